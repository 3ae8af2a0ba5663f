"""What the learning experiments share (:mod:`experiments.finetune_cpu`,
:mod:`experiments.no_gradient`): their common command-line options and output places, the
learning-rate sweep, the check of each run's count, runs in worker processes, and JSON without NaN."""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os

import torch
from tqdm.auto import tqdm

from experiments.finetune_report import auc


def parser(description: str, quick_out: str) -> argparse.ArgumentParser:
    """A parser with the options every learning experiment takes; ``quick_out``: where
    ``--quick`` writes (under runs/)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny model and budget: a smoke test (writes to runs/)")
    p.add_argument("--out", help=f"where figures and tables go (default: docs/results; with --quick, runs/{quick_out})")
    p.add_argument("--cache", help="weights cache directory (default: experiments/cache, which holds the "
                                   "committed weights; with --quick, runs/cache)")
    p.add_argument("--budget", type=int, help="override the compute budget (denoiser evaluations per run)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    p.add_argument("--methods", nargs="+", help="override the methods")
    p.add_argument("--lrs", type=float, nargs="+", help="override the learning rates swept (one value: no sweep)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, one thread each)")
    return p


def places(args: argparse.Namespace, quick_out: str) -> tuple[str, str]:
    """(output folder, weights cache) of parsed ``args``: docs/results and experiments/cache,
    or with ``--quick`` runs/<quick_out> and runs/cache, unless given."""
    out = args.out or (os.path.join("runs", quick_out) if args.quick else os.path.join("docs", "results"))
    cache = args.cache or (os.path.join("runs", "cache") if args.quick else os.path.join("experiments", "cache"))
    return out, cache


def overrides(args: argparse.Namespace, **more) -> dict:
    """The configuration fields that the common options (and ``more``) set."""
    given = dict(budget=args.budget, seeds=tuple(args.seeds or ()) or None, methods=tuple(args.methods or ()) or None,
                 lrs=tuple(args.lrs or ()) or None, **more)
    return {k: v for k, v in given.items() if v is not None}


def sweep(run_all, cfg) -> tuple[list, dict, dict]:
    """Every method over ``cfg.lrs`` on the sweep seed, extended a factor 3 at a time past the
    edge holding the best rate (by :func:`~experiments.finetune_report.auc`), at most ``cfg.lr_extend`` times.
    Returns the runs, the chosen rate and where it lies (``interior`` or the edge it stayed at;
    a method whose rates all score alike is not extended). One rate: no sweep."""
    if len(cfg.lrs) == 1:
        return [], {m: cfg.lrs[0] for m in cfg.methods}, {m: "not swept" for m in cfg.methods}
    runs = run_all([(m, cfg.sweep_seed, lr) for m in cfg.methods for lr in cfg.lrs], "learning-rate sweep")
    for round_ in range(cfg.lr_extend + 1):
        chosen, where, todo = {}, {}, []
        for m in cfg.methods:
            score = {r["lr"]: auc(r) for r in runs if r["method"] == m}
            tried = sorted(score)
            chosen[m] = max(tried, key=lambda lr: score[lr])
            where[m] = ("interior" if tried[0] < chosen[m] < tried[-1] else
                        "top edge" if chosen[m] == tried[-1] else "bottom edge")
            if where[m] != "interior" and len(tried) > 1 and len(set(score.values())) > 1:
                todo.append((m, cfg.sweep_seed, next_rate(chosen[m], +1 if where[m] == "top edge" else -1)))
        if not todo or round_ == cfg.lr_extend:
            return runs, chosen, where
        runs += run_all(todo, f"sweep extension {round_ + 1}")
    return runs, chosen, where


def next_rate(lr: float, direction: int) -> float:
    """The next rate up (+1) or down (-1) on the grid 1, 3, 10, 30, ... x 10^k (10^(k/2) to
    one digit: neighbours differ by a factor of 3 or 3.3)."""
    k = round(2 * math.log10(lr)) + direction
    return float(f"{10 ** (k / 2):.0e}")



def finite(v):
    """``v`` with every NaN (an interval of one seed) as None: JSON has no NaN."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


def check_count(sampler, records: list, seed: int, cost) -> None:
    """Each training record's metered evaluations equal ``cost(plan)``, the exact cost of the plan
    it drew: the loop's plan generator (seeded by ``seed``) and the sampler's state, replayed."""
    g, state = torch.Generator().manual_seed(seed), sampler.init()
    for rec in records:
        plan = sampler.sample(state, g)
        want = cost(plan)
        got = {"forward": rec["evaluations_forward"], "backward": rec["evaluations_backward"]}
        if str(plan) != rec["plan"] or got != want:
            raise RuntimeError(f"step {rec['step']}: metered {got} for plan {rec['plan']}, exact {want} for {plan}")
        if not rec.get("skipped"):       # the loop moves the sampler's state on steps it applied
            state = sampler.update(state, plan, None)


_WORKER: dict = {}


def _start_worker(build, args: tuple) -> None:
    torch.set_num_threads(1)
    _WORKER["state"] = build(*args)


def _in_worker(work, job):
    return work(_WORKER["state"], *job)


@contextlib.contextmanager
def runner(state, work, jobs: int, build, args: tuple):
    """``run_all(todo, desc) -> results``: ``work(state, *job)`` for each job, in this process, or
    in ``jobs`` worker processes (one torch thread each) whose state is ``build(*args)``.
    ``work`` and ``build`` are module-level functions, so that worker processes can import them."""
    pool = None
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(jobs, mp.get_context("spawn"), _start_worker, (build, args))

    def run_all(todo, desc):
        with tqdm(total=len(todo), desc=desc) as bar:
            results = []
            for r in (pool.map(functools.partial(_in_worker, work), todo) if pool else
                      (work(state, *job) for job in todo)):
                results.append(r)
                bar.update()
        return results

    try:
        yield run_all
    finally:
        if pool is not None:
            pool.shutdown()

"""Learning from a reward with no gradient at equal counted compute: the field's GRPO recipes
against the paper's zeroth-order and half-order parts, on a small prompt-conditioned
flow-matching model.

The model is the library's SD3 family at toy size in pixel space, pretrained here on
coloured shapes with "<colour> <shape>" prompts (:mod:`experiments.shapes.prompted`). It is
sampled by the library's flow solver with Flow-GRPO's SDE noise (or CPS where a recipe asks
for it) and fine-tuned through a LoRA adapter by the library's task and training loop. Two
rewards have no gradient (``differentiable = False``):

* ``prompt``: 1 when a fixed classifier finds the prompt's shape and colour, else 0 (GenEval's
  kind; :mod:`experiments.shapes.prompt_rewards`);
* ``jpeg``: DDPO's JPEG compressibility, -kB at quality 95 (the library's ``jpeg_compressibility``).

Every method spends the same budget of denoiser evaluations per run, counted by the
library's meter, and each run's count is checked against its plans' exact cost. Methods:
REINFORCE with per-prompt leave-one-out; the Flow-GRPO recipe (every step but the last,
GRPO's advantage with the batch's std, PPO's clip with 2 updates per rollout, KL beta
swept); DanceGRPO's random step fraction, MixGRPO's window and Flow-GRPO-Fast's few CPS
steps, each unweighted (the field's) and weighted by 1 / P(step trained); zeroth order,
unpaired and paired; and RLR's parts that need no reward gradient (an HO block and ZO
steps, step 1 by ZO). The group size is the one ``halforder diagnose`` advises for the
Flow-GRPO recipe at the start (:func:`advised_group`). Learning rates are swept until
interior, as in :mod:`experiments.finetune_cpu`; evaluations use deterministic sampling from
fixed noise, on the training prompts and on held-out pairs of shape and colour.

Run (from the repository root):

    python experiments/no_gradient.py --jobs 2     # full run, writes docs/results/no_gradient_*
    python experiments/no_gradient.py --quick      # smoke test, writes runs/no-gradient-quick
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time


if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import require_extras  # noqa: E402

if __name__ == "__main__":   # at once, before the imports below need them
    require_extras("plots", "diffusion")

from experiments import no_gradient_report as report  # noqa: E402
from experiments import learning_runs as runs  # noqa: E402
from experiments.no_gradient_world import (METHODS, ExperimentConfig, Method, World, build_world,  # noqa: E402
                                           evaluate, grid, methods)
from experiments.shapes.classifier import ClassifierConfig  # noqa: E402
from experiments.shapes.prompted import FlowPretrainConfig  # noqa: E402
from halforder.estimators import expected_evaluations  # noqa: E402
from halforder.estimators.clipped_ratio import surrogate_evaluations  # noqa: E402
from halforder.training import Hooks, LoopConfig, make_accelerator, train  # noqa: E402
from halforder.training.files import write_json  # noqa: E402

QUICK = ExperimentConfig(pretrain=FlowPretrainConfig(layers=1, heads=2, steps=30, batch=16),
                         classifier=ClassifierConfig(steps=30, batch=32),
                         check_classifier=ClassifierConfig(steps=30, batch=32, seed=1),
                         T=4, budget=600, jpeg_budget=600, lrs=(3e-3, 1e-2), lr_extend=1, seeds=(0, 1), n_eval=2, n_points=2,
                         diagnose_budget=1500, kl_betas=(0.04,),
                         methods=("reinforce_loo", "flow_grpo_kl0.04", "dance_weighted", "fast", "zo_paired",
                                  "rlr_no_fo"), jpeg_methods=("zo_paired",))


# ----------------------------------------------------------------------------- one run
def run(world: World, reward: str, name: str, seed: int, lr: float) -> dict:
    """Fine-tune from the start with method ``name`` on ``reward`` at rate ``lr`` until the
    budget is spent, through the library's training loop; the compute comes from the loop's
    records (the library's meter), checked against the plans' exact cost."""
    cfg = world.cfg
    method = methods(cfg, world.group)[name]
    task = world.task(reward, method)
    first, _ = world.start
    curve, plans = [{"compute": 0, "seconds": 0.0, **first}], []
    budget = cfg.budget if reward == "prompt" else cfg.jpeg_budget
    marks = [budget * (i + 1) / cfg.n_points for i in range(cfg.n_points)]
    eval_seconds = 0.0
    last = {}

    def on_step(rec, est):
        nonlocal eval_seconds
        plans.append(rec)
        while marks and rec["evaluations"] >= marks[0]:
            marks.pop(0)
            t0 = time.perf_counter()
            point, last["images"] = evaluate(world, task)
            curve.append({"compute": rec["evaluations"], "seconds": rec["elapsed_s"] - eval_seconds,
                          "ratio_mean": rec.get("ratio_mean"), "clip_fraction": rec.get("clip_fraction"), **point})
            eval_seconds += time.perf_counter() - t0

    loop = LoopConfig(steps=10 ** 9, lr=lr, batch_size=cfg.batch, grad_accum=1, clip_norm=1.0,
                      baseline=method.baseline, group_size=method.group, global_std=method.global_std,
                      clip_range=method.clip_range, updates_per_rollout=method.updates, kl_beta=method.kl_beta,
                      pairing=method.pairing, seed=seed, output_dir=None, eval_every=0, progress=False)
    hooks = Hooks(on_step=on_step, stop=lambda rec: rec["evaluations"] >= budget)
    result = train(task, method.sampler, world.train_prompts, loop, accelerator=make_accelerator(cpu=True),
                   hooks=hooks)
    check_count(method, plans, cfg.batch, seed)
    for p in curve:   # the trained reward on the training prompts, under the name the sweep reads
        p["reward"] = p[f"{reward}/train"]
    return {"reward_name": reward, "method": name, "seed": seed, "lr": lr, "curve": curve, "steps": result.step,
            "updates": sum(r.get("updates", 1) for r in result.metrics),
            "forward": sum(r["evaluations_forward"] for r in result.metrics),
            "backward": sum(r["evaluations_backward"] for r in result.metrics),
            "seconds": result.metrics[-1]["elapsed_s"] - eval_seconds, "plans": [r["plan"] for r in plans[:4]],
            "diverged": any(r["skipped"] for r in result.metrics),
            "final_samples": grid(world, last["images"]).tolist() if seed == cfg.seeds[0] else None}


def exact_cost(method: Method, plan, batch: int) -> dict[str, int]:
    """The evaluations one loop step of ``method`` costs on ``plan``: the engine's estimate, or a
    recorded rollout feeding ``method.updates`` clipped-surrogate passes."""
    if method.clipped:
        return surrogate_evaluations(plan, batch, updates=method.updates, kl=method.kl_beta > 0)
    return expected_evaluations(plan, batch)


def check_count(method: Method, records: list, batch: int, seed: int) -> None:
    """Each step's metered evaluations equal the exact cost of the plan it drew
    (:func:`experiments.learning_runs.check_count` with :func:`exact_cost`)."""
    runs.check_count(method.sampler, records, seed, lambda plan: exact_cost(method, plan, batch))


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = runs.parser(__doc__.split("\n")[0], "no-gradient-quick")
    p.add_argument("--rewards", nargs="+", choices=("prompt", "jpeg"), help="override the rewards")
    args = p.parse_args(argv)
    out, cache = runs.places(args, "no-gradient-quick")
    cfg = dataclasses.replace(QUICK if args.quick else ExperimentConfig(),
                              **runs.overrides(args, rewards=tuple(args.rewards or ()) or None))
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    if min(cfg.budget, cfg.jpeg_budget) < 1 or any(not lr > 0 for lr in cfg.lrs) or not cfg.seeds:
        p.error("the budget and the learning rates must be positive, and one seed at least is needed")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    world = build_world(cfg, cache)
    cfg = world.cfg
    summary = {"config": dataclasses.asdict(cfg), "advice": world.advice, "group": world.group,
               "reference": world.reference, "jobs": args.jobs}
    all_runs, all_sweeps, chosen, where = [], [], {}, {}
    with runs.runner(world, run, args.jobs, build_world, (cfg, cache)) as run_all:
        for reward in cfg.rewards:
            names = cfg.methods if reward == "prompt" else tuple(m for m in cfg.methods if m in cfg.jpeg_methods)
            sub = dataclasses.replace(cfg, methods=names)
            jobs = (lambda todo, desc, reward=reward: run_all([(reward, *job) for job in todo], f"{reward}: {desc}"))
            swept, chosen[reward], where[reward] = runs.sweep(jobs, sub)
            all_sweeps += swept
            all_runs += jobs([(m, seed, chosen[reward][m]) for m in names for seed in cfg.seeds], "runs")
    summary.update(chosen_lr=chosen, lr_position=where, wall_seconds=time.perf_counter() - t0,
                   sweep=[{k: v for k, v in r.items() if k != "final_samples"} for r in all_sweeps],
                   runs=[{k: v for k, v in r.items() if k != "final_samples"} for r in all_runs])
    summary["table"] = report.write_all(world, all_runs, all_sweeps, chosen, where, out, args.jobs)
    write_json(os.path.join(out, "no_gradient_results.json"), runs.finite(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

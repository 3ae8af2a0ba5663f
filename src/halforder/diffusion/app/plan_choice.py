"""The plan search for a fine-tuning run: ``halforder plan`` and ``--estimator auto``
(docs/plan-search.md).

:func:`choose` runs :func:`halforder.planning.search.measure` on the run's own chain
(its model, LoRA adapter, reward, T, batch size, noise recipe and baseline) and returns
the top-ranked plan as a :class:`~halforder.estimators.samplers.FixedPlan`, so the
training loop still does not know which estimator it runs. A run checkpoints all of its
gradient steps or none (``gradient_checkpointing``), and its pairing is the loop's, so the
candidates offered are those a run can take: pairing "param" for plans with ZO steps
(the loop's "auto"; "none" with ``--pairing none``), checkpointing all or nothing.

    halforder plan --preset tiny --memory 2GiB [--time 1s]
    halforder train --preset tiny --estimator auto --memory-budget 2GiB

A run writes its choice to ``plan.json`` in its output directory (:func:`save_choice`);
resuming it reads the plan from there (:func:`resume_choice`) instead of searching again,
since a search that depends on measured times could choose another plan.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from ...estimators.baselines import named_baseline
from ...estimators.compute import ComputeMeter, expected_evaluations
from ...estimators.plan import Plan, Role
from ...estimators.samplers import FixedPlan
from ...planning.cost import SearchCost
from ...planning.search import SearchResult, measure
from ...planning.space import Space
from ...planning.units import parse_bytes, parse_seconds
from ...training.files import write_json

PLAN_FILE = "plan.json"


SEARCH_EVALUATIONS = 1000
SEARCH_SHARE = 0.02


def evaluation_budget(cfg) -> float:
    """The chain evaluations the search may spend on HO pilots: :data:`SEARCH_EVALUATIONS`, or
    :data:`SEARCH_SHARE` of the run's (steps x batch x accumulation) if that is more."""
    return max(SEARCH_EVALUATIONS, SEARCH_SHARE * cfg.steps * cfg.batch_size * cfg.grad_accum)


def space_for(cfg) -> Space:
    """The candidates a run with ``cfg`` can take (module docstring): its pairing, and every
    gradient step checkpointed or none (all, with ``gradient_checkpointing``), compared only
    where checkpointing can matter (:func:`~halforder.planning.space.checkpointable`: an FO
    prefix of one step or HO blocks of one step are the same either way)."""
    if cfg.pairing not in ("auto", "param", "none"):
        raise ValueError(f"estimator auto searches pairings auto, param or none; got pairing {cfg.pairing!r}")
    return Space(pairings=("none",) if cfg.pairing == "none" else ("param",),
                 checkpoint="all" if cfg.gradient_checkpointing else "all-or-none")


def choose(cfg, task, prompts, *, progress: bool = False):
    """Search for ``cfg``'s run on ``task`` (memory budget ``cfg.memory_budget``, time budget
    ``cfg.time_budget``); returns ``(task, sampler, result)``: the task with the chosen
    checkpointing, a :class:`FixedPlan` of the top-ranked plan, and the search result.
    The timing probes and pilots stay within the memory budget (``probe_memory``).
    ``ValueError`` if no candidate fits, or (one line) if the device runs out of memory."""
    base = task.base_chain(list(prompts)[:1])

    def chain_for(plan):
        return base.for_plan(plan, task.noise_scales)

    params = {k: v.detach() for k, v in task.params.items()}
    budget = parse_bytes(cfg.memory_budget)
    seconds = parse_seconds(cfg.time_budget) if cfg.time_budget else None
    t0 = time.perf_counter()
    try:
        with ComputeMeter() as meter:
            measured = measure(base, params, generator=torch.Generator(device=base.device).manual_seed(cfg.seed),
                               n=cfg.batch_size, space=space_for(cfg), chain_for=chain_for,
                               pilot_samples=cfg.plan_pilots, baseline=named_baseline(cfg.baseline),
                               probe_memory=budget, budgets=[(budget, seconds)],
                               max_evaluations=evaluation_budget(cfg), progress=progress)
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        raise ValueError("the device ran out of memory during the plan search (it measures one step graph and "
                         f"the reward's graph at batch size {cfg.batch_size}, and keeps probes and pilots within the "
                         f"memory budget {cfg.memory_budget}): give a smaller memory budget or batch size") from None
    result = measured.choose(budget, seconds)
    best = result.best.candidate
    task, sampler = _apply(task, Plan(best.plan.roles, best.plan.blocks, f"auto: {best.name}"),
                           bool(best.checkpoint) or cfg.gradient_checkpointing)
    run = expected_evaluations(sampler.plan, cfg.batch_size, checkpointed=task.gradient_checkpointing)
    cost = SearchCost(meter.forward, meter.backward, time.perf_counter() - t0,
                      cfg.steps * cfg.grad_accum * (run["forward"] + run["backward"]), cfg.T, evaluation_budget(cfg),
                      SEARCH_EVALUATIONS)
    return task, sampler, dataclasses.replace(result, cost=cost)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or any(
        m in str(e) for m in ("out of memory", "not enough memory"))


def _apply(task, plan: Plan, checkpointing: bool):
    return dataclasses.replace(task, gradient_checkpointing=checkpointing), FixedPlan(plan)


def save_choice(out: str, task, sampler: FixedPlan) -> None:
    """Write the chosen plan and checkpointing to ``out``/:data:`PLAN_FILE` (atomically),
    so that a resumed run trains the same plan without searching again."""
    plan = sampler.plan
    write_json(os.path.join(out, PLAN_FILE), {"name": plan.name, "roles": [r.value for r in plan.roles],
                                              "blocks": [list(b) for b in plan.blocks],
                                              "gradient_checkpointing": bool(task.gradient_checkpointing)})


def resume_choice(task, checkpoint_path: str, gradient_checkpointing: bool = False):
    """The plan and checkpointing an estimator-auto run chose, read from its output
    directory (the checkpoint's ``../..``); returns ``(task, sampler)``. ``ValueError`` if
    the run has no readable :data:`PLAN_FILE` (a new search could choose another plan)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path))), PLAN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        plan = Plan(tuple(Role(r) for r in d["roles"]), tuple(tuple(b) for b in d["blocks"]), d["name"])
        on = bool(d["gradient_checkpointing"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot resume an estimator-auto run without the plan it chose: {path!r} is missing or "
                         f"unreadable ({e})") from None
    return _apply(task, plan, on or gradient_checkpointing)


def report(result: SearchResult, top: int = 20) -> str:
    """The ranked table, the reason for the choice and what the search cost, as ``halforder
    plan`` prints it."""
    text = f"{result.table(top)}\n\nchosen: {result.best.candidate.name}: {result.why()}"
    return text + (f"\n{result.cost.line()}" if result.cost is not None else "")

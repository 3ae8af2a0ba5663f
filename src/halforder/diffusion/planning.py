"""The plan search for a fine-tuning run: ``halforder plan`` and ``--estimator auto``
(docs/plan-search.md).

:func:`choose` runs :func:`halforder.estimators.search.measure` on the run's own chain
(its model, LoRA adapter, reward, T, batch size, noise recipe and baseline) and returns
the top-ranked plan as a :class:`~halforder.estimators.samplers.FixedPlan`, so the
training loop still does not know which estimator it runs. A run checkpoints all of its
gradient steps or none (``gradient_checkpointing``), and its pairing is the loop's, so the
candidates offered are those a run can take: pairing "param" for plans with ZO steps
(the loop's "auto"; "none" with ``--pairing none``), checkpointing all or nothing.

    halforder plan --preset tiny --memory 2GiB [--time 1s]
    halforder train --preset tiny --estimator auto --memory-budget 2GiB
"""
from __future__ import annotations

import dataclasses

import torch

from ..estimators.plan import Plan
from ..estimators.samplers import FixedPlan
from ..estimators.search import (Measured, SearchResult, Space, checkpointable, measure, parse_bytes,
                                 parse_seconds)


def space_for(cfg) -> Space:
    """The candidates a run with ``cfg`` can take (module docstring)."""
    if cfg.pairing not in ("auto", "param", "none"):
        raise ValueError(f"estimator auto searches pairings auto, param or none; got pairing {cfg.pairing!r}")
    return Space(pairings=("none",) if cfg.pairing == "none" else ("param",))


def runnable(measured: Measured, checkpointing: bool) -> Measured:
    """Only the candidates that checkpoint all their gradient steps or none (all, if
    ``checkpointing``): what ``Checkpointed(chain)`` of a run gives. Only the roles where
    checkpointing can matter are compared (:func:`~halforder.estimators.search.checkpointable`:
    an FO prefix of one step or HO blocks of one step are the same either way)."""
    def ok(s):
        plan = s.candidate.plan
        can = set(checkpointable(plan.fo_steps, plan.blocks))
        return set(s.candidate.checkpoint) == (can if checkpointing or s.candidate.checkpoint else set())
    return dataclasses.replace(measured, scored=tuple(s for s in measured.scored if ok(s)))


def choose(cfg, task, prompts, *, progress: bool = False):
    """Search for ``cfg``'s run on ``task`` (memory budget ``cfg.memory_budget``, time budget
    ``cfg.time_budget``); returns ``(task, sampler, result)``: the task with the chosen
    checkpointing, a :class:`FixedPlan` of the top-ranked plan, and the search result.
    ``ValueError`` if no candidate fits."""
    base = task.base_chain(list(prompts)[:1])

    def chain_for(plan):
        return base.for_plan(plan, eta=task.eta, ho_eta=task.eta_plan, zo_sigma=task.zo_sigma)

    params = {k: v.detach() for k, v in task.params.items()}
    measured = measure(base, params, generator=torch.Generator(device=base.device).manual_seed(cfg.seed),
                       n=cfg.batch_size, space=space_for(cfg), chain_for=chain_for, pilot_samples=cfg.plan_pilots,
                       baseline=None if cfg.baseline == "none" else cfg.baseline, progress=progress)
    result = runnable(measured, cfg.gradient_checkpointing).choose(
        parse_bytes(cfg.memory_budget), parse_seconds(cfg.time_budget) if cfg.time_budget else None)
    best = result.best.candidate
    plan = Plan(best.plan.roles, best.plan.blocks, f"auto: {best.name}")
    task = dataclasses.replace(task, gradient_checkpointing=bool(best.checkpoint) or cfg.gradient_checkpointing)
    return task, FixedPlan(plan), result


def report(result: SearchResult, top: int = 20) -> str:
    """The ranked table and the reason for the choice, as ``halforder plan`` prints it."""
    return f"{result.table(top)}\n\nchosen: {result.best.candidate.name}: {result.why()}"

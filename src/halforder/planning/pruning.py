"""Which HO parts to pilot: branch and bound, with successive halving, under an evaluation
budget (docs/plan-search.md, "What the search spends").

The HO parts are the search's dear pilots: one per block layout and group size, each a
rollout and a block backward per row, where one shared pilot gives every FO and ZO part
(:mod:`.shared_pilot`). A candidate's variance is G (V_FO + V_HO + V_ZO) with every part
>= 0, so G (V_FO + V_ZO) x its time is a lower bound on its score before its HO part is
measured. The layouts are piloted in the order of their candidates' least bound:

* a layout whose least bound is at or above the best score so far (``U``, from the
  candidates already complete) cannot hold the best candidate (pruned: ``"bound"``);
  with several budgets (memory, and time per estimate), U and the bounds are per budget,
  over the candidates that fit it, and a layout is pruned only where it is for every one;
* otherwise it is piloted in stages: first two batches (two rows of batch means with a
  leave-one-out baseline), then four times as many rows in all at each stage, up to the
  full pilot. For a Gaussian sample variance with B - 1 degrees of freedom,
  (B - 1) estimate / V is chi-square, so V lies above (B - 1) / chi2_{B-1}(1 - alpha) x
  the estimate with probability 1 - alpha. The rule uses the smaller factor
  q = chi2_{B-1}(alpha) / (B - 1) (0.00016 at one degree of freedom, 0.35 at 15, where the
  99% bound is 0.15 and 0.49): if even q x the estimate lifts every candidate of the
  layout to U or above, it stops there (pruned: ``"halving"``). It errs towards keeping a
  layout: q is below the 1 - alpha bound, a trace over P dimensions has more degrees of
  freedom than B - 1, and the right-skewed sample variance of heavy-tailed rows reads
  low more often than high. After the full pilot its candidates are scored and U is
  updated;
* a stage that would take the search past ``max_evaluations`` chain evaluations (forward
  model evaluations / T, counted by the compute meter) is not run (``"budget"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

import torch
from scipy.stats import chi2

from ..estimators.compute import ComputeMeter
from .part_variances import trace_variance

Key = Hashable  # a layout: the search's are :class:`~.part_variances.HOKey`


@dataclass(frozen=True)
class Bound:
    """One candidate that needs a layout, under one budget: its score is
    ``base + scale * V_HO`` (base = G (V_FO + V_ZO) x time, scale = G x time), and
    ``budget`` indexes the budgets' best scores."""

    base: float
    scale: float
    budget: int


def halving_factor(rows: int, alpha: float) -> float:
    """q = chi2_{rows-1}(alpha) / (rows - 1), below the 1 - alpha lower confidence factor
    (rows - 1) / chi2_{rows-1}(1 - alpha) of a Gaussian sample variance of ``rows`` rows
    (module docstring)."""
    return float(chi2.ppf(alpha, rows - 1) / (rows - 1))


def pilot_ho_parts(bounds: Mapping[Key, Sequence[Bound]], best: list[float],
                   draw: Callable[[Key, int], torch.Tensor], cost: Callable[[Key, int], float], rows: int, *,
                   meter: ComputeMeter, T: int, max_evaluations: float | None, first: int = 2, alpha: float = 0.01,
                   prune: bool = True) -> tuple[dict[Key, float], dict[Key, str]]:
    """Pilot the HO parts by branch and bound (module docstring), for one or more budgets.

    Args:
      bounds: per layout, one :class:`Bound` per candidate that needs it and budget it
        fits (its ``budget`` indexes ``best``).
      best: per budget, the best score among the candidates without HO blocks that fit it
        (inf if none); a layout is pruned only where it is pruned for every budget.
      draw: ``draw(key, samples)``: the pilot rows (:func:`~.part_variances.pilot_rows`) of that
        many new samples of the layout (rows of batch means with a leave-one-out baseline).
      cost: ``cost(key, samples)``: their chain evaluations (forward model evaluations / T).
      rows: pilot samples per layout in all.
      first: the samples of the first stage; each later stage has four times as many in
        all, up to ``rows``.
      meter: the open meter of the search; T: the chain's steps.
      max_evaluations: chain evaluations the search may spend in all (None: no limit).
      prune: False pilots every layout in full (the exhaustive search).

    Returns:
      ``(ho, skipped)``: V_HO per piloted layout, and the reason for each one not piloted.
    """
    best = list(best)

    def gap(key, v=0.0):     # the least ratio of a candidate's score (V_HO = v) to its budget's best
        return min((b.base + b.scale * v) / best[b.budget] if best[b.budget] > 0
                   else (0.0 if b.base + b.scale * v <= 0 else float("inf")) for b in bounds[key])

    order = sorted(bounds, key=gap)
    ho, skipped = {}, {}

    def affordable(key, n):
        return max_evaluations is None or meter.forward / T + cost(key, n) <= max_evaluations

    for key in order:
        if prune and gap(key) >= 1:
            skipped[key] = "bound"
            continue
        drawn, taken, target = None, 0, min(first, rows) if prune else rows
        while True:
            more = target - taken
            if not affordable(key, more):
                skipped[key] = "budget"
                break
            new = draw(key, more)
            drawn, taken = (new if drawn is None else torch.cat([drawn, new])), target
            if taken >= rows:
                ho[key] = trace_variance(drawn)
                for b in bounds[key]:
                    best[b.budget] = min(best[b.budget], b.base + b.scale * ho[key])
                break
            if gap(key, halving_factor(drawn.shape[0], alpha) * trace_variance(drawn)) >= 1:
                skipped[key] = "halving"
                break
            target = min(rows, 4 * target)
    return ho, skipped

"""Choose the estimator: a search over plans, pairing and checkpointing under a memory and
a time budget, from costs and variances measured on the user's chain (docs/plan-search.md).

    result = search(chain, params, memory_budget=2 * 2**30, n=4, generator=g)
    result.best.candidate.plan, result.best.candidate.pairing, result.table()

The candidates are :mod:`.space`'s. Each gets its activation memory from
:mod:`.memory_model`, its time per estimate from :mod:`.time_model` and its variance per
chain evaluation from the model of :mod:`.part_variances`, whose FO and ZO parts come from
one shared pilot (:mod:`.shared_pilot`) and whose HO parts are piloted by branch and
bound (:mod:`.pruning`); the feasible ones are ranked by variance x time, the variance of
the estimate that one second of compute buys (lower is better). :func:`measure` is the
composition of :mod:`.stages`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..estimators.compute import ComputeMeter
from ..estimators.plan import ChainFor
from .cost import SearchCost
from .memory_model import MemoryCosts
from .part_variances import PartVariances
from .space import Space
from .stages import Scored, SearchSettings, Spent, candidates, costs, pilot_fo_zo, prune_ho, score, score_all
from .time_model import TimeModel
from .units import format_bytes

__all__ = ["Measured", "Scored", "SearchResult", "measure", "rank", "score", "search"]


@dataclass(frozen=True)
class SearchResult:
    """The candidates that fit the budgets, best first (``ranked``), and those that do not
    (``rejected``, with the reason), with the measurements they come from."""

    ranked: tuple[Scored, ...]
    rejected: tuple[tuple[Scored, str], ...]
    memory_budget: float
    time_budget: float | None
    memory: MemoryCosts | None = field(default=None, repr=False)
    timing: TimeModel | None = field(default=None, repr=False)
    parts: PartVariances | None = field(default=None, repr=False)
    cost: SearchCost | None = None
    measured: Measured | None = field(default=None, repr=False)

    @property
    def best(self) -> Scored:
        """The top-ranked candidate (``ValueError`` naming the smallest need if none fits, or if
        none of those that fit was piloted)."""
        if self.ranked and self.ranked[0].note:
            raise ValueError(f"no candidate within the budgets was piloted ({self.ranked[0].note}): give the search "
                             "more evaluations or a smaller space")
        if not self.ranked:
            need = min((s.memory for s, _ in self.rejected), default=None)
            raise ValueError(f"no candidate fits the memory budget {format_bytes(self.memory_budget)}"
                             + (f" and the time budget {self.time_budget:g} s" if self.time_budget else "")
                             + (f"; the smallest needs {format_bytes(need)}" if need is not None else ""))
        return self.ranked[0]

    def why(self) -> str:
        """One line: why the best candidate was chosen."""
        b = self.best
        others = len(self.ranked) - 1
        runner = (f"; next {self.ranked[1].candidate.name} at {_ratio(self.ranked[1].score, b.score):.2f}x"
                  if others and not self.ranked[1].note else "")
        unpiloted = sum(1 for s in self.ranked if s.note)
        return (f"lowest variance x time among {len(self.ranked)} candidates within memory "
                f"{format_bytes(self.memory_budget)}" + (f" and time {self.time_budget:g} s" if self.time_budget else "")
                + f" ({len(self.rejected)} over budget" + (f", {unpiloted} not piloted" if unpiloted else "")
                + f"){runner}")

    def table(self, top: int = 20) -> str:
        """The ranked candidates as a plain-text table."""
        head = f"{'rank':>4}  {'candidate':<34} {'memory':>10} {'s/estimate':>11} {'variance':>11} " \
               f"{'var x time':>11} {'vs best':>8}  unbiased"
        rows = [head, "-" * len(head)]
        best = self.ranked[0].score if self.ranked else 1.0
        for i, s in enumerate(self.ranked[:top], 1):
            cols = (f"{s.variance:>11.4g} {s.score:>11.4g} {_ratio(s.score, best):>7.3g}x" if not s.note
                    else f"{'not piloted: ' + s.note:>32}")
            rows.append(f"{i:>4}  {s.candidate.name:<34} {format_bytes(s.memory):>10} {s.time:>11.4g} {cols}  "
                        f"{'yes' if s.unbiased else 'NO'}")
        return "\n".join(rows)


def _ratio(score: float, best: float) -> float:
    """``score`` / ``best`` (1 where both are 0: a plan whose pilots all gave one gradient)."""
    return score / best if best > 0 else 1.0 if score <= best else float("inf")


def rank(scored: Sequence[Scored], memory_budget: float, time_budget: float | None = None,
         biased: bool = False) -> tuple[tuple[Scored, ...], tuple[tuple[Scored, str], ...]]:
    """Split ``scored`` into those within the budgets, ranked by variance x time (then
    memory), and the rest with the reason. Biased candidates are dropped unless ``biased``."""
    ok, rejected = [], []
    for s in scored:
        if not (biased or s.unbiased):
            continue
        if s.memory > memory_budget:
            rejected.append((s, "memory"))
        elif time_budget is not None and s.time > time_budget:
            rejected.append((s, "time"))
        else:
            ok.append(s)
    ok.sort(key=lambda s: (s.score, s.memory, s.candidate.name))
    return tuple(ok), tuple(rejected)


@dataclass(frozen=True)
class Measured:
    """Every candidate of a space scored on one chain, with the measurements behind the
    scores; :meth:`choose` ranks them under budgets (measure once, choose for many).
    ``budgets``: where HO parts were pruned, the budgets the pruning kept the best for
    (:func:`measure`); None where every part was piloted. ``spent``: the model evaluations
    (forward, backward) of each stage of the search, counted by the compute meter
    (:class:`~.stages.Spent`)."""

    scored: tuple[Scored, ...]
    memory: MemoryCosts
    timing: TimeModel
    parts: PartVariances = field(repr=False)
    biased: bool = False
    budgets: tuple[tuple[float, float | None], ...] | None = None
    spent: Spent | None = None

    def choose(self, memory_budget: float, time_budget: float | None = None) -> SearchResult:
        """The candidates within ``memory_budget`` (bytes) and ``time_budget`` (seconds per
        estimate, or None), best first. ``ValueError`` if parts were pruned for other budgets."""
        if self.budgets is not None and (memory_budget, time_budget) not in self.budgets:
            raise ValueError(f"this search pruned for the budgets {self.budgets}, not ({memory_budget}, "
                             f"{time_budget}): measure with budgets=... that include it")
        ranked, rejected = rank(self.scored, memory_budget, time_budget, self.biased)
        return SearchResult(ranked, rejected, memory_budget, time_budget, self.memory, self.timing, self.parts,
                            measured=self)


def measure(chain, params, *, generator: torch.Generator, n: int = 4, space: Space = Space(),
            chain_for: ChainFor | None = None, pilot_samples: int = 256, baseline=None, repeats: int = 5,
            probe_memory: float | None = None, progress: bool = False, shared: bool = True, prune: bool = True,
            max_evaluations: float | None = None,
            budgets: Sequence[tuple[float, float | None]] | None = None) -> Measured:
    """Measure ``chain``'s costs and part variances and score every candidate of ``space``.

    Args:
      chain, params: the chain and its parameters; ``chain_for(plan)`` gives the chain of a
        plan whose noise scales depend on it (a diffusion chain's ``for_plan``).
      generator: start states and noise of the measurements and pilots.
      n: samples per estimate (the batch size; pairs count as two: paired candidates are
        offered only for even n). Pilots with a leave-one-out baseline are drawn in
        batches of n, as training draws them.
      space: the candidates (its ``biased`` also admits biased plans to the ranking).
      pilot_samples: pilot rows per part (module :mod:`.part_variances`).
      baseline: the baseline the estimates will use (e.g. ``"loo"``).
      repeats: timing repeats (medians).
      probe_memory: the most memory (bytes) a timing probe or a pilot may take (None: no
        limit): probes over it are skipped, pilots run in batches of n and checkpointed
        where they would not fit otherwise, and candidates that do not fit even so are
        not piloted (variance inf). Give the memory budget where full backprop would
        not fit the device.
      shared: every FO and ZO part from one shared pilot of per-step gradients
        (:mod:`.shared_pilot`) where full backprop fits ``probe_memory`` (checkpointed if
        it must be); False, or where it does not fit: one pilot per part.
      prune: pilot the HO parts by branch and bound with successive halving
        (:mod:`.pruning`); False pilots every one in full.
      max_evaluations: the chain evaluations (forward model evaluations / T, counted by
        the compute meter) the HO pilots may take the search to (None: no limit).
      budgets: the (memory bytes, seconds per estimate or None) budgets the result will be
        chosen under (:meth:`Measured.choose`); pruning keeps what is best under each one.
        Default: ``probe_memory`` (or no limit) and no time budget.
    """
    settings = SearchSettings.of(chain, n=n, space=space, chain_for=chain_for, pilot_samples=pilot_samples,
                                 baseline=baseline, repeats=repeats, probe_memory=probe_memory, progress=progress,
                                 shared=shared, prune=prune, max_evaluations=max_evaluations, budgets=budgets)
    cands = candidates(chain, settings)
    with ComputeMeter() as meter:
        costed = costs(chain, params, settings, cands, generator)
        marks = [(meter.forward, meter.backward)]
        fo_zo = pilot_fo_zo(chain, params, settings, costed, generator)
        marks.append((meter.forward, meter.backward))
        ho = prune_ho(chain, params, settings, costed, fo_zo, generator, meter)
        marks.append((meter.forward, meter.backward))
    parts = replace(fo_zo, ho=ho.ho)
    return Measured(score_all(settings, cands, costed, parts, ho.skipped), costed.memory, costed.timing, parts,
                    space.biased, settings.budgets if ho.skipped else None, Spent.between(marks))


def search(chain, params, memory_budget: float, *, time_budget: float | None = None, **kwargs) -> SearchResult:
    """Rank the candidates on ``chain`` that fit ``memory_budget`` (bytes: what the meter
    measures plus the states and sums the engine holds) and ``time_budget`` (seconds per
    estimate of ``n`` samples, or None), best first. ``kwargs`` are :func:`measure`'s."""
    return measure(chain, params, budgets=[(memory_budget, time_budget)], **kwargs).choose(memory_budget, time_budget)

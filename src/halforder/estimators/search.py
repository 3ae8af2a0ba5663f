"""Choose the estimator: a search over plans, pairing and checkpointing under a memory and
a time budget, from costs and variances measured on the user's chain (docs/plan-search.md).

    result = search(chain, params, memory_budget=2 * 2**30, n=4, generator=g)
    result.best.candidate.plan, result.best.candidate.pairing, result.table()

A :class:`Candidate` is a plan (one role per step), a pairing of its samples and the set
of checkpointed steps. :class:`Space` enumerates them: an FO prefix 1..K for K in a grid,
at most one HO block (j, h) of each length h in a grid at a few positions after the
prefix with ZO on every other step (pairing "none" or "param"), or HO blocks of length h
tiling all the steps after the prefix (no ZO: REINFORCE for K = 0, h = 1), and
checkpointing of the FO prefix and of the HO blocks, each on or off where it can matter
(K >= 2, h >= 2). Biased
plans (steps dropped: truncated backprop, the same with an HO block) come in only with
``biased=True`` and are marked so.

Each candidate gets its activation memory from :mod:`~halforder.estimators.memory_model`,
its time per estimate from :mod:`~halforder.estimators.time_model` and its variance per
chain evaluation from
:mod:`~halforder.estimators.part_variances`; the feasible ones are ranked by variance x
time, the variance of the estimate that one second of compute buys (lower is better).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .compute import SearchCost
from .memory_model import MemoryCosts, measure_memory, predicted_memory
from .pairing import Pairing
from .part_variances import PartVariances, layout, measure_part_variances, predicted_variance
from .plan import ChainFor, Plan, Role
from .time_model import TimeModel, fit_time_model, plan_chain



@dataclass(frozen=True)
class Candidate:
    """A plan, the pairing of its samples (``"none"`` or ``"param"``) and the roles whose
    steps are checkpointed (a subset of ``("FO", "HO")``)."""

    plan: Plan
    pairing: str = "none"
    checkpoint: tuple[str, ...] = ()

    @property
    def checkpoint_steps(self) -> frozenset[int]:
        """The checkpointed steps."""
        return frozenset(t for r in self.checkpoint for t in self.plan.steps(r))

    @property
    def is_unbiased(self) -> bool:
        """Whether the plan drops no step (its estimate is unbiased)."""
        return self.plan.is_unbiased

    @property
    def name(self) -> str:
        """E.g. ``FO4+HO(10,2)+ZO[param] ckpt FO``, ``FO1+HO2-tiles(2..50)``."""
        p = self.plan
        parts = [f"FO{p.fo_steps}"] if p.fo_steps else []
        if len(p.blocks) > 1:   # a tiling: blocks of length h from the first start up to T
            parts.append(f"HO{p.blocks[0][1]}-tiles({p.blocks[0][0]}..{p.T})")
        else:
            parts += [f"HO({j},{h})" for j, h in p.blocks]
        if p.steps(Role.ZO):
            parts.append("ZO" + ("[param]" if self.pairing != "none" else ""))
        if p.steps(Role.NONE):
            parts.append(f"drop{len(p.steps(Role.NONE))}")
        return "+".join(parts) + (f" ckpt {'+'.join(self.checkpoint)}" if self.checkpoint else "")

    def chain(self, chain_for: ChainFor):
        """The chain this candidate runs on: the plan's chain, checkpointed where asked."""
        return plan_chain(chain_for, self.plan, self.checkpoint_steps)


def k_grid(T: int) -> tuple[int, ...]:
    """0, the powers of two below T, and T."""
    return tuple(sorted({0, T, *(2 ** i for i in range(int(np.log2(max(T, 1))) + 1) if 2 ** i < T)}))


@dataclass(frozen=True)
class Space:
    """The candidates searched (module docstring).

    Attributes:
      ks: FO prefix lengths (None: :func:`k_grid`).
      hs: HO block lengths (None: the powers of two below T).
      positions: starts of a single HO block of each length (:func:`block_starts`; those
        after the prefix are used); blocks of each length also tile K+1..T (:func:`tiling`).
      pairings: of the ZO steps.
      checkpoint: also offer the checkpointed variants.
      biased: also offer plans with dropped steps (marked biased).
    """

    ks: tuple[int, ...] | None = None
    hs: tuple[int, ...] | None = None
    positions: int = 3
    pairings: tuple[str, ...] = ("none", "param")
    checkpoint: bool = True
    biased: bool = False

    def __post_init__(self):
        if not set(self.pairings) <= {"none", "param"}:
            raise ValueError(f"the search offers pairings none and param (the variance model's), got {self.pairings}")

    def candidates(self, T: int) -> list[Candidate]:
        """Every candidate of the space for a chain of T steps (no duplicates)."""
        ks = k_grid(T) if self.ks is None else tuple(k for k in self.ks if 0 <= k <= T)
        hs = self.hs_for(T)
        out = {}
        for K in ks:
            layouts = [()] + [((j, h),) for h in hs for j in block_starts(T, h, self.positions) if j > K]
            layouts += [tiling(T, K, h) for h in hs if K < T]
            for blocks in layouts:
                can = checkpointable(K, blocks)
                cks = [c for c in ((), ("FO",), ("HO",), ("FO", "HO")) if self.checkpoint or not c]
                cks = [c for c in cks if set(c) <= set(can)]
                for fill in ("ZO", "NONE") if self.biased else ("ZO",):
                    plan = layout(T, K, blocks, fill)
                    if fill == "NONE" and not plan.steps(Role.NONE):
                        continue
                    pairings = self.pairings if Role.ZO in plan.roles else ("none",)
                    out.update((Candidate(plan, p, c), None) for p in pairings for c in cks)
        return list(out)

    def hs_for(self, T: int) -> tuple[int, ...]:
        """The HO block lengths offered on a chain of T steps: ``hs``, or the powers of two
        below T."""
        return self.hs if self.hs is not None else tuple(2 ** i for i in range(8) if 2 ** i < T)


def checkpointable(K: int, blocks) -> tuple[str, ...]:
    """The roles whose checkpointing can matter for a plan with an FO prefix of K steps and
    HO ``blocks`` ((j, h), ...): FO if K >= 2, HO if a block is 2 steps or longer (a
    segment of one step saves the same graph either way)."""
    return tuple(r for r, ok in (("FO", K >= 2), ("HO", max((h for _, h in blocks), default=0) >= 2)) if ok)


def block_starts(T: int, h: int, m: int) -> list[int]:
    """m starts of a block of length h, evenly spaced over 1..T-h+1."""
    return _positions(1, T - h + 1, m)


def tiling(T: int, K: int, h: int) -> tuple[tuple[int, int], ...]:
    """HO blocks of length h over K+1..T from K+1 up, the last one shorter if h does not
    divide T-K."""
    return tuple((j, min(h, T - j + 1)) for j in range(K + 1, T + 1, h))


def _positions(lo: int, hi: int, m: int) -> list[int]:
    if hi < lo:
        return []
    return sorted({int(round(v)) for v in np.linspace(lo, hi, max(1, m))})


@dataclass(frozen=True)
class Scored:
    """A candidate with its predicted activation memory (bytes), time per estimate
    (seconds) and variance (tr Cov per chain evaluation)."""

    candidate: Candidate
    memory: int
    time: float
    variance: float

    @property
    def score(self) -> float:
        """variance x time: lower is better."""
        return self.variance * self.time

    @property
    def unbiased(self) -> bool:
        """Whether the candidate's plan is unbiased."""
        return self.candidate.is_unbiased


def score(candidate: Candidate, memory: MemoryCosts, timing: TimeModel, parts: PartVariances | None,
          chain_for: ChainFor) -> Scored:
    """Predicted memory, time and variance of ``candidate`` (variance inf without ``parts``:
    not piloted)."""
    plan, steps = candidate.plan, candidate.checkpoint_steps
    variance = float("inf") if parts is None else predicted_variance(parts, plan, candidate.pairing)
    seconds = timing.predict(plan, steps, chain_for(plan), candidate.pairing)
    return Scored(candidate, predicted_memory(memory, plan, steps), seconds, variance)


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

    @property
    def best(self) -> Scored:
        """The top-ranked candidate (``ValueError`` naming the smallest need if none fits)."""
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
        runner = (f"; next {self.ranked[1].candidate.name} at {self.ranked[1].score / b.score:.2f}x"
                  if others else "")
        return (f"lowest variance x time among {len(self.ranked)} candidates within memory "
                f"{format_bytes(self.memory_budget)}" + (f" and time {self.time_budget:g} s" if self.time_budget else "")
                + f" ({len(self.rejected)} over budget){runner}")

    def table(self, top: int = 20) -> str:
        """The ranked candidates as a plain-text table."""
        head = f"{'rank':>4}  {'candidate':<34} {'memory':>10} {'s/estimate':>11} {'variance':>11} " \
               f"{'var x time':>11} {'vs best':>8}  unbiased"
        rows = [head, "-" * len(head)]
        best = self.ranked[0].score if self.ranked else 1.0
        for i, s in enumerate(self.ranked[:top], 1):
            rows.append(f"{i:>4}  {s.candidate.name:<34} {format_bytes(s.memory):>10} {s.time:>11.4g} "
                        f"{s.variance:>11.4g} {s.score:>11.4g} {s.score / best:>7.3g}x  {'yes' if s.unbiased else 'NO'}")
        return "\n".join(rows)


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
    scores; :meth:`choose` ranks them under budgets (measure once, choose for many)."""

    scored: tuple[Scored, ...]
    memory: MemoryCosts
    timing: TimeModel
    parts: PartVariances = field(repr=False)
    biased: bool = False

    def choose(self, memory_budget: float, time_budget: float | None = None) -> SearchResult:
        """The candidates within ``memory_budget`` (bytes) and ``time_budget`` (seconds per
        estimate, or None), best first."""
        ranked, rejected = rank(self.scored, memory_budget, time_budget, self.biased)
        return SearchResult(ranked, rejected, memory_budget, time_budget, self.memory, self.timing, self.parts)


def measure(chain, params, *, generator: torch.Generator, n: int = 4, space: Space = Space(),
            chain_for: ChainFor | None = None, pilot_samples: int = 256, baseline=None, repeats: int = 5,
            probe_memory: float | None = None, progress: bool = False) -> Measured:
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
    """
    chain_for = chain_for or (lambda plan: chain)
    cands = [c for c in space.candidates(chain.T)
             if _valid(c.plan, chain_for) and n % Pairing.parse(c.pairing).size == 0]
    memory = measure_memory(chain, params, n, generator=generator, chain_for=chain_for)
    limit = float("inf") if probe_memory is None else probe_memory
    least = min(cands, key=lambda c: predicted_memory(memory, c.plan, c.checkpoint_steps), default=None)
    if least is not None and predicted_memory(memory, least.plan, least.checkpoint_steps) > limit:
        raise ValueError(f"no plan fits in {format_bytes(limit)}: the least memory any plan needs is "
                         f"{format_bytes(predicted_memory(memory, least.plan, least.checkpoint_steps))} "
                         f"({least.name})")
    timing = fit_time_model(chain, params, n, generator=generator, chain_for=chain_for, repeats=repeats,
                            admit=lambda plan, ck: predicted_memory(memory, plan, ck) <= limit)

    def checkpoint(plan):   # a pilot's steps to checkpoint: all its gradient steps where it would not fit
        steps = set(plan.steps(Role.FO)) | set(plan.steps(Role.HO))
        return steps if predicted_memory(memory, plan) > limit else ()

    fits = [c for c in cands if predicted_memory(memory, c.plan, c.checkpoint_steps) <= limit]
    parts = measure_part_variances(chain, params, ks={c.plan.fo_steps for c in fits},
                                   blocks={(c.plan.blocks, Pairing.parse(c.pairing).size) for c in fits},
                                   zo={(c.plan.fo_steps, c.plan.blocks, c.pairing) for c in fits
                                       if Role.ZO in c.plan.roles}, n=pilot_samples,
                                   batch=n, generator=generator, chain_for=chain_for, baseline=baseline,
                                   chunk=n if probe_memory is not None else 1 << 14, checkpoint=checkpoint,
                                   progress=progress)
    over = set(cands) - set(fits)
    scored = tuple(score(c, memory, timing, None if c in over else parts, chain_for) for c in cands)
    return Measured(scored, memory, timing, parts, space.biased)


def search(chain, params, memory_budget: float, *, time_budget: float | None = None, **kwargs) -> SearchResult:
    """Rank the candidates on ``chain`` that fit ``memory_budget`` (bytes: what the meter
    measures plus the states and sums the engine holds) and ``time_budget`` (seconds per
    estimate of ``n`` samples, or None), best first. ``kwargs`` are :func:`measure`'s."""
    return measure(chain, params, **kwargs).choose(memory_budget, time_budget)


def _valid(plan: Plan, chain_for: ChainFor) -> bool:
    try:
        plan.validate(chain_for(plan))
        return True
    except ValueError:
        return False


_BYTES = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0, "m": 60.0, "h": 3600.0}


def parse_bytes(text: str) -> int:
    """A size like ``2GiB``, ``512MiB``, ``1.5GB`` or ``1000000`` (bytes) as bytes;
    ``ValueError`` naming the accepted units otherwise."""
    return int(_parse(text, _BYTES, "size", "2GiB, 512MiB, 1.5GB or a number of bytes"))


def parse_seconds(text: str) -> float:
    """A duration like ``1s``, ``250ms``, ``2min`` or ``0.5`` (seconds) as seconds;
    ``ValueError`` naming the accepted units otherwise."""
    return _parse(text, _SECONDS, "duration", "1s, 250ms, 2min or a number of seconds")


def _parse(text: str, units: dict, what: str, examples: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"not a {what}: {text!r} (write e.g. {examples})")
    value = float(m.group(1)) * units[m.group(2).lower()]
    if not value > 0:
        raise ValueError(f"a {what} must be > 0, got {text!r}")
    return value


def format_bytes(b: float) -> str:
    """Bytes as B, KiB, MiB or GiB."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(b) >= size:
            return f"{b / size:.3g} {unit}"
    return f"{int(b)} B"


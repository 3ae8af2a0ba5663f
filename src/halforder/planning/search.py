"""Choose the estimator: a search over plans, pairing and checkpointing under a memory and
a time budget, from costs and variances measured on the user's chain (docs/plan-search.md).

    result = search(chain, params, memory_budget=2 * 2**30, n=4, generator=g)
    result.best.candidate.plan, result.best.candidate.pairing, result.table()

The candidates are :mod:`.space`'s. Each gets its activation memory from
:mod:`.memory_model`, its time per estimate from :mod:`.time_model` and its variance per
chain evaluation from the model of :mod:`.part_variances`, whose FO and ZO parts come from
one shared pilot (:mod:`.shared_pilot`) and whose HO parts are piloted by branch and
bound (:mod:`.pruning`); the feasible ones are ranked by variance x time, the variance of
the estimate that one second of compute buys (lower is better).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..estimators.compute import ComputeMeter, expected_evaluations
from ..estimators.pairing import Pairing
from ..estimators.plan import ChainFor, Plan, Role
from .cost import SearchCost
from .memory_model import MemoryCosts, measure_memory, predicted_memory
from .part_variances import (PartVariances, ho_pilot, layout, measure_part_variances, pilot_rows, predicted_variance,
                             zo_pilot)
from .pruning import pilot_ho_parts
from .shared_pilot import measure_step_gradients
from .space import Candidate, Space
from .time_model import TimeModel, fit_time_model
from .units import format_bytes


@dataclass(frozen=True)
class Scored:
    """A candidate with its predicted activation memory (bytes), time per estimate
    (seconds) and variance (tr Cov per chain evaluation; inf where a part it needs was not
    piloted, ``note`` saying why: ``"bound"``, ``"halving"``, ``"budget"``, ...)."""

    candidate: Candidate
    memory: int
    time: float
    variance: float
    note: str = ""

    @property
    def score(self) -> float:
        """variance x time: lower is better."""
        return self.variance * self.time

    @property
    def unbiased(self) -> bool:
        """Whether the candidate's plan is unbiased."""
        return self.candidate.is_unbiased


def score(candidate: Candidate, memory: MemoryCosts, timing: TimeModel, parts: PartVariances | None,
          chain_for: ChainFor, note: str = "") -> Scored:
    """Predicted memory, time and variance of ``candidate`` (variance inf where a part it
    needs was not piloted, with the reason in ``note``)."""
    plan, steps = candidate.plan, candidate.checkpoint_steps
    try:
        variance = float("inf") if parts is None else predicted_variance(parts, plan, candidate.pairing)
    except KeyError:
        variance, note = float("inf"), note or "not piloted"
    seconds = timing.predict(plan, steps, chain_for(plan), candidate.pairing)
    return Scored(candidate, predicted_memory(memory, plan, steps), seconds, variance,
                  note if variance == float("inf") else "")


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
    (forward, backward) of each stage of the search, counted by the compute meter."""

    scored: tuple[Scored, ...]
    memory: MemoryCosts
    timing: TimeModel
    parts: PartVariances = field(repr=False)
    biased: bool = False
    budgets: tuple[tuple[float, float | None], ...] | None = None
    spent: dict[str, tuple[int, int]] | None = None

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
    chain_for = chain_for or (lambda plan: chain)
    T = chain.T
    cands = [c for c in space.candidates(T)
             if _valid(c.plan, chain_for) and n % Pairing.parse(c.pairing).size == 0]
    with ComputeMeter() as meter:
        memory = measure_memory(chain, params, n, generator=generator, chain_for=chain_for)
        limit = float("inf") if probe_memory is None else probe_memory
        budgets = tuple(budgets) if budgets is not None else ((limit, None),)
        _check_memory(cands, memory, min(limit, max(m for m, _ in budgets)))
        timing = fit_time_model(chain, params, n, generator=generator, chain_for=chain_for, repeats=repeats,
                                admit=lambda plan, ck: predicted_memory(memory, plan, ck) <= limit)

        def checkpoint(plan):   # a pilot's steps to checkpoint: all its gradient steps where it would not fit
            steps = set(plan.steps(Role.FO)) | set(plan.steps(Role.HO))
            return steps if predicted_memory(memory, plan) > limit else ()

        fits = [c for c in cands if predicted_memory(memory, c.plan, c.checkpoint_steps) <= limit]
        seconds = {c: timing.predict(c.plan, c.checkpoint_steps, chain_for(c.plan), c.pairing) for c in fits}

        def within(c, i, timed=True):
            m, t = budgets[i]
            return (space.biased or c.is_unbiased) and predicted_memory(memory, c.plan, c.checkpoint_steps) <= m \
                and (not timed or t is None or seconds[c] <= t)

        _check_time(fits, seconds, budgets, within)
        zo_keys = {zo_key(c) for c in fits if Role.ZO in c.plan.roles}
        marks = [(meter.forward, meter.backward)]
        fo, zo = _fo_zo_parts(chain, params, fits, zo_keys, memory, limit, shared, chain_for=chain_for,
                              generator=generator, n=n, pilot_samples=pilot_samples, baseline=baseline,
                              checkpoint=checkpoint, chunk=n if probe_memory is not None else 1 << 14,
                              progress=progress)
        marks.append((meter.forward, meter.backward))

        def base(c):    # G (V_FO + V_ZO): the variance without the HO part
            G = Pairing.parse(c.pairing).size
            return G * (fo.get(c.plan.fo_steps, 0.0) + (zo[zo_key(c)] if Role.ZO in c.plan.roles else 0.0))

        bounds = {}
        for c in fits:
            for i in range(len(budgets)):
                if c.plan.blocks and within(c, i):
                    G = Pairing.parse(c.pairing).size
                    bounds.setdefault(ho_key(c), []).append((base(c) * seconds[c], G * seconds[c], i))
        best = [min((base(c) * seconds[c] for c in fits if not c.plan.blocks and within(c, i)), default=float("inf"))
                for i in range(len(budgets))]

        def draw(key, rows):
            plan = ho_pilot(T, key[0])
            return pilot_rows(chain_for, plan, params, rows, n, generator=generator, group=key[1],
                              baseline=baseline, checkpoint=checkpoint(plan),
                              chunk=n if probe_memory is not None else 1 << 14, progress=progress)

        def cost(key, rows):
            plan, b = ho_pilot(T, key[0]), n // key[1]
            drawn = max(2, rows // b) * b if isinstance(baseline, str) else rows
            return expected_evaluations(plan, drawn, bool(checkpoint(plan)))["forward"] / T

        ho, skipped = pilot_ho_parts(bounds, best, draw, cost, pilot_samples, meter=meter, T=T,
                                     max_evaluations=max_evaluations, first=2 * n, prune=prune)
        marks.append((meter.forward, meter.backward))
    spent = {stage: (b[0] - a[0], b[1] - a[1]) for stage, a, b in
             zip(("memory and timing", "FO and ZO parts", "HO parts"), [(0, 0)] + marks, marks)}
    parts = PartVariances(pilot_samples, n, fo, ho, zo)
    over = set(cands) - set(fits)
    scored = tuple(score(c, memory, timing, parts, chain_for,
                         "over the probe memory" if c in over else skipped.get(ho_key(c), "")) for c in cands)
    return Measured(scored, memory, timing, parts, space.biased, budgets if skipped else None, spent)


def _check_memory(cands, memory: MemoryCosts, room: float) -> None:
    """``ValueError`` if no candidate fits ``room`` bytes: answered from the memory model, before
    any timing probe or pilot."""
    need = {c: predicted_memory(memory, c.plan, c.checkpoint_steps) for c in cands}
    least = min(need, key=need.get, default=None)
    if least is not None and need[least] > room:
        raise ValueError(f"no plan fits in {format_bytes(room)}: the least memory any plan needs is "
                         f"{format_bytes(need[least])} ({least.name})")


def _check_time(fits, seconds, budgets, within) -> None:
    """``ValueError`` if no candidate of ``fits`` is within any of the budgets (with the fastest
    plan's time where a time budget is what rules them out): answered before any pilot."""
    if not fits or any(within(c, i) for c in fits for i in range(len(budgets))):
        return
    m, t = budgets[0]
    fastest = min((c for c in fits if within(c, 0, timed=False)), key=seconds.get, default=None)
    raise ValueError(f"no plan fits in {format_bytes(m)}" + (f" and {t:g} s per estimate" if t is not None else "")
                     + (f": the fastest that fits the memory takes {seconds[fastest]:.3g} s ({fastest.name})"
                        if fastest is not None and t is not None else ""))


def zo_key(c: Candidate) -> tuple:
    """The ZO part a candidate needs: (K, blocks, pairing)."""
    return c.plan.fo_steps, tuple(sorted(c.plan.blocks)), Pairing.parse(c.pairing).name


def ho_key(c: Candidate) -> tuple:
    """The HO part a candidate needs: (blocks, G)."""
    return tuple(sorted(c.plan.blocks)), Pairing.parse(c.pairing).size


def _fo_zo_parts(chain, params, fits, zo_keys, memory, limit, shared, *, chain_for, generator, n, pilot_samples,
                 baseline, checkpoint, chunk, progress):
    """The FO and ZO parts: from the shared pilot where some candidate has an FO step (so
    the reward is differentiable) and full backprop fits ``limit``, checkpointed and with
    fewer samples a call if it must be (activation memory is proportional to the samples
    of a call), else one pilot per part."""
    T, full = chain.T, Plan.full(chain.T)
    ks = {c.plan.fo_steps for c in fits if c.plan.fo_steps}
    ckpt = predicted_memory(memory, full) > limit
    need = predicted_memory(memory, full, range(1, T + 1) if ckpt else ())
    per_call = n if need <= limit else int(n * limit / need)
    if shared and ks and per_call >= 1:
        moments = measure_step_gradients(chain_for, params, T, pilot_samples, n, generator=generator,
                                         baseline=baseline, checkpoint=ckpt, chunk=chunk, per_call=per_call,
                                         progress=progress)
        zo = {}
        for K, b, p in zo_keys:
            on = chain_for(layout(T, K, b))
            G = Pairing.parse(p).size
            noisy = {t: float(on.tau(t)) for t in range(1, T + 1) if float(on.tau(t)) > 0}
            zo[(K, b, p)] = moments.zo({t: noisy[t] for t in zo_pilot(T, K, b).steps(Role.ZO)}, noisy, p,
                                       n // G if baseline == "loo" else None)
        return {K: moments.fo(K) for K in ks}, zo
    parts = measure_part_variances(chain, params, ks=ks, blocks=(), zo=zo_keys, n=pilot_samples, batch=n,
                                   generator=generator, chain_for=chain_for, baseline=baseline, chunk=chunk,
                                   checkpoint=checkpoint, progress=progress)
    return dict(parts.fo), dict(parts.zo)


def search(chain, params, memory_budget: float, *, time_budget: float | None = None, **kwargs) -> SearchResult:
    """Rank the candidates on ``chain`` that fit ``memory_budget`` (bytes: what the meter
    measures plus the states and sums the engine holds) and ``time_budget`` (seconds per
    estimate of ``n`` samples, or None), best first. ``kwargs`` are :func:`measure`'s."""
    return measure(chain, params, budgets=[(memory_budget, time_budget)], **kwargs).choose(memory_budget, time_budget)


def _valid(plan: Plan, chain_for: ChainFor) -> bool:
    try:
        plan.validate(chain_for(plan))
        return True
    except ValueError:
        return False

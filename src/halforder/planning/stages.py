"""The stages of the plan search (docs/plan-search.md), each a function from named records
to a named record; :func:`.search.measure` composes them:

    settings = SearchSettings.of(chain, n=4, ...)                             # what is asked
    cands = candidates(chain, settings)                 # the space, less what the chain cannot run
    costed = costs(chain, params, settings, cands, generator)       # memory and time; feasibility
    fo_zo = pilot_fo_zo(chain, params, settings, costed, generator)            # FO and ZO parts
    ho = prune_ho(chain, params, settings, costed, fo_zo, generator, meter)          # HO parts
    scored = score_all(settings, cands, costed, replace(fo_zo, ho=ho.ho), ho.skipped)

The stages draw from one generator in this order. The timing probes run as often as the clock
has them run, so they draw from a generator of their own, seeded by one draw of the search's:
the pilots, and with them the variances and the choice, are the same from run to run for one
seed (only the seconds vary).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Mapping, Sequence

import torch

from ..estimators.compute import ComputeMeter, expected_evaluations
from ..estimators.pairing import Pairing
from ..estimators.plan import ChainFor, Plan, Role
from .memory_model import MemoryCosts, measure_memory, predicted_memory
from .part_variances import (HOKey, PartVariances, ZOKey, ho_pilot, layout, measure_part_variances, pilot_rows,
                             predicted_variance, zo_pilot)
from .pruning import Bound, pilot_ho_parts
from .shared_pilot import StepGradientMoments, measure_step_gradients
from .space import Candidate, Space
from .time_model import TimeModel, fit_time_model
from .units import format_bytes

Budget = tuple[float, float | None]     # (memory bytes, seconds per estimate or None)


@dataclass(frozen=True)
class SearchSettings:
    """What a search is asked: :func:`.search.measure`'s arguments, with ``chain_for`` and
    ``budgets`` defaulted (:meth:`of`)."""

    n: int
    space: Space
    chain_for: ChainFor
    pilot_samples: int
    baseline: object
    repeats: int
    probe_memory: float | None
    progress: bool
    shared: bool
    prune: bool
    max_evaluations: float | None
    budgets: tuple[Budget, ...]

    @classmethod
    def of(cls, chain, *, n: int, space: Space, chain_for: ChainFor | None, pilot_samples: int, baseline,
           repeats: int, probe_memory: float | None, progress: bool, shared: bool, prune: bool,
           max_evaluations: float | None, budgets: Sequence[Budget] | None) -> SearchSettings:
        """The settings of a search on ``chain``: ``chain_for`` None runs every plan on ``chain``,
        ``budgets`` None is the probe memory (or no limit) and no time budget."""
        limit = float("inf") if probe_memory is None else probe_memory
        return cls(n, space, chain_for or (lambda plan: chain), pilot_samples, baseline, repeats, probe_memory,
                   progress, shared, prune, max_evaluations,
                   tuple(budgets) if budgets is not None else ((limit, None),))

    @property
    def limit(self) -> float:
        """The most memory (bytes) a timing probe or a pilot may take (inf: no limit)."""
        return float("inf") if self.probe_memory is None else self.probe_memory

    @property
    def chunk(self) -> int:
        """Chain evaluations a pilot call may take where its rows are independent."""
        return self.n if self.probe_memory is not None else 1 << 14


@dataclass(frozen=True)
class Costs:
    """The measured memory costs and the fitted time model; the candidates within the probe
    memory (``fits``) and the seconds per estimate of each."""

    memory: MemoryCosts
    timing: TimeModel
    fits: tuple[Candidate, ...]
    seconds: Mapping[Candidate, float]


@dataclass(frozen=True)
class HOPilots:
    """The HO parts: V_HO of each piloted layout, and why each other one was not piloted
    (``"bound"``, ``"halving"``, ``"budget"``; :mod:`.pruning`)."""

    ho: Mapping[HOKey, float]
    skipped: Mapping[HOKey, str]


@dataclass(frozen=True)
class Spent:
    """Model evaluations (forward, backward) each stage of a search took, counted by the
    compute meter."""

    memory_and_timing: tuple[int, int]
    fo_zo: tuple[int, int]
    ho: tuple[int, int]

    @classmethod
    def between(cls, marks: Sequence[tuple[int, int]]) -> Spent:
        """From the meter's (forward, backward) after each of the three stages."""
        starts = [(0, 0), *marks]
        return cls(*((b[0] - a[0], b[1] - a[1]) for a, b in zip(starts, marks)))


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


def candidates(chain, settings: SearchSettings) -> tuple[Candidate, ...]:
    """The candidates of the space that ``chain`` can run, whose groups divide n."""
    return tuple(c for c in settings.space.candidates(chain.T)
                 if _valid(c.plan, settings.chain_for) and settings.n % Pairing.parse(c.pairing).size == 0)


def costs(chain, params, settings: SearchSettings, cands: Sequence[Candidate], generator: torch.Generator) -> Costs:
    """Measure the memory costs, fit the time model and predict the time of each candidate
    within the probe memory. ``ValueError`` (before any pilot) if no candidate fits the
    memory, checked before any timing probe, or none fits any budget's time."""
    memory = measure_memory(chain, params, settings.n, generator=generator, chain_for=settings.chain_for)
    _check_memory(cands, memory, min(settings.limit, max(m for m, _ in settings.budgets)))
    timing = fit_time_model(chain, params, settings.n, generator=fork(generator), chain_for=settings.chain_for,
                            repeats=settings.repeats,
                            admit=lambda plan, ck: predicted_memory(memory, plan, ck) <= settings.limit)
    fits = tuple(c for c in cands if predicted_memory(memory, c.plan, c.checkpoint_steps) <= settings.limit)
    seconds = {c: timing.predict(c.plan, c.checkpoint_steps, settings.chain_for(c.plan), c.pairing) for c in fits}
    out = Costs(memory, timing, fits, seconds)
    _check_time(settings, out)
    return out


def fork(generator: torch.Generator) -> torch.Generator:
    """A generator of its own, seeded by one draw of ``generator`` (on its device)."""
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=generator.device).manual_seed(seed)


def within(settings: SearchSettings, costs: Costs, c: Candidate, budget: int, timed: bool = True) -> bool:
    """Whether ``c`` (of ``costs.fits``) is admitted and within budget number ``budget`` (its
    memory only, unless ``timed``)."""
    m, t = settings.budgets[budget]
    return (settings.space.biased or c.is_unbiased) and predicted_memory(costs.memory, c.plan, c.checkpoint_steps) \
        <= m and (not timed or t is None or costs.seconds[c] <= t)


def pilot_checkpoint(settings: SearchSettings, memory: MemoryCosts, plan: Plan) -> set[int] | tuple:
    """A pilot's steps to checkpoint: all its gradient steps where it would not fit the probe
    memory otherwise, else none."""
    steps = set(plan.steps(Role.FO)) | set(plan.steps(Role.HO))
    return steps if predicted_memory(memory, plan) > settings.limit else ()


def pilot_fo_zo(chain, params, settings: SearchSettings, costs: Costs,
                generator: torch.Generator) -> PartVariances:
    """The FO and ZO parts of the candidates within the probe memory (no HO part yet): from
    the shared pilot (:mod:`.shared_pilot`) where ``settings.shared``, some candidate has an
    FO step (so the reward is differentiable) and full backprop fits the probe memory,
    checkpointed and with fewer samples a call if it must be (activation memory is
    proportional to the samples of a call); else one pilot per part."""
    T, full, n, limit = chain.T, Plan.full(chain.T), settings.n, settings.limit
    ks = {c.plan.fo_steps for c in costs.fits if c.plan.fo_steps}
    zo_keys = {ZOKey.of(c.plan, c.pairing) for c in costs.fits if Role.ZO in c.plan.roles}
    ckpt = predicted_memory(costs.memory, full) > limit
    need = predicted_memory(costs.memory, full, range(1, T + 1) if ckpt else ())
    per_call = n if need <= limit else int(n * limit / need)
    if settings.shared and ks and per_call >= 1:
        moments = measure_step_gradients(settings.chain_for, params, T, settings.pilot_samples, n,
                                         generator=generator, baseline=settings.baseline, checkpoint=ckpt,
                                         chunk=settings.chunk, per_call=per_call, progress=settings.progress)
        zo = {key: _shared_zo(settings, moments, T, key) for key in zo_keys}
        return PartVariances(settings.pilot_samples, n, {K: moments.fo(K) for K in ks}, {}, zo)
    return measure_part_variances(chain, params, ks=ks, blocks=(), zo=zo_keys, n=settings.pilot_samples, batch=n,
                                  generator=generator, chain_for=settings.chain_for, baseline=settings.baseline,
                                  chunk=settings.chunk, checkpoint=partial(pilot_checkpoint, settings, costs.memory),
                                  progress=settings.progress)


def _shared_zo(settings: SearchSettings, moments: StepGradientMoments, T: int, key: ZOKey) -> float:
    """V_ZO of the layout ``key`` from the shared pilot, on the chain of that layout."""
    on = settings.chain_for(layout(T, key.fo_steps, key.blocks))
    G = Pairing.parse(key.pairing).size
    noisy = {t: float(on.tau(t)) for t in range(1, T + 1) if float(on.tau(t)) > 0}
    return moments.zo({t: noisy[t] for t in zo_pilot(T, key.fo_steps, key.blocks).steps(Role.ZO)}, noisy,
                      key.pairing, settings.n // G if settings.baseline == "loo" else None)


def prune_ho(chain, params, settings: SearchSettings, costs: Costs, fo_zo: PartVariances,
             generator: torch.Generator, meter: ComputeMeter) -> HOPilots:
    """The HO parts by branch and bound with successive halving (:mod:`.pruning`), per
    budget: each candidate with HO blocks within a budget is bounded below by
    G (V_FO + V_ZO) x its time, against the best score of those without HO blocks.
    ``meter``: the search's, open since its start (the evaluation budget counts it all)."""
    T, budgets = chain.T, range(len(settings.budgets))
    seconds = costs.seconds
    bounds = {}
    for c in costs.fits:
        for i in budgets:
            if c.plan.blocks and within(settings, costs, c, i):
                G = Pairing.parse(c.pairing).size
                bounds.setdefault(HOKey.of(c.plan, c.pairing), []).append(
                    Bound(_without_ho(fo_zo, c) * seconds[c], G * seconds[c], i))
    best = [min((_without_ho(fo_zo, c) * seconds[c] for c in costs.fits
                 if not c.plan.blocks and within(settings, costs, c, i)), default=float("inf")) for i in budgets]
    ho, skipped = pilot_ho_parts(bounds, best, partial(_draw_ho, T, params, settings, costs.memory, generator),
                                 partial(_ho_evaluations, T, settings, costs.memory), settings.pilot_samples,
                                 meter=meter, T=T, max_evaluations=settings.max_evaluations, first=2 * settings.n,
                                 prune=settings.prune)
    return HOPilots(ho, skipped)


def _without_ho(parts: PartVariances, c: Candidate) -> float:
    """G (V_FO + V_ZO): the candidate's variance without its HO part."""
    G = Pairing.parse(c.pairing).size
    return G * (parts.fo.get(c.plan.fo_steps, 0.0)
                + (parts.zo[ZOKey.of(c.plan, c.pairing)] if Role.ZO in c.plan.roles else 0.0))


def _draw_ho(T: int, params, settings: SearchSettings, memory: MemoryCosts, generator: torch.Generator, key: HOKey,
             rows: int) -> torch.Tensor:
    """The pilot rows of ``rows`` new samples of the HO layout ``key``."""
    plan = ho_pilot(T, key.blocks)
    return pilot_rows(settings.chain_for, plan, params, rows, settings.n, generator=generator, group=key.group,
                      baseline=settings.baseline, checkpoint=pilot_checkpoint(settings, memory, plan),
                      chunk=settings.chunk, progress=settings.progress)


def _ho_evaluations(T: int, settings: SearchSettings, memory: MemoryCosts, key: HOKey, rows: int) -> float:
    """The chain evaluations (forward model evaluations / T) of :func:`_draw_ho`."""
    plan, b = ho_pilot(T, key.blocks), settings.n // key.group
    drawn = max(2, rows // b) * b if isinstance(settings.baseline, str) else rows
    return expected_evaluations(plan, drawn, bool(pilot_checkpoint(settings, memory, plan)))["forward"] / T


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


def score_all(settings: SearchSettings, cands: Sequence[Candidate], costs: Costs, parts: PartVariances,
              skipped: Mapping[HOKey, str]) -> tuple[Scored, ...]:
    """Every candidate scored (:func:`score`), those over the probe memory and those whose HO
    part was ``skipped`` with the reason."""
    over = set(cands) - set(costs.fits)
    return tuple(score(c, costs.memory, costs.timing, parts, settings.chain_for,
                       "over the probe memory" if c in over else skipped.get(HOKey.of(c.plan, c.pairing), ""))
                 for c in cands)


def _check_memory(cands: Sequence[Candidate], memory: MemoryCosts, room: float) -> None:
    """``ValueError`` if no candidate fits ``room`` bytes: answered from the memory model, before
    any timing probe or pilot."""
    need = {c: predicted_memory(memory, c.plan, c.checkpoint_steps) for c in cands}
    least = min(need, key=need.get, default=None)
    if least is not None and need[least] > room:
        raise ValueError(f"no plan fits in {format_bytes(room)}: the least memory any plan needs is "
                         f"{format_bytes(need[least])} ({least.name})")


def _check_time(settings: SearchSettings, costs: Costs) -> None:
    """``ValueError`` if no candidate within the probe memory is within any of the budgets (with
    the fastest plan's time where a time budget is what rules them out): answered before any
    pilot."""
    fits, budgets = costs.fits, range(len(settings.budgets))
    if not fits or any(within(settings, costs, c, i) for c in fits for i in budgets):
        return
    m, t = settings.budgets[0]
    fastest = min((c for c in fits if within(settings, costs, c, 0, timed=False)), key=costs.seconds.get,
                  default=None)
    raise ValueError(f"no plan fits in {format_bytes(m)}" + (f" and {t:g} s per estimate" if t is not None else "")
                     + (f": the fastest that fits the memory takes {costs.seconds[fastest]:.3g} s ({fastest.name})"
                        if fastest is not None and t is not None else ""))


def _valid(plan: Plan, chain_for: ChainFor) -> bool:
    try:
        plan.validate(chain_for(plan))
        return True
    except ValueError:
        return False

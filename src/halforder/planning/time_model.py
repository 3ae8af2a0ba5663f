"""What a plan costs in time on a chain: seconds per estimate, fitted to timings of the
engine on probe plans (docs/plan-search.md).

The time of one estimate is modelled as a non-negative combination of counts,

    rollout steps without and with parameter noise (steps K+1..T: per-sample parameters
    cost more in a diffusion chain), steps evaluated with gradients (forward and backward:
    K + sum h), checkpointed steps (a second forward), HO blocks, ZO steps (the running
    sum), whether the reward is backpropagated (K > 0), steps whose noise is drawn for
    antithetic groups (T with a pairing: the draws are expanded over each group, which
    costs as much as a step on a small chain), and one call,

whose coefficients (seconds per unit) are fitted by non-negative least squares to the
median time (over ``repeats`` rounds; :func:`median_seconds`: wall clock on a GPU, the
process's CPU time on a CPU) of :func:`~halforder.estimators.estimate` on a set of probe
plans chosen to vary every count. Timing on a shared machine is noisy, and other jobs
change the CPU time too (they compete for caches, memory bandwidth and clock frequency):
blocks of calls long enough for the clock, rounds that interleave the probes (a slow spell
slows them all alike), medians and the fit over several probes damp that without removing
it, and :attr:`TimeModel.probes` keeps the measured and fitted time of each probe. No
prediction is below the clock's resolution, so no plan is free (the fit can give a plan's
counts zero seconds each).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Collection, Sequence

import numpy as np
import torch
from scipy.optimize import nnls

from ..estimators.engine import estimate
from ..estimators.gradient_checkpointing import Checkpointed
from ..estimators.pairing import Pairing, grouped
from ..estimators.plan import ChainFor, Plan, Role
from ..estimators.protocol import latent

FEATURES = ("rollout step", "rollout step with parameter noise", "gradient step (forward + backward)",
            "checkpointed step", "HO block", "ZO step", "reward backward", "step with paired noise", "call")


def plan_chain(chain_for: ChainFor, plan: Plan, checkpoint: Collection[int] = ()):
    """The chain ``plan`` runs on, with the steps ``checkpoint`` checkpointed."""
    c = chain_for(plan)
    return Checkpointed(c, checkpoint) if checkpoint else c


def features(plan: Plan, checkpoint: Collection[int], chain, pairing: str | Pairing | None = None) -> np.ndarray:
    """The counts of :data:`FEATURES` for ``plan`` with ``pairing`` on its chain ``chain``."""
    K = plan.fo_steps
    noisy = [float(chain.tau(t)) > 0 for t in range(K + 1, plan.T + 1)]
    grad = K + sum(h for _, h in plan.blocks)
    ckpt = sum(1 for t in checkpoint if t <= K or plan.roles[t - 1] is Role.HO)
    return np.array([noisy.count(False), noisy.count(True), grad, ckpt, len(plan.blocks),
                     len(plan.steps(Role.ZO)), float(K > 0), plan.T * float(Pairing.parse(pairing).size > 1), 1.0])


@dataclass(frozen=True)
class TimeModel:
    """Seconds per estimate (module docstring).

    Attributes:
      coef: seconds per unit of each of :data:`FEATURES`.
      probes: (probe name, measured seconds, fitted seconds) for each probe.
      n: samples per estimate.
      repeats: timing rounds per probe (their median is used).
      floor: the least seconds a prediction may be, the resolution of the clock that timed
        the probes (> 0).
    """

    coef: tuple[float, ...]
    probes: tuple[tuple[str, float, float], ...]
    n: int
    repeats: int
    floor: float = 1e-9

    def predict(self, plan: Plan, checkpoint: Collection[int], chain, pairing: str | Pairing | None = None) -> float:
        """Seconds per estimate of ``plan`` with ``checkpoint`` and ``pairing`` on its chain
        ``chain``, at least :attr:`floor`."""
        return max(float(np.dot(self.coef, features(plan, checkpoint, chain, pairing))), self.floor)


Probe = tuple[Plan, frozenset[int], str]


def probe_plans(T: int) -> list[Probe]:
    """Probes (plan, checkpointed steps, pairing) that vary every count: zeroth order
    (unpaired and paired), full backprop (plain and checkpointed), truncation, REINFORCE,
    an FO prefix with ZO, and RLR-like plans with long blocks (one of them paired)."""
    half, none = max(1, T // 2), frozenset()
    out = [(Plan.zeroth_order(T), none, "none"), (Plan.zeroth_order(T), none, "param"),
           (Plan.full(T), none, "none"), (Plan.full(T), frozenset(range(1, T + 1)), "none"),
           (Plan.reinforce(T), none, "none")]
    if T >= 2:
        fo_zo = Plan.from_roles(["FO"] * half + ["ZO"] * (T - half))
        out += [(Plan.truncated(T, half), none, "none"), (fo_zo, none, "none"),
                (fo_zo, frozenset(range(1, half + 1)), "none")]
    if T >= 3:
        h = T - 1 - (T - 1) // 2
        rlr = Plan.from_roles(["FO"] + ["HO"] * h + ["ZO"] * (T - 1 - h), [(2, h)])
        out += [(rlr, none, "none"), (rlr, frozenset(range(2, h + 2)), "none"), (rlr, none, "param")]
    return out


def fit_time_model(chain, params, n: int, *, generator: torch.Generator, chain_for: ChainFor | None = None,
                   repeats: int = 5, probes: Sequence[Probe] | None = None,
                   admit: Callable[[Plan, Collection[int]], bool] = lambda plan, ck: True,
                   seconds: float | None = 15.0) -> TimeModel:
    """Time the engine on ``probes`` (default :func:`probe_plans`; those ``admit`` refuses,
    e.g. over a memory limit, whose roles the chain cannot take, or whose groups do not
    divide ``n``, are skipped) at batch size ``n`` and fit the coefficients (module
    docstring). ``seconds`` caps the time of the rounds (:func:`round_seconds`)."""
    chain_for = chain_for or (lambda plan: chain)
    probes = probe_plans(chain.T) if probes is None else probes
    dtype = next(iter(params.values())).dtype
    calls, rows, names = [], [], []
    for plan, ck, pairing in probes:
        c, G = plan_chain(chain_for, plan, ck), Pairing.parse(pairing).size
        try:
            plan.validate(c)
        except ValueError:
            continue
        if n % G or not admit(plan, ck):
            continue
        x_T = grouped(chain.sample_start(n // G, generator, dtype), G)
        device = latent(x_T).device
        calls.append(partial(estimate, c, plan, params, x_T, generator=generator, pairing=pairing))
        rows.append(features(plan, ck, c, pairing))
        names.append(f"{plan}" + (" ckpt" if ck else "") + (f" [{pairing}]" if G > 1 else ""))
    if not rows:
        raise ValueError("no probe plan could be timed on this chain")
    measured = median_seconds(calls, repeats, device, seconds=seconds)
    return fit_probes(names, rows, measured, n, repeats, timer(device)[1])


def fit_probes(names: Sequence[str], rows: Sequence[np.ndarray], measured: Sequence[float], n: int, repeats: int,
        resolution: float) -> TimeModel:
    """The :class:`TimeModel` fitted to the probes' counts ``rows`` (of :func:`features`) and
    ``measured`` seconds, none of them taken below the clock's ``resolution`` (> 0)."""
    if not resolution > 0:
        raise ValueError(f"the clock's resolution must be > 0 seconds, got {resolution}")
    A, b = np.array(rows), np.maximum(np.array(measured, dtype=float), resolution)
    coef, _ = nnls(A, b)
    fitted = A @ coef
    return TimeModel(tuple(float(c) for c in coef), tuple(zip(names, map(float, b), map(float, fitted))), n, repeats,
                     resolution)


def timer(device) -> tuple[Callable[[], float], float]:
    """The clock that times the engine on ``device`` and its resolution in seconds: wall clock
    on a GPU (with the device synchronised around it), the process's CPU time on a CPU."""
    name = "perf_counter" if torch.device(device).type == "cuda" else "process_time"
    return getattr(time, name), time.get_clock_info(name).resolution


def median_seconds(calls: Sequence[Callable[[], object]], repeats: int, device, block: float = 0.05,
                   seconds: float | None = None) -> list[float]:
    """Seconds per call of each of ``calls``: the median over the rounds of
    :func:`round_seconds`."""
    return [statistics.median(r) for r in round_seconds(calls, repeats, device, block, seconds)]


def round_seconds(calls: Sequence[Callable[[], object]], repeats: int, device,
                  block: float = 0.05, seconds: float | None = None) -> list[list[float]]:
    """Seconds per call of each of ``calls`` in each of ``repeats`` rounds (``[call][round]``).
    Each round times every call in turn (so that a slow spell of the machine slows them all
    alike), as a block of calls lasting about ``block`` seconds, divided by its length; the
    warm-up sizes the blocks, doubling from one call while a block is under half of
    ``block`` (so a coarse clock cannot ask for millions). Wall-clock time with the device
    synchronised around each block on a GPU, the process's CPU time on a CPU (:func:`timer`:
    it leaves out the time other processes hold the cores, not the slowdown they cause by
    sharing caches and memory bandwidth). With ``seconds``,
    fewer rounds where ``repeats`` of them would take longer (at least one), and none
    after the warm-up where the warm-up (one call each, after the search's memory
    measurement has run the model) already took longer: the warm-up is then the one
    round. Calls that long are timed precisely by one round, and a long chain's probes
    cost too much to repeat."""
    cuda = torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    clock = timer(device)[0]

    def timed(fn, k):
        sync()
        t0 = clock()
        for _ in range(k):
            fn()
        sync()
        return (clock() - t0) / k

    def size(fn):
        k, total = 1, timed(fn, 1)
        while total < block / 2 and k < 1 << 16:
            k *= 2
            total = timed(fn, k) * k
        return k, total / k

    t0 = clock()
    sizes, warm = zip(*[size(fn) for fn in calls]) if calls else ((), ())
    spent = clock() - t0
    if seconds is not None and spent > seconds:   # one call each already takes longer: the warm-up is the round
        return [[w] for w in warm]
    rounds = max(1, repeats) if seconds is None else max(1, min(repeats, int(seconds / max(spent, 1e-9))))
    times = [[timed(fn, k) for fn, k in zip(calls, sizes)] for _ in range(rounds)]
    return [list(col) for col in zip(*times)]

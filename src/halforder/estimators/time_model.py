"""What a plan costs in time on a chain: seconds per estimate, fitted to wall-clock
measurements of the engine on probe plans (docs/plan-search.md).

The time of one estimate is modelled as a non-negative combination of counts,

    rollout steps without and with parameter noise (steps K+1..T: per-sample parameters
    cost more in a diffusion chain), steps evaluated with gradients (forward and backward:
    K + sum h), checkpointed steps (a second forward), HO blocks, ZO steps (the running
    sum), whether the reward is backpropagated (K > 0), and one call,

whose coefficients (seconds per unit) are fitted by non-negative least squares to the
median time (over ``repeats``, after a warm-up; :func:`median_seconds`: wall clock on a GPU,
the process's CPU time on a CPU) of :func:`~halforder.estimators.estimate` on a set of probe
plans chosen to vary every count. Timing on a shared machine is noisy; CPU time, medians
and the fit over several probes damp that, and :attr:`TimeModel.probes` keeps the measured
and fitted time of each probe.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import numpy as np
import torch
from scipy.optimize import nnls

from .engine import estimate
from .gradient_checkpointing import Checkpointed
from .plan import ChainFor, Plan, Role
from .protocol import latent

FEATURES = ("rollout step", "rollout step with parameter noise", "gradient step (forward + backward)",
            "checkpointed step", "HO block", "ZO step", "reward backward", "call")


def plan_chain(chain_for: ChainFor, plan: Plan, checkpoint: Collection[int] = ()):
    """The chain ``plan`` runs on, with the steps ``checkpoint`` checkpointed."""
    c = chain_for(plan)
    return Checkpointed(c, checkpoint) if checkpoint else c


def features(plan: Plan, checkpoint: Collection[int], chain) -> np.ndarray:
    """The counts of :data:`FEATURES` for ``plan`` on its chain ``chain``."""
    K = plan.fo_steps
    noisy = [float(chain.tau(t)) > 0 for t in range(K + 1, plan.T + 1)]
    grad = K + sum(h for _, h in plan.blocks)
    ckpt = sum(1 for t in checkpoint if t <= K or plan.roles[t - 1] is Role.HO)
    return np.array([noisy.count(False), noisy.count(True), grad, ckpt, len(plan.blocks),
                     len(plan.steps(Role.ZO)), float(K > 0), 1.0])


@dataclass(frozen=True)
class TimeModel:
    """Seconds per estimate (module docstring).

    Attributes:
      coef: seconds per unit of each of :data:`FEATURES`.
      probes: (probe name, measured seconds, fitted seconds) for each probe.
      n: samples per estimate.
      repeats: timings per probe (their median is used).
    """

    coef: tuple[float, ...]
    probes: tuple[tuple[str, float, float], ...]
    n: int
    repeats: int

    def predict(self, plan: Plan, checkpoint: Collection[int], chain) -> float:
        """Seconds per estimate of ``plan`` with ``checkpoint`` on its chain ``chain``."""
        return float(np.dot(self.coef, features(plan, checkpoint, chain)))


def probe_plans(T: int) -> list[tuple[Plan, frozenset[int]]]:
    """Probes that vary every count: zeroth order, full backprop (plain and checkpointed),
    truncation, REINFORCE, an FO prefix with ZO, and RLR-like plans with long blocks."""
    half = max(1, T // 2)
    out = [(Plan.zeroth_order(T), frozenset()), (Plan.full(T), frozenset()),
           (Plan.full(T), frozenset(range(1, T + 1))), (Plan.reinforce(T), frozenset())]
    if T >= 2:
        fo_zo = Plan.from_roles(["FO"] * half + ["ZO"] * (T - half))
        out += [(Plan.truncated(T, half), frozenset()), (fo_zo, frozenset()), (fo_zo, frozenset(range(1, half + 1)))]
    if T >= 3:
        h = T - 1 - (T - 1) // 2
        rlr = Plan.from_roles(["FO"] + ["HO"] * h + ["ZO"] * (T - 1 - h), [(2, h)])
        out += [(rlr, frozenset()), (rlr, frozenset(range(2, h + 2)))]
    return out


def fit_time_model(chain, params, n: int, *, generator: torch.Generator, chain_for: ChainFor | None = None,
                   repeats: int = 5, probes: Sequence[tuple[Plan, Collection[int]]] | None = None,
                   admit: Callable[[Plan, Collection[int]], bool] = lambda plan, ck: True) -> TimeModel:
    """Time the engine on ``probes`` (default :func:`probe_plans`; those ``admit`` refuses,
    e.g. over a memory limit, or whose roles the chain cannot take, are skipped) at batch
    size ``n`` and fit the coefficients (module docstring)."""
    chain_for = chain_for or (lambda plan: chain)
    probes = probe_plans(chain.T) if probes is None else probes
    dtype = next(iter(params.values())).dtype
    rows, times, names = [], [], []
    for plan, ck in probes:
        c = plan_chain(chain_for, plan, ck)
        try:
            plan.validate(c)
        except ValueError:
            continue
        if not admit(plan, ck):
            continue
        x_T = chain.sample_start(n, generator, dtype)
        times.append(median_seconds(lambda: estimate(c, plan, params, x_T, generator=generator), repeats,
                                    latent(x_T).device))
        rows.append(features(plan, ck, c))
        names.append(f"{plan}" + (" ckpt" if ck else ""))
    if not rows:
        raise ValueError("no probe plan could be timed on this chain")
    A, b = np.array(rows), np.array(times)
    coef, _ = nnls(A, b)
    fitted = A @ coef
    return TimeModel(tuple(float(c) for c in coef), tuple(zip(names, map(float, b), map(float, fitted))), n, repeats)


def median_seconds(fn: Callable[[], object], repeats: int, device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call: wall-clock
    time with the device synchronised around each call on a GPU, the process's CPU time on
    a CPU (robust to other processes sharing the machine; with one thread it is the time)."""
    cuda = torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    fn()
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times)

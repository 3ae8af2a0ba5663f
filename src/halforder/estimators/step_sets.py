"""Random sets of trained steps, weighted or as the field runs them (docs/field-estimators.md).

Each sampler draws the set S of steps whose terms a plan keeps, from its own generator and
before the step's noise is drawn, and comes in two labelled variants:

    weighted     step t's term times 1 / P(t in S): E_S[sum_{t in S} g_t / P(t in S)] = sum_t g_t,
                 unbiased (a Horvitz-Thompson sum) wherever every step can be drawn;
    unweighted   the terms as drawn (the field's form): E_S[...] = sum_t P(t in S) g_t, biased
                 unless every step is always drawn.

For a uniform subset of k of n steps (DanceGRPO's and Flow-GRPO's ``timestep_fraction``)
P(t in S) = k / n for every t, so the unweighted form is grad J scaled by k / n: biased in
length, not in direction. A window at a random position covers the middle steps more often
than the ends, so its unweighted form is biased in direction too. A sliding window (MixGRPO)
moves with the update index: at any one update it estimates the gradient through its own
steps only, weighted or not.

Randomised truncation draws the length K of the FO prefix: weighted by 1 / P(K >= t) it is
the Russian-roulette estimator (unbiased when P(K = T) > 0); unweighted it is AlignProp's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Plan
from .samplers import State

WEIGHTINGS = ("unbiased", "field")
POSITIONS = ("random", "sliding")


def _weights(plan: Plan, inclusion: dict[int, float], weighted: bool, label: str) -> Plan:
    if not weighted:
        return Plan(plan.roles, plan.blocks, f"{plan.name} ({label}, unweighted)")
    w = [1.0 / inclusion[t] if t in inclusion else 1.0 for t in range(1, plan.T + 1)]
    return plan.with_weights(w, f"{plan.name} ({label}, weighted)")


def _candidates(T: int, within: tuple[int, int] | None) -> tuple[int, ...]:
    if within is None:
        return tuple(range(1, T + 1))
    a, b = (int(v) for v in within)
    if not 1 <= a <= b <= T:
        raise ValueError(f"the steps a..b must satisfy 1 <= a <= b <= T={T}, got a={a}, b={b}")
    return tuple(range(a, b + 1))


def _check_weighting(weighting: str) -> bool:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"step weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return weighting == "unbiased"


@dataclass(frozen=True)
class RandomSubset:
    """REINFORCE on a uniform random subset of k = max(1, round(fraction * n)) of the n
    candidate steps (1..T, or ``within = (a, b)``), drawn afresh every update (DanceGRPO's
    ``timestep_fraction``); ``weighting`` ``"unbiased"`` (weights n / k) or ``"field"``."""

    T: int
    fraction: float
    weighting: str = "unbiased"
    within: tuple[int, int] | None = None

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"the step fraction must lie in (0, 1], got {self.fraction}")
        _check_weighting(self.weighting)
        _candidates(self.T, self.within)

    @property
    def size(self) -> int:
        """k, the steps drawn."""
        return max(1, round(self.fraction * len(_candidates(self.T, self.within))))

    @property
    def unbiased(self) -> bool:
        """Whether the law's estimate is unbiased for grad J."""
        return (self.weighting == "unbiased" and self.within is None) or self.size == self.T

    def init(self) -> State:
        return {}

    def sample(self, state: State, generator: torch.Generator | None = None) -> Plan:
        cand = _candidates(self.T, self.within)
        pick = torch.randperm(len(cand), generator=generator)[:self.size]
        plan = Plan.reinforce(self.T, [cand[i] for i in pick.tolist()])
        p = self.size / len(cand)
        return _weights(plan, {t: p for t in cand}, self.weighting == "unbiased", f"fraction {self.fraction:g}")

    def update(self, state: State, plan: Plan, estimate) -> State:
        return state


@dataclass(frozen=True)
class RandomWindow:
    """REINFORCE on a window of ``length`` consecutive candidate steps (1..T, or ``within =
    (a, b)``): at a uniform random position every update (``"random"``), or sliding from the
    first generated steps (t = b) down by one step every ``every`` updates and around again
    (``"sliding"``, MixGRPO's progressive window). ``weighting`` ``"unbiased"`` weighs step t
    by 1 / (share of positions that cover it); ``"field"`` keeps the terms as drawn."""

    T: int
    length: int
    position: str = "random"
    weighting: str = "unbiased"
    within: tuple[int, int] | None = None
    every: int = 1

    def __post_init__(self):
        cand = _candidates(self.T, self.within)
        if not 1 <= self.length <= len(cand):
            raise ValueError(f"the window length must lie in 1..{len(cand)} (the candidate steps), got {self.length}")
        if self.position not in POSITIONS:
            raise ValueError(f"window position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.every < 1:
            raise ValueError(f"a sliding window moves every >= 1 updates, got {self.every}")
        _check_weighting(self.weighting)

    @property
    def starts(self) -> tuple[int, ...]:
        """The lowest step of each position, from the first generated steps down."""
        cand = _candidates(self.T, self.within)
        return tuple(range(cand[-1] - self.length + 1, cand[0] - 1, -1))

    @property
    def unbiased(self) -> bool:
        """Whether the law's estimate is unbiased for grad J at every update."""
        covers_all = self.within is None or _candidates(self.T, self.within) == tuple(range(1, self.T + 1))
        return covers_all and (self.length == self.T or (self.position == "random" and self.weighting == "unbiased"))

    def inclusion(self) -> dict[int, float]:
        """P(t in window) over the positions (uniform over them, or over a sliding cycle)."""
        starts = self.starts
        return {t: sum(s <= t < s + self.length for s in starts) / len(starts) for t in _candidates(self.T, self.within)}

    def init(self) -> State:
        return {"updates": torch.zeros((), dtype=torch.int64)} if self.position == "sliding" else {}

    def sample(self, state: State, generator: torch.Generator | None = None) -> Plan:
        starts = self.starts
        if self.position == "random":
            s = starts[int(torch.randint(len(starts), (), generator=generator))]
        else:
            s = starts[(int(state["updates"]) // self.every) % len(starts)]
        plan = Plan.reinforce(self.T, range(s, s + self.length))
        return _weights(plan, self.inclusion(), self.weighting == "unbiased", f"{self.position} window {self.length}")

    def update(self, state: State, plan: Plan, estimate) -> State:
        return {"updates": state["updates"] + 1} if self.position == "sliding" else state


@dataclass(frozen=True)
class RandomTruncation:
    """Truncated backprop with K uniform on 1..k_max, drawn afresh every update. ``weighting``
    ``"field"`` is AlignProp's randomized truncation (biased, Prop. 6.1, for every K < T);
    ``"unbiased"`` weighs step t by 1 / P(K >= t), the Russian-roulette estimator, unbiased
    when k_max = T."""

    T: int
    k_max: int
    weighting: str = "field"

    def __post_init__(self):
        Plan.truncated(self.T, self.k_max)  # validates T and k_max
        _check_weighting(self.weighting)

    @property
    def unbiased(self) -> bool:
        """Whether the law's estimate is unbiased for grad J."""
        return self.weighting == "unbiased" and self.k_max == self.T

    def survival(self, t: int) -> float:
        """P(K >= t)."""
        return max(0, self.k_max - t + 1) / self.k_max

    def init(self) -> State:
        return {}

    def sample(self, state: State, generator: torch.Generator | None = None) -> Plan:
        K = int(torch.randint(1, self.k_max + 1, (), generator=generator))
        plan = Plan.truncated(self.T, K)
        if self.weighting == "field":
            return plan
        return _weights(plan, {t: self.survival(t) for t in range(1, K + 1)}, True, "roulette")

    def update(self, state: State, plan: Plan, estimate) -> State:
        return state

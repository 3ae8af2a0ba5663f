"""Plan samplers: which plan a training step uses (docs/design.md, "Plan samplers").

A trainer asks a sampler for the plan of each step; every sampler shares one small,
optax-like API over an explicit state:

    state = sampler.init()                       # a dict of tensors (checkpointable), maybe empty
    plan  = sampler.sample(state, generator)     # draws from ``generator`` only
    state = sampler.update(state, plan, est)     # after the step, from its Estimate

RLR(h, j) is unbiased for every fixed j, so j may follow any law that does not look at
the current sample's noise. Every sampler here draws j *before* the step's noise is
drawn, from a law that depends only on past steps (through ``state``), so the
estimate stays unbiased conditionally on j and hence overall. The same holds for any
law over unbiased plans. Each sampler says whether its law is unbiased (``unbiased``);
:class:`DropZO` is not. Random sets of steps are :mod:`~halforder.estimators.step_sets`,
and the families built from these samplers :mod:`~halforder.estimators.families`.

Indices follow :meth:`Plan.rlr`: the HO block is steps j..j+h-1 with 2 <= j <= T-h+1
(step 1 is the FO step). The paper writes j in 1..T-h for the same T-h positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping, Protocol, runtime_checkable

import torch

from .plan import Plan, Role

State = dict[str, torch.Tensor]


@runtime_checkable
class PlanSampler(Protocol):
    """Structural type of a plan sampler (see module docstring)."""

    T: int
    unbiased: bool

    def init(self) -> State: ...

    def sample(self, state: State, generator: torch.Generator | None = None) -> Plan: ...

    def update(self, state: State, plan: Plan, estimate) -> State: ...


@dataclass(frozen=True)
class FixedPlan:
    """Always the same plan (full, truncated, reinforce, zeroth_order, a fixed RLR(h, j), ...)."""

    plan: Plan

    @property
    def T(self) -> int:
        return self.plan.T

    @property
    def unbiased(self) -> bool:
        """Whether the law's estimate is unbiased for grad J: the plan's own."""
        return self.plan.is_unbiased

    def init(self) -> State:
        return {}

    def sample(self, state: State, generator: torch.Generator | None = None) -> Plan:
        return self.plan

    def update(self, state: State, plan: Plan, estimate) -> State:
        return state


@dataclass(frozen=True)
class UniformRLR:
    """RLR(h, j) with j uniform on 2..T-h+1 (the paper's j ~ U(1, T-h)). h = 0 gives RLR
    without HO, which has no j."""

    T: int
    h: int

    def __post_init__(self):
        Plan.rlr(self.T, self.h, None if self.h == 0 else 2)  # validates T and h

    unbiased = True   # RLR(h, j) is unbiased for every j, drawn before the noise

    def init(self) -> State:
        return {}

    def sample(self, state: State, generator: torch.Generator | None = None) -> Plan:
        if self.h == 0:
            return Plan.rlr(self.T, 0)
        return Plan.rlr(self.T, self.h, _uniform_int(2, self.T - self.h + 1, generator))

    def update(self, state: State, plan: Plan, estimate) -> State:
        return state


@dataclass(frozen=True)
class WindowRLR:
    """RLR(h, j) with j uniform on the window a..b (DCoT, sec. 5.3: j ~ U(a, b) with
    b - a > h), so the HO block lands on the steps (scales) where generation is deficient.

    The window must fit: 2 <= a and b <= T-h+1, so that every block j..j+h-1 lies in 2..T.
    """

    T: int
    h: int
    a: int
    b: int

    def __post_init__(self):
        if self.h < 1:
            raise ValueError(f"a window on j needs an HO block, i.e. h >= 1, got h={self.h}")
        if not self.b - self.a > self.h:
            raise ValueError(f"the window [a, b] = [{self.a}, {self.b}] needs b - a > h = {self.h}")
        try:  # both ends must be admissible block starts
            Plan.rlr(self.T, self.h, self.a)
            Plan.rlr(self.T, self.h, self.b)
        except ValueError as e:
            raise ValueError(f"the window [a, b] = [{self.a}, {self.b}] does not fit: {e}") from None

    unbiased = True   # RLR(h, j) is unbiased for every j, drawn before the noise

    def init(self) -> State:
        return {}

    def sample(self, state: State, generator: torch.Generator | None = None) -> Plan:
        return Plan.rlr(self.T, self.h, _uniform_int(self.a, self.b, generator))

    def update(self, state: State, plan: Plan, estimate) -> State:
        return state


@dataclass(frozen=True)
class SoftmaxRLR:
    """RLR(h, j) with j ~ Cat(softmax(|g_j| / temperature)) over j = 2..T-h+1 (sec. 4.2,
    "Determining j"; the paper has temperature 1).

    The norms |g_j| are a running estimate fed back by the trainer through :meth:`update`:
    after a step that used the block (j, h), the norm of that step's HO part (its estimate
    of sum_{t=j}^{j+h-1} grad_{theta_t} J, averaged over the batch and the processes) updates
    an exponential moving average for j with weight ``1 - decay``; the first observation of
    a j sets it. A j not yet observed takes the mean of the observed ones (0 when none is),
    so the first draws are uniform and every j keeps being explored.

    The law of j depends only on past steps, never on the current sample's noise, so the
    estimator stays unbiased.
    """

    T: int
    h: int
    temperature: float = 1.0
    decay: float = 0.9

    def __post_init__(self):
        if self.h < 1:
            raise ValueError("sampling j needs an HO block, i.e. h >= 1")
        Plan.rlr(self.T, self.h, 2)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")

    @property
    def js(self) -> range:
        """The admissible j: 2..T-h+1."""
        return range(2, self.T - self.h + 2)

    unbiased = True   # RLR(h, j) is unbiased for every j, drawn before the noise

    def init(self) -> State:
        n = len(self.js)
        return {"norm": torch.zeros(n, dtype=torch.float64), "count": torch.zeros(n, dtype=torch.int64)}

    def probabilities(self, state: State) -> torch.Tensor:
        """The law of j over :attr:`js` given ``state``."""
        norm, seen = state["norm"], state["count"] > 0
        fill = norm[seen].mean() if bool(seen.any()) else norm.new_zeros(())
        logits = torch.where(seen, norm, fill) / self.temperature
        return torch.softmax(logits, 0)

    def sample(self, state: State, generator: torch.Generator | None = None) -> Plan:
        i = int(torch.multinomial(self.probabilities(state), 1, generator=generator))
        return Plan.rlr(self.T, self.h, self.js[i])

    def observe(self, state: State, j: int, norm: float) -> State:
        """The state after observing the gradient norm ``norm`` of the block starting at ``j``."""
        if j not in self.js:
            raise ValueError(f"j={j} is not in {self.js.start}..{self.js.stop - 1}")
        if not math.isfinite(norm) or norm < 0:
            raise ValueError(f"a gradient norm must be finite and >= 0, got {norm}")
        i = j - self.js.start
        out = {"norm": state["norm"].clone(), "count": state["count"].clone()}
        old = float(out["norm"][i])
        out["norm"][i] = norm if int(out["count"][i]) == 0 else self.decay * old + (1 - self.decay) * norm
        out["count"][i] += 1
        return out

    def update(self, state: State, plan: Plan, estimate) -> State:
        if not plan.blocks:
            return state
        (j, h), = plan.blocks
        return self.observe(state, j, parts_norm(estimate.parts["HO"]))


def parts_norm(grad: Mapping[str, torch.Tensor]) -> float:
    """The Euclidean norm of a gradient given as name -> tensor."""
    return math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grad.values()))


@dataclass(frozen=True)
class _RoleReplaced:
    """The plans of ``inner`` with every step of role ``old`` given role ``new`` (blocks and
    weights kept), named with ``suffix``."""

    inner: PlanSampler
    old: ClassVar[Role]
    new: ClassVar[Role]
    suffix: ClassVar[str]

    @property
    def T(self) -> int:
        return self.inner.T

    def init(self) -> State:
        return self.inner.init()

    def sample(self, state: State, generator: torch.Generator | None = None) -> Plan:
        plan = self.inner.sample(state, generator)
        roles = [self.new if r is self.old else r for r in plan.roles]
        return Plan.from_roles(roles, plan.blocks, name=f"{plan}{self.suffix}").with_weights(plan.weights)

    def update(self, state: State, plan: Plan, estimate) -> State:
        return self.inner.update(state, plan, estimate)


@dataclass(frozen=True)
class DropZO(_RoleReplaced):
    """The plans of ``inner`` with their ZO steps dropped (role NONE). **Biased**: RLR
    without its zeroth-order term, which is what the official RLR code computes
    (docs/official-code-notes.md). For comparisons only."""

    old, new, suffix = Role.ZO, Role.NONE, "-noZO"
    unbiased = False


@dataclass(frozen=True)
class FirstOrderAsZO(_RoleReplaced):
    """The plans of ``inner`` with their FO steps estimated by zeroth order instead (role ZO):
    every step's term is then a likelihood ratio, so no plan needs the reward's gradient.
    Unbiased where ``inner`` is: a ZO step's term is an unbiased estimate of that step's
    share of the gradient (eq. (5)), as its FO term was."""

    old, new, suffix = Role.FO, Role.ZO, "-FOasZO"

    @property
    def unbiased(self) -> bool:
        return getattr(self.inner, "unbiased", True)


def _uniform_int(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """One draw from the integers lo..hi (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))

"""A plan assigns every step of a chain one gradient-estimation role (docs/design.md,
"The estimator design space").

Write theta_t for the copy of theta used at step t, so that grad J = sum_t grad_{theta_t} J.
Each role estimates grad_{theta_t} J for its steps:

    FO    pathwise: backprop from R(x_0) through steps t-1..1 into theta_t.
          FO steps form a prefix 1..K.
    HO    a block of h consecutive steps j..j+h-1: pathwise through the block (from the
          stored x_{j+h-1}), then the likelihood ratio at the inherent noise eps_j that
          ends it: R(x_0) * D_theta Phi^T eps_j / sigma_j. Needs sigma_j > 0.
    ZO    likelihood ratio on the parameter noise: R(x_0) * eps'_t / tau_t. Needs tau_t > 0.
    NONE  the step's term is dropped (this biases the estimate).

Each step also carries a weight w_t (default 1) that multiplies its term, whatever its role:
the plan then estimates sum_t w_t grad_{theta_t} J. The forward values do not change. A
random set of steps S with weights 1 / P(t in S) estimates grad J without bias over the law
of S (a Horvitz-Thompson sum; :mod:`~halforder.estimators.step_sets`).

The paper's estimators are named members: full backprop, truncated backprop (AlignProp,
DRaFT-K), REINFORCE (DDPO-style), zeroth order (evolution strategies) and RLR(h, j) of
eq. (6). Any other assignment is a plan too.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence


class Role(str, enum.Enum):
    """How one step's parameter gradient is estimated."""

    FO = "FO"
    HO = "HO"
    ZO = "ZO"
    NONE = "NONE"


@dataclass(frozen=True)
class Plan:
    """One role per step, and the HO blocks.

    Attributes:
      roles: ``roles[t-1]`` is the role of step t (t = 1 is the last step generated,
        the one that produces x_0).
      blocks: the HO blocks as ``(j, h)``: steps j..j+h-1, likelihood ratio at eps_j.
        Every HO step lies in exactly one block.
      name: a label for tables and logs; not part of equality.
      weights: ``weights[t-1]`` multiplies step t's term (finite, > 0); empty: all 1. A
        dropped (NONE) step's weight is stored as 1.
    """

    roles: tuple[Role, ...]
    blocks: tuple[tuple[int, int], ...] = ()
    name: str = field(default="", compare=False)
    weights: tuple[float, ...] = ()

    def __post_init__(self):
        roles = tuple(Role(r) for r in self.roles)
        object.__setattr__(self, "roles", roles)
        object.__setattr__(self, "blocks", tuple(sorted((int(j), int(h)) for j, h in self.blocks)))
        T = len(roles)
        if T < 1:
            raise ValueError("a plan needs at least one step")
        weights = tuple(float(w) for w in self.weights) or (1.0,) * T
        if len(weights) != T:
            raise ValueError(f"a plan of {T} steps needs {T} weights, got {len(weights)}")
        for t, w in enumerate(weights, start=1):
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"step {t}: weight {w} must be finite and > 0 (drop a step with role NONE)")
        object.__setattr__(self, "weights", tuple(1.0 if r is Role.NONE else w for r, w in zip(roles, weights)))
        seen_other = None
        for t, r in enumerate(roles, start=1):
            if r is Role.FO and seen_other is not None:
                raise ValueError(
                    f"step {t}: FO steps must form a prefix 1..K, but step {seen_other} "
                    f"before it is {roles[seen_other - 1].value}")
            if r is not Role.FO and seen_other is None:
                seen_other = t
        covered = set()
        for j, h in self.blocks:
            if h < 1:
                raise ValueError(f"step {j}: HO block (j={j}, h={h}) needs h >= 1")
            if j < 1 or j + h - 1 > T:
                raise ValueError(f"step {j}: HO block (j={j}, h={h}) does not fit in 1..{T}")
            for t in range(j, j + h):
                if roles[t - 1] is not Role.HO:
                    raise ValueError(f"step {t}: in HO block (j={j}, h={h}) but its role is {roles[t - 1].value}")
                if t in covered:
                    raise ValueError(f"step {t}: lies in two HO blocks")
                covered.add(t)
        for t, r in enumerate(roles, start=1):
            if r is Role.HO and t not in covered:
                raise ValueError(f"step {t}: role HO but in no HO block")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_roles(cls, roles: Iterable[str | Role], blocks: Sequence[tuple[int, int]] | None = None,
                   name: str = "") -> "Plan":
        """Any assignment. ``roles[t-1]`` is step t's role. Without ``blocks``, each maximal
        run of consecutive HO steps is one block."""
        roles = tuple(Role(r) for r in roles)
        if blocks is None:
            blocks, t = [], 1
            while t <= len(roles):
                if roles[t - 1] is Role.HO:
                    start = t
                    while t <= len(roles) and roles[t - 1] is Role.HO:
                        t += 1
                    blocks.append((start, t - start))
                else:
                    t += 1
        return cls(roles, tuple(blocks), name or "custom")

    @classmethod
    def full(cls, T: int) -> "Plan":
        """Full backpropagation: FO on every step (unbiased)."""
        _check_T(T)
        return cls((Role.FO,) * T, (), "full")

    @classmethod
    def truncated(cls, T: int, k: int) -> "Plan":
        """Truncated backprop (AlignProp, DRaFT-K): FO on 1..k, NONE elsewhere (biased,
        Proposition 6.1)."""
        _check_T(T)
        if not 1 <= k <= T:
            raise ValueError(f"truncated backprop needs 1 <= k <= T={T}, got k={k}")
        return cls((Role.FO,) * k + (Role.NONE,) * (T - k), (), f"truncated(k={k})")

    @classmethod
    def zeroth_order(cls, T: int) -> "Plan":
        """Evolution strategies: ZO on every step."""
        _check_T(T)
        return cls((Role.ZO,) * T, (), "zeroth_order")

    @classmethod
    def reinforce(cls, T: int, steps: Sequence[int] | None = None) -> "Plan":
        """REINFORCE / DDPO-style: HO blocks of length 1 on every step, or only on ``steps``
        (the others NONE: Flow-GRPO's subset of steps, MixGRPO's window). With ``steps`` the
        plan estimates the gradient through those steps' parameters alone."""
        _check_T(T)
        if steps is None:
            return cls((Role.HO,) * T, tuple((t, 1) for t in range(1, T + 1)), "reinforce")
        chosen = sorted({int(t) for t in steps})
        if not chosen or chosen[0] < 1 or chosen[-1] > T:
            raise ValueError(f"REINFORCE steps must be a non-empty subset of 1..{T}, got {list(steps)}")
        roles = tuple(Role.HO if t in chosen else Role.NONE for t in range(1, T + 1))
        return cls(roles, tuple((t, 1) for t in chosen), f"reinforce{chosen}")

    @classmethod
    def rlr(cls, T: int, h: int, j: int | None = None) -> "Plan":
        """RLR(h, j) of eq. (6): FO on step 1, one HO block on steps j..j+h-1
        (2 <= j, j+h-1 <= T), ZO on every other step. ``h = 0`` (no j) is RLR without HO."""
        _check_T(T)
        if h < 0 or h > T - 1:
            raise ValueError(f"h={h} is {'negative' if h < 0 else 'too large'}: RLR needs 0 <= h <= T-1 = {T - 1} "
                             f"(step 1 is first order)")
        if h == 0:
            if j is not None:
                raise ValueError(f"RLR with h=0 has no HO block, so j must be None (got j={j})")
            return cls((Role.FO,) + (Role.ZO,) * (T - 1), (), "rlr(h=0)")
        if j is None or not 2 <= j <= T - h + 1:
            raise ValueError(f"RLR(h={h}) needs 2 <= j <= T-h+1 = {T - h + 1} for the start j of its HO block, "
                             f"got j={j}")
        roles = [Role.ZO] * T
        roles[0] = Role.FO
        for t in range(j, j + h):
            roles[t - 1] = Role.HO
        return cls(tuple(roles), ((j, h),), f"rlr(h={h},j={j})")

    def with_weights(self, weights: Sequence[float], name: str | None = None) -> "Plan":
        """The same roles and blocks with per-step ``weights`` (``weights[t-1]`` for step t)."""
        return replace(self, weights=tuple(weights), name=self.name if name is None else name)

    # ----------------------------------------------------------------- properties
    @property
    def T(self) -> int:
        return len(self.roles)

    @property
    def fo_steps(self) -> int:
        """K, the length of the FO prefix 1..K."""
        return sum(r is Role.FO for r in self.roles)

    @property
    def is_unbiased(self) -> bool:
        """No step is dropped and every weight is 1. (Each role's need on a given chain is
        checked by :meth:`validate`; a plan that passes it and is_unbiased is unbiased there. A
        plan drawn by a sampler may be biased on its own and unbiased over the sampler's law:
        the sampler's ``unbiased`` says.)"""
        return Role.NONE not in self.roles and all(w == 1.0 for w in self.weights)

    def summary(self) -> dict:
        """The plan as a training record shows it: its name, and j, the start of its HO block
        where it has exactly one (RLR's block; None otherwise)."""
        return {"plan": str(self), "j": self.blocks[0][0] if len(self.blocks) == 1 else None}

    def weight(self, t: int) -> float:
        """w_t, the weight of step t's term."""
        return self.weights[t - 1]

    def steps(self, role: Role | str) -> tuple[int, ...]:
        """The steps t (1-based) that have ``role``."""
        role = Role(role)
        return tuple(t for t, r in enumerate(self.roles, start=1) if r is role)

    def cost(self) -> dict[str, int]:
        """Deterministic cost model in units of one step of the chain.

        ``graph_steps`` counts step graphs kept at once: the FO prefix is kept with the
        reward's graph and freed before the HO blocks are recomputed one at a time from
        their stored inputs, so it is max(K, max h). ``forward`` counts step evaluations
        (the rollout plus the HO recomputation), ``backward`` the steps backpropagated.
        """
        hs = [h for _, h in self.blocks]
        return {
            "graph_steps": max([self.fo_steps, *hs]),
            "forward": self.T + sum(hs),
            "backward": self.fo_steps + sum(hs),
            "reward_backward": int(self.fo_steps > 0),
        }

    def validate(self, chain) -> None:
        """Raise ``ValueError`` naming the step and the reason if a role's need does not
        hold on ``chain``."""
        if self.T != chain.T:
            raise ValueError(f"plan has T={self.T} steps but the chain has T={chain.T}")
        for j, h in self.blocks:
            if not float(chain.sigma(j)) > 0:
                raise ValueError(f"step {j}: HO block (j={j}, h={h}) ends where sigma_{j} = 0; "
                                 "its likelihood ratio needs inherent noise")
        for t in self.steps(Role.ZO):
            if not float(chain.tau(t)) > 0:
                raise ValueError(f"step {t}: ZO needs parameter noise, but tau_{t} = 0")

    def __str__(self) -> str:
        return self.name or "".join(r.value[0] for r in self.roles)


def _check_T(T: int) -> None:
    if int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")


#: A plan's chain: ``chain_for(plan)`` gives the chain a plan runs on, where the noise
#: scales depend on the plan (a diffusion chain's ``for_plan``).
ChainFor = Callable[[Plan], object]

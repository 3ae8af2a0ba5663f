"""The candidates of the plan search: a plan, the pairing of its samples and the steps it
checkpoints (:class:`Candidate`), and the set searched (:class:`Space`; docs/plan-search.md,
"What is searched")."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..estimators.plan import ChainFor, Plan, Role
from .part_variances import layout
from .time_model import plan_chain


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
      checkpoint: True: checkpointing of each role on or off; False: none; ``"all-or-none"``:
        every role where it can matter (:func:`checkpointable`) or none (what a run's
        ``Checkpointed(chain)`` gives); ``"all"``: every role where it can matter.
      biased: also offer plans with dropped steps (marked biased).
    """

    ks: tuple[int, ...] | None = None
    hs: tuple[int, ...] | None = None
    positions: int = 3
    pairings: tuple[str, ...] = ("none", "param")
    checkpoint: bool | str = True
    biased: bool = False

    def __post_init__(self):
        if self.checkpoint not in (True, False, "all-or-none", "all"):
            raise ValueError(f"checkpoint is True, False, 'all-or-none' or 'all', got {self.checkpoint!r}")
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
                if self.checkpoint in ("all-or-none", "all"):
                    cks = [c for c in cks if c == can or (not c and self.checkpoint == "all-or-none")]
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

"""Antithetic groups: samples drawn in groups that share all their noise but a mirrored part.

A group of G consecutive samples shares its start state and every noise draw, except the
noise kinds the pairing *mirrors*: each mirrored kind takes the signs +eps and -eps across
the group, and with two mirrored kinds the group holds all four sign combinations:

    pairing      G   member signs (parameter noise eps'; noise eps_j where HO blocks end)
    "none"       1   (+)
    "param"      2   eps': (+, -)                    every other noise shared
    "ho"         2   eps_j: (+, -)                   every other noise shared
    "param+ho"   4   eps': (+, -, +, -), eps_j: (+, +, -, -)

Every member has the chain's own noise law (-eps ~ eps, independent of the rest), so each
member's estimate, and hence the group mean, is unbiased. Mirroring a noise contrasts the
members that differ only in it: with "param" the two ZO terms R(x_0) eps'/tau average to
(R(+eps') - R(-eps')) eps' / (2 tau), the two-sided difference of zeroth-order
optimisation (MeZO), in which the part of R that does not depend on eps' (most of
Var(R), which comes from the inherent noise) cancels. With "ho" the HO terms are
contrasted the same way at the block ends' noise.

A baseline must not depend on a sample's own noise; under pairing the other members of
its group share that noise, so the leave-one-out baseline leaves the whole group out
(:func:`~halforder.estimators.baselines.leave_one_out` with ``group=G``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAIRINGS = ("none", "param", "ho", "param+ho")
AUTO = "auto"


@dataclass(frozen=True)
class Pairing:
    """Which noise kinds a group mirrors: a subset of ``("param", "ho")``."""

    mirrored: tuple[str, ...] = ()

    @classmethod
    def parse(cls, pairing: "str | Pairing | None") -> "Pairing":
        """A pairing from its name (one of :data:`PAIRINGS`; None is ``"none"``)."""
        if isinstance(pairing, Pairing):
            return pairing
        name = "none" if pairing is None else pairing
        if name not in PAIRINGS:
            raise ValueError(f"unknown pairing {pairing!r}; use one of {', '.join(PAIRINGS)}")
        return cls(() if name == "none" else tuple(name.split("+")))

    @property
    def size(self) -> int:
        """G, the samples in a group."""
        return 2 ** len(self.mirrored)

    @property
    def name(self) -> str:
        return "+".join(self.mirrored) or "none"

    def signs(self, kind: str) -> tuple[float, ...]:
        """The sign of noise ``kind`` ("param" or "ho") for each member of a group."""
        if kind not in self.mirrored:
            return (1.0,) * self.size
        period = 2 ** self.mirrored.index(kind)   # "param" alternates fastest
        return tuple(-1.0 if (i // period) % 2 else 1.0 for i in range(self.size))

    def expand(self, z: torch.Tensor, kind: str) -> torch.Tensor:
        """Per-group draws ``[N/G, ...]`` as per-sample noise ``[N, ...]``: each group's draw
        repeated over its members, with the members' signs if ``kind`` is mirrored."""
        if self.size == 1:
            return z
        if kind not in self.mirrored:
            return z.repeat_interleave(self.size, dim=0)
        return torch.stack([z if s > 0 else -z for s in self.signs(kind)], 1).flatten(0, 1)


def grouped(x, size: int):
    """Rows repeated ``size`` times in place (``[a, b] -> [a, a, b, b]`` for size 2): start
    states or conditioning shared by the members of each group. A tuple state is grouped
    element by element."""
    if isinstance(x, tuple):
        return tuple(grouped(v, size) for v in x)
    if isinstance(x, torch.Tensor):
        return x.repeat_interleave(size, dim=0)
    return [v for v in x for _ in range(size)]


def group_means(x: torch.Tensor, size: int) -> torch.Tensor:
    """The mean over each group of ``size`` consecutive rows: ``[N, ...] -> [N/size, ...]``.
    Group means are i.i.d. (members of a group are not)."""
    if x.shape[0] % size:
        raise ValueError(f"{x.shape[0]} rows do not split into groups of {size}")
    return x.reshape(x.shape[0] // size, size, *x.shape[1:]).mean(1)


def pairing_for(name: str | Pairing | None, plan) -> Pairing:
    """The pairing ``name`` gives ``plan``: itself, or for ``"auto"`` mirrored parameter
    noise (``"param"``) when the plan has ZO steps and none otherwise (docs/design.md,
    "Antithetic pairing", says why)."""
    if name == AUTO:
        return Pairing(("param",) if "ZO" in {r.value for r in plan.roles} else ())
    return Pairing.parse(name)

"""The variance of a plan from pilot estimates of its parts (docs/plan-search.md).

A plan with FO prefix 1..K, HO blocks and ZO on the other steps S (with
pairing "none" or "param") is a sum of three role parts. Each part can be measured once,
from pilot estimates (:func:`~halforder.estimators.draws.draw_estimates`) of a plan that
has that part only (NONE elsewhere), as below; the search takes the FO and ZO parts from
one shared pilot instead (:mod:`.shared_pilot`) and pilots the HO parts this way where
they can matter (:mod:`.pruning`):

    FO(K)                 truncated(K), on its own chain      the FO part of every plan with prefix K
    HO(blocks, G)         HO on the blocks, on its own chain  the HO part of every plan with those
                                                              blocks and groups of G samples
    ZO(K, blocks, p)      ZO on S, on the plan's chain        the ZO part of the plans with that
                                                              prefix, those blocks and pairing p

Every variance is that of one estimate *as training draws it*: from a batch of n chain
evaluations (n/G groups) whose leave-one-out baseline is taken over that batch. The
baseline couples the rows of a batch, and Var(R - b) grows like 1 + 1/(m - 1) with m
groups in it (1.33 at m = 4, 2 at m = 2), so the pilots are drawn in batches of exactly
n/G groups and each batch counts once: the variance of one row is measured as
(n/G) x Var(batch mean) over many batches (:func:`variance_rows`). Without a baseline the
rows are independent and are used as drawn.

The variance model, per chain evaluation (a pair of mirrored samples counts as two), with
G = 2 for pairing "param" and 1 otherwise:

    V(plan) = G * ( V_FO(K) + V_HO(blocks, G) + V_ZO(K, blocks, p) )

* Cross-covariances between the roles are ignored: their noises (the path, eps_j, eps'_t)
  enter different factors of each term. Those between HO blocks are not: a plan's blocks
  are measured together. The FO and HO parts of a pair's mean are taken as
  those of one unpaired sample: the pair shares every noise but eps', which they barely
  depend on, so pairing halves nothing there and costs twice the evaluations; the HO
  pilot for groups of G is drawn unpaired in batches of n/G samples, the baseline's m.
* The ZO part is measured on the plan's own chain (the noise where its HO blocks end,
  tau on its ZO steps), so it is exact but for the pilot's sampling error: its term
  R eps'_t / tau_t (with pairing, (R(+eps') - R(-eps'))/2 in place of R, whose size
  depends on which steps carry parameter noise and how strongly R responds to each)
  does not depend on the FO and HO computations. This costs one pilot per layout (K,
  blocks, pairing) rather than per prefix; rescaling one pilot by sum tau_t^-2, as if
  every step's noise moved R alike, put a plan 35% low on the tiny SD chain (0.41
  against 0.63), where the last step's parameter noise barely moves R.
* The FO and HO parts are measured on their pilots' chains, not on the plan's: V_FO(K) on
  truncated(K)'s chain (no inherent noise where HO blocks end, eta = 0, and no parameter
  noise, tau = 0, after K), V_HO on a chain with tau = 0 outside the blocks. In a plan
  each also sees the other roles' noise (the FO part the HO-end eta and the ZO tau, the
  HO part the ZO tau). These noises are small in the paper's recipe (eta 0.1, tau 1e-3);
  the error this leaves is part of the model error e8 reports.

:func:`predicted_variance` evaluates the model; its error against directly measured
plans is reported by experiment e8 (docs/results/e8_plan_search.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Mapping, Sequence

import torch

from ..estimators.draws import draw_estimates
from ..estimators.pairing import Pairing
from ..estimators.plan import ChainFor, Plan, Role
from .time_model import plan_chain

Blocks = tuple[tuple[int, int], ...]


@dataclass(frozen=True, order=True)
class HOKey:
    """The HO part a plan needs: its blocks ((j, h), ...) in order, and G, the samples of a
    group of its pairing."""

    blocks: Blocks
    group: int

    @classmethod
    def of(cls, plan: Plan, pairing: str | Pairing | None = None) -> HOKey:
        """The HO part of ``plan`` with ``pairing``."""
        return cls(tuple(sorted(plan.blocks)), Pairing.parse(pairing).size)


@dataclass(frozen=True, order=True)
class ZOKey:
    """The ZO part a plan needs: its FO prefix K, its blocks ((j, h), ...) in order, and the
    name of its pairing."""

    fo_steps: int
    blocks: Blocks
    pairing: str

    @classmethod
    def of(cls, plan: Plan, pairing: str | Pairing | None = None) -> ZOKey:
        """The ZO part of ``plan`` with ``pairing``."""
        return cls(plan.fo_steps, tuple(sorted(plan.blocks)), Pairing.parse(pairing).name)


@dataclass(frozen=True)
class PartVariances:
    """Pilot measurements (module docstring): traces of covariance of one row (the mean of
    a group with pairing) of an estimate from a batch of ``batch`` chain evaluations.

    Attributes:
      n: pilot rows per part.
      batch: chain evaluations per estimate (the training batch n).
      fo: K -> tr Var of truncated(K).
      ho: :class:`HOKey` (blocks, G) -> tr Var of the plan with HO on the blocks only,
        in batches of batch/G.
      zo: :class:`ZOKey` (K, blocks, pairing) -> tr Var of ZO on the steps after K outside
        the blocks, on the chain of the plan with that layout.
    """

    n: int
    batch: int
    fo: Mapping[int, float]
    ho: Mapping[HOKey, float]
    zo: Mapping[ZOKey, float]


def fo_pilot(T: int, K: int) -> Plan:
    """FO on 1..K, NONE elsewhere."""
    return Plan.truncated(T, K)


def ho_pilot(T: int, blocks: Sequence[tuple[int, int]]) -> Plan:
    """HO on the blocks (j, h), NONE elsewhere."""
    roles = ["NONE"] * T
    for j, h in blocks:
        roles[j - 1:j + h - 1] = ["HO"] * h
    return Plan.from_roles(roles, list(blocks), name="HO" + "".join(f"({j},{h})" for j, h in blocks))


def layout(T: int, K: int, blocks: Sequence[tuple[int, int]], fill: str = "ZO") -> Plan:
    """FO on 1..K, HO on the blocks, ``fill`` on the other steps."""
    roles = ["FO"] * K + [fill] * (T - K)
    for j, h in blocks:
        roles[j - 1:j + h - 1] = ["HO"] * h
    return Plan.from_roles(roles, list(blocks))


def zo_pilot(T: int, K: int, blocks: Sequence[tuple[int, int]] = ()) -> Plan:
    """ZO on the steps after K outside the blocks, NONE elsewhere (run on the chain of
    :func:`layout`)."""
    roles = ["ZO" if r is Role.ZO else "NONE" for r in layout(T, K, blocks).roles]
    return Plan.from_roles(roles, name=f"ZO({K}, {tuple(blocks)})")


def variance_rows(chain, plan: Plan, params, rows: int, batch: int, *, generator: torch.Generator, baseline=None,
                  pairing: str | Pairing | None = None, chunk: int = 1 << 14, progress: bool = False) -> torch.Tensor:
    """Independent rows ``[B, P]`` whose covariance is that of one row (one group's mean
    with ``pairing``) of an estimate from a batch of ``batch`` rows, as training draws it.

    With a leave-one-out baseline the rows of a batch are correlated through it, so
    ``rows`` estimates are drawn in batches of exactly ``batch`` rows and each batch gives
    one row, sqrt(batch) x its mean, whose covariance is batch x Cov(batch mean) (their mean
    is not the gradient's; only their covariance is used); B = max(2, rows // batch).
    Otherwise the rows are independent and are returned as drawn, ``chunk`` per call."""
    if isinstance(baseline, str):
        B = max(2, rows // batch)
        s = draw_estimates(chain, plan, params, B * batch, generator=generator, chunk=batch, baseline=baseline,
                           pairing=pairing, progress=progress)
        return s.grad.reshape(B, batch, -1).mean(1) * batch ** 0.5
    return draw_estimates(chain, plan, params, rows, generator=generator, chunk=chunk, baseline=baseline,
                          pairing=pairing, progress=progress).grad


def pilot_rows(chain_for: ChainFor, plan: Plan, params, rows: int, batch: int, *, generator: torch.Generator,
               group: int = 1, pairing=None, baseline=None, on: Plan | None = None, checkpoint: Collection[int] = (),
               chunk: int = 1 << 14, progress: bool = False) -> torch.Tensor:
    """:func:`variance_rows` of a pilot ``plan`` in groups of ``group`` (batches of
    ``batch // group`` groups), on ``chain_for(on)`` if given, else on the pilot's own chain
    with the steps ``checkpoint`` checkpointed."""
    c = plan_chain(chain_for, plan, checkpoint) if on is None else chain_for(on)
    return variance_rows(c, plan, params, rows, batch // group, generator=generator, baseline=baseline,
                         pairing=pairing, chunk=max(1, chunk // group), progress=progress)


def trace_variance(rows: torch.Tensor) -> float:
    """tr Cov of the rows ``[B, P]``."""
    return float(rows.double().var(0).sum())


def measure_part_variances(chain, params, *, ks: Iterable[int], blocks: Iterable[HOKey],
                           zo: Iterable[ZOKey], n: int, batch: int, generator: torch.Generator,
                           chain_for: ChainFor | None = None, baseline=None, chunk: int = 1 << 14,
                           checkpoint: Callable[[Plan], Collection[int]] = lambda plan: (),
                           progress: bool = False) -> PartVariances:
    """Run the pilots (module docstring) for the prefixes ``ks``, the HO block sets with the
    group sizes of the plans that use them ``blocks`` (:class:`HOKey`) and the ZO layouts
    ``zo`` (:class:`ZOKey`): ``n`` rows each, for estimates from
    batches of ``batch`` chain evaluations. ``chain_for(plan)`` gives each pilot its chain
    (default: ``chain``); ``checkpoint(plan)`` the pilot's steps to checkpoint (the values
    are the same; the memory is less); ``chunk`` bounds the chain evaluations per call where
    rows are independent."""
    chain_for = chain_for or (lambda plan: chain)
    T = chain.T
    if n < 2:
        raise ValueError(f"a variance needs at least 2 pilot rows, got n={n}")

    def trace_var(plan, group=1, pairing=None, base=baseline, on=None):
        return trace_variance(pilot_rows(chain_for, plan, params, n, batch, generator=generator, group=group,
                                         pairing=pairing, baseline=base, on=on, checkpoint=checkpoint(plan),
                                         chunk=chunk, progress=progress))

    ks = sorted(set(int(k) for k in ks))
    fo = {K: trace_var(fo_pilot(T, K), base=None) for K in ks if K >= 1}   # the FO part takes no baseline
    ho = {k: trace_var(ho_pilot(T, k.blocks), k.group)
          for k in sorted({HOKey(tuple(sorted(k.blocks)), k.group) for k in blocks}) if k.blocks}
    zo_parts = {}
    for k in sorted({ZOKey(int(k.fo_steps), tuple(sorted(k.blocks)), _modelled(k.pairing).name) for k in zo}):
        pilot = zo_pilot(T, k.fo_steps, k.blocks)
        if pilot.steps(Role.ZO):
            zo_parts[k] = trace_var(pilot, Pairing.parse(k.pairing).size, k.pairing,
                                    on=layout(T, k.fo_steps, k.blocks))
    return PartVariances(n, batch, fo, ho, zo_parts)


def predicted_variance(parts: PartVariances, plan: Plan, pairing: str | Pairing | None) -> float:
    """tr Var per chain evaluation of ``plan`` with ``pairing`` by the model of the module
    docstring. ``KeyError`` if a pilot the plan needs was not measured."""
    pairing = _modelled(pairing)
    K, blocks = plan.fo_steps, tuple(sorted(plan.blocks))
    v = parts.fo[K] if K else 0.0
    v += parts.ho[HOKey.of(plan, pairing)] if blocks else 0.0
    if plan.steps(Role.ZO):
        if plan.steps(Role.ZO) != zo_pilot(plan.T, K, blocks).steps(Role.ZO):
            raise ValueError(f"plan {plan}: the model needs ZO on every step after the FO prefix outside the HO "
                             "blocks")
        v += parts.zo[ZOKey.of(plan, pairing)]
    return pairing.size * v


def _modelled(pairing) -> Pairing:
    """The pairing, if the model covers it ("none" or "param")."""
    p = Pairing.parse(pairing)
    if "ho" in p.mirrored:
        raise ValueError(f"the variance model covers pairings none and param, not {p.name!r}: a pilot without "
                         "HO blocks cannot mirror the noise where they end")
    return p

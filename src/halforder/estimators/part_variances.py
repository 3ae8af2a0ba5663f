"""The variance of a plan from pilot estimates of its parts (docs/plan-search.md).

A plan with FO prefix 1..K, HO blocks and ZO on the other steps S (with
pairing "none" or "param") is a sum of three role parts. Each part is measured once, from
pilot estimates (:func:`~halforder.estimators.draws.draw_estimates`) of a plan that has
that part only (NONE elsewhere), on that plan's own chain:

    FO(K)          truncated(K)                    the FO part of every plan with prefix K
    HO(blocks, G)  HO on the blocks                the HO part of every plan with those blocks
                                                   and groups of G samples
    ZO(K, p)       ZO on K+1..T, pairing p         calibrates the ZO part of plans with prefix K

Every variance is that of one estimate *as training draws it*: from a batch of n chain
evaluations (n/G groups) whose leave-one-out baseline is taken over that batch. The
baseline couples the rows of a batch, and Var(R - b) grows like 1 + 1/(m - 1) with m
groups in it (1.33 at m = 4, 2 at m = 2), so the pilots are drawn in batches of exactly
n/G groups and each batch counts once: the variance of one row is measured as
(n/G) x Var(batch mean) over many batches (:func:`variance_rows`). Without a baseline the
rows are independent and are used as drawn.

The variance model, per chain evaluation (a pair of mirrored samples counts as two), with
G = 2 for pairing "param" and 1 otherwise:

    V(plan) = G * ( V_FO(K) + V_HO(blocks, G) + V_ZO(K, p) * a * b )

* Cross-covariances between the roles are ignored: their noises (the path, eps_j, eps'_t)
  enter different factors of each term. Those between HO blocks are not: a plan's blocks
  are measured together. The FO and HO parts of a pair's mean are taken as
  those of one unpaired sample: the pair shares every noise but eps', which they barely
  depend on, so pairing halves nothing there and costs twice the evaluations; the HO
  pilot for groups of G is drawn unpaired in batches of n/G samples, the baseline's m.
* Each part is measured on its pilot's chain, not on the plan's: V_FO(K) on
  truncated(K)'s chain (no inherent noise where HO blocks end, eta = 0, and no parameter
  noise, tau = 0, after K), V_HO on a chain with tau = 0 outside the blocks, V_ZO without
  the noise where HO blocks end. In a plan each part also sees the other roles' noise
  (the FO part the HO-end eta and the ZO tau, the HO part the ZO tau, the ZO part the
  HO-end eta). These noises are small in the paper's recipe (eta 0.1, tau 1e-3), and a
  pilot per plan would cost one pilot per candidate instead of one per part; the error
  this leaves is part of the model error e8 reports.
* a = sum_{t in S} tau_t^-2 / sum_{t = K+1..T} tau_t^-2: step t's ZO term R eps'_t / tau_t
  has variance about E[R^2] P / tau_t^2 (P parameters), and the steps' terms are
  uncorrelated (independent, mean-zero eps'_t), so the ZO variance is additive over steps.
* b = 1 without pairing. With "param", R is replaced by (R(+eps') - R(-eps'))/2, whose
  second moment grows with the parameter noise the chain injects at all its steps:
  b = sum_s tau_s^2 over the plan's chain / the same over the pilot's chain.

:func:`predicted_variance` evaluates the model; its error against directly measured
plans is reported by experiment e8 (docs/results/e8_plan_search.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Mapping, Sequence

import torch

from .draws import draw_estimates
from .pairing import Pairing
from .plan import ChainFor, Plan, Role
from .time_model import plan_chain



@dataclass(frozen=True)
class PartVariances:
    """Pilot measurements (module docstring): traces of covariance of one row (the mean of
    a group with pairing) of an estimate from a batch of ``batch`` chain evaluations.

    Attributes:
      n: pilot rows per part.
      batch: chain evaluations per estimate (the training batch n).
      fo: K -> tr Var of truncated(K).
      ho: (blocks ((j, h), ...), G) -> tr Var of the plan with HO on the blocks only,
        in batches of batch/G.
      zo: (K, pairing) -> tr Var of ZO on K+1..T.
      zo_taus: (K, pairing) -> the pilot chain's tau_t, t = 1..T (for a and b).
    """

    n: int
    batch: int
    fo: Mapping[int, float]
    ho: Mapping[tuple[tuple[tuple[int, int], ...], int], float]
    zo: Mapping[tuple[int, str], float]
    zo_taus: Mapping[tuple[int, str], tuple[float, ...]]


def fo_pilot(T: int, K: int) -> Plan:
    """FO on 1..K, NONE elsewhere."""
    return Plan.truncated(T, K)


def ho_pilot(T: int, blocks: Sequence[tuple[int, int]]) -> Plan:
    """HO on the blocks (j, h), NONE elsewhere."""
    roles = ["NONE"] * T
    for j, h in blocks:
        roles[j - 1:j + h - 1] = ["HO"] * h
    return Plan.from_roles(roles, list(blocks), name="HO" + "".join(f"({j},{h})" for j, h in blocks))


def zo_pilot(T: int, K: int) -> Plan:
    """ZO on K+1..T, NONE on 1..K."""
    return Plan.from_roles(["NONE"] * K + ["ZO"] * (T - K), name=f"ZO({K + 1}..{T})")


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


def measure_part_variances(chain, params, *, ks: Iterable[int],
                           blocks: Iterable[tuple[tuple[tuple[int, int], ...], int]],
                           pairings: Iterable[str], n: int, batch: int, generator: torch.Generator,
                           chain_for: ChainFor | None = None, baseline=None, chunk: int = 1 << 14,
                           checkpoint: Callable[[Plan], Collection[int]] = lambda plan: (),
                           progress: bool = False) -> PartVariances:
    """Run the pilots (module docstring) for the prefixes ``ks``, the HO block sets with the
    group sizes of the plans that use them ``blocks`` (pairs ``(blocks, G)``) and the ZO
    ``pairings``: ``n`` rows each, for estimates from batches of ``batch`` chain
    evaluations. ``chain_for(plan)`` gives each pilot its chain (default: ``chain``);
    ``checkpoint(plan)`` the pilot's steps to checkpoint (the values are the same; the
    memory is less); ``chunk`` bounds the chain evaluations per call where rows are
    independent."""
    chain_for = chain_for or (lambda plan: chain)
    T = chain.T
    if n < 2:
        raise ValueError(f"a variance needs at least 2 pilot rows, got n={n}")

    def trace_var(plan, group=1, pairing=None, base=baseline):
        c = plan_chain(chain_for, plan, checkpoint(plan))
        rows = variance_rows(c, plan, params, n, batch // group, generator=generator, baseline=base,
                             pairing=pairing, chunk=max(1, chunk // group), progress=progress)
        return float(rows.double().var(0).sum())

    ks = sorted(set(int(k) for k in ks))
    fo = {K: trace_var(fo_pilot(T, K), base=None) for K in ks if K >= 1}   # the FO part takes no baseline
    ho = {(b, G): trace_var(ho_pilot(T, b), G) for b, G in sorted(set((tuple(b), G) for b, G in blocks)) if b}
    zo, taus = {}, {}
    for p in sorted(set(pairings)):
        for K in ks:
            if K < T:
                plan = zo_pilot(T, K)
                zo[(K, p)] = trace_var(plan, Pairing.parse(p).size, p)
                taus[(K, p)] = _taus(chain_for(plan))
    return PartVariances(n, batch, fo, ho, zo, taus)


def predicted_variance(parts: PartVariances, plan: Plan, pairing: str | Pairing | None, chain) -> float:
    """tr Var per chain evaluation of ``plan`` with ``pairing`` on ``chain`` (the plan's own
    chain, for its tau_t) by the model of the module docstring. ``KeyError`` if a pilot
    the plan needs was not measured."""
    pairing = Pairing.parse(pairing)
    K = plan.fo_steps
    v = parts.fo[K] if K else 0.0
    v += parts.ho[(plan.blocks, pairing.size)] if plan.blocks else 0.0
    zo_steps = plan.steps(Role.ZO)
    if zo_steps:
        key = (K, pairing.name)
        pilot = parts.zo_taus[key]
        taus = _taus(chain)
        a = sum(taus[t - 1] ** -2 for t in zo_steps) / sum(pilot[t - 1] ** -2 for t in range(K + 1, plan.T + 1))
        b = sum(s * s for s in taus) / sum(s * s for s in pilot) if pairing.mirrored else 1.0
        v += parts.zo[key] * a * b
    return pairing.size * v


def _taus(chain) -> tuple[float, ...]:
    return tuple(float(chain.tau(t)) for t in range(1, chain.T + 1))

"""The variance of a plan from pilot estimates of its parts (docs/plan-search.md).

A plan with FO prefix 1..K, HO blocks and ZO on the other steps S (with
pairing "none" or "param") is a sum of three role parts. Each part is measured once, by n
per-sample pilot estimates (:func:`~halforder.estimators.draws.draw_estimates`) of a plan
that has that part only (NONE elsewhere), on that plan's own chain:

    FO(K)        truncated(K)                      the FO part of every plan with prefix K
    HO(blocks)   HO on the blocks                  the HO part of every plan with those blocks
    ZO(K, p)     ZO on K+1..T, pairing p           calibrates the ZO part of plans with prefix K

The variance model, per chain evaluation (a pair of mirrored samples counts as two), with
G = 2 for pairing "param" and 1 otherwise:

    V(plan) = G * ( V_FO(K) + V_HO(blocks) + V_ZO(K, p) * a * b )

* Cross-covariances between the roles are ignored: their noises (the path, eps_j, eps'_t)
  enter different factors of each term. Those between HO blocks are not: a plan's blocks
  are measured together. The FO and HO parts of a pair's mean are taken as
  those of one unpaired sample: the pair shares every noise but eps', which they barely
  depend on, so pairing halves nothing there and costs twice the evaluations.
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
from typing import Iterable, Mapping, Sequence

import torch

from .draws import draw_estimates
from .pairing import Pairing
from .plan import ChainFor, Plan, Role



@dataclass(frozen=True)
class PartVariances:
    """Pilot measurements (module docstring): traces of covariance of one pilot row (the
    mean of a pair with pairing).

    Attributes:
      n: rows per pilot.
      fo: K -> tr Var of truncated(K).
      ho: blocks ((j, h), ...) -> tr Var of the plan with HO on them only.
      zo: (K, pairing) -> tr Var of ZO on K+1..T.
      zo_taus: (K, pairing) -> the pilot chain's tau_t, t = 1..T (for a and b).
    """

    n: int
    fo: Mapping[int, float]
    ho: Mapping[tuple[tuple[int, int], ...], float]
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


def measure_part_variances(chain, params, *, ks: Iterable[int], blocks: Iterable[tuple[tuple[int, int], ...]],
                           pairings: Iterable[str], n: int, generator: torch.Generator,
                           chain_for: ChainFor | None = None, baseline=None, chunk: int = 1 << 14,
                           progress: bool = False) -> PartVariances:
    """Run the pilots (module docstring) for the prefixes ``ks``, the HO block sets ``blocks`` and the ZO
    ``pairings``; ``chain_for(plan)`` gives each pilot its chain (default: ``chain``)."""
    chain_for = chain_for or (lambda plan: chain)
    T = chain.T
    if n < 2:
        raise ValueError(f"a variance needs at least 2 pilot rows, got n={n}")

    def trace_var(plan, pairing=None):
        s = draw_estimates(chain_for(plan), plan, params, n, generator=generator, chunk=chunk, baseline=baseline,
                           pairing=pairing, progress=progress)
        return float(s.grad.double().var(0).sum())

    ks = sorted(set(int(k) for k in ks))
    fo = {K: trace_var(fo_pilot(T, K)) for K in ks if K >= 1}
    ho = {b: trace_var(ho_pilot(T, b)) for b in sorted(set(tuple(b) for b in blocks)) if b}
    zo, taus = {}, {}
    for p in sorted(set(pairings)):
        for K in ks:
            if K < T:
                plan = zo_pilot(T, K)
                zo[(K, p)] = trace_var(plan, p)
                taus[(K, p)] = _taus(chain_for(plan))
    return PartVariances(n, fo, ho, zo, taus)


def predicted_variance(parts: PartVariances, plan: Plan, pairing: str | Pairing | None, chain) -> float:
    """tr Var per chain evaluation of ``plan`` with ``pairing`` on ``chain`` (the plan's own
    chain, for its tau_t) by the model of the module docstring. ``KeyError`` if a pilot
    the plan needs was not measured."""
    pairing = Pairing.parse(pairing)
    K = plan.fo_steps
    v = parts.fo[K] if K else 0.0
    v += parts.ho[plan.blocks] if plan.blocks else 0.0
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

"""Every FO part and every ZO part of the variance model from one set of rollouts
(docs/plan-search.md, "One set of pilots").

Write g_t for the pathwise gradient of R(x_0) through theta_t alone (the copy of theta
used at step t, :mod:`~halforder.estimators.plan`). One rollout with full backprop and a
separate parameter leaf per step gives every g_t of a sample in one backward pass
(:func:`~halforder.estimators.theory.step_gradients`). The
rollouts run on the chain of full backprop, ``chain_for(Plan.full(T))``, in mirrored
pairs where that chain has parameter noise (pairing "param", :mod:`~halforder.estimators.pairing`):

* **FO(K)** is sum_{t <= K} g_t: truncated(K)'s estimate on the same noise, exactly (its
  chain is the same one, and the same seed draws the same noise), so V_FO(K) =
  tr Cov(sum_{t <= K} g_t) for every K from the same rows (one member of each pair).
* **ZO on the steps S, direct**, where the plan's chain puts parameter noise on the same
  steps as the pilot's (a chain whose noise does not depend on the plan, such as the toy
  chains): the ZO estimate is sum_{t in S} u_t with u_t = w eps'_t / tau_t, w = R - b for
  one member and (R(+) - R(-)) / 2 for a pair's mean, so V_ZO(S) = tr Cov(sum_{t in S} u_t)
  from the same rows, exactly.
* **ZO on the steps S, to first order in tau**, where the plan's chain puts parameter noise
  on S only (the diffusion chains) and the pilot's chain has none: R(theta + tau eps') =
  R + a with a = sum_{s in S} tau_s <g_s, eps'_s>, and the estimate is w v with v =
  sum_{t in S} eps'_t / tau_t. A pair's mean is a v (the baseline cancels; the error is
  O(tau^3)); an unpaired sample's is (A + a - a_b) v with A = R - b and a_b the baseline's
  share of the other samples' a. For jointly Gaussian a and v, E[a^2 |v|^2] =
  E[a^2] E|v|^2 + 2 |E[a v]|^2 (Isserlis), E|v|^2 = P sum_S tau_t^-2 over the P
  parameters, E[a v] = G_S = sum_{t in S} g_t, so per row

      V_ZO(S) = P sum_S tau_t^-2 (c E[A^2] + (1 + c/(m - 1)) E sum_S tau_s^2 |g_s|^2)
                + 2 E|G_S|^2 - |E G_S|^2

  with c = 0 paired and 1 unpaired, and m the samples the leave-one-out baseline is
  taken over (no a_b term without one): the floor of paired ZO
  (:func:`~halforder.estimators.theory.paired_zo_floor`) for any S and per-step tau.
  What it leaves out, and e8 measures (docs/results/e8_model_error.md): terms of order
  tau^2 against these, and the inherent noise where the plan's HO blocks end, which the
  pilot's chain does not have.

Only moments are kept: per kind of row vector (g_t, and u_t for one member and for a pair)
the mean over rows of the Gram matrix <z_s, z_t> ``[T, T]`` and the mean of z_t ``[T, P]``;
one batch's per-step vectors are held at a time (2n x T x P numbers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping

import torch

from ..estimators.baselines import advantage
from ..estimators.pairing import Pairing, grouped
from ..estimators.plan import ChainFor, Plan
from ..estimators.theory import step_gradients
from .time_model import plan_chain

PAIR = Pairing.parse("param")


@dataclass(frozen=True)
class Moments:
    """Moments of per-step vectors z_t over ``rows`` rows: ``gram`` the mean of <z_s, z_t>,
    ``mean`` the mean of z_t ``[T, P]`` (index t - 1 for step t)."""

    rows: int
    gram: torch.Tensor
    mean: torch.Tensor

    def sum_variance(self, steps: Collection[int]) -> float:
        """tr Cov(sum_{t in steps} z_t) of one row (unbiased over the rows); a difference of
        moments, taken no lower than its rounding error, so never negative."""
        m = self._indicator(steps) @ self.mean
        second = self.second_moment(steps)
        return self.rows / (self.rows - 1) * max(second - float(m @ m), torch.finfo(self.gram.dtype).eps * second)

    def second_moment(self, steps: Collection[int]) -> float:
        """E|sum_{t in steps} z_t|^2."""
        s = self._indicator(steps)
        return float(s @ self.gram @ s)

    def _indicator(self, steps: Collection[int]) -> torch.Tensor:
        s = torch.zeros(self.gram.shape[0], dtype=self.gram.dtype)
        s[[t - 1 for t in steps]] = 1.0
        return s


@dataclass(frozen=True)
class StepGradientMoments:
    """What the shared pilot measured (module docstring).

    Attributes:
      g: moments of the per-step gradients g_t.
      advantage2: mean of (R - b)^2 over the rows.
      parameters: P, the number of parameters.
      taus: tau_t of the pilot's chain (step -> tau; empty without parameter noise).
      direct: the moments of u_t per pairing name (``"none"``, ``"param"``) where the pilot's
        chain has parameter noise, else empty.
    """

    g: Moments
    advantage2: float
    parameters: int
    taus: Mapping[int, float]
    direct: Mapping[str, Moments]

    def fo(self, K: int) -> float:
        """V_FO(K) = tr Cov(sum_{t <= K} g_t)."""
        return self.g.sum_variance(range(1, K + 1))

    def zo(self, taus: Mapping[int, float], noisy: Mapping[int, float], pairing: str,
           baseline_samples: int | None) -> float:
        """V_ZO(S) of one row (a pair's mean with pairing ``"param"``) for ZO on the steps of
        ``taus`` (step -> tau_t > 0) on a chain with parameter noise on the steps of
        ``noisy``: direct where those are the pilot's, else to first order in tau (module
        docstring; ``noisy`` must then be ``taus``). ``baseline_samples``: the m of the
        leave-one-out baseline (None without one)."""
        if self.direct and dict(noisy) == dict(self.taus):
            return self.direct[pairing].sum_variance(taus)
        if self.taus or dict(noisy) != dict(taus):
            raise ValueError("the ZO part needs the pilot's chain to have the plan's parameter noise, or none with "
                             "noise on the ZO steps only")
        idx = torch.tensor([t - 1 for t in taus], dtype=torch.long)
        tau = torch.tensor(list(taus.values()), dtype=self.g.gram.dtype)
        perturbed = float((tau ** 2 * self.g.gram.diagonal()[idx]).sum())
        c = 0.0 if pairing == "param" else 1.0
        share = c / (baseline_samples - 1) if baseline_samples else 0.0
        own = self.parameters * float((tau ** -2).sum()) * (c * self.advantage2 + (1 + share) * perturbed)
        return own + self.g.second_moment(taus) + self.g.sum_variance(taus)   # 2E|G|^2 - |EG|^2


def measure_step_gradients(chain_for: ChainFor, params, T: int, rows: int, batch: int, *,
                           generator: torch.Generator, baseline=None, checkpoint: bool = False,
                           chunk: int = 1 << 14, per_call: int | None = None,
                           progress: bool = False) -> StepGradientMoments:
    """:class:`StepGradientMoments` from ``rows`` samples (pairs where the chain has
    parameter noise) drawn in batches of ``batch`` on the chain of full backprop
    (all steps checkpointed if ``checkpoint``); ``baseline`` None, a number or ``"loo"``
    (over each batch) for A = R - b. Without a leave-one-out baseline the rows are
    independent and are drawn ``chunk`` at a time. ``per_call``: at most that many samples
    (pairs) through the chain at once, where a whole batch would not fit the memory
    budget; the per-step parameter leaves add T x P numbers a sample beyond the plan's."""
    from tqdm.auto import tqdm

    chain = plan_chain(chain_for, Plan.full(T), range(1, T + 1) if checkpoint else ())
    taus = {t: float(chain.tau(t)) for t in range(1, T + 1) if float(chain.tau(t)) > 0}
    pairing = PAIR if taus else Pairing()
    dtype = next(iter(params.values())).dtype
    inv_tau = torch.tensor([1.0 / taus[t] if t in taus else 0.0 for t in range(1, T + 1)], dtype=torch.float64)
    sums = {"g": [0, 0], "none": [0, 0], "param": [0, 0]}
    size = batch if isinstance(baseline, str) else max(batch, min(rows, chunk))
    step = max(1, per_call // pairing.size) if per_call else size    # start states a call (a pair is two samples)
    calls = [min(step, size - i) for i in range(0, size, step)]
    adv2, B = 0.0, max(2, -(-rows // size))
    for _ in tqdm(range(B), desc="shared pilot", disable=not progress, leave=False):
        drawn = [step_gradients(chain, params, grouped(chain.sample_start(m, generator, dtype), pairing.size),
                                generator=generator, pairing=pairing) for m in calls]
        g, R, eps = (torch.cat(parts) for parts in zip(*drawn))
        one = slice(None, None, pairing.size)     # one member of each group: independent rows
        w = advantage(R[one].double(), baseline, 1)
        adv2 += float(w.pow(2).sum())
        vectors = {"g": g[one].double()}
        if taus:
            u = eps[one].double() * inv_tau[None, :, None]
            vectors["none"] = w[:, None, None] * u
            vectors["param"] = ((R[0::2] - R[1::2]).double() / 2)[:, None, None] * u
        for k, z in vectors.items():
            sums[k][0] = sums[k][0] + torch.einsum("nsp,ntp->st", z, z)
            sums[k][1] = sums[k][1] + z.sum(0)
    n = B * size
    moments = {k: Moments(n, s[0] / n, s[1] / n) for k, s in sums.items() if not isinstance(s[0], int)}
    g = moments.pop("g")
    return StepGradientMoments(g, adv2 / n, int(g.mean.shape[1]), taus, moments)

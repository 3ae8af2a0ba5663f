"""Many per-sample estimates of one plan, drawn in vectorised chunks.

``draw_estimates`` calls :func:`~halforder.estimators.engine.estimate` with
``per_sample=True`` on chunks of samples (a loop over chunks, each chunk one vectorised
call) and returns the estimates flattened to ``[n, P]`` rows, the form that variance
measurements and mean tests take.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from tqdm.auto import tqdm

from .engine import checked_inputs, estimate
from .pairing import Pairing, group_means, grouped
from .plan import Plan
from .protocol import Chain


def flatten(tensors: Mapping[str, torch.Tensor], sample_axis: bool = False) -> torch.Tensor:
    """Concatenate a parameter dict into one vector (``[N, P]`` with ``sample_axis``)."""
    if sample_axis:
        return torch.cat([v.reshape(v.shape[0], -1) for v in tensors.values()], dim=1)
    return torch.cat([v.reshape(-1) for v in tensors.values()])


@dataclass(frozen=True)
class Samples:
    """Per-sample estimates: ``grad`` and each role's part as ``[n, P]``, rewards ``[n]``."""

    grad: torch.Tensor
    parts: dict[str, torch.Tensor]
    reward: torch.Tensor

    @property
    def n(self) -> int:
        return self.grad.shape[0]


def draw_estimates(chain: Chain, plan: Plan, params, n: int, *, generator: torch.Generator,
                   chunk: int = 1 << 14, baseline=None, pairing: str | Pairing | None = None,
                   progress: bool = False) -> Samples:
    """n i.i.d. per-sample estimates of ``plan`` on ``chain`` (x_T from ``chain.sample_start``).

    With ``pairing`` (:mod:`~halforder.estimators.pairing`) each row is the mean of one
    antithetic group of G samples sharing its start state, so n rows cost n * G chain
    evaluations. With ``baseline="loo"`` the leave-one-out mean is taken within each chunk."""
    with checked_inputs(chain, plan, params):
        return _draw(chain, plan, params, n, generator, chunk, baseline, Pairing.parse(pairing), progress)


def _draw(chain, plan, params, n, generator, chunk, baseline, pairing, progress) -> Samples:
    G = pairing.size
    dtype = next(iter(params.values())).dtype
    grads, parts, rewards = [], {"FO": [], "HO": [], "ZO": []}, []
    sizes = [min(chunk, n - i) for i in range(0, n, chunk)]
    for m in tqdm(sizes, desc=str(plan), disable=not progress, leave=False):
        x_T = grouped(chain.sample_start(m, generator, dtype), G)
        est = estimate(chain, plan, params, x_T, generator=generator, per_sample=True, baseline=baseline,
                       pairing=pairing)
        grads.append(group_means(flatten(est.grad, True), G))
        for r in parts:
            parts[r].append(group_means(flatten(est.parts[r], True), G))
        rewards.append(group_means(est.reward, G))
    return Samples(torch.cat(grads), {r: torch.cat(v) for r, v in parts.items()}, torch.cat(rewards))

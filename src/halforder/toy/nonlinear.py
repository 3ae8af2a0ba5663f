"""A nonlinear toy chain: x_{t-1} = tanh((W + tau_t E_t) x_t + b + tau_t e_t) + sigma_t eps_t.

No closed form exists; reference gradients come from a high-sample full-backprop (FO)
estimate, which is unbiased (Prop. 6.1), via :func:`halforder.toy.stats.reference_gradient`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..estimators.compute import record
from .base import ToyChain
from .rewards import Quadratic


@dataclass(frozen=True, eq=False)
class TanhChain(ToyChain):
    """Chain with phi_t(x; W, b) = tanh(W x + b); same parameters and noises as the linear chain."""

    def step(self, t: int, x: torch.Tensor, params) -> torch.Tensor:
        W, b = params["W"], params["b"]
        out = torch.tanh((W @ x.unsqueeze(-1)).squeeze(-1) + b)
        record(x.shape[0], out)
        return out


def tanh_chain(T: int = 8, d: int = 3, sigma: float | Sequence[float] = 0.3,
               tau: float | Sequence[float] = 0.1, reward=None, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> tuple[TanhChain, dict[str, torch.Tensor]]:
    """A random tanh chain and parameters, reproducible from ``seed`` (W has spectral norm 1.5)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn((d, d), generator=g, dtype=dtype)
    W = 1.5 * W / torch.linalg.matrix_norm(W, ord=2)
    b = 0.1 * torch.randn((d,), generator=g, dtype=dtype)
    if reward is None:
        reward = Quadratic.target(0.5 * torch.randn((d,), generator=g, dtype=dtype))
    x_T_mean = torch.randn((d,), generator=g, dtype=dtype)
    return TanhChain(T, d, sigma, tau, reward, x_T_mean), {"W": W, "b": b}

"""A nonlinear toy chain: x_{t-1} = tanh((W + tau_t E_t) x_t + b + tau_t e_t) + sigma_t eps_t.

No closed form exists; reference gradients come from a high-sample full-backprop (FO)
estimate, which is unbiased (Prop. 6.1), via :func:`halforder.toy.stats.reference_gradient`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .linear import _per_step
from .rewards import Quadratic


@dataclass(frozen=True, eq=False)
class TanhChain:
    """Chain with phi_t(x; W, b) = tanh(W x + b); same parameters and noises as the linear chain."""

    T: int
    d: int
    sigmas: tuple[float, ...]
    taus: tuple[float, ...]
    reward_fn: Callable
    x_T_mean: torch.Tensor
    x_T_std: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "sigmas", _per_step(self.sigmas, self.T, "sigmas"))
        object.__setattr__(self, "taus", _per_step(self.taus, self.T, "taus"))

    def step(self, t: int, x: torch.Tensor, params) -> torch.Tensor:
        W, b = params["W"], params["b"]
        return torch.tanh((W @ x.unsqueeze(-1)).squeeze(-1) + b)

    def sigma(self, t: int) -> float:
        return self.sigmas[t - 1]

    def tau(self, t: int) -> float:
        return self.taus[t - 1]

    def reward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.reward_fn(x0)

    def sample_start(self, n: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """n draws of x_T ~ N(x_T_mean, x_T_std^2 I)."""
        z = torch.randn((n, self.d), generator=generator, dtype=dtype)
        return self.x_T_mean.to(dtype) + self.x_T_std * z


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

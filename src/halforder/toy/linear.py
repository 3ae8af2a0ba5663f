"""The linear-Gaussian chain, the toy with an exact objective and exact gradient.

    x_{t-1} = (W + tau_t E_t) x_t + (b + tau_t e_t) + sigma_t eps_t,    E, e, eps ~ N(0, I)

with shared parameters theta = (W, b). The mean and covariance propagate exactly,

    mu'  = W mu + b
    cov' = W cov W^T + (tau_t^2 (tr cov + |mu|^2 + 1) + sigma_t^2) I,

because E_t is independent of x_t with E[(E x)(E x)^T] = E|x|^2 I. A quadratic reward's
expectation depends only on these two moments, so J(theta) is exact and autograd gives
grad J. Giving each step its own copy theta_t gives the per-step gradients
grad_{theta_t} J, hence the exact truncation bias of Proposition 6.1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..estimators.compute import record
from .base import ToyChain
from .rewards import Quadratic


@dataclass(frozen=True, eq=False)
class LinearGaussianChain(ToyChain):
    """Linear chain x_{t-1} = W_t x_t + b_t + sigma_t eps_t (see module docstring; the
    fields are :class:`~halforder.toy.base.ToyChain`'s; exact J needs a reward with
    ``expectation``)."""

    def step(self, t: int, x: torch.Tensor, params) -> torch.Tensor:
        W, b = params["W"], params["b"]
        out = (W @ x.unsqueeze(-1)).squeeze(-1) + b
        record(x.shape[0], out)
        return out

    # exact quantities
    def moments(self, params, per_step: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of x_0. With ``per_step``, params carry a leading T axis
        and step t uses ``params[k][t-1]``."""
        W, b = params["W"], params["b"]
        mu = self.x_T_mean.to(W)
        cov = self.x_T_std ** 2 * torch.eye(self.d, dtype=W.dtype)
        eye = torch.eye(self.d, dtype=W.dtype)
        for t in range(self.T, 0, -1):
            Wt, bt = (W[t - 1], b[t - 1]) if per_step else (W, b)
            tau, sig = self.taus[t - 1], self.sigmas[t - 1]
            extra = tau ** 2 * (torch.trace(cov) + mu @ mu + 1.0) + sig ** 2
            mu, cov = Wt @ mu + bt, Wt @ cov @ Wt.T + extra * eye
        return mu, cov

    @property
    def is_gaussian(self) -> bool:
        """x_0 is Gaussian when no step has parameter noise."""
        return all(t == 0 for t in self.taus)

    def exact_objective(self, params, per_step: bool = False) -> torch.Tensor:
        """J(theta) = E[R(x_0)], exactly."""
        mu, cov = self.moments(params, per_step)
        return self.reward_fn.expectation(mu, cov, gaussian=self.is_gaussian)

    def exact_grad(self, params) -> dict[str, torch.Tensor]:
        """grad J, exactly (autograd through :meth:`exact_objective`)."""
        return {k: v.sum(0) for k, v in self.exact_step_grads(params).items()}

    def exact_step_grads(self, params) -> dict[str, torch.Tensor]:
        """grad_{theta_t} J for every step: name -> ``[T, *shape]``, index t-1 for step t."""
        copies = {k: v.detach().unsqueeze(0).repeat(self.T, *([1] * v.dim())).requires_grad_()
                  for k, v in params.items()}
        with torch.enable_grad():
            J = self.exact_objective(copies, per_step=True)
            gs = torch.autograd.grad(J, list(copies.values()))
        return dict(zip(copies, gs))

    def exact_truncation_bias(self, params, k: int) -> dict[str, torch.Tensor]:
        """grad J - E[truncated-K estimate] = sum_{t > k} grad_{theta_t} J (Prop. 6.1)."""
        if not 1 <= k <= self.T:
            raise ValueError(f"k must be in 1..{self.T}, got {k}")
        return {n: g[k:].sum(0) for n, g in self.exact_step_grads(params).items()}


def linear_chain(T: int = 8, d: int = 3, sigma: float | Sequence[float] = 0.5,
                 tau: float | Sequence[float] = 0.1, reward=None, seed: int = 0,
                 dtype: torch.dtype = torch.float64, spectral_radius: float = 0.9,
                 x_T_std: float = 1.0) -> tuple[LinearGaussianChain, dict[str, torch.Tensor]]:
    """A random linear-Gaussian chain and parameters, reproducible from ``seed``.

    W is a random matrix rescaled to the given spectral norm (so the chain neither
    explodes nor forgets x_T at once), b ~ N(0, 0.1^2 I), and the default reward is
    -|x - target|^2 for a random target.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn((d, d), generator=g, dtype=dtype)
    W = spectral_radius * W / torch.linalg.matrix_norm(W, ord=2)
    b = 0.1 * torch.randn((d,), generator=g, dtype=dtype)
    if reward is None:
        reward = Quadratic.target(torch.randn((d,), generator=g, dtype=dtype))
    x_T_mean = torch.randn((d,), generator=g, dtype=dtype)
    chain = LinearGaussianChain(T, d, sigma, tau, reward, x_T_mean, x_T_std)
    return chain, {"W": W, "b": b}

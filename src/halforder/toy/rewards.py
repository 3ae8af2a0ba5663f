"""Rewards for toy chains. Each is a callable x [N, d] -> [N] with, where it exists, the
exact expectation under a law with mean ``mu`` and covariance ``cov``."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Quadratic:
    """R(x) = x^T A x + c^T x + const. Its expectation depends only on the first two
    moments, E R = tr(A cov) + mu^T A mu + c^T mu + const, for any law."""

    A: torch.Tensor
    c: torch.Tensor
    const: float = 0.0

    @classmethod
    def target(cls, target: torch.Tensor, scale: float = 1.0) -> "Quadratic":
        """R(x) = -scale * ||x - target||^2."""
        target = torch.as_tensor(target)
        d = target.shape[0]
        return cls(-scale * torch.eye(d, dtype=target.dtype), 2 * scale * target, -scale * float(target @ target))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        A, c = self.A.to(x), self.c.to(x)
        return ((x @ A) * x).sum(-1) + x @ c + self.const

    def expectation(self, mu: torch.Tensor, cov: torch.Tensor, gaussian: bool = False) -> torch.Tensor:
        A, c = self.A.to(mu), self.c.to(mu)
        return torch.trace(A @ cov) + mu @ A @ mu + c @ mu + self.const


@dataclass(frozen=True, eq=False)
class Cosine:
    """R(x) = amplitude * cos(k <a, x>): a high-frequency reward for large k, the known
    counterexample to 'pathwise variance <= likelihood-ratio variance' (Prop. 6.2).
    Exact expectation only for Gaussian x: amplitude * cos(k a.mu) exp(-k^2 a^T cov a / 2)."""

    a: torch.Tensor
    k: float = 1.0
    amplitude: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.cos(self.k * (x @ self.a.to(x)))

    def expectation(self, mu: torch.Tensor, cov: torch.Tensor, gaussian: bool = False) -> torch.Tensor:
        if not gaussian:
            raise ValueError("the cosine reward's expectation is exact only for Gaussian x "
                             "(a linear chain with tau = 0 at every step)")
        a = self.a.to(mu)
        return self.amplitude * torch.cos(self.k * (a @ mu)) * torch.exp(-0.5 * self.k ** 2 * (a @ cov @ a))


@dataclass(frozen=True, eq=False)
class SoftplusBump:
    """R(x) = softplus(<a, x> - shift): smooth, monotone, not quadratic (no exact
    expectation; use a high-sample FO reference)."""

    a: torch.Tensor
    shift: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(x @ self.a.to(x) - self.shift)

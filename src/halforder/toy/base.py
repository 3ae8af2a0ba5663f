"""What the toy chains share: per-step noise scales, a reward and a Gaussian start law."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..estimators.protocol import per_step


@dataclass(frozen=True, eq=False)
class ToyChain:
    """The chain protocol minus ``step``, for chains on R^d with parameters (W, b).

    Attributes:
      T, d: steps and dimension.
      sigmas, taus: per-step noise scales (a float for every step, or one per step);
        ``sigmas[t-1]`` is sigma_t.
      reward_fn: a reward from :mod:`halforder.toy.rewards`.
      x_T_mean, x_T_std: the start law N(x_T_mean, x_T_std^2 I).
    """

    T: int
    d: int
    sigmas: tuple[float, ...]
    taus: tuple[float, ...]
    reward_fn: Callable
    x_T_mean: torch.Tensor
    x_T_std: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "sigmas", per_step(self.sigmas, self.T, "sigmas"))
        object.__setattr__(self, "taus", per_step(self.taus, self.T, "taus"))

    def sigma(self, t: int) -> float:
        return self.sigmas[t - 1]

    def tau(self, t: int) -> float:
        return self.taus[t - 1]

    def reward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.reward_fn(x0)

    def sample_start(self, n: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """n draws of x_T."""
        z = torch.randn((n, self.d), generator=generator, dtype=dtype)
        return self.x_T_mean.to(dtype) + self.x_T_std * z

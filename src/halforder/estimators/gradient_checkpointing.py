"""Per-step gradient checkpointing for any chain.

``Checkpointed(chain)`` is the same chain, except that a step evaluated with gradients keeps
only its inputs (the state and the parameters) and recomputes its graph during backward
(``torch.utils.checkpoint``, non-reentrant). Full backprop through T steps then keeps T
states instead of T step graphs, at the price of a second forward pass per step; the
estimate itself is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .protocol import Params, State


@dataclass(frozen=True, eq=False)
class Checkpointed:
    """``chain`` with every step checkpointed (see module docstring); other attributes
    (``sample_start``, ...) are the wrapped chain's."""

    chain: Any

    @property
    def T(self) -> int:
        return self.chain.T

    def step(self, t: int, x: State, params: Params) -> State:
        if not torch.is_grad_enabled():
            return self.chain.step(t, x, params)
        names = list(params)

        def run(x_, *values):
            return self.chain.step(t, x_, dict(zip(names, values)))

        return checkpoint(run, x, *params.values(), use_reentrant=False)

    def sigma(self, t: int) -> float:
        return self.chain.sigma(t)

    def tau(self, t: int) -> float:
        return self.chain.tau(t)

    def reward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.chain.reward(x0)

    def sample_start(self, n: int, generator: torch.Generator | None = None, *args, **kwargs) -> State:
        return self.chain.sample_start(n, generator, *args, **kwargs)

    def __getattr__(self, name):
        if name == "chain":
            raise AttributeError(name)
        return getattr(self.chain, name)

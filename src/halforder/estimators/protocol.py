"""The chain protocol: the recursive chain that every estimator differentiates
(docs/design.md, "The chain").

A chain has T steps, applied in generation order t = T, T-1, ..., 1:

    x_{t-1} = phi_t(x_t; theta + tau_t * eps'_t) + sigma_t * eps_t,   eps, eps' ~ N(0, I)

and the objective is J(theta) = E[R(x_0)]. A chain object provides

    T                      number of steps
    step(t, x, params)     the mean phi_t(x_t; params) of x_{t-1}
    sigma(t)               inherent noise scale of step t (x-space), >= 0
    tau(t)                 parameter noise scale of step t, >= 0
    reward(x0)             R(x_0), one value per sample, shape [N]
    sample_start(n, g)     n start states x_T drawn from the generator g

The noise scales sigma and tau are part of the chain: an estimator is unbiased for the
chain it is given. Chains whose scales depend on the plan (the diffusion chains put
inherent noise where HO blocks end and parameter noise on ZO steps) are built once and
given each plan's scales afterwards, without rebuilding.

Conventions shared by all chains:

* The sample axis comes first. A state is a tensor ``[N, ...]`` or a tuple of
  tensors whose first element is the latent (a multistep solver carries its history
  in the other elements). Only the latent receives the inherent noise, and the
  likelihood ratio is taken on that noise.
* ``params`` maps names to tensors, as ``torch.func.functional_call`` takes them. A
  value either has the parameter's own shape (shared by all samples) or carries a
  leading sample axis ``[N, *shape]`` (one copy per sample: parameter noise, or
  per-sample gradients). ``step`` must accept both, i.e. broadcast over the sample
  axis, and must treat samples independently.
* ``reward`` is differentiable wherever a plan uses first order (FO) steps; plans
  made only of HO and ZO steps treat it as a black box.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Union, runtime_checkable

import math

import torch

State = Union[torch.Tensor, tuple]
Params = Mapping[str, torch.Tensor]


@runtime_checkable
class Chain(Protocol):
    """Structural type of a recursive stochastic chain (see module docstring)."""

    T: int

    def step(self, t: int, x: State, params: Params) -> State: ...

    def sigma(self, t: int) -> float: ...

    def tau(self, t: int) -> float: ...

    def reward(self, x0: torch.Tensor) -> torch.Tensor: ...

    def sample_start(self, n: int, generator: torch.Generator | None = None) -> State: ...


MEMBERS = (*Chain.__annotations__, *(k for k, v in vars(Chain).items() if callable(v) and not k.startswith("_")))


def check_chain(chain) -> None:
    """Raise ``TypeError`` naming the members of the chain protocol that ``chain`` lacks."""
    missing = [m for m in MEMBERS if not hasattr(chain, m)]
    if missing:
        raise TypeError(f"{type(chain).__name__} is not a chain: it lacks {', '.join(missing)} of the chain protocol "
                        f"(halforder.estimators.protocol.Chain: {', '.join(MEMBERS)}; docs/design.md, 'The chain')")


def latent(x: State) -> torch.Tensor:
    """The latent of a state: the state itself, or its first element."""
    return x[0] if isinstance(x, tuple) else x


def with_latent(x: State, z: torch.Tensor) -> State:
    """The state ``x`` with its latent replaced by ``z``."""
    return (z, *x[1:]) if isinstance(x, tuple) else z


def detach(x: State) -> State:
    """A state cut from the autograd graph."""
    return tuple(v.detach() for v in x) if isinstance(x, tuple) else x.detach()


def per_step(v, T: int, name: str) -> tuple[float, ...]:
    """A noise schedule given as one number for every step or one value per step, as a
    tuple of T finite, non-negative floats (``[t-1]`` for step t)."""
    vals = (float(v),) * T if isinstance(v, (int, float)) else tuple(float(x) for x in v)
    if len(vals) != T:
        raise ValueError(f"{name} needs one value per step (T={T}), got {len(vals)}")
    if any(not math.isfinite(x) or x < 0 for x in vals):
        raise ValueError(f"{name} must be finite and >= 0 at every step, got {vals}")
    return vals

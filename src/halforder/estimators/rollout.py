"""One rollout: a step's noise draw, and the chain rolled out with it (docs/design.md, "The chain").

Every caller draws a step's noise through :func:`draw_noise`, in one order: the parameter
noise tau_t eps'_t (one tensor per parameter, if tau_t > 0), then the inherent noise eps_t
(if sigma_t > 0). With pairing, each draw is made once per antithetic group and expanded
over its members (mirrored where the pairing mirrors that kind). The same generator state
therefore gives the same path in :func:`~halforder.estimators.estimate`, the per-step
gradients, the clipped-ratio estimator, the memory model and a diffusion sampler.

:func:`roll_out` applies

    x_{t-1} = phi_t(x_t; theta_t + tau_t eps'_t) + sigma_t eps_t,     t = T, ..., 1

with the parameters each step is given, and records, at the steps asked for, what a later
pass needs: the step's input x_t, its noise and its mean phi_t (the log-density of x_{t-1}
under the sampling parameters follows from the noise alone, :meth:`RecordedStep.log_density`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence, Union

import torch

from .pairing import Pairing
from .protocol import State, detach, latent, with_latent

Params = Mapping[str, torch.Tensor]
ParamsAt = Union[Params, Callable[[int], Params]]


@dataclass(frozen=True)
class StepNoise:
    """The draws of one step: ``dtheta`` = tau_t eps'_t by parameter name (``[N, *shape]``;
    None where tau_t = 0) and ``eps`` = eps_t shaped like the latent (None where sigma_t = 0)."""

    dtheta: dict[str, torch.Tensor] | None
    eps: torch.Tensor | None
    sigma: float
    tau: float


@dataclass(frozen=True)
class RecordedStep:
    """What :func:`roll_out` keeps of step t: its input state x_t (detached), its noise, and
    the latent of its mean phi_t(x_t) (detached), so that x_{t-1} = mean + sigma_t eps_t."""

    x: State
    noise: StepNoise
    mean: torch.Tensor

    def log_density(self) -> torch.Tensor:
        """log N(x_{t-1}; mean, sigma_t^2 I) per sample, ``[N]``, computed from the drawn noise:
        -|eps|^2 / 2 - D log sigma_t - D log(2 pi) / 2 (D, the latent's size per sample)."""
        eps = self.noise.eps.flatten(1)
        D = eps.shape[1]
        return -0.5 * eps.pow(2).sum(1) - D * (math.log(self.noise.sigma) + 0.5 * math.log(2 * math.pi))


@dataclass(frozen=True)
class Rollout:
    """The end of a rollout: ``x`` = x_0 (the whole state), and ``steps``, step t -> its
    :class:`RecordedStep` for the steps :func:`roll_out` was asked to record."""

    x: State
    steps: dict[int, RecordedStep] = field(default_factory=dict)


def draw_noise(chain, t: int, x: State, params: Params, generator: torch.Generator | None, *,
               pairing: Pairing = Pairing(), mirrored: bool = False, eps: torch.Tensor | None = None) -> StepNoise:
    """Step t's noise for the states ``x`` (N rows): the parameter noise first, then the
    inherent noise, each drawn once per group of ``pairing`` and expanded over the group.
    ``mirrored``: the inherent noise is the kind the pairing mirrors at HO block ends ("ho").
    ``eps``: the inherent noise given instead of drawn."""
    tau, sig = float(chain.tau(t)), float(chain.sigma(t))
    lat = latent(x)
    N, G = lat.shape[0], pairing.size
    dtheta = {k: pairing.expand(torch.randn((N // G, *v.shape), generator=generator, dtype=v.dtype,
                                            device=v.device).mul_(tau), "param")
              for k, v in params.items()} if tau > 0 else None
    if sig > 0 and eps is None:
        eps = pairing.expand(torch.randn((N // G, *lat.shape[1:]), generator=generator, dtype=lat.dtype,
                                         device=lat.device), "ho" if mirrored else "inherent")
    eps = eps if sig > 0 else None
    return StepNoise(dtheta, eps, sig, tau)


def perturb(params: Params, dtheta: Mapping[str, torch.Tensor] | None) -> Params:
    """``params`` plus the per-sample parameter noise ``dtheta`` (None or empty: no noise). Keeps the
    mapping's own type (a chain's lookup of a missing name raises as the mapping does)."""
    return params if not dtheta else type(params)({k: v + dtheta[k] for k, v in params.items()})


def noisy_step(chain, t: int, x: State, params: Params, noise: StepNoise) -> State:
    """One step of the chain: ``chain.step(t, x, params + dtheta)`` plus ``sigma_t eps_t`` on the latent."""
    mean = chain.step(t, x, perturb(params, noise.dtheta))
    return mean if noise.eps is None else with_latent(mean, latent(mean) + noise.sigma * noise.eps)


def roll_out(chain, x_T: State, params: ParamsAt, *, generator: torch.Generator | None = None,
             pairing: Pairing = Pairing(), mirrored: Collection[int] = (), grad: Collection[int] = (),
             record: Collection[int] = (), shapes: Params | None = None,
             visit: Callable[[int, State, StepNoise], None] | None = None,
             inherent: Sequence[torch.Tensor | None] | None = None) -> Rollout:
    """Roll ``chain`` out from ``x_T``, drawing every step's noise with :func:`draw_noise`.

    Args:
      chain: a :class:`~halforder.estimators.protocol.Chain`.
      x_T: start states, sample axis first.
      params: the parameters of every step, or ``t -> parameters`` of step t.
      generator: the source of every draw.
      pairing, mirrored: antithetic groups, and the steps whose inherent noise is the "ho" kind.
      grad: the steps evaluated with autograd on (the others under ``no_grad``).
      record: the steps whose input, noise and mean are kept (:class:`RecordedStep`).
      shapes: the parameters whose shapes and dtypes the parameter noise takes (default:
        ``params``, which must then be a mapping).
      visit: ``(t, x_t, noise)``, called before step t is applied.
      inherent: eps_t given in generation order (``inherent[T - t]``) instead of drawn; then
        only the parameter noise is drawn.
    """
    at = params if callable(params) else (lambda t: params)
    shapes = shapes if shapes is not None else params
    x, steps = x_T, {}
    for t in range(chain.T, 0, -1):
        noise = draw_noise(chain, t, x, shapes, generator, pairing=pairing, mirrored=t in mirrored,
                           eps=None if inherent is None else inherent[chain.T - t])
        if visit is not None:
            visit(t, x, noise)
        with torch.set_grad_enabled(t in grad):
            mean = chain.step(t, x, perturb(at(t), noise.dtheta))
        if t in record:
            steps[t] = RecordedStep(detach(x), noise, latent(mean).detach())
        x = mean if noise.eps is None else with_latent(mean, latent(mean) + noise.sigma * noise.eps)
    return Rollout(x, steps)


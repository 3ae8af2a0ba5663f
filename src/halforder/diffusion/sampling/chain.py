"""A diffusion sampler as a :class:`~halforder.estimators.protocol.Chain`.

One chain step t is the solver's update on the denoiser's output,

    x_{t-1} = mean_t(x_t; denoiser(x_t, t, theta + tau_t eps'_t)) + sigma_t * eps_t,

with sigma_t from the solver's eta at step t and tau_t the parameter-noise scale. The
noise scales are set apart from building the chain (:meth:`DiffusionChain.with_noise`,
:meth:`DiffusionChain.for_plan` with a :class:`NoiseScales`): a chain is built once for a
batch of prompts (the prompts encoded once), and each plan gets its scales from it without
rebuilding. The paper's recipe (App. G) puts eta > 0 only where an HO block ends and tau > 0
only on ZO steps (:func:`eta_schedule`, :func:`tau_schedule`).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...estimators.plan import Plan, Role
from ...estimators.protocol import State, latent, per_step
from ...estimators.rollout import roll_out
from .denoiser import Denoiser, Params
from .solvers import Schedule, Solver


@dataclass(frozen=True)
class NoiseScales:
    """A chain's noise settings, which :meth:`DiffusionChain.for_plan` turns into a plan's
    per-step scales (the defaults are the paper's recipe, App. G).

    Attributes:
      eta: the solver's eta: ``"plan"`` (``eta_plan`` where an HO block ends, 0 elsewhere:
        :func:`eta_schedule`), one number for every step, or one value per step.
      eta_plan: eta at the step that ends each HO block, where ``eta`` is ``"plan"``.
      tau: the parameter-noise scale: ``"plan"`` (``zo_sigma`` on the ZO steps, 0 elsewhere:
        :func:`tau_schedule`), one number for every step, or one value per step.
      zo_sigma: tau on the ZO steps, where ``tau`` is ``"plan"``.
    """

    eta: Schedule = "plan"
    eta_plan: float = 1.0
    tau: Schedule = "plan"
    zo_sigma: float = 1e-3

    def __post_init__(self):
        for name in ("eta", "tau"):
            v = getattr(self, name)
            if not isinstance(v, (str, int, float)):
                object.__setattr__(self, name, tuple(v))

    def etas(self, plan: Plan) -> tuple[float, ...]:
        """The per-step eta for ``plan`` (:func:`eta_schedule`)."""
        return eta_schedule(plan, self.eta, self.eta_plan)

    def taus(self, plan: Plan) -> tuple[float, ...]:
        """The per-step parameter-noise scale for ``plan`` (:func:`tau_schedule`)."""
        return tau_schedule(plan, self.tau, self.zo_sigma)


#: The keywords of :meth:`DiffusionChain.for_plan` before :class:`NoiseScales`, and their fields.
_KEYWORDS = {"eta": "eta", "ho_eta": "eta_plan", "tau": "tau", "zo_sigma": "zo_sigma"}


def _from_keywords(scales: NoiseScales | None, given: dict) -> NoiseScales:
    unknown = sorted(set(given) - set(_KEYWORDS))
    if unknown:
        raise TypeError(f"for_plan() got unexpected keyword arguments {unknown}")
    if scales is not None:
        raise TypeError("for_plan() takes the noise scales either as a NoiseScales or as keywords, not both")
    fields = {_KEYWORDS[k]: v for k, v in given.items()}
    warnings.warn(f"the keywords {', '.join(given)} of for_plan are deprecated: pass "
                  f"NoiseScales({', '.join(f'{k}={v!r}' for k, v in fields.items())})", DeprecationWarning,
                  stacklevel=3)
    return NoiseScales(**fields)


@dataclass(frozen=True, eq=False)
class DiffusionChain:
    """A diffusion sampler as a chain.

    ``step(t, x, params)`` is the solver's mean on ``denoiser(latent(x), t, params)``;
    ``sigma(t)`` the solver's noise scale at step t (from its eta); ``tau(t) = taus[t-1]``
    the ZO parameter-noise scale; ``reward(x0)`` is ``reward_fn`` on the final latent.

    Attributes:
      denoiser: ``(x, t, params) -> model output`` (e.g. a
        :class:`~halforder.diffusion.sampling.denoiser.ModuleDenoiser`).
      solver: a :class:`~halforder.diffusion.sampling.solvers.Solver` (DDIM, DPM-Solver or flow matching).
      taus: per-step parameter-noise scales (one number: the same at every step).
      reward_fn: final latent ``[N, ...]`` -> reward ``[N]``.
      latent_shape: the shape of one latent, for :meth:`sample_start`.
      init_noise_sigma: the scheduler's start scale (x_T = init_noise_sigma * N(0, I)).
      device: where start latents are drawn.
    """

    denoiser: Denoiser
    solver: Solver
    taus: tuple[float, ...] | float
    reward_fn: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: tuple[int, ...]
    init_noise_sigma: float = 1.0
    device: torch.device | str = "cpu"

    def __post_init__(self):
        object.__setattr__(self, "taus", per_step(self.taus, self.solver.T, "taus"))

    @property
    def T(self) -> int:
        return self.solver.T

    def step(self, t: int, x: State, params: Params) -> State:
        return self.solver.step(t, x, self.denoiser(latent(x), t, params))

    def sigma(self, t: int) -> float:
        return self.solver.sigma(t)

    def tau(self, t: int) -> float:
        return self.taus[t - 1]

    def reward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.reward_fn(x0)

    def initial_state(self, x_T: torch.Tensor) -> State:
        """The start state for latents ``x_T`` (a tuple for multistep solvers)."""
        return self.solver.initial_state(x_T)

    def sample_start(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> State:
        """n start states x_T ~ N(0, init_noise_sigma^2 I) on the chain's device."""
        z = torch.randn((n, *self.latent_shape), generator=generator, dtype=dtype, device=self.device)
        return self.initial_state(z * self.init_noise_sigma)

    def with_noise(self, etas: Schedule, taus: Schedule) -> "DiffusionChain":
        """The same chain (same denoiser, prompts and reward) with other noise scales: the
        solver's per-step eta and the per-step parameter-noise scale tau."""
        return dataclasses.replace(self, solver=self.solver.with_etas(etas), taus=per_step(taus, self.T, "taus"))

    def for_plan(self, plan: Plan, scales: NoiseScales | None = None, **deprecated) -> "DiffusionChain":
        """The chain with the noise scales that ``scales`` gives ``plan`` (:class:`NoiseScales`;
        None: its defaults, the paper's recipe).

        The keywords ``eta``, ``ho_eta`` (now ``eta_plan``), ``tau`` and ``zo_sigma`` in place
        of ``scales`` still work, with a ``DeprecationWarning``."""
        if deprecated:
            scales = _from_keywords(scales, deprecated)
        scales = NoiseScales() if scales is None else scales
        return self.with_noise(scales.etas(plan), scales.taus(plan))


def rollout(chain, params: Params, x_T: State, *, generator: torch.Generator | None = None,
            noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Sample x_0 from ``x_T`` without gradients: x_{t-1} = step + sigma_t eps_t
    (:func:`~halforder.estimators.rollout.roll_out`, with no parameter noise).

    ``noise[T - t]`` (generation order) gives eps_t; otherwise eps_t is drawn from
    ``generator`` at the steps with sigma_t > 0. Returns the final latent."""
    return latent(roll_out(chain, x_T, params, generator=generator, shapes={}, inherent=noise).x)


def eta_schedule(plan: Plan, eta: Schedule = "plan", eta_plan: float = 1.0) -> tuple[float, ...]:
    """Per-step eta for a plan.

    ``"plan"`` is the paper's recipe (App. G): eta = ``eta_plan`` at the step j that ends
    each HO block (the step whose noise carries the likelihood ratio), eta = 0 elsewhere.
    A number is used at every step; a sequence gives ``eta[t-1]`` for step t."""
    if isinstance(eta, str):
        if eta != "plan":
            raise ValueError(f"unknown eta schedule {eta!r}; use 'plan', a number or one value per step")
        if not eta_plan > 0:
            raise ValueError(f"eta_plan must be > 0, got {eta_plan}")
        ends = {j for j, _ in plan.blocks}
        return tuple(float(eta_plan) if t in ends else 0.0 for t in range(1, plan.T + 1))
    return per_step(eta, plan.T, "eta")


def tau_schedule(plan: Plan, tau: Schedule = "plan", zo_sigma: float = 1e-3) -> tuple[float, ...]:
    """Per-step parameter-noise scale: ``"plan"`` puts ``zo_sigma`` on the ZO steps and 0
    elsewhere; a number is used at every step; a sequence gives ``tau[t-1]``."""
    if isinstance(tau, str):
        if tau != "plan":
            raise ValueError(f"unknown tau schedule {tau!r}; use 'plan', a number or one value per step")
        if not zo_sigma > 0:
            raise ValueError(f"zo_sigma must be > 0, got {zo_sigma}")
        return tuple(float(zo_sigma) if r is Role.ZO else 0.0 for r in plan.roles)
    return per_step(tau, plan.T, "tau")



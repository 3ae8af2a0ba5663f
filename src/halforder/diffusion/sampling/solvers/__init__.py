"""Solvers: the part of a diffusers scheduler step that does not call the network.

One chain step t (t = T..1, generation order; diffusers' step index is T - t) is

    x_{t-1} = mean_t(x_t; out) + sigma_t * eps_t,

where ``out`` is the denoiser's output at x_t and mean_t the scheduler's update with the
noise term left out. A solver is built once from a scheduler and T (``from_scheduler``);
its per-step eta, which sets sigma_t, is given separately (``with_etas``), so one
solver serves every plan. Every solver meets :class:`Solver`; its per-step numbers are
records with named fields (``steps[t-1]``: :class:`DDIMStep`, :class:`DPMStep`,
:class:`FlowStep`). :func:`make_solver` picks the solver of a scheduler.

* :class:`DDIMSolver` — DDIM (Song et al. 2021, eq. 12) with eta_t per step,
  sigma_t = eta_t * sqrt((1 - a_{t-1})/(1 - a_t) * (1 - a_t/a_{t-1})), as
  ``DDIMScheduler.step(..., eta=eta_t, variance_noise=eps)``. Optionally for a model
  trained with a :class:`LatentScale` (VideoCrafter2), whose forward process is
  x_t = sqrt(a_t) s_t x_0 + sqrt(1 - a_t) eps: the mean is then

      mean_t = sqrt(a_{t-1}) (s_{t-1} / s_t) y_0 + sqrt(1 - a_{t-1} - sigma_t^2) eps_pred,

  with y_0 = s_t x_0 the prediction at the model's own scale (derivation in
  docs/video.md). The scale changes the mean only; sigma_t is the same.
* :class:`DPMSolver` — DPM-Solver++(2M) (Lu et al. 2022; multistep, midpoint, order 2). Its
  state is the tuple (x, previous data prediction). With s = eta * sigma_next * sqrt(1 - e^{-2h})
  the update is

      x' = c_x x + c_D (D0 + D1/2) + s * eps,
      c_x = sqrt(sigma_next^2 - s^2) / sigma_cur,   c_D = alpha_next - c_x * alpha_cur,

  which is exactly diffusers' ``sde-dpmsolver++`` step at eta = 1 and its (ODE)
  ``dpmsolver++`` step at eta = 0; 0 < eta < 1 interpolates the injected variance,
  keeping the marginal variance of the first-order step (no diffusers counterpart).
  The paper's Table 8 recipe is stochastic (eta = 1) only at the steps that end an HO
  block. The update holds for any (alpha, sigma): on VP sigmas (Stable Diffusion) alpha =
  1/sqrt(sigma^2 + 1) and sigma_t = sigma alpha; on flow sigmas (``use_flow_sigmas``, SANA)
  alpha = 1 - sigma, sigma_t = sigma, and a velocity prediction v (``flow_prediction``)
  gives D0 = x - sigma_t v. Checked against diffusers 0.42 (tests/diffusion/test_chain.py,
  tests/diffusion/test_solvers.py): per step, with the same noise, for eta = 1 (SDE), eta = 0
  (ODE) and a schedule mixing both (the history carried between two schedulers): VP with
  epsilon prediction, T = 6 and 16, default and Karras sigmas, and a whole SDE rollout against
  ``StableDiffusionPipeline``; flow sigmas with flow prediction (SANA's flow_shift = 3),
  T = 1, 2, 6 and 16, final sigma zero and sigma_min. Not checked: order 3, the heun solver
  type, v-prediction with DPM (implemented by the same conversion as DDIM's, which is checked).
* :class:`FlowMatchSolver` — the Euler step of a flow-matching model (SD3, FLUX, Wan) at
  eta = 0, and two stochastic families at eta > 0: Flow-GRPO's SDE and CPS.
"""
from __future__ import annotations

from typing import Sequence

from .ddim import DDIMSolver, DDIMStep, LatentScale
from .dpm import DPMSolver, DPMStep
from .flow import FLOW_NOISE, FlowMatchSolver, FlowStep
from .protocol import Schedule, Solver

__all__ = ["DDIMSolver", "DDIMStep", "DPMSolver", "DPMStep", "FLOW_NOISE", "FlowMatchSolver", "FlowStep",
           "LatentScale", "Schedule", "Solver", "make_solver"]


def _flow(scheduler, T, etas, latent_scale, noise, mu, sigmas) -> Solver:
    if latent_scale is not None:
        raise ValueError("a latent scale applies to DDIM only, not to a flow-matching scheduler")
    return FlowMatchSolver.from_scheduler(scheduler, T, etas, noise=noise, mu=mu, sigmas=sigmas)


def _diffusion(solver):
    """The builder of a solver that takes a latent scale and none of the flow-matching options."""
    def build(scheduler, T, etas, latent_scale, noise, mu, sigmas) -> Solver:
        name = type(scheduler).__name__
        if noise != "sde":
            raise ValueError(f"noise {noise!r} is for flow-matching models (SD3, FLUX, Wan), not for this model's "
                             f"{name}: leave noise at its default, sde")
        if mu is not None or sigmas is not None:
            raise ValueError(f"mu and sigmas apply to flow-matching models only, not to {name}")
        return solver.from_scheduler(scheduler, T, etas, latent_scale)
    return build


def _builders():
    """(scheduler class, builder) pairs; diffusers is imported here, when a solver is made."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    return ((FlowMatchEulerDiscreteScheduler, _flow), (DDIMScheduler, _diffusion(DDIMSolver)),
            (DPMSolverMultistepScheduler, _diffusion(DPMSolver)))


def make_solver(scheduler, T: int, etas: Schedule = 0.0, latent_scale: LatentScale | None = None, *,
                noise: str = "sde", mu: float | None = None, sigmas: Sequence[float] | None = None) -> Solver:
    """The solver for a diffusers scheduler (DDIM, DPM-Solver multistep or flow-matching Euler).

    ``latent_scale``: the model's :class:`LatentScale` (DDIM only); ``noise``: the stochastic
    family at eta > 0 of a flow-matching model (``"sde"`` or ``"cps"``); ``mu`` and ``sigmas``:
    a flow-matching pipeline's dynamic shift and schedule (:meth:`FlowMatchSolver.from_scheduler`)."""
    for cls, build in _builders():
        if isinstance(scheduler, cls):
            return build(scheduler, T, etas, latent_scale, noise, mu, sigmas)
    raise ValueError(f"unsupported scheduler {type(scheduler).__name__}; use DDIMScheduler, "
                     "DPMSolverMultistepScheduler or FlowMatchEulerDiscreteScheduler")

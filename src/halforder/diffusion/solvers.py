"""Solvers: the part of a diffusers scheduler step that does not call the network.

One chain step t (t = T..1, generation order; diffusers' step index is T - t) is

    x_{t-1} = mean_t(x_t; out) + sigma_t * eps_t,

where ``out`` is the denoiser's output at x_t and mean_t the scheduler's update with the
noise term left out. A solver is built once from a scheduler and T (``from_scheduler``);
its per-step eta, which sets sigma_t, is given separately (``with_etas``), so one
solver serves every plan.

* :class:`DDIMSolver` — DDIM (Song et al. 2021, eq. 12) with eta_t per step,
  sigma_t = eta_t * sqrt((1 - a_{t-1})/(1 - a_t) * (1 - a_t/a_{t-1})), as
  ``DDIMScheduler.step(..., eta=eta_t, variance_noise=eps)``. Optionally for a model
  trained with a :class:`LatentScale` (VideoCrafter2), whose forward process is
  x_t = sqrt(a_t) s_t x_0 + sqrt(1 - a_t) eps: the mean is then

      mean_t = sqrt(a_{t-1}) (s_{t-1} / s_t) y_0 + sqrt(1 - a_{t-1} - sigma_t^2) eps_pred,

  with y_0 = s_t x_0 the prediction at the model's own scale (derivation in
  docs/video.md). The scale changes the mean only; sigma_t is the same.
* :class:`DPMSolver` — DPM-Solver++(2M) (multistep, midpoint, order 2). Its state is
  the tuple (x, previous data prediction). With s = eta * sigma_next * sqrt(1 - e^{-2h})
  the update is

      x' = c_x x + c_D (D0 + D1/2) + s * eps,
      c_x = sqrt(sigma_next^2 - s^2) / sigma_cur,   c_D = alpha_next - c_x * alpha_cur,

  which is exactly diffusers' ``sde-dpmsolver++`` step at eta = 1 and its (ODE)
  ``dpmsolver++`` step at eta = 0; 0 < eta < 1 interpolates the injected variance,
  keeping the marginal variance of the first-order step (no diffusers counterpart).
  The paper's Table 8 recipe is stochastic (eta = 1) only at the steps that end an HO
  block. Checked against diffusers 0.42 (tests/diffusion/test_chain.py): per step, with
  the same noise, for eta = 1 (SDE), eta = 0 (ODE) and a schedule mixing both (the
  history carried between two schedulers), T = 6 and 16, default and Karras sigmas,
  epsilon prediction; and a whole SDE rollout against ``StableDiffusionPipeline``.
  Not checked: order 3, the heun solver type, v-prediction with DPM (implemented by the
  same conversion as DDIM's, which is checked).
* :class:`FlowMatchSolver` — the Euler step of a flow-matching model (SD3, FLUX, Wan) at
  eta = 0, and two stochastic families at eta > 0: Flow-GRPO's SDE and CPS.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from ..estimators.protocol import State, per_step

Schedule = Union[str, float, Sequence[float]]


@dataclass(frozen=True)
class LatentScale:
    """A scale of the clean latent per training timestep tau: the model was trained on

        x_tau = sqrt(abar_tau) s(tau) x_0 + sqrt(1 - abar_tau) eps,

    s(tau) = linspace(start, end, ramp)[tau] for tau < ramp, then ``end``
    (VideoCrafter2: start 1, end 0.7, ramp 400; docs/video.md)."""

    start: float
    end: float
    ramp: int

    def __post_init__(self):
        if not (self.start > 0 and self.end > 0 and self.ramp >= 2):
            raise ValueError(f"a latent scale needs start > 0, end > 0 and ramp >= 2, got {self}")

    def __call__(self, timestep: int) -> float:
        """s(timestep); timesteps below 0 (the final DDIM step) get s(0)."""
        tau = max(int(timestep), 0)
        if tau >= self.ramp:
            return float(self.end)
        return self.start + (self.end - self.start) * tau / (self.ramp - 1)


def _fresh(scheduler, T: int):
    """A copy of ``scheduler`` with ``set_timesteps(T)`` (the caller's object is left alone)."""
    s = type(scheduler).from_config(scheduler.config)
    s.set_timesteps(T)
    return s


@dataclass(frozen=True, eq=False)
class DDIMSolver:
    """DDIM steps of a ``DDIMScheduler`` for T inference steps with per-step ``etas``
    (``etas[t-1]`` for chain step t). Coefficients are computed in float64 from the
    scheduler's ``alphas_cumprod``; ``base[t-1] = (a_t, a_prev, v_t)`` do not depend on eta,
    and sigma_t = eta_t sqrt(v_t) (Song et al. 2021, eq. 16). ``scales[t-1] = (s_t, s_prev)``
    are a :class:`LatentScale` at step t's timestep and the previous one (empty: no scale)."""

    T: int
    timesteps: torch.Tensor          # timesteps[t-1]: the model timestep of chain step t
    prediction_type: str
    clip: float | None
    base: tuple[tuple[float, float, float], ...]
    etas: tuple[float, ...] = ()
    scales: tuple[tuple[float, float], ...] = ()
    coef: tuple = field(init=False, repr=False)   # (a_t, x0 coefficient, sigma, dir, s_t) per step t

    def __post_init__(self):
        etas = per_step(self.etas or 0.0, self.T, "etas")
        object.__setattr__(self, "etas", etas)
        scales = self.scales or ((1.0, 1.0),) * self.T
        if len(scales) != self.T:
            raise ValueError(f"scales: {len(scales)} (s_t, s_prev) pairs for T={self.T} steps")
        coef = []
        for (a_t, a_prev, var), eta, (s_t, s_prev) in zip(self.base, etas, scales):
            sig = eta * math.sqrt(var)
            coef.append((a_t, math.sqrt(a_prev) * s_prev / s_t, sig, math.sqrt(max(1 - a_prev - sig ** 2, 0.0)),
                         s_t))
        object.__setattr__(self, "coef", tuple(coef))

    @classmethod
    def from_scheduler(cls, scheduler, T: int, etas: Schedule = 0.0,
                       latent_scale: LatentScale | None = None) -> "DDIMSolver":
        """The solver of ``scheduler`` for T steps; ``latent_scale``: the model's
        :class:`LatentScale` (None: the standard forward process)."""
        s = _fresh(scheduler, T)
        if getattr(s.config, "thresholding", False):
            raise ValueError("DDIMSolver does not support dynamic thresholding (thresholding=True)")
        ac = s.alphas_cumprod.double()
        base, scales = [], []
        for t in range(1, T + 1):
            ts = int(s.timesteps[T - t])
            prev = ts - s.config.num_train_timesteps // T
            a_t = float(ac[ts])
            a_prev = float(ac[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
            base.append((a_t, a_prev, (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)))
            if latent_scale is not None:
                scales.append((latent_scale(ts), latent_scale(prev)))
        clip = float(s.config.clip_sample_range) if s.config.clip_sample else None
        return cls(T, s.timesteps.flip(0).clone(), s.config.prediction_type, clip, tuple(base), etas,
                   tuple(scales))

    def with_etas(self, etas: Schedule) -> "DDIMSolver":
        """The same solver with another per-step eta."""
        return dataclasses.replace(self, etas=per_step(etas, self.T, "etas"))

    def initial_state(self, x_T: torch.Tensor) -> State:
        return x_T

    def sigma(self, t: int) -> float:
        return self.coef[t - 1][2]

    def step(self, t: int, x: State, out: torch.Tensor) -> State:
        a_t, c_x0, _, direction, s_t = self.coef[t - 1]
        # y0 = s_t x_0, the clean latent at the model's scale; c_x0 = sqrt(a_prev) s_prev / s_t
        y0, eps = _x0_eps(self.prediction_type, x, out, math.sqrt(a_t), math.sqrt(1 - a_t))
        if self.clip is not None:
            y0 = y0.clamp(-self.clip * s_t, self.clip * s_t)     # x_0 = y0 / s_t in the clip range
        return c_x0 * y0 + direction * eps


def _x0_eps(prediction_type, x, out, alpha, sigma):
    """(predicted x_0, predicted noise) from x = alpha x_0 + sigma eps and a model output."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    if prediction_type == "sample":
        return out, (x - alpha * out) / sigma
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@dataclass(frozen=True, eq=False)
class DPMSolver:
    """DPM-Solver++(2M) of a ``DPMSolverMultistepScheduler`` (midpoint, order <= 2) with
    per-step ``etas`` in [0, 1] (see module docstring). State: (x, previous data prediction).
    ``base[t-1] = (alpha_cur, sigma_cur, alpha_next, sigma_next, h, order, r0)`` do not
    depend on eta."""

    T: int
    timesteps: torch.Tensor
    prediction_type: str
    base: tuple[tuple[float, float, float, float, float, int, float], ...]
    etas: tuple[float, ...] = ()
    coef: tuple = field(init=False, repr=False)   # (alpha_cur, sigma_cur, c_x, c_D, noise s, order, r0)

    def __post_init__(self):
        etas = per_step(self.etas or 0.0, self.T, "etas")
        if any(e > 1 for e in etas):
            raise ValueError("DPM-Solver etas must lie in [0, 1] (1 = diffusers' sde-dpmsolver++ step)")
        object.__setattr__(self, "etas", etas)
        coef = []
        for (a_c, s_c, a_n, s_n, h, order, r0), eta in zip(self.base, etas):
            if s_n == 0.0:       # final step to sigma = 0: x' = D0, no noise
                noise, c_x = 0.0, 0.0
            else:
                noise = eta * s_n * math.sqrt(-math.expm1(-2 * h))
                c_x = math.sqrt(max(s_n ** 2 - noise ** 2, 0.0)) / s_c
            coef.append((a_c, s_c, c_x, a_n - c_x * a_c, noise, order, r0))
        object.__setattr__(self, "coef", tuple(coef))

    @classmethod
    def from_scheduler(cls, scheduler, T: int, etas: Schedule = 0.0,
                       latent_scale: LatentScale | None = None) -> "DPMSolver":
        """The solver of ``scheduler`` for T steps; a ``latent_scale`` is refused (no
        DPM-Solver counterpart is derived here)."""
        if latent_scale is not None:
            raise ValueError("DPM-Solver has no latent-scale (VideoCrafter2) counterpart here; use the DDIM "
                             "scheduler (--scheduler ddim)")
        s = _fresh(scheduler, T)
        cfg = s.config
        if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError(f"DPMSolver needs algorithm_type dpmsolver++ or sde-dpmsolver++, got {cfg.algorithm_type}")
        if cfg.solver_order > 2 or cfg.solver_type != "midpoint" or cfg.thresholding \
                or getattr(cfg, "use_flow_sigmas", False):
            raise ValueError("DPMSolver supports solver_order <= 2, solver_type='midpoint', no thresholding, "
                             "no flow sigmas")
        sig = s.sigmas.double()
        alpha = 1.0 / torch.sqrt(sig ** 2 + 1)
        sg = sig * alpha                      # diffusers' _sigma_to_alpha_sigma_t
        lam = torch.log(alpha) - torch.log(sg)
        base = []
        for t in range(1, T + 1):
            i = T - t
            last = i == T - 1 and (cfg.euler_at_final or (cfg.lower_order_final and T < 15)
                                   or cfg.final_sigmas_type == "zero")
            order = 1 if (cfg.solver_order == 1 or i == 0 or last) else 2
            a_c, s_c, a_n, s_n = (float(v) for v in (alpha[i], sg[i], alpha[i + 1], sg[i + 1]))
            h = float(lam[i + 1] - lam[i]) if s_n > 0 else 0.0
            r0 = float((lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])) if order == 2 else 1.0
            base.append((a_c, s_c, a_n, s_n, h, order, r0))
        return cls(T, s.timesteps.flip(0).clone(), cfg.prediction_type, tuple(base), etas)

    def with_etas(self, etas: Schedule) -> "DPMSolver":
        """The same solver with another per-step eta."""
        return dataclasses.replace(self, etas=per_step(etas, self.T, "etas"))

    def initial_state(self, x_T: torch.Tensor) -> State:
        return (x_T, torch.zeros_like(x_T))

    def sigma(self, t: int) -> float:
        return self.coef[t - 1][4]

    def step(self, t: int, x: State, out: torch.Tensor) -> State:
        a_c, s_c, c_x, c_D, _, order, r0 = self.coef[t - 1]
        z, prev = x
        d0, _ = _x0_eps(self.prediction_type, z, out, a_c, s_c)
        d = d0 if order == 1 else d0 + 0.5 * (d0 - prev) / r0
        return (c_x * z + c_D * d, d0)


FLOW_NOISE = ("sde", "cps")


@dataclass(frozen=True, eq=False)
class FlowMatchSolver:
    """Euler steps of a ``FlowMatchEulerDiscreteScheduler`` (rectified flow, x = (1 - s) x_0 +
    s x_1, the network predicts the velocity v = x_1 - x_0) with per-step ``etas``
    (docs/flow.md derives both noise families). With s = sigmas[i], s' = sigmas[i + 1] and
    dt = s' - s < 0 at chain step t (i = T - t):

    * eta = 0: the scheduler's ODE step, x + dt v, bit for bit.
    * ``noise="sde"``, eta = a > 0: Flow-GRPO's marginal-preserving reverse SDE, with
      g = a sqrt(s / (1 - s*)) (s* = s, or the schedule's first sigma below 1 where s = 1),
      mean x (1 + g^2 dt / (2 s)) + v (1 + g^2 (1 - s) / (2 s)) dt and noise std g sqrt(-dt).
    * ``noise="cps"``, eta = a in [0, 1]: coefficient-preserving sampling, noise std
      s' sin(a pi / 2) and mean x0 (1 - s') + x1 sqrt(s'^2 - std^2), with x0 = x - s v and
      x1 = x + (1 - s) v.

    ``sigmas`` are the scheduler's (T + 1 values, float32 as it computes them, ending at 0)."""

    T: int
    timesteps: torch.Tensor
    sigmas: tuple[float, ...]
    etas: tuple[float, ...] = ()
    noise: str = "sde"
    coef: tuple = field(init=False, repr=False)   # (s, dt, eta, x coefficient, v coefficient, std) per step t

    def __post_init__(self):
        if self.noise not in FLOW_NOISE:
            raise ValueError(f"noise must be one of {', '.join(FLOW_NOISE)}, got {self.noise!r}")
        etas = per_step(self.etas or 0.0, self.T, "etas")
        if self.noise == "cps" and any(e > 1 for e in etas):
            raise ValueError("CPS etas must lie in [0, 1] (the noise std is sigma_next sin(eta pi / 2))")
        object.__setattr__(self, "etas", etas)
        below_one = next((s for s in self.sigmas if s < 1), None)
        coef = []
        for t in range(1, self.T + 1):
            s, s_next, a = self.sigmas[self.T - t], self.sigmas[self.T - t + 1], etas[t - 1]
            if a == 0:   # dt as the scheduler computes it, in float32
                dt = float(torch.tensor(s_next, dtype=torch.float32) - torch.tensor(s, dtype=torch.float32))
                coef.append((s, dt, a, 1.0, dt, 0.0))
            elif self.noise == "sde":
                dt = s_next - s
                g2 = a ** 2 * s / (1 - (s if s < 1 else below_one))
                coef.append((s, dt, a, 1 + g2 * dt / (2 * s), (1 + g2 * (1 - s) / (2 * s)) * dt, math.sqrt(-g2 * dt)))
            else:   # cps: mean = (x - s v)(1 - s') + (x + (1 - s) v) c with c = sqrt(s'^2 - std^2)
                std = s_next * math.sin(a * math.pi / 2)
                c = math.sqrt(max(s_next ** 2 - std ** 2, 0.0))
                coef.append((s, s_next - s, a, 1 - s_next + c, -s * (1 - s_next) + (1 - s) * c, std))
        object.__setattr__(self, "coef", tuple(coef))

    @classmethod
    def from_scheduler(cls, scheduler, T: int, etas: Schedule = 0.0, *, noise: str = "sde",
                       mu: float | None = None, sigmas: Sequence[float] | None = None) -> "FlowMatchSolver":
        """The solver of ``scheduler`` for T steps: ``set_timesteps`` as the pipelines call it
        (``mu``: the dynamic shift, needed when the scheduler has ``use_dynamic_shifting``;
        ``sigmas``: the pipeline's own schedule, e.g. FLUX's linspace(1, 1/T, T))."""
        s = type(scheduler).from_config(scheduler.config)
        cfg = s.config
        if cfg.get("stochastic_sampling") or cfg.get("invert_sigmas"):
            raise ValueError("FlowMatchSolver does not support stochastic_sampling or invert_sigmas")
        if cfg.get("use_dynamic_shifting") and mu is None:
            raise ValueError("the scheduler uses dynamic shifting: give mu (as the pipeline computes it from the "
                             "image size)")
        kw = {} if mu is None else {"mu": float(mu)}
        if sigmas is not None:
            s.set_timesteps(sigmas=list(sigmas), **kw)
        else:
            s.set_timesteps(T, **kw)
        if len(s.timesteps) != T:
            raise ValueError(f"{len(s.timesteps)} sigmas for T={T} steps")
        return cls(T, s.timesteps.flip(0).clone(), tuple(float(v) for v in s.sigmas), etas, noise)

    def with_etas(self, etas: Schedule) -> "FlowMatchSolver":
        """The same solver with another per-step eta."""
        return dataclasses.replace(self, etas=per_step(etas, self.T, "etas"))

    def initial_state(self, x_T: torch.Tensor) -> State:
        return x_T

    def sigma(self, t: int) -> float:
        return self.coef[t - 1][5]

    def step(self, t: int, x: State, out: torch.Tensor) -> State:
        _, dt, a, c_x, c_v, _ = self.coef[t - 1]
        if a == 0:
            return x + dt * out          # FlowMatchEulerDiscreteScheduler.step
        return c_x * x + c_v * out


def make_solver(scheduler, T: int, etas: Schedule = 0.0, latent_scale: LatentScale | None = None, *,
                noise: str = "sde", mu: float | None = None, sigmas: Sequence[float] | None = None):
    """The solver for a diffusers scheduler (DDIM, DPM-Solver multistep or flow-matching Euler).

    ``latent_scale``: the model's :class:`LatentScale` (DDIM only); ``noise``: the stochastic
    family at eta > 0 of a flow-matching model (``"sde"`` or ``"cps"``); ``mu`` and ``sigmas``:
    a flow-matching pipeline's dynamic shift and schedule (:meth:`FlowMatchSolver.from_scheduler`)."""
    name = type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        if latent_scale is not None:
            raise ValueError("a latent scale applies to DDIM only, not to a flow-matching scheduler")
        return FlowMatchSolver.from_scheduler(scheduler, T, etas, noise=noise, mu=mu, sigmas=sigmas)
    if noise != "sde":
        raise ValueError(f"noise {noise!r} is for flow-matching models (SD3, FLUX, Wan), not for this model's {name}: "
                         "leave noise at its default, sde")
    if mu is not None or sigmas is not None:
        raise ValueError(f"mu and sigmas apply to flow-matching models only, not to {name}")
    if name == "DDIMScheduler":
        return DDIMSolver.from_scheduler(scheduler, T, etas, latent_scale)
    if name == "DPMSolverMultistepScheduler":
        return DPMSolver.from_scheduler(scheduler, T, etas, latent_scale)
    raise ValueError(f"unsupported scheduler {name}; use DDIMScheduler, DPMSolverMultistepScheduler or "
                     "FlowMatchEulerDiscreteScheduler")



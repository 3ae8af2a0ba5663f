"""DDIM (Song et al. 2021, eq. 12) with a per-step eta, optionally for a model trained with a
:class:`LatentScale` (VideoCrafter2)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ....estimators.protocol import State, per_step
from .protocol import Schedule, StepTable, fresh, x0_eps


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


@dataclass(frozen=True)
class DDIMStep:
    """The numbers of one DDIM step: ``a_t`` (alphas_cumprod at the step's timestep),
    ``x0_coef`` = sqrt(a_prev) s_prev / s_t, ``sigma`` (the noise scale), ``dir_coef`` =
    sqrt(1 - a_prev - sigma^2) (the coefficient of the predicted noise) and ``scale`` = s_t."""

    a_t: float
    x0_coef: float
    sigma: float
    dir_coef: float
    scale: float


@dataclass(frozen=True, eq=False)
class DDIMSolver(StepTable):
    """DDIM steps of a ``DDIMScheduler`` for T inference steps with per-step ``etas``
    (``etas[t-1]`` for chain step t). Coefficients are computed in float64 from the
    scheduler's ``alphas_cumprod``; ``base[t-1] = (a_t, a_prev, v_t)`` do not depend on eta,
    and sigma_t = eta_t sqrt(v_t) (Song et al. 2021, eq. 16). ``scales[t-1] = (s_t, s_prev)``
    are a :class:`LatentScale` at step t's timestep and the previous one (empty: no scale).
    ``steps[t-1]`` is step t's :class:`DDIMStep`."""

    T: int
    timesteps: torch.Tensor          # timesteps[t-1]: the model timestep of chain step t
    prediction_type: str
    clip: float | None
    base: tuple[tuple[float, float, float], ...]
    etas: tuple[float, ...] = ()
    scales: tuple[tuple[float, float], ...] = ()
    steps: tuple[DDIMStep, ...] = field(init=False, repr=False)

    def __post_init__(self):
        etas = per_step(self.etas or 0.0, self.T, "etas")
        object.__setattr__(self, "etas", etas)
        scales = self.scales or ((1.0, 1.0),) * self.T
        if len(scales) != self.T:
            raise ValueError(f"scales: {len(scales)} (s_t, s_prev) pairs for T={self.T} steps")
        steps = []
        for (a_t, a_prev, var), eta, (s_t, s_prev) in zip(self.base, etas, scales):
            sig = eta * math.sqrt(var)
            steps.append(DDIMStep(a_t, math.sqrt(a_prev) * s_prev / s_t, sig,
                                  math.sqrt(max(1 - a_prev - sig ** 2, 0.0)), s_t))
        object.__setattr__(self, "steps", tuple(steps))

    @classmethod
    def from_scheduler(cls, scheduler, T: int, etas: Schedule = 0.0,
                       latent_scale: LatentScale | None = None) -> "DDIMSolver":
        """The solver of ``scheduler`` for T steps; ``latent_scale``: the model's
        :class:`LatentScale` (None: the standard forward process)."""
        s = fresh(scheduler, T)
        if getattr(s.config, "thresholding", False):
            raise ValueError("DDIMSolver does not support dynamic thresholding (thresholding=True)")
        if s.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {s.config.prediction_type!r} for DDIM")
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

    def step(self, t: int, x: State, out: torch.Tensor) -> State:
        """The mean of step t from ``x`` and the model output ``out``."""
        k = self.steps[t - 1]
        # y0 = s_t x_0, the clean latent at the model's scale; x0_coef = sqrt(a_prev) s_prev / s_t
        y0, eps = x0_eps(self.prediction_type, x, out, math.sqrt(k.a_t), math.sqrt(1 - k.a_t))
        if self.clip is not None:
            y0 = y0.clamp(-self.clip * k.scale, self.clip * k.scale)     # x_0 = y0 / s_t in the clip range
        return k.x0_coef * y0 + k.dir_coef * eps

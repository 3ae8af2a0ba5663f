"""DPM-Solver++(2M) (Lu et al. 2022) with a per-step eta, on VP sigmas (Stable Diffusion) and on
flow sigmas with a velocity prediction (SANA)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ....estimators.protocol import State, per_step
from .ddim import LatentScale
from .protocol import Schedule, StepTable, fresh, x0_eps


@dataclass(frozen=True)
class DPMStep:
    """The numbers of one DPM-Solver++ step from (alpha_cur, sigma_cur) to the next noise
    level: ``x_coef`` = c_x, ``d_coef`` = c_D, ``sigma`` = s (the injected noise scale; module
    docstring of :mod:`halforder.diffusion.sampling.solvers`), ``order`` (1 or 2) and ``r0`` = h_prev / h
    (1.0 at order 1)."""

    alpha_cur: float
    sigma_cur: float
    x_coef: float
    d_coef: float
    sigma: float
    order: int
    r0: float


@dataclass(frozen=True, eq=False)
class DPMSolver(StepTable):
    """DPM-Solver++(2M) of a ``DPMSolverMultistepScheduler`` (midpoint, order <= 2) with
    per-step ``etas`` in [0, 1] (see the module docstring of :mod:`halforder.diffusion.sampling.solvers`).
    State: (x, previous data prediction). ``base[t-1] = (alpha_cur, sigma_cur, alpha_next,
    sigma_next, h, order, r0)`` do not depend on eta; ``steps[t-1]`` is step t's
    :class:`DPMStep`."""

    T: int
    timesteps: torch.Tensor
    prediction_type: str
    base: tuple[tuple[float, float, float, float, float, int, float], ...]
    etas: tuple[float, ...] = ()
    steps: tuple[DPMStep, ...] = field(init=False, repr=False)

    def __post_init__(self):
        etas = per_step(self.etas or 0.0, self.T, "etas")
        if any(e > 1 for e in etas):
            raise ValueError("DPM-Solver etas must lie in [0, 1] (1 = diffusers' sde-dpmsolver++ step)")
        object.__setattr__(self, "etas", etas)
        steps = []
        for (a_c, s_c, a_n, s_n, h, order, r0), eta in zip(self.base, etas):
            if s_n == 0.0:       # final step to sigma = 0: x' = D0, no noise
                noise, c_x = 0.0, 0.0
            else:
                noise = eta * s_n * math.sqrt(-math.expm1(-2 * h))
                c_x = math.sqrt(max(s_n ** 2 - noise ** 2, 0.0)) / s_c
            steps.append(DPMStep(a_c, s_c, c_x, a_n - c_x * a_c, noise, order, r0))
        object.__setattr__(self, "steps", tuple(steps))

    @classmethod
    def from_scheduler(cls, scheduler, T: int, etas: Schedule = 0.0,
                       latent_scale: LatentScale | None = None) -> "DPMSolver":
        """The solver of ``scheduler`` for T steps; a ``latent_scale`` is refused (no
        DPM-Solver counterpart is derived here). With ``use_flow_sigmas`` (SANA) the
        scheduler's sigmas are flow sigmas: alpha_t = 1 - sigma_t."""
        if latent_scale is not None:
            raise ValueError("DPM-Solver has no latent-scale (VideoCrafter2) counterpart here; use the DDIM "
                             "scheduler (--scheduler ddim)")
        s = fresh(scheduler, T)
        cfg = s.config
        if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError(f"DPMSolver needs algorithm_type dpmsolver++ or sde-dpmsolver++, got {cfg.algorithm_type}")
        if cfg.solver_order > 2 or cfg.solver_type != "midpoint" or cfg.thresholding:
            raise ValueError("DPMSolver supports solver_order <= 2, solver_type='midpoint', no thresholding")
        flow = bool(getattr(cfg, "use_flow_sigmas", False))
        if cfg.prediction_type == "flow_prediction" and not flow:
            raise ValueError("prediction_type='flow_prediction' needs flow sigmas (use_flow_sigmas=True)")
        sig = s.sigmas.double()
        if flow:                              # x = (1 - sigma) x_0 + sigma eps
            alpha, sg = 1 - sig, sig
        else:                                 # VP: the scheduler's sigma is sigma_t / alpha_t
            alpha = 1.0 / torch.sqrt(sig ** 2 + 1)
            sg = sig * alpha
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

    def initial_state(self, x_T: torch.Tensor) -> State:
        """The start state: the latents and a zero previous data prediction."""
        return (x_T, torch.zeros_like(x_T))

    def step(self, t: int, x: State, out: torch.Tensor) -> State:
        """The mean of step t from the state (x, previous data prediction) and the model
        output ``out``: (next x, this step's data prediction D0)."""
        k = self.steps[t - 1]
        z, prev = x
        d0, _ = x0_eps(self.prediction_type, z, out, k.alpha_cur, k.sigma_cur)
        # midpoint 2M: D = D0 + (D0 - D_prev) / (2 r0)  (Lu et al. 2022, Alg. 2)
        d = d0 if k.order == 1 else d0 + 0.5 * (d0 - prev) / k.r0
        return (k.x_coef * z + k.d_coef * d, d0)

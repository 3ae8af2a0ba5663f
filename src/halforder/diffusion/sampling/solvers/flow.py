"""The Euler step of a flow-matching model (SD3, FLUX, Wan) at eta = 0, and two stochastic
families at eta > 0: Flow-GRPO's SDE and CPS (docs/flow.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ....estimators.protocol import State, per_step
from .protocol import Schedule, StepTable

FLOW_NOISE = ("sde", "cps")


@dataclass(frozen=True)
class FlowStep:
    """The numbers of one flow-matching step: ``flow_sigma`` (s, the step's sigma), ``dt`` =
    s' - s, ``eta``, ``x_coef`` and ``v_coef`` (the mean is x_coef x + v_coef v at eta > 0) and
    ``sigma`` (the noise std)."""

    flow_sigma: float
    dt: float
    eta: float
    x_coef: float
    v_coef: float
    sigma: float


@dataclass(frozen=True, eq=False)
class FlowMatchSolver(StepTable):
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

    ``sigmas`` are the scheduler's (T + 1 values, float32 as it computes them, ending at 0);
    ``steps[t-1]`` is step t's :class:`FlowStep`."""

    T: int
    timesteps: torch.Tensor
    sigmas: tuple[float, ...]
    etas: tuple[float, ...] = ()
    noise: str = "sde"
    steps: tuple[FlowStep, ...] = field(init=False, repr=False)

    def __post_init__(self):
        if self.noise not in FLOW_NOISE:
            raise ValueError(f"noise must be one of {', '.join(FLOW_NOISE)}, got {self.noise!r}")
        etas = per_step(self.etas or 0.0, self.T, "etas")
        if self.noise == "cps" and any(e > 1 for e in etas):
            raise ValueError("CPS etas must lie in [0, 1] (the noise std is sigma_next sin(eta pi / 2))")
        object.__setattr__(self, "etas", etas)
        below_one = next((s for s in self.sigmas if s < 1), None)
        steps = []
        for t in range(1, self.T + 1):
            s, s_next, a = self.sigmas[self.T - t], self.sigmas[self.T - t + 1], etas[t - 1]
            if a == 0:   # dt as the scheduler computes it, in float32
                dt = float(torch.tensor(s_next, dtype=torch.float32) - torch.tensor(s, dtype=torch.float32))
                steps.append(FlowStep(s, dt, a, 1.0, dt, 0.0))
            elif self.noise == "sde":
                dt = s_next - s
                g2 = a ** 2 * s / (1 - (s if s < 1 else below_one))
                steps.append(FlowStep(s, dt, a, 1 + g2 * dt / (2 * s), (1 + g2 * (1 - s) / (2 * s)) * dt,
                                      math.sqrt(-g2 * dt)))
            else:   # cps: mean = (x - s v)(1 - s') + (x + (1 - s) v) c with c = sqrt(s'^2 - std^2)
                std = s_next * math.sin(a * math.pi / 2)
                c = math.sqrt(max(s_next ** 2 - std ** 2, 0.0))
                steps.append(FlowStep(s, s_next - s, a, 1 - s_next + c, -s * (1 - s_next) + (1 - s) * c, std))
        object.__setattr__(self, "steps", tuple(steps))

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

    def step(self, t: int, x: State, out: torch.Tensor) -> State:
        """The mean of step t from ``x`` and the predicted velocity ``out``."""
        k = self.steps[t - 1]
        if k.eta == 0:
            return x + k.dt * out          # FlowMatchEulerDiscreteScheduler.step
        return k.x_coef * x + k.v_coef * out

"""The contract every solver meets (:class:`Solver`), and what the solvers share: the
per-step eta given as a schedule, a fresh copy of a scheduler, and the conversion of a
model output to the predicted clean sample and noise."""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, Union, runtime_checkable

import torch

from ....estimators.protocol import State, per_step

Schedule = Union[str, float, Sequence[float]]


@runtime_checkable
class Solver(Protocol):
    """The part of a scheduler step that does not call the network, for T chain steps
    (t = T..1, generation order):

        x_{t-1} = step(t, x_t, out) + sigma(t) * eps_t,

    with ``out`` the denoiser's output at x_t.

    Attributes:
      T: the number of steps.
      timesteps: ``timesteps[t-1]`` is the model timestep of chain step t.
      etas: ``etas[t-1]``, the noise level of step t, which sets ``sigma(t)``.
    """

    T: int
    timesteps: torch.Tensor
    etas: tuple[float, ...]

    def initial_state(self, x_T: torch.Tensor) -> State:
        """The start state for latents ``x_T`` (a tuple for a multistep solver)."""
        ...

    def sigma(self, t: int) -> float:
        """The noise scale of step t."""
        ...

    def step(self, t: int, x: State, out: torch.Tensor) -> State:
        """The mean of step t from state ``x`` and the model output ``out`` at it."""
        ...

    def with_etas(self, etas: Schedule) -> "Solver":
        """The same solver with another per-step eta."""
        ...


class StepTable:
    """What the solvers share, each a frozen dataclass with ``T``, ``etas`` and per-step records
    ``steps`` (``steps[t-1].sigma``) derived from them: a multistep solver's state is a tuple,
    and it overrides :meth:`initial_state`."""

    def with_etas(self, etas: Schedule):
        """The same solver with another per-step eta."""
        return dataclasses.replace(self, etas=per_step(etas, self.T, "etas"))

    def initial_state(self, x_T: torch.Tensor) -> State:
        """The start state: the latents themselves."""
        return x_T

    def sigma(self, t: int) -> float:
        """The noise scale of step t."""
        return self.steps[t - 1].sigma


def fresh(scheduler, T: int):
    """A copy of ``scheduler`` with ``set_timesteps(T)`` (the caller's object is left alone)."""
    s = type(scheduler).from_config(scheduler.config)
    s.set_timesteps(T)
    return s


def x0_eps(prediction_type: str, x: torch.Tensor, out: torch.Tensor, alpha: float, sigma: float):
    """(predicted x_0, predicted noise) from x = alpha x_0 + sigma eps and a model output.

    ``"flow_prediction"`` is a velocity out = eps - x_0 on flow sigmas, alpha = 1 - sigma."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    if prediction_type == "sample":
        return out, (x - alpha * out) / sigma
    if prediction_type == "flow_prediction":
        return x - sigma * out, x + alpha * out
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")

"""Estimator families: each written once, with its name, whether it is biased, its settings
and how its plan sampler is built. The command line's choices, which settings a
configuration uses, and :func:`make_sampler` are all derived from :data:`FAMILIES`.

A setting is named as the run's configuration names it (``h``, ``k``, ``j_sampling``,
``step_fraction``, ...), so a family reads its settings from a configuration unchanged.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .plan import Plan
from .samplers import DropZO, FirstOrderAsZO, FixedPlan, PlanSampler, SoftmaxRLR, UniformRLR, WindowRLR
from .step_sets import RandomSubset, RandomTruncation, RandomWindow

J_SAMPLING = ("uniform", "softmax", "window", "fixed")

#: When a setting is used, given the family's other settings, and that condition in words.
Used = tuple[Callable[[Mapping[str, Any]], bool], str]
ALWAYS: Used = (lambda s: True, "")


@dataclass(frozen=True)
class Family:
    """One estimator family.

    Attributes:
      name: the estimator's name on the command line and in configs.
      summary: one line: what it estimates and who runs it.
      biased: "no", "yes", or when it is.
      build: ``(T, **settings) -> PlanSampler``; its keyword defaults are the settings' defaults.
      used: setting name -> when it is used (:data:`ALWAYS` if always).
      reward_gradient: whether its plans need the reward's gradient (first-order steps).
    """

    name: str
    summary: str
    biased: str
    build: Callable[..., PlanSampler]
    used: Mapping[str, Used] = field(default_factory=dict)
    reward_gradient: bool = False

    @property
    def settings(self) -> tuple[str, ...]:
        """The settings the family reads."""
        return tuple(self.used)

    def defaults(self) -> dict[str, Any]:
        """Each setting's default (the builder's keyword default)."""
        sig = inspect.signature(self.build).parameters
        return {k: sig[k].default for k in self.used}

    def uses(self, setting: str, values: Mapping[str, Any]) -> bool:
        """Whether ``setting`` has an effect, given the family's ``values`` (defaults filled in)."""
        if setting not in self.used:
            return False
        return self.used[setting][0]({**self.defaults(), **values})


def _rlr_sampler(T: int, h: int = 2, j_sampling: str = "uniform", j: int | None = None,
                 j_window: tuple[int, int] | None = None, j_temperature: float = 1.0,
                 j_decay: float = 0.9) -> PlanSampler:
    if j_sampling == "uniform":
        return UniformRLR(T, h)
    if j_sampling == "softmax":
        return SoftmaxRLR(T, h, j_temperature, j_decay)
    if j_sampling == "window":
        if j_window is None:
            raise ValueError("j_sampling='window' needs a window (a, b)")
        return WindowRLR(T, h, *_pair(j_window, "j_window"))
    if j_sampling == "fixed":
        return FixedPlan(Plan.rlr(T, h, j))
    raise ValueError(f"unknown j sampling {j_sampling!r}; known: {', '.join(J_SAMPLING)}")


def _rlr_no_zo(T: int, h: int = 2, j_sampling: str = "uniform", j: int | None = None,
               j_window: tuple[int, int] | None = None, j_temperature: float = 1.0,
               j_decay: float = 0.9) -> PlanSampler:
    return DropZO(_rlr_sampler(T, h, j_sampling, j, j_window, j_temperature, j_decay))


def _rlr_no_fo(T: int, h: int = 2, j_sampling: str = "uniform", j: int | None = None,
               j_window: tuple[int, int] | None = None, j_temperature: float = 1.0,
               j_decay: float = 0.9) -> PlanSampler:
    return FirstOrderAsZO(_rlr_sampler(T, h, j_sampling, j, j_window, j_temperature, j_decay))


def _reinforce(T: int, reinforce_window: tuple[int, int] | None = None, step_fraction: float = 1.0,
               window_length: int | None = None, window_position: str = "random", window_every: int = 1,
               step_weighting: str = "unbiased") -> PlanSampler:
    within = None if reinforce_window is None else _pair(reinforce_window, "reinforce_window")
    if window_length is not None:
        if step_fraction != 1.0:
            raise ValueError("step_fraction and window_length are two ways to choose the trained steps: give one")
        return RandomWindow(T, window_length, window_position, step_weighting, within, window_every)
    if step_fraction != 1.0:
        return RandomSubset(T, step_fraction, step_weighting, within)
    if within is not None and within[0] > within[1]:
        raise ValueError(f"reinforce_window a b needs a <= b, got a={within[0]}, b={within[1]}")
    return FixedPlan(Plan.reinforce(T, None if within is None else range(within[0], within[1] + 1)))


def _pair(v, name: str) -> tuple[int, int]:
    if len(v) != 2:
        raise ValueError(f"{name} is two steps a b, got {list(v)!r}")
    return int(v[0]), int(v[1])


_RLR_USED: dict[str, Used] = {
    "h": ALWAYS, "j_sampling": ALWAYS,
    "j": (lambda s: s["j_sampling"] == "fixed", "j_sampling fixed"),
    "j_window": (lambda s: s["j_sampling"] == "window", "j_sampling window"),
    "j_temperature": (lambda s: s["j_sampling"] == "softmax", "j_sampling softmax"),
    "j_decay": (lambda s: s["j_sampling"] == "softmax", "j_sampling softmax")}
_RANDOM_STEPS = (lambda s: s["step_fraction"] != 1.0 or s["window_length"] is not None,
                 "a step_fraction below 1 or a window_length")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("full", "backprop through every step", "no", lambda T: FixedPlan(Plan.full(T)), reward_gradient=True),
    Family("truncated", "backprop through the last k steps (DRaFT-K)", "yes (Prop. 6.1) unless k = T",
           lambda T, k=1: FixedPlan(Plan.truncated(T, k)), {"k": ALWAYS}, reward_gradient=True),
    Family("truncated_random", "backprop through the last K ~ U(1..k) steps: AlignProp (step_weighting field) "
           "or Russian roulette (unbiased)", "field: yes; unbiased: no when k = T",
           lambda T, k=1, step_weighting="field": RandomTruncation(T, k, step_weighting),
           {"k": ALWAYS, "step_weighting": ALWAYS}, reward_gradient=True),
    Family("reinforce", "likelihood ratio at each trained step (DDPO, Flow-GRPO, DanceGRPO, MixGRPO)",
           "no on every step; a subset or window: unless weighted (step_weighting unbiased, random position)",
           _reinforce, {"reinforce_window": ALWAYS, "step_fraction": ALWAYS, "window_length": ALWAYS,
                        "window_position": (lambda s: s["window_length"] is not None, "a window_length"),
                        "window_every": (lambda s: s["window_length"] is not None
                                         and s["window_position"] == "sliding",
                                         "a window_length and window_position sliding"),
                        "step_weighting": _RANDOM_STEPS}),
    Family("zeroth_order", "parameter-noise likelihood ratio on every step (evolution strategies)", "no",
           lambda T: FixedPlan(Plan.zeroth_order(T))),
    Family("rlr", "RLR(h, j) of eq. (6): FO step 1, an HO block of h steps, ZO elsewhere", "no",
           _rlr_sampler, _RLR_USED, reward_gradient=True),
    Family("rlr_no_zo", "RLR without its ZO steps (the official code's form)", "yes",
           _rlr_no_zo, _RLR_USED, reward_gradient=True),
    Family("rlr_no_fo", "RLR(h, j) with step 1 by zeroth order: HO block and ZO, no reward gradient", "no",
           _rlr_no_fo, _RLR_USED),
)}

#: Every family's settings, once each.
SETTINGS: tuple[str, ...] = tuple(dict.fromkeys(s for f in FAMILIES.values() for s in f.settings))


def make_sampler(estimator: str, T: int, **settings) -> PlanSampler:
    """The plan sampler of family ``estimator`` (:data:`FAMILIES`) on T steps with its
    ``settings`` (named as a configuration names them; each family ignores the others').
    ``ValueError`` naming the problem (the ranges of h and j are :meth:`Plan.rlr`'s)."""
    if estimator not in FAMILIES:
        raise ValueError(f"unknown estimator {estimator!r}; known: {', '.join(FAMILIES)}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown estimator setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    family = FAMILIES[estimator]
    return family.build(T, **{k: v for k, v in settings.items() if k in family.used})

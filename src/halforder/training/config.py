"""The training loop's settings, and ``knob``, the one way a setting is declared.

Every setting is a field of a frozen dataclass declared with :func:`knob`: its default,
its help text and, where it has them, its choices. The command line and the config
files are generated from these fields, so a setting documented here is a setting a user
can set (``halforder.diffusion.app.cli``).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
import typing
from typing import Any, ClassVar, Mapping, Sequence

from ..estimators.baselines import BASELINES
from ..estimators.pairing import AUTO, PAIRINGS, Pairing
from .schedules import LR_SCHEDULES
from .trackers import JSONL, TRACKERS


def knob(default: Any, help: str, *, choices: Sequence[Any] | None = None, factory: bool = False) -> Any:
    """A dataclass field with its help text (and choices) in ``metadata``, as
    ``transformers.HfArgumentParser`` reads it. ``factory=True`` for a list or dict default
    (each instance gets a copy)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = list(choices)
    if factory:
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A setting that cannot work; raised before anything is written."""


def need(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class LoopConfig:
    """Settings of :func:`halforder.training.loop.train` (optimiser, batches, outputs)."""

    #: The settings a resumed run may change (:mod:`halforder.training.resume`): they say how long
    #: to train and what to write, not what is trained, so the metrics stay those of one run.
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"steps", "eval_every", "checkpoint_every", "keep_checkpoints",
                                                     "resume", "output_dir", "progress", "report_to"})

    steps: int = knob(100, "optimiser updates")
    lr: float = knob(5e-4, "Adam learning rate")
    adam_betas: list[float] = knob([0.9, 0.999], "Adam betas (two numbers)", factory=True)
    adam_eps: float = knob(1e-8, "Adam epsilon")
    weight_decay: float = knob(0.0, "decoupled weight decay (AdamW)")
    batch_size: int = knob(4, "samples per micro-batch, process")
    grad_accum: int = knob(2, "micro-batches per update")
    lr_scheduler: str = knob("constant", "linear/cosine: 0 at steps",
                             choices=LR_SCHEDULES)
    lr_warmup_steps: int = knob(0, "updates of learning-rate warmup")
    ema: bool = knob(False, "evaluate and export a moving average of the weights")
    ema_decay: float = knob(0.99, "ema: the average's decay")
    clip_norm: float = knob(1.0, "gradient norm clip (0: none)")
    baseline: str = knob("loo", "loo, none or grpo (biased)", choices=BASELINES)
    group_size: int | None = knob(None, "samples per prompt group")
    global_std: bool = knob(False, "grpo: the batch's std")
    clip_range: float | None = knob(None, "PPO's ratio clip range")
    updates_per_rollout: int = knob(1, "updates per rollout (PPO reuse)")
    kl_beta: float = knob(0.0, "KL weight to the initial model")
    pairing: str = knob(AUTO, f"antithetic groups: {', '.join(PAIRINGS)}, {AUTO}", choices=(AUTO, *PAIRINGS))
    seed: int = knob(0, "seed (process r: seed + r)")
    output_dir: str | None = knob(os.path.join("runs", "halforder"),
                                  "where metrics, checkpoints and outputs go")
    eval_every: int = knob(50, "updates between evaluations (0: none)")
    checkpoint_every: int = knob(50, "updates between checkpoints (0: at the end)")
    keep_checkpoints: int = knob(2, "checkpoints kept (0: all)")
    resume: str | None = knob(None, "a checkpoint directory, or 'latest'")
    progress: bool = knob(True, "show a progress bar")
    report_to: list[str] = knob([JSONL], f"{', '.join(TRACKERS)} (one or more)",
                                choices=TRACKERS, factory=True)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` on values that cannot work."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            need(not _non_finite(v), f"{f.name} must hold finite numbers only, got {v!r}")
            choices = f.metadata.get("choices")
            need(choices is None or v is None or all(x in choices for x in (v if isinstance(v, list) else [v])),
                 f"{f.name} must be one of {', '.join(map(str, choices or ()))}; got {v!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        need(0 < self.ema_decay < 1, f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "seed", "lr_warmup_steps"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        for name in ("lr", "adam_eps", "weight_decay", "clip_norm"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                 f"{name} must be a finite number >= 0, got {v!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        G = 2 if self.pairing == AUTO else Pairing.parse(self.pairing).size
        need(self.batch_size % G == 0, f"pairing {self.pairing} draws groups of {G} samples: batch_size must be a "
                                       f"multiple of {G}, got {self.batch_size} (pairing none draws single samples)")
        P = self.group_size
        need(P is None or (isinstance(P, int) and P >= 1 and self.batch_size % P == 0),
             f"group_size must divide batch_size={self.batch_size}, got {P!r}")
        need(P is None or P % G == 0, f"pairing {self.pairing} draws groups of {G} samples: group_size must be a "
                                      f"multiple of {G}, got {P}")
        size, where = (self.batch_size, "batch_size") if P is None else (P, "group_size")
        need(self.baseline != "grpo" or size >= 2,
             f"the 'grpo' advantage normalises over each group: {where} >= 2, got {size}")
        need(self.baseline != "loo" or size >= 2 * G,
             f"the 'loo' baseline needs at least 2 groups: {where} >= {2 * G} with pairing {self.pairing}")
        need(self.clip_range is None or (math.isfinite(self.clip_range) and self.clip_range > 0),
             f"clip_range must be > 0, got {self.clip_range}")
        need(isinstance(self.updates_per_rollout, int) and self.updates_per_rollout >= 1,
             f"updates_per_rollout must be an integer >= 1, got {self.updates_per_rollout!r}")
        need(self.kl_beta >= 0, f"kl_beta must be >= 0, got {self.kl_beta}")
        need(self.lr_warmup_steps < self.steps,
             f"lr_warmup_steps={self.lr_warmup_steps} is not shorter than the run (steps={self.steps}): the learning "
             f"rate would never reach lr; warm up over fewer updates than steps")
        for name, (applies, when) in self.conditional().items():
            v, default = getattr(self, name), field_default(self.__dataclass_fields__[name])
            need(applies or v == default, f"{name}={v!r} has no effect here: it applies only with {when}; "
                                          f"otherwise leave it at its default {default!r}")

    def conditional(self) -> dict[str, tuple[bool, str]]:
        """The settings that only some configurations use: ``name -> (used here, when it is
        used)``. :meth:`check` refuses a value other than the default where it is not used,
        rather than ignore it; :func:`layered` lets such a value give way where a later layer
        of settings (flags over a preset) made it unused."""
        return {"ema_decay": (self.ema, "ema"),
                "global_std": (self.baseline == "grpo", "baseline grpo")}

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples), as written to ``output_dir/config.json``."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def changes_from(self, original: Mapping[str, Any]) -> dict[str, list]:
        """The settings whose value differs from ``original`` (a run's ``config.json``; a setting
        it lacks counts as its default), as ``{name: [original, now]}``."""
        now = self.to_dict()
        before = {f.name: field_default(f) for f in dataclasses.fields(self)}
        before.update((k, v) for k, v in original.items() if k in now)
        return {k: [before[k], v] for k, v in now.items() if before[k] != v}


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a config field (a fresh copy for a list or dict)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _non_finite(v: Any) -> bool:
    """True if ``v`` is, or holds (in a list or dict), a NaN or an infinity."""
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return any(map(_non_finite, v))
    return isinstance(v, dict) and any(map(_non_finite, v.values()))


def read_mapping_file(path: str, what: str = "config file", allow_list: bool = False) -> Any:
    """The mapping in a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file (a list too with
    ``allow_list``); ``ConfigError`` naming ``what`` on a missing, unreadable or malformed file."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".yaml", ".yml"):
            import yaml
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        elif ext == ".toml":
            import tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif ext == ".json":
            import json
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            raise ConfigError(f"{what} {path!r} must end in .yaml, .yml, .toml or .json")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # YAML, TOML and JSON errors are ValueErrors
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{what} {path!r} cannot be read: {e}") from e
    except Exception as e:  # yaml.YAMLError is not a ValueError
        raise ConfigError(f"{what} {path!r} is not valid {ext[1:].upper()}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict) and not (allow_list and isinstance(data, list)):
        raise ConfigError(f"{what} {path!r} must hold a mapping of names to values")
    return data


def coerce(tp: Any, value: Any, name: str) -> Any:
    """``value`` as the declared type ``tp`` of field ``name``: numbers written as strings
    (YAML reads ``5e-4`` as a string) become numbers, lists' items are coerced, None stays
    None where the type allows it. ``ConfigError`` when it cannot be."""
    args = typing.get_args(tp)
    if value is None:
        need(type(None) in args, f"{name} cannot be None")
        return None
    if type(None) in args:  # X | None
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        need(isinstance(value, (list, tuple)), f"{name} must be a list, got {value!r}")
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return [coerce(item, v, name) for v in value]
    if tp is dict or origin is dict:
        need(isinstance(value, dict), f"{name} must be a mapping of names to values, got {value!r}")
        return value
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            need(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
            return value
        if tp is int:
            need(not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
            v = float(value) if isinstance(value, str) else value
            need(float(v).is_integer(), f"{name} must be an integer, got {value!r}")
            return int(v)
        if tp is float:
            need(not isinstance(value, bool), f"{name} must be a number, got {value!r}")
            return float(value)
        if tp is str:
            need(isinstance(value, (str, int, float)) and not isinstance(value, bool),
                 f"{name} must be a string, got {value!r}")
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def coerced(cls, values: Mapping[str, Any], source: str = "config",
            other_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``values`` each coerced to the declared type of its field of the config dataclass ``cls``.
    ``ConfigError`` naming ``source`` on an unknown name (with the closest known names, or the one
    ``other_names`` gives it, e.g. diffusers' ``learning_rate`` for ``lr``) or on a value of the
    wrong type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        def near(name):
            close = ([other_names[name]] if name in (other_names or {}) else
                     difflib.get_close_matches(name, names, n=3, cutoff=0.6))
            return f"{name!r} (did you mean {' or '.join(close)}?)" if close else repr(name)
        raise ConfigError(f"unknown option(s) in {source}: {', '.join(map(near, unknown))}; "
                          "`halforder train --help` lists every setting")
    try:
        return {k: coerce(hints[k], v, k) for k, v in values.items()}
    except ConfigError as e:
        raise ConfigError(f"{e} (in {source})") from None


def from_mapping(cls, values: Mapping[str, Any], source: str = "config"):
    """An instance of the config dataclass ``cls`` from ``values``, each coerced to its field's
    declared type (:func:`coerced`); unknown names are refused."""
    return cls(**coerced(cls, values, source))


def layered(cls, layers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The settings of ``layers`` (e.g. a preset, a config file, flags) merged in increasing
    precedence. A value that a later layer makes unused (``cls.conditional``: e.g. a preset's
    ``eta_plan`` under a flag's numeric ``eta``) gives way to its default, so that the check
    for settings without effect sees only values given together with what makes them unused."""
    values: dict[str, Any] = {}
    for layer in layers:
        used_before = _uses(cls, values)
        values.update(layer)
        used_now = _uses(cls, values)
        for name in [n for n in values if n not in layer and used_before.get(n) and used_now.get(n) is False]:
            del values[name]
    return values


def _uses(cls, values: Mapping[str, Any]) -> dict[str, bool]:
    """Which conditional settings a config of ``values`` uses, without checking it; {} where
    the values cannot be read (the full check reports that)."""
    hints = typing.get_type_hints(cls)
    unchecked = object.__new__(cls)
    try:
        for f in dataclasses.fields(cls):
            v = coerce(hints[f.name], values[f.name], f.name) if f.name in values else field_default(f)
            object.__setattr__(unchecked, f.name, v)
        return {name: bool(used) for name, (used, _) in unchecked.conditional().items()}
    except (TypeError, ValueError, LookupError, AttributeError):
        return {}

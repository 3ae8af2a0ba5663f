"""Resuming a run: which checkpoint, whether this run may continue it, and what it records.

A resumed run must be the run that wrote the checkpoint, so that ``metrics.jsonl`` never
mixes two runs: its settings may differ from those stored in the checkpoint only in the
config's ``RESUMABLE`` ones (how long to train and what to write, e.g. ``steps``). The
run's ``config.json`` keeps the settings it started with; each resume appends the settings
it changed to ``resumes.jsonl``.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from .checkpoints import Checkpoint, CheckpointError, latest_checkpoint
from .config import ConfigError, LoopConfig
from .files import append_jsonl, check_writable_dir, write_json


def resume_path(cfg: LoopConfig) -> str | None:
    """The checkpoint ``cfg.resume`` names (``"latest"``: the newest in ``output_dir``), or
    None without ``resume``. ``CheckpointError`` when ``"latest"`` finds nothing to resume."""
    if cfg.resume != "latest":
        return cfg.resume
    if not cfg.output_dir:
        raise CheckpointError("resume 'latest' looks in output_dir, and there is none")
    root = os.path.join(cfg.output_dir, "checkpoints")
    found = latest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"nothing to resume: {root!r} holds no checkpoint (start a new run without --resume)")
    return found


def check_output_dir(cfg: LoopConfig) -> None:
    """The output directory can be written, and a new run (no ``cfg.resume``) does not start
    over the checkpoints of another run."""
    if not cfg.output_dir:
        return
    check_writable_dir(cfg.output_dir)
    if cfg.resume is None and latest_checkpoint(os.path.join(cfg.output_dir, "checkpoints")):
        raise ConfigError(f"output directory {cfg.output_dir!r} already holds checkpoints of a run; pass "
                          f"--resume latest to continue it, or choose another --output-dir")


def check_resume(cfg: LoopConfig, ck: Checkpoint) -> None:
    """``ConfigError`` unless ``cfg`` may continue the run that wrote ``ck``: the same settings
    but the config's ``RESUMABLE`` ones (every other difference is listed), and updates left
    to train. A checkpoint without its settings is checked by :func:`check_fits` alone."""
    if ck.config is not None:
        differ = {k: v for k, v in cfg.changes_from(ck.config).items() if k not in type(cfg).RESUMABLE}
        if differ:
            raise ConfigError(f"cannot resume {ck.path!r} with other settings than its run's: "
                              + "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in differ.items())
                              + f". A resume may change only {', '.join(sorted(type(cfg).RESUMABLE))}; "
                                "start a new run (another --output-dir) to change the others")
        old_steps = ck.config.get("steps", cfg.steps)
        if _decays(cfg) and old_steps != cfg.steps:
            finish = f"resume with --steps {old_steps} to finish it; " if ck.step < old_steps else ""
            raise ConfigError(f"cannot resume {ck.path!r} with steps={cfg.steps}: its {cfg.lr_scheduler} learning-rate "
                              f"schedule runs over steps={old_steps}; {finish}{extend_hint(cfg, ck)}")
    if ck.step >= cfg.steps:
        where = f"past steps={cfg.steps}" if ck.step > cfg.steps else f"so the run of steps={cfg.steps} is complete"
        further = extend_hint(cfg, ck) if _decays(cfg) else f"pass --steps N with N > {ck.step} to train further"
        raise ConfigError(f"nothing to resume: checkpoint {ck.path!r} is at update {ck.step}, {where}; {further}")


def _decays(cfg: LoopConfig) -> bool:
    """Whether the run's learning-rate schedule depends on its steps (it reaches 0 at the end)."""
    return getattr(cfg, "lr_scheduler", "constant") != "constant"


def extend_hint(cfg: LoopConfig, ck: Checkpoint) -> str:
    """How to train a run with a decaying learning-rate schedule beyond its steps, which a resume
    cannot (the schedule is fixed to them): a new run, over the new total or from ``ck``'s weights."""
    n = cfg.steps if cfg.steps > ck.step else "N"
    return (f"to train beyond update {ck.step}, start a new run (another --output-dir), either over the new total "
            f"from the start (--steps {n}: the schedule then spans them all) or from this checkpoint's weights "
            f"(halforder export {ck.path} DIR --fuse, then --model DIR)")


def check_fits(ck: Checkpoint, params: Mapping[str, torch.Tensor], sampler_state: Mapping[str, torch.Tensor]) -> None:
    """``CheckpointError`` unless ``ck`` holds the parameters ``params`` (same names and shapes)
    and a state of the plan sampler whose fresh state is ``sampler_state``."""
    if set(ck.params) != set(params):
        raise CheckpointError(f"checkpoint {ck.path!r} holds other parameters than the model "
                              f"(different LoRA rank or target modules?)")
    for k, p in params.items():
        if ck.params[k].shape != p.shape:
            raise CheckpointError(f"checkpoint {ck.path!r}: {k} has shape {tuple(ck.params[k].shape)}, "
                                  f"the model {tuple(p.shape)} (different LoRA rank?)")
    if set(ck.sampler_state) != set(sampler_state) or any(ck.sampler_state[k].shape != v.shape
                                                          for k, v in sampler_state.items()):
        raise CheckpointError(f"checkpoint {ck.path!r} was written with another plan sampler (or another T or h)")


def record_config(out: str, cfg: LoopConfig, resumed: Checkpoint | None = None) -> None:
    """Write ``out/config.json`` for a new run. A run resumed from ``resumed`` keeps the
    ``config.json`` it started with (writing one only where there is none) and appends
    ``{"step", "checkpoint", "changes": {name: [before, now]}}`` to ``out/resumes.jsonl``
    (``changes`` is None for a checkpoint without its settings)."""
    path = os.path.join(out, "config.json")
    if resumed is None or not os.path.exists(path):
        write_json(path, cfg.to_dict())
    if resumed is not None:
        changes = None if resumed.config is None else cfg.changes_from(resumed.config)
        append_jsonl(os.path.join(out, "resumes.jsonl"),
                     {"step": resumed.step, "checkpoint": resumed.path, "changes": changes})

"""Training checkpoints: written atomically, verified when read.

A checkpoint is a directory ``step_XXXXXXXX`` holding

    params.safetensors    the trainable (LoRA) weights by name
    sampler.safetensors   the plan sampler's state (e.g. running gradient norms)
    optimizer.pt          the optimiser's state_dict (read back with weights_only=True)
    rng.pt                every random generator's state, one dict per process
    ema.pt                with ``ema`` on: the moving average's state (diffusers' EMAModel.state_dict)
    meta.json             step, number of processes, format version, the SHA-256 of each file,
                          the run's settings (``config``, as in its ``config.json``) and the
                          model evaluations spent up to this step (``evaluations``: forward, backward)

and whatever the caller's ``weights`` writes beside them (a diffusion run: ``lora/``, the LoRA
file diffusers' pipelines load, so any checkpoint can be tried as it is).

It is written through :func:`~halforder.training.files.atomic_dir`, so a crash leaves
either the previous checkpoints or the complete new one. :func:`load_checkpoint`
checks every file against ``meta.json`` and raises :class:`CheckpointError` (a ``ValueError``)
on anything missing, truncated or altered.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .files import atomic_dir

FORMAT = 2   # 2: meta.json records the evaluations spent
_FILES = ("params.safetensors", "sampler.safetensors", "optimizer.pt", "rng.pt")
_EMA = "ema.pt"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupted."""


@dataclass(frozen=True)
class Checkpoint:
    """The contents of a checkpoint directory (see module docstring)."""

    step: int
    params: dict[str, torch.Tensor]
    sampler_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: list[dict[str, torch.Tensor]]
    num_processes: int
    path: str
    config: dict[str, Any] | None = None
    evaluations: dict[str, int] = dataclasses.field(default_factory=lambda: {"forward": 0, "backward": 0})
    ema: dict[str, Any] | None = None


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: str, step: int, params: Mapping[str, torch.Tensor], sampler_state: Mapping[str, torch.Tensor],
                    optimizer: Mapping[str, Any], rng: list[Mapping[str, torch.Tensor]], keep: int = 0,
                    config: Mapping[str, Any] | None = None, evaluations: Mapping[str, int] | None = None,
                    weights: Callable[[str], None] | None = None, ema: Mapping[str, Any] | None = None) -> str:
    """Write the checkpoint of ``step`` under ``root`` atomically, with the run's settings
    ``config`` (what a resume is checked against) and the evaluations spent so far
    (``{"forward": f, "backward": b}``, all processes) and the EMA's state ``ema``;
    ``weights(directory)`` adds the trained weights in a format of the caller's; keep only the
    newest ``keep`` checkpoints (0: keep all).
    Returns its path."""
    from safetensors.torch import save_file

    with atomic_dir(os.path.join(root, checkpoint_name(step))) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, os.path.join(tmp, _FILES[0]))
        save_file({k: v.detach().cpu().contiguous() for k, v in sampler_state.items()}, os.path.join(tmp, _FILES[1]))
        torch.save(dict(optimizer), os.path.join(tmp, _FILES[2]))
        torch.save([dict(r) for r in rng], os.path.join(tmp, _FILES[3]))
        files = _FILES
        if ema is not None:
            torch.save(dict(ema), os.path.join(tmp, _EMA))
            files = (*_FILES, _EMA)
        meta = {"format": FORMAT, "step": int(step), "num_processes": len(rng),
                "sha256": {f: _sha256(os.path.join(tmp, f)) for f in files},
                "config": None if config is None else dict(config),
                "evaluations": {k: int((evaluations or {}).get(k, 0)) for k in ("forward", "backward")}}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        if weights is not None:
            weights(tmp)
    if keep > 0:
        for path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return os.path.join(root, checkpoint_name(step))


def list_checkpoints(root: str) -> list[str]:
    """Complete-looking checkpoint directories under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n) and os.path.isdir(os.path.join(root, n)))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(root: str) -> str | None:
    """The newest checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify a checkpoint directory (``CheckpointError`` if it is not intact)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a directory")
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        digests = meta["sha256"]
        step, nproc = int(meta["step"]), int(meta["num_processes"])
        config = meta.get("config")
        if config is not None and not isinstance(config, dict):
            raise TypeError("config is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupted or incomplete: meta.json unreadable ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} has format {meta.get('format')!r}, expected {FORMAT}")
    try:
        evaluations = {k: int(meta["evaluations"][k]) for k in ("forward", "backward")}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupted: meta.json has no evaluation count ({e})") from e
    for name in (*_FILES, *([_EMA] if _EMA in digests else [])):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path!r} is incomplete: {name} is missing")
        if _sha256(file) != digests.get(name):
            raise CheckpointError(f"checkpoint {path!r} is corrupted: {name} does not match its checksum")
    try:
        params = load_file(os.path.join(path, _FILES[0]), device=str(map_location))
        sampler_state = load_file(os.path.join(path, _FILES[1]))
        optimizer = torch.load(os.path.join(path, _FILES[2]), map_location=map_location, weights_only=True)
        rng = torch.load(os.path.join(path, _FILES[3]), weights_only=True)
        ema = torch.load(os.path.join(path, _EMA), map_location=map_location, weights_only=True) \
            if _EMA in digests else None
    except (OSError, RuntimeError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupted: {e}") from e
    if len(rng) != nproc:
        raise CheckpointError(f"checkpoint {path!r} is corrupted: {len(rng)} RNG states for {nproc} processes")
    return Checkpoint(step, params, sampler_state, optimizer, rng, nproc, path, config, evaluations, ema)


def _sha256(file: str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

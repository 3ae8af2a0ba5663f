"""halforder export: a training checkpoint as a diffusers LoRA file, or fused into a model folder.

    halforder export runs/tiny/checkpoints/step_00000006 runs/tiny-step6          # the LoRA file
    halforder export runs/tiny/checkpoints/step_00000006 runs/tiny-fused --fuse   # a pipeline folder

Without --fuse, OUT gets the checkpoint's pytorch_lora_weights.safetensors, which the model's
pipeline loads with load_lora_weights(OUT). With --fuse, the run's base model is built again
(downloaded if it is a hub id), the checkpoint's LoRA weights are fused into it, and OUT is a
diffusers pipeline folder (DiffusionPipeline.from_pretrained(OUT)). The checkpoint is verified
first; bad input ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from ...training.checkpoints import latest_checkpoint, load_checkpoint
from ...training.config import from_mapping
from ...training.files import atomic_dir
from .config import TrainConfig
from ..models.families import family_of
from ..models.lora import LORA_FILE, add_lora, save_lora, set_lora
from .run import build_components


def parser() -> argparse.ArgumentParser:
    """The parser of ``halforder export``."""
    p = argparse.ArgumentParser(prog="halforder export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory of a run (runs/NAME/checkpoints/step_XXXXXXXX), "
                                      "or a run folder (runs/NAME: its newest checkpoint)")
    p.add_argument("out", help="the directory to write (it must not exist yet)")
    p.add_argument("--fuse", action="store_true", help="fuse the LoRA weights into the base model and write a "
                                                       "pipeline folder (builds the run's model)")
    return p


def export(checkpoint: str, out: str, fuse: bool = False) -> str:
    """Write ``checkpoint``'s LoRA file (or, with ``fuse``, a pipeline folder with it fused) to
    ``out``; returns ``out``. ``ValueError`` or ``OSError`` on bad input."""
    if os.path.exists(out):
        raise ValueError(f"{out!r} exists: give a new directory")
    ck = load_checkpoint(checkpoint)
    lora_file = os.path.join(checkpoint, "lora", LORA_FILE)
    if not fuse and os.path.isfile(lora_file):
        with atomic_dir(out) as tmp:
            shutil.copyfile(lora_file, os.path.join(tmp, LORA_FILE))
        return out
    if ck.config is None:
        raise ValueError(f"checkpoint {checkpoint!r} does not record its run's settings, so its model is unknown")
    cfg = from_mapping(TrainConfig, {**ck.config, "resume": None, "output_dir": None, "progress": False},
                       f"the settings of checkpoint {checkpoint!r}")
    components = build_components(cfg)
    network = components.unet
    add_lora(network, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)
    set_lora(network, ck.params)
    family = family_of(components)
    with atomic_dir(out) as tmp:
        if not fuse:
            save_lora(network, tmp, prefix=family.lora_prefix)
            return out
        if not hasattr(network, "fuse_lora") or family.pipeline is None:
            raise ValueError(f"a {type(network).__name__} cannot fuse LoRA in diffusers; export its LoRA file "
                             "(without --fuse)")
        network.fuse_lora()
        network.unload_lora()
        family.pipeline(components).save_pretrained(tmp)
    return out


def run_checkpoint(path: str) -> str | None:
    """The newest checkpoint of ``path`` where it is a run's folder (holding ``checkpoints/``) or
    its ``checkpoints`` folder, rather than a checkpoint; None otherwise. ``ValueError`` for a
    run folder without a checkpoint."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "meta.json")):
        return None
    root = os.path.join(path, "checkpoints")
    for folder in (root, path):
        found = latest_checkpoint(folder) if os.path.isdir(folder) else None
        if found is not None:
            return found
    if os.path.isdir(root):
        raise ValueError(f"run folder {path!r} holds no checkpoint yet ({root!r} is empty)")
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``halforder export``; returns the exit status (2 on bad input)."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        found = run_checkpoint(args.checkpoint)
        if found is not None:
            print(f"{args.checkpoint} is a run folder: exporting its newest checkpoint, {found}")
            args.checkpoint = found
        export(args.checkpoint, args.out, args.fuse)
    except (ValueError, OSError) as e:
        print(f"halforder export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {'a fused pipeline folder' if args.fuse else 'the LoRA file'} to {args.out}")
    return 0

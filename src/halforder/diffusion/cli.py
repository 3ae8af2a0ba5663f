"""``halforder train``: reward fine-tuning of a diffusion model's LoRA with any estimator.

    halforder train --preset tiny                                   # offline CPU smoke run
    halforder train --task t2v --preset tiny-video                  # offline CPU text-to-video smoke run
    halforder train --config run.yaml --steps 200 --lr 1e-4         # a file, then flags
    torchrun --nproc_per_node 2 -m halforder train --preset tiny    # data parallel

Every input is checked (config, prompts, reward, model, estimator, checkpoint) before
anything is written, so a bad input ends with a clear message and no half-written run.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
from typing import Any

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .config import PRESETS, TINY_EVAL_PROMPTS, TINY_MODEL, TINY_PROMPTS, TrainConfig, load_config
from ..estimators.samplers import FAMILIES, J_SAMPLING, make_sampler
from .video import VIDEO_ARGS, add_video_arguments


def _eta(v: str):
    if v == "plan":
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"eta must be 'plan' or a number, got {v!r}") from None


def _optional_float(v: str):
    return "none" if v.lower() == "none" else float(v)


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``halforder train`` (flags override the config file)."""
    p = argparse.ArgumentParser(prog="halforder train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML (.yaml/.yml) or TOML (.toml) file of TrainConfig fields")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset ('tiny': offline CPU smoke run)")
    p.add_argument("--task", choices=("t2i", "t2v"),
                   help="t2i: text-to-image (default); t2v: text-to-video (the task of --preset tiny-video)")
    a = p.add_argument_group("model and data")
    a.add_argument("--model", help="hub id or local diffusers directory of the SD model ('tiny': random tiny parts)")
    a.add_argument("--revision", help="hub revision of --model")
    a.add_argument("--scheduler", choices=("ddim", "dpm"))
    a.add_argument("--T", type=int, help="sampler steps of the chain")
    a.add_argument("--guidance-scale", type=float)
    a.add_argument("--prompts", help="text file, one training prompt per line")
    a.add_argument("--eval-prompts", help="text file of held-out prompts for the sample grids")
    a.add_argument("--reward", help="reward name (see halforder.diffusion.rewards.REWARDS)")
    e = p.add_argument_group("estimator")
    e.add_argument("--estimator", choices=FAMILIES)
    e.add_argument("--h", type=int, help="RLR half-order block length")
    e.add_argument("--k", type=int, help="truncated backprop: first-order steps")
    e.add_argument("--j-sampling", choices=J_SAMPLING, help="RLR: law of the block start j")
    e.add_argument("--j", type=int, help="RLR with --j-sampling fixed: the block start")
    e.add_argument("--j-window", type=int, nargs=2, metavar=("A", "B"), help="RLR with --j-sampling window")
    e.add_argument("--zo-sigma", type=float, help="parameter-noise std of the zeroth-order steps")
    e.add_argument("--eta", type=_eta, help="'plan' (eta > 0 only at HO block ends) or a DDIM eta for every step")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, help="optimiser updates")
    o.add_argument("--lr", type=float)
    o.add_argument("--batch-size", type=int)
    o.add_argument("--grad-accum", type=int)
    o.add_argument("--clip-norm", type=_optional_float, help="a number, or 'none' for no clipping")
    o.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"))
    o.add_argument("--lora-rank", type=int)
    o.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute each step's graph in backward (less memory, more time)")
    o.add_argument("--seed", type=int)
    w = p.add_argument_group("output")
    w.add_argument("--output-dir")
    w.add_argument("--eval-every", type=int)
    w.add_argument("--checkpoint-every", type=int)
    w.add_argument("--resume", help="checkpoint directory, or 'latest' in --output-dir")
    w.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    add_video_arguments(p)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    d = {k: v for k, v in vars(args).items() if k != "config" and k not in VIDEO_ARGS}
    if d.get("j_window") is not None:
        d["j_window"] = tuple(d["j_window"])
    return d


def prepare(cfg: TrainConfig, device="cpu"):
    """Check every input and build (task, sampler, prompts, eval prompts) without writing anything.

    Raises ``ValueError`` / ``OSError`` with a message on bad input."""
    import torch

    from .task import build_components, build_task, read_prompts
    from .trainer import check_output_dir

    if cfg.prompts is None:
        if cfg.model != TINY_MODEL:
            raise ValueError("a prompt file is needed (--prompts FILE, one prompt per line)")
        prompts, eval_prompts = list(TINY_PROMPTS), list(TINY_EVAL_PROMPTS)
    else:
        prompts = read_prompts(cfg.prompts)
        eval_prompts = None
    if cfg.eval_prompts is not None:
        eval_prompts = read_prompts(cfg.eval_prompts)
    sampler = make_sampler(cfg.estimator, cfg.T, h=cfg.h, k=cfg.k, j_sampling=cfg.j_sampling, j=cfg.j,
                           window=cfg.j_window, temperature=cfg.j_temperature, decay=cfg.j_decay)
    reward = _reward(cfg, device)
    check_output_dir(cfg)
    resume = latest_checkpoint(os.path.join(cfg.output_dir, "checkpoints")) if cfg.resume == "latest" else cfg.resume
    if resume:
        load_checkpoint(resume)   # verified now, before anything is written
    components = build_components(cfg, device)
    task = build_task(cfg, reward, components, device)
    plan = sampler.sample(sampler.init(), torch.Generator().manual_seed(cfg.seed))
    plan.validate(task.chain(plan, prompts[:1]))   # e.g. HO blocks need eta > 0 where they end
    return task, sampler, prompts, eval_prompts


def _reward(cfg, device):
    """The reward of ``cfg`` on ``device`` (offline-only loading under HF_HUB_OFFLINE=1)."""
    import torch

    from .rewards import REWARDS, make_reward

    kwargs = dict(cfg.reward_kwargs)
    factory = REWARDS.get(cfg.reward)
    if factory is not None:
        sig = inspect.signature(factory).parameters
        if "device" in sig:
            kwargs.setdefault("device", str(device))
        if "local_files_only" in sig and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            kwargs.setdefault("local_files_only", True)
    reward = make_reward(cfg.reward, **kwargs)
    if isinstance(reward, torch.nn.Module):
        reward.to(device)
    return reward


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``halforder train``; returns the exit status (2 on bad input)."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = _overrides(args)
    no_clip = overrides.get("clip_norm") == "none"
    if no_clip:
        overrides.pop("clip_norm")
    try:
        cfg = load_config(args.config, overrides)
        if no_clip:
            cfg = dataclasses.replace(cfg, clip_norm=None)
        from .trainer import make_accelerator, train
        acc = make_accelerator(cfg)
        video = cfg.task == "t2v"
        if video:
            from .video import prepare_video, video_options, write_video_samples
            options = video_options(cfg.preset, vars(args))
            task, sampler, prompts, eval_prompts = prepare_video(cfg, acc.device, options)
        else:
            task, sampler, prompts, eval_prompts = prepare(cfg, acc.device)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"halforder train: error: {e}", file=sys.stderr)
        return 2
    result = train(task, sampler, prompts, cfg, accelerator=acc, eval_prompts=eval_prompts)
    if video and acc.is_main_process:
        write_video_samples(task, list(eval_prompts or prompts)[:cfg.eval_num],
                            os.path.join(cfg.output_dir, "samples", "final.gif"), cfg.seed + 7919, options.gif_fps)
    if acc.is_main_process:
        last = result.metrics[-1] if result.metrics else {}
        print(f"trained {result.step} updates ({cfg.estimator}, model {cfg.model if cfg.model != TINY_MODEL else 'tiny'}); "
              f"last reward mean {last.get('reward_mean')}; outputs in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a run's records go: ``metrics.jsonl`` and accelerate's experiment trackers.

The setting ``report_to`` (:class:`~halforder.training.config.LoopConfig`) names them:

    jsonl        metrics.jsonl in the output directory (the default, and the run's record)
    tensorboard  TensorBoard event files in output_dir/tensorboard/ (the ``tensorboard`` extra)
    wandb        a Weights & Biases run (``pip install wandb``; not a dependency), its files in
                 output_dir/wandb/; it needs an API key (``wandb login`` or ``WANDB_API_KEY``) or
                 ``WANDB_MODE=offline``, checked before anything is loaded

The JSONL file is written by the loop itself; the others go through accelerate's tracker
API: the accelerator is built with ``log_with`` (:func:`log_with`), the loop calls
``init_trackers`` once (:func:`start`) and ``log`` for every record (:func:`track`). A
tracker is used only when named, never because its package happens to be installed, and a
named tracker whose package is missing is an error before anything is written.

An evaluation may return :class:`SampleImages`, images with their prompts and rewards: the
trackers get the images and a table of the prompts and rewards, the JSONL record the table.
"""
from __future__ import annotations

import json
import netrc
import os
from dataclasses import dataclass
from urllib.parse import urlparse
from typing import Any, Mapping, Sequence

import torch

JSONL = "jsonl"
TRACKERS = (JSONL, "tensorboard", "wandb")
PROJECT = "halforder"
_INSTALL = {"tensorboard": "pip install 'halforder[tensorboard]'", "wandb": "pip install wandb"}


@dataclass(frozen=True, eq=False)
class SampleImages:
    """Evaluation samples: ``images`` ``[N, 3, H, W]`` in [0, 1], each with its prompt and reward."""

    images: torch.Tensor
    prompts: Sequence[str]
    rewards: Sequence[float]

    def record(self) -> list[dict[str, Any]]:
        """The JSONL form: one ``{"prompt", "reward"}`` per image, in the images' order."""
        return [{"prompt": p, "reward": float(r)} for p, r in zip(self.prompts, self.rewards)]

    def table(self) -> str:
        """The prompts and rewards as a markdown table (image i is row i)."""
        rows = [f"| {i} | {p} | {float(r):.4g} |" for i, (p, r) in enumerate(zip(self.prompts, self.rewards))]
        return "\n".join(["| image | prompt | reward |", "|---|---|---|", *rows])


def log_with(report_to: Sequence[str]) -> list[str]:
    """The accelerate trackers that ``report_to`` names (all but jsonl), for
    ``Accelerator(log_with=...)``; ``ValueError`` naming the package to install when one is missing."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    names = [n for n in dict.fromkeys(report_to) if n != JSONL]
    for n in names:
        if n not in available:
            raise ValueError(f"unknown tracker {n!r} in report_to; known: {', '.join(TRACKERS)}")
        if not available[n]():
            raise ValueError(f"report_to {n} needs the {n} package, which is not installed: {_INSTALL[n]}")
    if "wandb" in names and not wandb_can_start():
        raise ValueError("report_to wandb needs a W&B API key: run `wandb login` or set WANDB_API_KEY, or set "
                         "WANDB_MODE=offline to log locally")
    return names


def wandb_can_start() -> bool:
    """Whether a wandb run can start without asking for a key: offline or disabled mode, an API key
    in the environment, or one that ``wandb login`` stored in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start(acc, report_to: Sequence[str], config: Mapping[str, Any], output_dir: str | None = None) -> None:
    """Start the accelerator's trackers with the run's settings as hyperparameters (wandb's files
    under ``output_dir/wandb``); ``ValueError`` if ``report_to`` names a tracker the accelerator
    was built without."""
    have = {str(t) for t in acc.log_with}
    missing = [n for n in log_with(report_to) if n not in have]
    if missing:
        raise ValueError(f"report_to names {', '.join(missing)}, but the accelerator was built without it: "
                         f"make it with make_accelerator(..., report_to=cfg.report_to, output_dir=cfg.output_dir)")
    if acc.log_with:
        kwargs = {}
        if output_dir and "wandb" in have:
            os.makedirs(output_dir, exist_ok=True)
            kwargs = {"wandb": {"dir": output_dir}}    # wandb makes its own wandb/ in the directory it is given
        acc.init_trackers(PROJECT, config={k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                                           for k, v in config.items()}, init_kwargs=kwargs)


def plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` as JSON values (:class:`SampleImages` as their :meth:`~SampleImages.record`)."""
    return {k: v.record() if isinstance(v, SampleImages) else v for k, v in metrics.items()}


def track(acc, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
    """Send one record's numbers to the accelerator's trackers as scalars (names ``prefix + key``),
    and each :class:`SampleImages` as images with the table of their prompts and rewards."""
    if not acc.trackers:
        return
    acc.log({prefix + k: v for k, v in values.items()
             if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)
    for k, v in values.items():
        if isinstance(v, SampleImages):
            for tracker in acc.trackers:
                if hasattr(tracker, "log_images"):
                    tracker.log_images({prefix + k: v.images.detach().float().cpu()}, step=step)
            acc.log({f"{prefix}{k}_prompts": v.table()}, step=step)


def finish(acc) -> None:
    """Close the accelerator's trackers (the process group stays, unlike ``end_training``)."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers.clear()

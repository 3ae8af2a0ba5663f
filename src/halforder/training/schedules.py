"""The learning-rate schedule and the exponential moving average (EMA) of the trained weights.

Both are diffusers' (``diffusers.optimization.get_scheduler``, ``diffusers.training_utils.EMAModel``),
as its training scripts use them:

- ``lr_scheduler`` ``constant``, ``linear`` or ``cosine`` with ``lr_warmup_steps`` = w of linear
  warmup: the learning rate of update k + 1 is lr * f(k), a function of the update index alone,
  so a resumed run recomputes it exactly from the step it resumes at. The warmup starts at its
  first non-zero rate, f(k) = (k + 1) / w for k < w (diffusers' starts at 0, so that its first
  update would be spent for nothing); from update w + 1 on, f is diffusers'.
- ``ema`` keeps theta_ema <- d theta_ema + (1 - d) theta after every optimiser step, with
  diffusers' warmup d = min(ema_decay, (1 + n) / (10 + n)) at its n-th step; evaluations and
  the exported LoRA files then use the averaged weights (as Flow-GRPO evaluates), the raw ones
  stay in the checkpoint for resuming.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_schedule(name: str, optimizer: torch.optim.Optimizer, warmup: int, steps: int, start: int = 0):
    """The schedule ``name`` over ``steps`` updates with ``warmup`` warmup updates, positioned after
    ``start`` updates (a resume: the optimizer's state, with its ``initial_lr``, already loaded)."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULES:
        raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULES)}, got {name!r}")
    kind = "constant_with_warmup" if name == "constant" and warmup else name
    if not warmup:
        return get_scheduler(kind, optimizer, num_warmup_steps=0, num_training_steps=steps, last_epoch=start - 1)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)   # diffusers' factor, read off a probe
    factor = get_scheduler(kind, probe, num_warmup_steps=warmup, num_training_steps=steps).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (k + 1) / warmup if k < warmup else factor(k),
                                             last_epoch=start - 1)


def make_ema(params: Iterable[torch.nn.Parameter], decay: float):
    """diffusers' ``EMAModel`` over ``params`` (a copy of them to average into)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(list(params), decay=decay)


@contextlib.contextmanager
def averaged(ema, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block ``params`` hold the EMA weights (no change when ``ema`` is None); the
    trained ones are put back after it."""
    if ema is None:
        yield
        return
    params = list(params)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)

"""A small trainer that does not know which estimator it runs.

Each update:

    plan  = sampler.sample(state, plan_generator)          # fixed plan, or RLR with some j law
    for each micro-batch:                                    # gradient accumulation
        chain = task.chain(plan, prompts);  x_T = task.start(chain, n, noise_generator)
        est   = estimate(chain, plan, params, x_T, generator=noise_generator, baseline=...)
    g = mean over micro-batches and processes of est.grad   # an estimate of grad E[R]
    if rewards and g are finite:  param.grad = -g;  clip;  Adam step
    state = sampler.update(state, plan, averaged estimate)

Everything estimator-specific lives in the plan and in :func:`halforder.estimators.estimate`.
A *task* supplies the model side (see :class:`Task`); :mod:`halforder.diffusion.task` has
the Stable Diffusion one.

Randomness: the plan generator has the same seed on every process (so all processes use
the same plan, and the sampler state, updated from process-averaged estimates, stays
identical); the prompt and noise generators are seeded per process. All of them, the
optimiser and the sampler state go into checkpoints, so a resumed run continues exactly as
an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..estimators import Estimate, Plan, estimate
from ..estimators.chain import Chain, State
from ..estimators.samplers import PlanSampler
from .checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig

ROLES = ("FO", "HO", "ZO")


class Task(Protocol):
    """The model side of training."""

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters to train, by the names ``chain.step`` expects."""

    def chain(self, plan: Plan, prompts: Sequence[str]) -> Chain:
        """The chain for ``plan`` (noise schedules follow the plan) on a batch of prompts."""

    def start(self, chain: Chain, n: int, generator: torch.Generator) -> State:
        """n start states x_T."""

    def images(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Samples with the current parameters for a grid: ``[N, 3, H, W]`` in [0, 1]."""

    def save_adapter(self, directory: str) -> None:
        """Export the trained weights (for SD: a LoRA that ``load_lora_weights`` reads)."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the last update's index, this session's metric records
    and the output directory."""

    step: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    output_dir: str = ""


@dataclass
class TrainRNG:
    """The trainer's generators: ``plan`` (same seed on every process), ``data`` (prompt
    draws) and ``noise`` (every noise draw of the estimator), both seeded per process."""

    plan: torch.Generator
    data: torch.Generator
    noise: torch.Generator

    @classmethod
    def seeded(cls, seed: int, rank: int = 0, device="cpu") -> "TrainRNG":
        noise = torch.Generator(device=device)
        return cls(torch.Generator().manual_seed(seed),
                   torch.Generator().manual_seed(seed + 1_000_003 * (rank + 1)),
                   noise.manual_seed(seed + 2_000_029 * (rank + 1)))

    def state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).get_state() for k in ("plan", "data", "noise")}

    def restore(self, state: Mapping[str, torch.Tensor]) -> None:
        for k in ("plan", "data", "noise"):
            getattr(self, k).set_state(state[k].cpu())


def check_output_dir(cfg: TrainConfig) -> None:
    """A fresh run (no ``cfg.resume``) must not start over the checkpoints of another run."""
    if cfg.resume is None and latest_checkpoint(os.path.join(cfg.output_dir, "checkpoints")):
        raise ValueError(f"output directory {cfg.output_dir!r} already holds checkpoints of a run; pass "
                         f"--resume latest to continue it, or choose another --output-dir")


def make_accelerator(cfg: TrainConfig, cpu: bool | None = None):
    """An ``accelerate.Accelerator`` for ``cfg`` (CPU when no GPU is present or ``cpu=True``)."""
    from accelerate import Accelerator

    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    try:
        return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"mixed_precision={cfg.mixed_precision!r} is not available here: {e}") from e


def train(task: Task, sampler: PlanSampler, prompts: Sequence[str], cfg: TrainConfig, *,
          accelerator=None, eval_prompts: Sequence[str] | None = None,
          on_step: Callable[[dict[str, Any], Estimate], None] | None = None) -> TrainResult:
    """Run ``cfg.steps`` updates (continuing from ``cfg.resume`` if given) and write
    metrics, sample grids, checkpoints and the final adapter under ``cfg.output_dir``.

    Args:
      task: the model side (:class:`Task`).
      sampler: a plan sampler (:mod:`halforder.estimators.samplers`); its T must match the task's chains.
      prompts: training prompts; each micro-batch draws ``cfg.batch_size`` of them with replacement.
      cfg: the :class:`TrainConfig`.
      accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
      eval_prompts: prompts of the sample grids (default: the first ``cfg.eval_num`` prompts).
      on_step: called with each update's metric record and its estimate (averaged over
        micro-batches and processes; ``grad`` is the ascent direction before clipping).
    """
    if not prompts:
        raise ValueError("no training prompts")
    check_output_dir(cfg)
    acc = accelerator if accelerator is not None else make_accelerator(cfg)
    main = acc.is_main_process
    out = cfg.output_dir
    ckpt_root = os.path.join(out, "checkpoints")
    params = task.trainable()
    if not params:
        raise ValueError("the task has no trainable parameters")
    names = list(params)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    gens = TrainRNG.seeded(cfg.seed, acc.process_index, acc.device)
    sstate = sampler.init()
    start = 0

    resume = latest_checkpoint(ckpt_root) if cfg.resume == "latest" else cfg.resume
    if resume:
        ck = load_checkpoint(resume, map_location=acc.device)
        sstate = _restore(ck, params, opt, gens, sstate, acc)
        start = ck.step
    if start > cfg.steps:
        raise ValueError(f"the checkpoint is at step {start}, past steps={cfg.steps}")

    metrics_path = os.path.join(out, "metrics.jsonl")
    writer = None
    if main:
        os.makedirs(out, exist_ok=True)
        _write_text(os.path.join(out, "config.json"), json.dumps(cfg.to_dict(), indent=1))
        _truncate_metrics(metrics_path, start)
        writer = _tensorboard(os.path.join(out, "tensorboard"))
    eval_prompts = list(eval_prompts or prompts[:cfg.eval_num])[:cfg.eval_num]
    if main and cfg.eval_every and start == 0:
        _sample_grid(task, eval_prompts, cfg, acc.device, os.path.join(out, "samples", "step_00000000.png"))

    result = TrainResult(start, [], out)
    t_begin = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not (main and cfg.progress), desc="train", unit="upd")
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        plan = sampler.sample(sstate, gens.plan)
        est = local_estimate(task, plan, params, prompts, cfg, gens, acc.autocast)
        vec = _flatten(est, names)
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="mean")
        rewards = acc.gather(est.reward) if acc.num_processes > 1 else est.reward
        est = _unflatten(vec, params, rewards)
        rec = {"step": step, "plan": str(plan), "j": plan.blocks[0][0] if len(plan.blocks) == 1 else None,
               "reward_mean": _num(rewards.mean()), "reward_std": _num(rewards.std()) if len(rewards) > 1 else 0.0,
               "grad_norm": _norm(est.grad.values())}
        rec.update({f"grad_norm_{r}": _norm(est.parts[r].values()) for r in ROLES})
        reason = ("non-finite reward" if not bool(torch.isfinite(rewards).all()) else
                  "non-finite gradient" if not bool(torch.isfinite(vec).all()) else None)
        if reason is None:
            for k, p in params.items():
                p.grad = est.grad[k].neg().to(p.dtype)   # minimise -R
            if cfg.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sstate = sampler.update(sstate, plan, est)
        rec.update(skipped=reason is not None, reason=reason, lr=cfg.lr, time_s=time.perf_counter() - t0,
                   elapsed_s=time.perf_counter() - t_begin, memory_bytes=_memory(acc.device))
        result.step = step
        result.metrics.append(rec)
        if main:
            _append_jsonl(metrics_path, rec)
            if writer is not None:
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        writer.add_scalar(k, v, step)
            bar.update(1)
            bar.set_postfix(reward=rec["reward_mean"], skipped=int(rec["skipped"]))
        if on_step is not None:
            on_step(rec, est)
        last = step == cfg.steps
        if main and cfg.eval_every and (step % cfg.eval_every == 0 or last):
            _sample_grid(task, eval_prompts, cfg, acc.device, os.path.join(out, "samples", f"step_{step:08d}.png"))
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
            _checkpoint(ckpt_root, step, params, sstate, opt, gens, cfg, acc)
    bar.close()
    if writer is not None:
        writer.close()
    if main:
        _atomic_dir(os.path.join(out, "lora"), task.save_adapter)
    acc.wait_for_everyone()
    return result


# ----------------------------------------------------------------------------- one update
def local_estimate(task: Task, plan: Plan, params, prompts: Sequence[str], cfg: TrainConfig, rng: TrainRNG,
                   autocast=contextlib.nullcontext) -> Estimate:
    """This process's estimate for one update: the mean over ``cfg.grad_accum`` micro-batches,
    each ``cfg.batch_size`` prompts drawn with ``rng.data`` and noise from ``rng.noise``."""
    grad, parts, rewards = None, None, []
    for _ in range(cfg.grad_accum):
        idx = torch.randint(len(prompts), (cfg.batch_size,), generator=rng.data)
        batch = [prompts[i] for i in idx.tolist()]
        chain = task.chain(plan, batch)
        x_T = task.start(chain, cfg.batch_size, rng.noise)
        with autocast():
            est = estimate(chain, plan, params, x_T, generator=rng.noise, baseline=cfg.baseline)
        w = 1.0 / cfg.grad_accum
        if grad is None:
            grad = {k: v * w for k, v in est.grad.items()}
            parts = {r: {k: v * w for k, v in est.parts[r].items()} for r in ROLES}
        else:
            for k in grad:
                grad[k] += est.grad[k] * w
                for r in ROLES:
                    parts[r][k] += est.parts[r][k] * w
        rewards.append(est.reward.float())
    return Estimate(grad, torch.cat(rewards), parts)


def _flatten(est: Estimate, names) -> torch.Tensor:
    """grad and its three parts as one vector (one all-reduce for all of them), in float64
    if any gradient is float64 and float32 otherwise."""
    dtype = torch.float64 if any(est.grad[k].dtype == torch.float64 for k in names) else torch.float32
    chunks = [est.grad[k].reshape(-1).to(dtype) for k in names]
    for r in ROLES:
        chunks += [est.parts[r][k].reshape(-1).to(dtype) for k in names]
    return torch.cat(chunks)


def _unflatten(vec: torch.Tensor, params, rewards) -> Estimate:
    out, i = [], 0
    for _ in range(1 + len(ROLES)):
        d = {}
        for k, p in params.items():
            d[k] = vec[i:i + p.numel()].view_as(p)
            i += p.numel()
        out.append(d)
    return Estimate(out[0], rewards, dict(zip(ROLES, out[1:])))


def _norm(ts) -> float:
    return _num(torch.sqrt(sum((t.double() ** 2).sum() for t in ts)))


def _num(x) -> float | None:
    """A float for the JSONL record; None for NaN/inf (strict JSON has neither)."""
    v = float(x)
    return v if math.isfinite(v) else None


def _memory(device) -> int:
    """Peak memory in bytes: CUDA allocator peak on a GPU, the process's peak RSS on a CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------- checkpoints
def _checkpoint(root, step, params, sstate, opt, gens, cfg, acc) -> None:
    if acc.num_processes > 1:
        from accelerate.utils import gather_object
        rng = gather_object([{k: v.cpu() for k, v in gens.state().items()}])
    else:
        rng = [gens.state()]
    if acc.is_main_process:
        save_checkpoint(root, step, {k: p.detach() for k, p in params.items()}, sstate, opt.state_dict(), rng,
                        keep=cfg.keep_checkpoints)
    acc.wait_for_everyone()


def _restore(ck: Checkpoint, params, opt, gens, sstate, acc):
    if ck.num_processes != acc.num_processes:
        raise CheckpointError(f"checkpoint {ck.path!r} was written by {ck.num_processes} process(es); "
                              f"resume it with the same number (now {acc.num_processes})")
    if set(ck.params) != set(params):
        raise CheckpointError(f"checkpoint {ck.path!r} holds other parameters than the model "
                              f"(different LoRA rank or target modules?)")
    for k, p in params.items():
        if ck.params[k].shape != p.shape:
            raise CheckpointError(f"checkpoint {ck.path!r}: {k} has shape {tuple(ck.params[k].shape)}, "
                                  f"the model {tuple(p.shape)}")
    if set(ck.sampler_state) != set(sstate) or any(ck.sampler_state[k].shape != v.shape for k, v in sstate.items()):
        raise CheckpointError(f"checkpoint {ck.path!r} was written with another plan sampler (or another T or h)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ck.params[k])
    try:
        opt.load_state_dict(ck.optimizer)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ck.path!r}: optimizer state does not fit ({e})") from e
    gens.restore(ck.rng[acc.process_index])
    return dict(ck.sampler_state)


# ----------------------------------------------------------------------------- outputs
def _append_jsonl(path: str, rec: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, allow_nan=False) + "\n")


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the records of updates <= ``step`` (those after the checkpoint are redone)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    _write_text(path, "".join(keep))


def _write_text(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_dir(final: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary directory, then rename it to ``final``."""
    parent = os.path.dirname(final) or "."
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        write(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tensorboard(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir)


def _sample_grid(task, prompts, cfg, device, path: str) -> None:
    """A PNG grid of the task's samples for ``prompts`` (fixed seed, so grids are comparable)."""
    g = torch.Generator(device=device).manual_seed(cfg.seed + 7919)
    images = task.images(prompts, g)
    save_grid(images, path)


def save_grid(images: torch.Tensor, path: str, ncol: int | None = None) -> None:
    """Write images ``[N, 3, H, W]`` in [0, 1] as one PNG grid (1-pixel gaps)."""
    from PIL import Image

    images = images.detach().float().cpu().clamp(0, 1)
    n, c, hgt, wid = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.ones(c, nrow * (hgt + 1) - 1, ncol * (wid + 1) - 1)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, r * (hgt + 1):r * (hgt + 1) + hgt, q * (wid + 1):q * (wid + 1) + wid] = images[i]
    arr = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=os.path.dirname(path) or ".")
    os.close(fd)
    Image.fromarray(arr.squeeze(-1) if c == 1 else arr).save(tmp)
    os.replace(tmp, path)

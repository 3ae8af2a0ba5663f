"""A model-agnostic training loop that does not know which estimator it runs.

Each step:

    plan  = sampler.sample(state, plan_generator)          # fixed plan, or a law over plans
    for est in rule.updates(rule_state, task, plan, params, items, rng):   # one, or PPO's reuse
        g = mean over processes of est.grad                  # an estimate of grad E[R]
        if rewards and g are finite:  param.grad = -g;  clip;  AdamW step
    state = sampler.update(state, plan, last applied estimate)
    count the model's evaluations (ComputeMeter), summed over processes

Everything estimator-specific lives in the plan, the sampler and the update rule
(:mod:`halforder.training.update_rules`: on-policy estimates, or the clipped ratio with
reuse and a KL); the model side is a :class:`Task`, and what a caller adds (evaluation,
exported weights, an early stop, a memory meter) comes in through :class:`Hooks`.

Randomness: the plan generator has the same seed on every process (so all processes use
the same plan, and the sampler state, updated from process-averaged estimates, stays
identical); the data and noise generators are seeded per process. All of them, the
optimiser and the sampler state go into checkpoints, so a resumed run continues exactly as
an uninterrupted one. Processes average through ``accelerate``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..estimators import ComputeMeter, Estimate, Plan
from ..estimators.protocol import Chain
from ..estimators.samplers import PlanSampler
from .update_rules import UpdateRule, update_rule
from .checkpoints import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .schedules import averaged, lr_schedule, make_ema
from .config import LoopConfig
from . import trackers
from .files import append_jsonl, write_text
from .resume import check_fits, check_output_dir, check_resume, record_config, resume_path

class Task(Protocol):
    """The model side of training."""

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters to train, by the names the chains' ``step`` expects."""

    def chain(self, plan: Plan, batch: Sequence, generator: torch.Generator) -> Chain:
        """The chain of ``plan`` (its noise scales follow the plan) for a batch of conditioning
        items (prompts); ``generator`` draws whatever randomness building it needs."""


@dataclass(frozen=True)
class Hooks:
    """What a caller adds to :func:`train`; every hook is optional.

    Attributes:
      evaluate: ``step -> metrics``, main process only, at step 0 (before training), every
        ``eval_every`` updates and at the last one; a non-empty result is written as a
        record ``{"step": step, "eval": metrics}``. Numbers go to the trackers as
        ``eval/<name>`` scalars; a :class:`~halforder.training.trackers.SampleImages` value
        as images with their prompts and rewards (the JSONL record keeps prompts and rewards).
      on_step: ``(record, estimate)`` after every update (the estimate averaged over
        micro-batches and processes; ``grad`` is the ascent direction before clipping).
      stop: ``record -> bool``; True ends training after that update (e.g. a compute budget).
      export: ``output_dir -> None``, main process only, once at the end: write the
        trained weights (e.g. a LoRA adapter) and anything else a run leaves.
      weights: ``directory -> None``, main process only, into every checkpoint directory:
        the trained weights in the user's format (e.g. the LoRA file a pipeline loads).
      around_estimate: a context manager entered around every ``estimate`` call (e.g. a
        :class:`~halforder.estimators.memory.SavedTensorMeter`).
    """

    evaluate: Callable[[int], Mapping[str, Any]] | None = None
    on_step: Callable[[dict[str, Any], Estimate], None] | None = None
    stop: Callable[[dict[str, Any]], bool] | None = None
    export: Callable[[str], None] | None = None
    weights: Callable[[str], None] | None = None
    around_estimate: Callable[[], ContextManager] | None = None


@dataclass
class TrainResult:
    """What :func:`train` returns: the last update's index, this session's metric records
    and the output directory."""

    step: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    output_dir: str | None = None


@dataclass
class TrainRNG:
    """The loop's generators: ``plan`` (same seed on every process), ``data`` (batch
    draws) and ``noise`` (every draw of the estimator and the chains), seeded per process."""

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


def make_accelerator(cpu: bool | None = None, *, report_to: Sequence[str] = (), output_dir: str | None = None):
    """An ``accelerate.Accelerator`` (CPU when no GPU is present or ``cpu=True``) with the
    trackers ``report_to`` names (:mod:`halforder.training.trackers`; TensorBoard writes to
    ``output_dir/tensorboard``). ``ValueError`` when a tracker's package is missing. No
    autocast: a task keeps its own precision (the estimators' sums stay float32)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    log_with = trackers.log_with(report_to)
    if "tensorboard" in log_with and not output_dir:
        raise ValueError("report_to tensorboard writes into the output directory: give one (output_dir)")
    project = (ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, "tensorboard"))
               if output_dir else None)
    return Accelerator(cpu=cpu, log_with=log_with or None, project_config=project)


def train(task: Task, sampler: PlanSampler, batches: Sequence, cfg: LoopConfig, *, accelerator=None,
          hooks: Hooks = Hooks(), rule: UpdateRule | None = None) -> TrainResult:
    """Run ``cfg.steps`` updates (continuing from ``cfg.resume`` if given); with an
    ``output_dir``, write ``config.json``, ``metrics.jsonl`` and checkpoints there.

    Args:
      task: the model side (:class:`Task`).
      sampler: a plan sampler (:mod:`halforder.estimators.samplers`); its T must match the task's chains.
      batches: the conditioning items (prompts); each micro-batch draws ``cfg.batch_size`` of
        them with replacement.
      cfg: a :class:`~halforder.training.config.LoopConfig` (or a config that extends it).
      accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
      hooks: evaluation, export, early stop, ... (:class:`Hooks`).
      rule: the update rule (default: :func:`~halforder.training.update_rules.update_rule` of ``cfg``).
    """
    if not batches:
        raise ValueError("no training prompts (batches)")
    check_output_dir(cfg)
    acc = accelerator if accelerator is not None else make_accelerator(report_to=cfg.report_to,
                                                                       output_dir=cfg.output_dir)
    main = acc.is_main_process
    out = cfg.output_dir
    params = task.trainable()
    if not params:
        raise ValueError("the task has no trainable parameters")
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    ema = make_ema(params.values(), cfg.ema_decay) if cfg.ema else None
    gens = TrainRNG.seeded(cfg.seed, acc.process_index, acc.device)
    rule = rule if rule is not None else update_rule(cfg)
    sstate, rstate = sampler.init(), rule.init(params)
    start, ck = 0, None
    spent = {"forward": 0, "backward": 0}   # evaluations since step 0, all processes
    resume = resume_path(cfg)
    if resume:
        ck = load_checkpoint(resume, map_location=acc.device)
        check_resume(cfg, ck)
        sstate, rstate = _split(_restore(ck, params, opt, gens, _joined(sstate, rstate), acc, ema))
        start = ck.step
        spent = dict(ck.evaluations)
    schedule = lr_schedule(cfg.lr_scheduler, opt, cfg.lr_warmup_steps, cfg.steps, start)

    metrics_path = os.path.join(out, "metrics.jsonl") if out and trackers.JSONL in cfg.report_to else None
    trackers.start(acc, cfg.report_to, cfg.to_dict(), cfg.output_dir)
    if main and out:
        os.makedirs(out, exist_ok=True)
        record_config(out, cfg, ck)
        _truncate_metrics(os.path.join(out, "metrics.jsonl"), start)
    result = TrainResult(start, [], out)

    def log(rec):
        result.metrics.append(rec)
        if main and metrics_path:
            append_jsonl(metrics_path, rec)

    def evaluate(step):
        if main and hooks.evaluate is not None:
            with averaged(ema, params.values()):
                metrics = hooks.evaluate(step)
            if metrics:
                log({"step": step, "eval": trackers.plain(metrics)})
                trackers.track(acc, step, metrics, prefix="eval/")

    def weights(directory):   # into every checkpoint: the weights a user tries (the average, with ema)
        if hooks.weights is not None:
            with averaged(ema, params.values()):
                hooks.weights(directory)

    if cfg.eval_every and start == 0:
        evaluate(0)
    around = hooks.around_estimate or contextlib.nullcontext
    t_begin = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not (main and cfg.progress), desc="train", unit="upd")
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        plan = sampler.sample(sstate, gens.plan)
        stats, reasons, applied = [], [], None
        with ComputeMeter() as meter, around():
            for est in rule.updates(rstate, task, plan, params, batches, gens):
                est, vec = _averaged(est, acc)
                reason = ("non-finite reward" if not bool(torch.isfinite(est.reward).all()) else
                          "non-finite gradient" if not bool(torch.isfinite(vec).all()) else None)
                reasons.append(reason)
                stats.append(est.stats)
                if reason is None:
                    for k, p in params.items():
                        p.grad = est.grad[k].neg().to(p.dtype)   # minimise -R
                    if cfg.clip_norm > 0:
                        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.step(params.values())
                    applied = est
        if applied is not None:                   # once a step, from its last applied update
            sstate = sampler.update(sstate, plan, applied)
        counts = torch.tensor([meter.forward, meter.backward], dtype=torch.int64, device=acc.device)
        if acc.num_processes > 1:
            counts = acc.reduce(counts, reduction="sum")
        f, b = (int(v) for v in counts.tolist())
        spent = {"forward": spent["forward"] + f, "backward": spent["backward"] + b}
        rewards = est.reward
        reason = next((r for r in reasons if r is not None), None)
        rec = {"step": step, **plan.summary(), **rule.describe(plan), "reward_mean": _num(rewards.mean()),
               "reward_std": _num(rewards.std()) if len(rewards) > 1 else 0.0,
               "grad_norm": _norm(est.grad.values()), "evaluations_forward": f, "evaluations_backward": b,
               "evaluations": spent["forward"] + spent["backward"]}
        rec.update({f"grad_norm_{r}": _norm(part.values()) for r, part in est.parts.items()})
        rec.update({k: _num(sum(s[k] for s in stats) / len(stats)) for k in stats[-1]})
        if len(reasons) > 1:
            rec["updates"] = len(reasons)
        lr = opt.param_groups[0]["lr"]
        schedule.step()                       # the learning rate is a function of the update index
        rec.update(skipped=reason is not None, reason=reason, lr=lr, time_s=time.perf_counter() - t0,
                   elapsed_s=time.perf_counter() - t_begin, memory_bytes=_memory(acc.device))
        result.step = step
        log(rec)
        if main:
            trackers.track(acc, step, rec)
            bar.update(1)
            bar.set_postfix(reward=rec["reward_mean"], skipped=int(rec["skipped"]))
        if hooks.on_step is not None:
            hooks.on_step(rec, est)
        last = step == cfg.steps or (hooks.stop is not None and hooks.stop(rec))
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            evaluate(step)
        if out and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last):
            _checkpoint(os.path.join(out, "checkpoints"), step, params, _joined(sstate, rstate), opt, gens, cfg, acc,
                        spent, weights, ema)
        if last:
            break
    bar.close()
    if main:
        trackers.finish(acc)
    if main and out and hooks.export is not None:
        with averaged(ema, params.values()):
            hooks.export(out)
    acc.wait_for_everyone()
    return result


# ----------------------------------------------------------------------------- one update
def _averaged(est: Estimate, acc) -> tuple[Estimate, torch.Tensor]:
    """The estimate averaged over processes (rewards gathered), and its gradient and parts as
    one vector (one all-reduce for all of them), in float64 if any gradient is float64."""
    names = list(est.grad)
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in est.grad.values()) else torch.float32
    vec = torch.cat([d[k].reshape(-1).to(dtype) for d in (est.grad, *est.parts.values()) for k in names])
    if acc.num_processes <= 1:
        return est, vec[:sum(v.numel() for v in est.grad.values())]
    vec = acc.reduce(vec, reduction="mean")
    out, i = [], 0
    for _ in range(1 + len(est.parts)):
        d = {}
        for k in names:
            n = est.grad[k].numel()
            d[k] = vec[i:i + n].view_as(est.grad[k])
            i += n
        out.append(d)
    return (Estimate(out[0], acc.gather(est.reward), dict(zip(est.parts, out[1:])), est.stats),
            vec[:sum(v.numel() for v in est.grad.values())])


def _joined(sampler_state, rule_state):
    """The sampler's and the update rule's states as one checkpointed dict."""
    return {**sampler_state, **{f"update_rule/{k}": v for k, v in rule_state.items()}}


def _split(state):
    """The inverse of :func:`_joined`."""
    rule = {k[len("update_rule/"):]: v for k, v in state.items() if k.startswith("update_rule/")}
    return {k: v for k, v in state.items() if not k.startswith("update_rule/")}, rule


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
def _checkpoint(root, step, params, sstate, opt, gens, cfg, acc, spent, weights=None, ema=None) -> None:
    if acc.num_processes > 1:
        from accelerate.utils import gather_object
        rng = gather_object([{k: v.cpu() for k, v in gens.state().items()}])
    else:
        rng = [gens.state()]
    if acc.is_main_process:
        save_checkpoint(root, step, {k: p.detach() for k, p in params.items()}, sstate, opt.state_dict(), rng,
                        keep=cfg.keep_checkpoints, config=cfg.to_dict(), evaluations=spent, weights=weights,
                        ema=None if ema is None else ema.state_dict())
    acc.wait_for_everyone()


def _restore(ck: Checkpoint, params, opt, gens, sstate, acc, ema=None):
    if ck.num_processes != acc.num_processes:
        raise CheckpointError(f"checkpoint {ck.path!r} was written by {ck.num_processes} process(es); "
                              f"resume it with the same number (now {acc.num_processes})")
    check_fits(ck, params, sstate)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ck.params[k])
    try:
        opt.load_state_dict(ck.optimizer)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ck.path!r}: optimizer state does not fit ({e})") from e
    for group in opt.param_groups:           # a checkpoint from before learning-rate schedules
        group.setdefault("initial_lr", group["lr"])
    if ema is not None:
        if ck.ema is None:
            raise CheckpointError(f"checkpoint {ck.path!r} holds no moving average (ema): was it written without it?")
        ema.load_state_dict(ck.ema)
    gens.restore(ck.rng[acc.process_index])
    return dict(ck.sampler_state)


# ----------------------------------------------------------------------------- outputs
def _truncate_metrics(path: str, step: int) -> None:
    """Keep the records of updates <= ``step`` (those after the checkpoint are redone)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text(path, "".join(keep))

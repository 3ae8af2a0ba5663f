"""A fine-tuning run from a :class:`~halforder.diffusion.app.config.TrainConfig`: one path for
images, video and DCoT.

:func:`prepare` checks every input and builds the task, the plan sampler and the prompts
without writing anything; :func:`run` trains them with the library's loop
(:func:`halforder.training.loop.train`), adding what a diffusion run writes: sample grids
(``samples/step_XXXXXXXX.png``), the LoRA adapter (``lora/``) and, for video, a GIF of the
held-out prompts (``samples/final.gif``).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass

import torch

from ...estimators.gradient_checkpointing import checkpoint_blocks
from ...estimators.samplers import PlanSampler
from ...planning.search import SearchResult
from ...training.checkpoints import load_checkpoint
from ...training.files import append_jsonl, atomic_dir, write_text
from ...training.loop import Hooks, TrainResult, make_accelerator, train
from ...training.resume import check_fits, check_output_dir, check_resume, resume_path
from ...training.trackers import JSONL, SampleImages
from ..models.components import Components
from .config import PRECISIONS, TINY_EVAL_PROMPTS, TINY_PROMPTS, TrainConfig, family_settings
from .dcot import DCoTConditioning, StepSplit, load_dcot_prompts
from ..models.lora import add_lora
from .plan_choice import choose, report, resume_choice, save_choice
from .previews import save_grid, write_video
from ..rewards import REWARDS, make_reward
from ..models.families import TINY_MODELS, family_of, load_components, tiny_model
from ..models.sd_chain import image_view
from .task import DiffusionTask, StepPrompts
from ..models.video.frames import VideoView, frame_indices, parse_frames
from ..rewards.video import VIDEO_REWARDS, make_video_reward, min_frames

EVAL_SEED_OFFSET = 7919   # sample grids use seed + this, so that they are comparable across a run


@dataclass(frozen=True, eq=False)
class Prepared:
    """What :func:`prepare` builds: the task, the plan sampler, the training prompts, the
    held-out prompts of the sample grids and, with estimator auto, the plan search."""

    task: DiffusionTask
    sampler: PlanSampler
    prompts: list[str]
    eval_prompts: list[str]
    search: SearchResult | None = None
    eval_rewards: dict = dataclasses.field(default_factory=dict)


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a text file (ValueError if it is missing, unreadable or empty)."""
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path!r} is not UTF-8 text: {e}") from None
    if not prompts:
        raise ValueError(f"prompt file {path!r} is empty: put one prompt per line")
    return prompts


def model_dtype(cfg: TrainConfig, device="cpu") -> torch.dtype:
    """The dtype of the frozen model for ``cfg.mixed_precision`` on ``device`` (fp16 is
    refused on a CPU, where half-precision kernels are missing or slow)."""
    if cfg.mixed_precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("mixed_precision fp16 needs a GPU; on a CPU use bf16 or no")
    return PRECISIONS[cfg.mixed_precision]


def build_components(cfg: TrainConfig, device="cpu") -> Components:
    """The frozen parts ``cfg.model`` names (a tiny model's name, ``"tiny"``, ``"tiny-sd3"``, ...: random
    tiny parts, no download), in the dtype of ``cfg.mixed_precision``, with the family's options
    (:func:`~halforder.diffusion.app.config.family_settings`: e.g. ``shift``, ``t5``) applied by the family."""
    video, dtype, settings = cfg.task == "t2v", model_dtype(cfg, device), family_settings(cfg)
    if cfg.model in TINY_MODELS:
        comp = tiny_model(cfg.model, cfg.seed, video=video, **settings).to(dtype=dtype)
    else:
        comp = load_components(cfg.model, revision=cfg.revision, dtype=dtype, video=video, **settings)
    if cfg.checkpoint_decode and comp.vae is not None:
        if not getattr(comp.vae, "_supports_gradient_checkpointing", False):
            raise ValueError(f"checkpoint_decode: the model's VAE ({type(comp.vae).__name__}) cannot checkpoint its "
                             "blocks in diffusers; leave checkpoint_decode off")
        checkpoint_blocks(comp.vae)
    return comp.to(device)


def build_reward(cfg: TrainConfig, device="cpu", name: str | None = None, kwargs=None):
    """The reward of ``cfg`` (or the reward ``name`` with ``kwargs``) on ``device``: an image
    reward, or for video a spec of :func:`~halforder.diffusion.rewards.video.make_video_reward`."""
    name = cfg.reward if name is None else name
    kwargs = dict(cfg.reward_kwargs if kwargs is None else kwargs)
    factory = REWARDS.get(name) or VIDEO_REWARDS.get(name)
    if factory is not None and "device" in inspect.signature(factory).parameters:
        kwargs.setdefault("device", str(device))
    reward = (make_video_reward if cfg.task == "t2v" else make_reward)(name, **kwargs)
    return reward.to(device) if isinstance(reward, torch.nn.Module) else reward


def build_task(cfg: TrainConfig, components: Components, reward, device="cpu",
               step_prompts: StepPrompts | None = None) -> DiffusionTask:
    """Add the LoRA adapter of ``cfg`` to ``components.unet`` and make the task (image or
    video view by ``cfg.task``)."""
    unet = components.unet
    params = add_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets, seed=cfg.seed)
    for p in params.values():
        p.data = p.data.to(device)
    if cfg.task == "t2v":
        make_view = family_of(components).video_view
        if make_view is None:
            raise ValueError(f"model {cfg.model!r} is a text-to-image model: use task t2i")
        view = make_view(components, cfg.num_frames, parse_frames(cfg.frames), cfg.latent_size)
        k = frame_indices(view.frames, cfg.num_frames, 1, torch.Generator()).shape[1]
        if k < min_frames(reward):
            raise ValueError(f"the reward {cfg.reward!r} needs at least {min_frames(reward)} decoded frames per "
                             f"video, but frames={cfg.frames!r} decodes {k}")
    else:
        view = image_view(components, cfg.latent_size)
    cfg_weight = family_of(components).network(components, view.latent_shape, cfg.guidance_scale)[1]
    if cfg.negative_prompt and cfg_weight <= 1:
        raise ValueError("negative_prompt has no effect: this run has no classifier-free guidance (guidance_scale "
                         "<= 1, or FLUX, whose guidance is an embedding)")
    return DiffusionTask(components=components, params=params, reward=reward, view=view, T=cfg.T,
                         guidance_scale=cfg.guidance_scale, negative_prompt=cfg.negative_prompt,
                         noise_scales=cfg.noise_scales(), gradient_checkpointing=cfg.gradient_checkpointing,
                         step_prompts=step_prompts, batching=cfg.batching,
                         compile=None if cfg.compile == "no" else cfg.compile)


def prepare(cfg: TrainConfig, device="cpu") -> Prepared:
    """Check every input and build the run, without writing anything.

    Raises ``ValueError`` or ``OSError`` with a message on bad input."""
    step_prompts = None
    if cfg.dcot is not None:
        if cfg.prompts is not None:
            raise ValueError("give either a prompt file or a DCoT prompt file (dcot), not both")
        step_prompts = DCoTConditioning(load_dcot_prompts(cfg.dcot), StepSplit.make(cfg.T, cfg.dcot_split))
        prompts, eval_prompts = step_prompts.originals, None
    elif cfg.prompts is not None:
        prompts, eval_prompts = read_prompts(cfg.prompts), None
    elif cfg.model in TINY_MODELS:
        prompts, eval_prompts = list(TINY_PROMPTS[cfg.task]), list(TINY_EVAL_PROMPTS[cfg.task])
    else:
        raise ValueError("a prompt file is needed (--prompts FILE, one prompt per line)")
    if cfg.eval_prompts is not None:
        eval_prompts = read_prompts(cfg.eval_prompts)
    sampler = None if cfg.estimator == "auto" else cfg.sampler()
    check_output_dir(cfg)
    resume = resume_path(cfg)
    checkpoint = load_checkpoint(resume) if resume else None   # verified now, before anything is written
    if checkpoint is not None:
        check_resume(cfg, checkpoint)
    reward = build_reward(cfg, device)
    if hasattr(reward, "check_prompts"):     # e.g. ocr: each prompt quotes the text to render
        reward.check_prompts([*prompts, *(eval_prompts or ())])
    eval_rewards = {name: build_reward(cfg, device, name, kw) for name, kw in cfg.eval_rewards.items()}
    task = build_task(cfg, build_components(cfg, device), reward, device, step_prompts)
    search = None
    if sampler is None and checkpoint is not None:   # the plan the run chose, not a new search
        task, sampler = resume_choice(task, checkpoint.path, cfg.gradient_checkpointing)
    elif sampler is None:
        task, sampler, search = choose(cfg, task, prompts)
    if checkpoint is not None:
        check_fits(checkpoint, task.trainable(), sampler.init())
    plan = sampler.sample(sampler.init(), torch.Generator().manual_seed(cfg.seed))
    plan.validate(task.chain(plan, prompts[:1]))   # e.g. an HO block needs eta > 0 where it ends
    return Prepared(task, sampler, prompts, list(eval_prompts or prompts)[:cfg.eval_num], search, eval_rewards)


def run(cfg: TrainConfig, prepared: Prepared, accelerator=None) -> TrainResult:
    """Train ``prepared`` with the library's loop, writing sample grids, the LoRA adapter and
    (video) a GIF under ``cfg.output_dir``."""
    acc = accelerator if accelerator is not None else make_accelerator(report_to=cfg.report_to,
                                                                           output_dir=cfg.output_dir)
    task, eval_prompts = prepared.task, prepared.eval_prompts

    def generator():
        return torch.Generator(device=acc.device).manual_seed(cfg.seed + EVAL_SEED_OFFSET)

    def evaluate(step: int) -> dict:
        images, rewards, others = task.evaluate(eval_prompts, generator(), prepared.eval_rewards)
        save_grid(images, os.path.join(cfg.output_dir, "samples", f"step_{step:08d}.png"))
        return {"reward_mean": float(rewards.mean()), **{f"{k}_mean": float(v.mean()) for k, v in others.items()},
                "samples": SampleImages(images, eval_prompts, rewards.tolist())}

    def weights(directory: str) -> None:   # into every checkpoint, as at the end: the LoRA file a pipeline loads
        task.save_adapter(os.path.join(directory, "lora"))

    def export(out: str) -> None:
        with atomic_dir(os.path.join(out, "lora")) as tmp:
            task.save_adapter(tmp)
        if isinstance(task.view, VideoView):
            videos = task.view.videos(task.sample(eval_prompts, generator()))
            write_video(videos, os.path.join(out, "samples", "final.gif"), cfg.gif_fps)

    if prepared.search is not None and cfg.output_dir and acc.is_main_process:
        write_text(os.path.join(cfg.output_dir, "plan_search.txt"), report(prepared.search) + "\n")
        save_choice(cfg.output_dir, task, prepared.sampler)
        if prepared.search.cost is not None and JSONL in cfg.report_to:   # what the search spent, before step 1
            append_jsonl(os.path.join(cfg.output_dir, "metrics.jsonl"),
                         {"step": 0, "plan_search": prepared.search.cost.record()})
    hooks = Hooks(evaluate=evaluate if cfg.output_dir else None, export=export, weights=weights)
    return train(task, prepared.sampler, prepared.prompts, cfg, accelerator=acc, hooks=hooks)

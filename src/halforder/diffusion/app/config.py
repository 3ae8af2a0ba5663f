"""Everything a fine-tuning run needs to know, in one frozen dataclass.

:class:`TrainConfig` extends the training loop's :class:`~halforder.training.config.LoopConfig`
with the model, data, reward, estimator, LoRA and video settings. Each field carries its
help text (``knob``); the command line is generated from the fields
(:mod:`halforder.diffusion.app.cli`), so a config file and a flag can set every one of them.
Values come, in increasing precedence, from the field defaults, a preset, a config file
(YAML, TOML or JSON: a run's own ``config.json`` reproduces it) and flags:

    cfg = load_config("run.yaml", overrides={"lr": 1e-4})
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ...estimators.families import FAMILIES, J_SAMPLING, SETTINGS, make_sampler
from ...estimators.samplers import PlanSampler
from ...estimators.step_sets import POSITIONS, WEIGHTINGS
from ...planning.units import parse_bytes, parse_seconds
from ...training.config import (ConfigError, LoopConfig, coerced, from_mapping, knob, layered, need,
                                read_mapping_file)
from ..sampling.chain import NoiseScales
from ..sampling.denoiser import BATCHING
from ..models.lora import DEFAULT_TARGETS
from ..rewards import REWARDS, check_reward_options, differentiable
from ..sampling.solvers import FLOW_NOISE
from ..models.families import OPTION_SETTINGS, named_family, options_of
from ..models.video.components import VIDEOCRAFTER2_BASE, VIDEOCRAFTER2_UNET
from ..models.video.frames import FRAME_MODES, parse_frames
from ..rewards.video import VIDEO_REWARDS, check_video_reward_options

PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune")

PRESETS: dict[str, dict[str, Any]] = {
    # Offline, CPU, tiny random components: a smoke run of the whole pipeline in well under a minute.
    "tiny": dict(model="tiny", reward="brightness", T=6, guidance_scale=2.0, steps=6, batch_size=4,
                 grad_accum=1, lr=1e-2, lora_rank=2, lora_alpha=2.0, h=2, eval_every=3, checkpoint_every=3,
                 eval_num=4, output_dir=os.path.join("runs", "tiny")),
    # Offline, CPU, a tiny random UNet3D: text-to-video in well under a minute.
    "tiny-video": dict(task="t2v", model="tiny", reward="brightness+0.5*temporal", T=4, guidance_scale=2.0,
                       steps=4, batch_size=4, grad_accum=1, lr=1e-2, lora_rank=2, lora_alpha=2.0, h=2, eta_plan=1.0,
                       zo_sigma=1e-2, eval_every=2, checkpoint_every=2, eval_num=2, num_frames=4, frames="ends",
                       gif_fps=4.0, output_dir=os.path.join("runs", "tiny-video")),
    # Offline, CPU, tiny random flow-matching transformers: SD3 (CFG) and FLUX (guidance embedding, no CFG),
    # with Flow-GRPO's SDE noise level 0.7 where an HO block ends.
    **{name: dict(model=name, reward="brightness", T=4, guidance_scale=g, steps=4, batch_size=4, grad_accum=1,
                  lr=1e-2, lora_rank=2, lora_alpha=2.0, eta_plan=0.7, eval_every=2, checkpoint_every=2,
                  eval_num=4, output_dir=os.path.join("runs", name))
       for name, g in (("tiny-sd3", 2.0), ("tiny-flux", 3.5))},
    # The models' published sampling settings (model cards): SD3.5 medium, 40 steps, CFG 4.5, shift 3, 1024 px;
    # FLUX.1-dev, 50 steps, guidance 3.5, dynamic shift, 1024 px. Download the models only when run.
    "sd35m": dict(model="stabilityai/stable-diffusion-3.5-medium", T=40, guidance_scale=4.5, shift=3.0,
                  latent_size=[128, 128], eta_plan=0.7, output_dir=os.path.join("runs", "sd35m")),
    "flux-dev": dict(model="black-forest-labs/FLUX.1-dev", T=50, guidance_scale=3.5, latent_size=[128, 128],
                     eta_plan=0.7, output_dir=os.path.join("runs", "flux-dev")),
    # Offline, CPU, a tiny random Wan 2.1 (video transformer, causal video VAE, UMT5): 5 frames of 32x32.
    "tiny-wan": dict(task="t2v", model="tiny-wan", reward="brightness+0.5*temporal", T=4, guidance_scale=5.0,
                     steps=4, batch_size=4, grad_accum=1, lr=1e-2, lora_rank=2, lora_alpha=2.0, eta_plan=0.7,
                     eval_every=2, checkpoint_every=2, eval_num=2, num_frames=5, frames="ends", latent_size=[4, 4],
                     gif_fps=4.0, output_dir=os.path.join("runs", "tiny-wan")),
    # Wan 2.1 T2V 1.3B's published sampling (model card): 480x832, 81 frames, 50 steps, guidance 5, flow shift 3.
    "wan21": dict(task="t2v", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", T=50, guidance_scale=5.0, shift=3.0,
                  num_frames=81, latent_size=[60, 104], eta_plan=0.7, output_dir=os.path.join("runs", "wan21")),
    # VideoCrafter2's official text-to-video sampling (its inference script): DDIM with its latent scale,
    # 50 steps, eta 1, guidance 12, fps 28, 16 frames at 320x512. Downloads the model only when run.
    "videocrafter2": dict(task="t2v", model=VIDEOCRAFTER2_UNET, video_model="videocrafter2", scheduler="ddim", T=50,
                          eta="1.0", guidance_scale=12.0, fps=28.0, num_frames=16, latent_size=[40, 64],
                          output_dir=os.path.join("runs", "videocrafter2")),
}

#: the names diffusers' training scripts and trl give settings that halforder spells otherwise (as flags)
OTHER_NAMES = {"learning_rate": "lr", "train_batch_size": "batch-size", "gradient_accumulation_steps": "grad-accum",
               "resume_from_checkpoint": "resume", "checkpointing_steps": "checkpoint-every",
               "checkpoints_total_limit": "keep-checkpoints", "num_inference_steps": "T",
               "pretrained_model_name_or_path": "model", "max_train_steps": "steps"}

#: The settings of the estimator families, which estimator auto replaces by its search.
SAMPLER_FIELDS = SETTINGS

TINY_PROMPTS = {"t2i": ("a red square", "a blue circle", "a green field", "a yellow sun",
                        "a white cloud", "a black cat", "an orange fox", "a purple flower"),
                "t2v": ("a red ball bouncing", "a blue car driving", "a green tree swaying", "a yellow bird flying",
                        "a white boat sailing", "a black cat jumping")}
TINY_EVAL_PROMPTS = {"t2i": ("a grey stone", "a pink house", "a brown dog", "a silver car"),
                     "t2v": ("a grey horse running", "a pink kite flying")}


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """Reward fine-tuning of a diffusion model's LoRA adapter with a gradient estimator."""

    #: Beyond the loop's: what the sample grids show, and how (not what) the estimate is computed.
    RESUMABLE: ClassVar[frozenset[str]] = LoopConfig.RESUMABLE | {"eval_prompts", "eval_num", "gif_fps", "preset",
                                                                  "gradient_checkpointing", "checkpoint_decode",
                                                                  "compile", "batching"}

    # ------------------------------------------------------------------ model
    task: str = knob("t2i", "t2i (image) or t2v (video: Wan 2.1, UNet3D)", choices=("t2i", "t2v"))
    model: str = knob("CompVis/stable-diffusion-v1-4",
                      "hub id or local folder; tiny, tiny-sd3, tiny-flux, tiny-wan, tiny-qwen-image, tiny-sana")
    revision: str | None = knob(None, "hub revision of the model")
    scheduler: str = knob("ddim", "a UNet model's sampler (flow models and SANA keep theirs)",
                          choices=("ddim", "dpm"))
    noise: str = knob("sde", "flow models, where eta > 0: sde or cps", choices=FLOW_NOISE)
    shift: float | None = knob(None, "flow models: the scheduler's shift")
    t5: bool = knob(True, "SD3: load T5 (off: saves 9.5 GB on SD3.5)")
    T: int = knob(50, "sampler steps of the chain (the paper: 50)")
    guidance_scale: float = knob(7.5, "guidance weight (FLUX: its embedding)")
    negative_prompt: str = knob("", "the prompt of CFG's negative branch")
    mixed_precision: str = knob("no", "the frozen model's dtype (fp16 needs a GPU)", choices=tuple(PRECISIONS))
    gradient_checkpointing: bool = knob(False, "recompute each step's graph in backward")
    checkpoint_decode: bool = knob(False, "recompute the VAE decoder's blocks")
    compile: str = knob("no", f"torch.compile mode: {', '.join(COMPILE_MODES)}", choices=COMPILE_MODES)
    batching: str = knob("vmap", "per-sample parameters by vmap or loop", choices=BATCHING)

    # ------------------------------------------------------------------ data
    prompts: str | None = knob(None, "text file, one training prompt per line")
    eval_prompts: str | None = knob(None, "text file of held-out prompts")
    eval_num: int = knob(4, "held-out prompts in each sample grid")
    dcot: str | None = knob(None, "DCoT prompt file (docs/dcot.md)")
    dcot_split: list[float] | None = knob(None, "DCoT: sizes of the coarse, mid, fine groups")

    # ------------------------------------------------------------------ reward
    reward: str = knob("aesthetic", f"{', '.join(sorted(REWARDS))}; video: also {', '.join(sorted(VIDEO_REWARDS))}")
    reward_kwargs: dict = knob({}, "the reward's options (e.g. a model path)", factory=True)
    eval_rewards: dict = knob({}, "rewards logged beside it, JSON name -> options", factory=True)

    # ------------------------------------------------------------------ estimator
    estimator: str = knob("rlr", f"{', '.join(FAMILIES)}, or auto (the plan search)",
                          choices=(*FAMILIES, "auto"))
    memory_budget: str | None = knob(None, "estimator auto: memory budget, e.g. 2GiB")
    time_budget: str | None = knob(None, "estimator auto: seconds per estimate, e.g. 1s")
    plan_pilots: int = knob(64, "estimator auto: pilots per part of a plan")
    reinforce_window: list[int] | None = knob(None, "reinforce: a b, REINFORCE on steps a..b only")
    step_fraction: float = knob(1.0, "reinforce: share of steps")
    window_length: int | None = knob(None, "reinforce: a window of N steps")
    window_position: str = knob("random", "window: random or sliding", choices=POSITIONS)
    window_every: int = knob(1, "sliding window: updates a move")
    step_weighting: str = knob("unbiased", "unbiased (1/P) or field", choices=WEIGHTINGS)
    h: int = knob(2, "RLR: HO block length")
    k: int = knob(1, "truncated: first-order steps")
    j_sampling: str = knob("uniform", f"RLR, law of j: {', '.join(J_SAMPLING)}", choices=J_SAMPLING)
    j: int | None = knob(None, "RLR, j fixed: the block start")
    j_window: list[int] | None = knob(None, "RLR, j_sampling window: a b")
    j_temperature: float = knob(1.0, "RLR, j_sampling softmax: temperature")
    j_decay: float = knob(0.9, "RLR softmax: norms' decay")
    zo_sigma: float = knob(1e-3, "tau on ZO steps")
    eta: str = knob("plan", "'plan' (eta_plan where HO blocks end) or a number")
    eta_plan: float = knob(0.1, "eta where HO blocks end (DDIM: 0.1)")

    # ------------------------------------------------------------------ LoRA
    lora_rank: int = knob(4, "LoRA rank")
    lora_alpha: float = knob(4.0, "LoRA alpha (the update is alpha / rank x BA)")
    lora_targets: list[str] = knob(list(DEFAULT_TARGETS), "module names that get LoRA", factory=True)

    # ------------------------------------------------------------------ video (task t2v)
    num_frames: int = knob(16, "video: frames (Wan: 4 k + 1)")
    frames: str = knob("random", f"video: {', '.join(FRAME_MODES)} or indices 0,8,15")
    latent_size: list[int] | None = knob(None, "latent height and width")
    video_model: str = knob("t2v", "video: t2v (a diffusers folder) or videocrafter2",
                            choices=("t2v", "videocrafter2"))
    video_base: str = knob(VIDEOCRAFTER2_BASE, "videocrafter2: where its VAE and text encoder are")
    fps: float = knob(24.0, "videocrafter2: frame-rate conditioning")
    gif_fps: float = knob(8.0, "video: frame rate of the GIFs")

    preset: str | None = knob(None, f"{', '.join(PRESETS)}",
                              choices=tuple(PRESETS))

    def check(self) -> None:
        """Raise :class:`~halforder.training.config.ConfigError` on values that cannot work,
        before anything is written."""
        super().check()
        need(self.T >= 1, f"T must be a positive integer, got {self.T!r}")
        if self.estimator == "auto":
            try:
                need(self.memory_budget is not None, "estimator auto needs a memory budget (memory_budget, e.g. 2GiB)")
                parse_bytes(self.memory_budget)
                self.time_budget is None or parse_seconds(self.time_budget)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            need(self.plan_pilots >= 2, f"plan_pilots must be >= 2, got {self.plan_pilots}")
            first_order = True                      # the search times plans with first-order steps
        else:
            self.sampler()                          # h, k, j and the window, by the samplers' own rules
            first_order = FAMILIES[self.estimator].reward_gradient
        what = "searches plans that backpropagate" if self.estimator == "auto" else "backpropagates"
        need(not first_order or differentiable(self.reward), f"the reward {self.reward!r} has no gradient, but "
             f"estimator {self.estimator} {what} through it (first-order steps): use estimator reinforce, "
             "zeroth_order or rlr_no_fo")
        reuse = [n for n, on in (("clip_range", self.clip_range is not None),
                                 ("updates_per_rollout", self.updates_per_rollout > 1), ("kl_beta", self.kl_beta > 0))
                 if on]
        need(not reuse or self.estimator == "reinforce",
             f"{', '.join(reuse)} act on likelihood-ratio steps (PPO's ratio on a recorded rollout), but estimator "
             f"{self.estimator} has pathwise or zeroth-order steps: use estimator reinforce")
        need(self.zo_sigma > 0, f"zo_sigma must be > 0, got {self.zo_sigma}")
        need(self.eta_plan > 0, f"eta_plan must be > 0, got {self.eta_plan}")
        need(self.eta_value() == "plan" or self.eta_value() >= 0, f"eta must be 'plan' or a number >= 0, "
                                                                  f"got {self.eta!r}")
        need(self.guidance_scale >= 0, f"guidance_scale must be >= 0, got {self.guidance_scale}")
        need(self.shift is None or self.shift > 0, f"shift must be > 0, got {self.shift}")
        for name in ("lora_rank", "eval_num", "num_frames"):
            need(getattr(self, name) >= 1, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lora_alpha", "fps", "gif_fps"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(bool(self.lora_targets), "lora_targets must name at least one module")
        need(self.latent_size is None or (len(self.latent_size) == 2 and min(self.latent_size) >= 1),
             f"latent_size must be two positive integers (h w), got {self.latent_size!r}")
        try:
            parse_frames(self.frames)
            if self.task == "t2v" and self.video_model == "videocrafter2":
                family_options(self, "videocrafter2")      # e.g. DPM-Solver, before any download
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.check_rewards()

    def check_rewards(self) -> None:
        """``ConfigError`` unless the reward and every evaluation reward take their options (their
        factories' signatures), before any model is loaded."""
        check = check_video_reward_options if self.task == "t2v" else check_reward_options
        try:
            check(self.reward, self.reward_kwargs)
            for name, options in self.eval_rewards.items():
                check(name, options)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def conditional(self) -> dict[str, tuple[bool, str]]:
        """The settings that only some configurations use: ``name -> (used here, when it is
        used)``. :meth:`check` refuses a value other than the default where it is not used,
        rather than ignore it."""
        video = self.task == "t2v"
        vc2 = video and self.video_model == "videocrafter2"
        auto = (self.estimator == "auto", "estimator auto (with a memory_budget)")
        return {**super().conditional(),
                **self.estimator_settings_used(),
                "memory_budget": (auto[0], "estimator auto, which trains the plan that fits the budget: add "
                                           "--estimator auto"),
                "time_budget": auto, "plan_pilots": auto,
                "eta_plan": (self.eta == "plan", "eta 'plan'"),
                "dcot_split": (self.dcot is not None, "a DCoT prompt file (dcot)"),
                **{name: (video, "task t2v (video)") for name in ("num_frames", "frames", "video_model", "gif_fps")},
                **{name: (vc2, "task t2v and video_model videocrafter2") for name in ("video_base", "fps")}}

    def eta_value(self) -> str | float:
        """``eta`` as the chain takes it: ``"plan"`` or a finite number."""
        if self.eta == "plan":
            return "plan"
        try:
            value = float(self.eta)
        except ValueError:
            value = math.nan
        need(math.isfinite(value), f"eta must be 'plan' or a finite number, got {self.eta!r}")
        return value

    def noise_scales(self) -> NoiseScales:
        """The chain's noise settings: :meth:`eta_value`, ``eta_plan`` and ``zo_sigma``."""
        return NoiseScales(eta=self.eta_value(), eta_plan=self.eta_plan, zo_sigma=self.zo_sigma)

    def estimator_settings_used(self) -> dict[str, tuple[bool, str]]:
        """Each estimator setting, and whether this estimator uses it (from its family's
        description, :data:`~halforder.estimators.families.FAMILIES`)."""
        family = FAMILIES.get(self.estimator)
        values = {k: getattr(self, k) for k in SETTINGS}
        out = {}
        for name in SETTINGS:
            users = [f for f in FAMILIES.values() if name in f.used]
            when = {f.used[name][1] for f in users} - {""}
            needs = f"estimator {' or '.join(f.name for f in users)}" + (f" with {' or '.join(when)}" if when else "")
            used = family is not None and name in family.used and family.uses(name, values)
            out[name] = (used, needs)
        return out

    def sampler(self) -> PlanSampler:
        """The plan sampler of the estimator settings."""
        try:
            return make_sampler(self.estimator, self.T, **{k: getattr(self, k) for k in SETTINGS})
        except ValueError as e:
            raise ConfigError(str(e)) from None


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None,
                preset: str | None = None) -> TrainConfig:
    """Defaults, then ``preset`` (or the file's or the overrides' ``preset``), then the file
    (``.yaml``, ``.yml``, ``.toml`` or ``.json``), then ``overrides`` (entries with value
    None are ignored). Values are coerced to the fields' types; unknown names raise
    :class:`~halforder.training.config.ConfigError`. A value that a later source makes unused
    (a preset's ``eta_plan`` under ``eta=0.7``) gives way to its default
    (:func:`~halforder.training.config.layered`)."""
    data = read_mapping_file(path) if path else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    source = f"config file {path!r}" if path else "config"
    data = coerced(TrainConfig, data, source, {k: v.replace("-", "_") for k, v in OTHER_NAMES.items()})
    preset = overrides.get("preset", data.get("preset", preset))
    layers: list[Mapping[str, Any]] = []
    if preset is not None:
        need(preset in PRESETS, f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        layers.append(dict(PRESETS[preset], preset=preset))
    return from_mapping(TrainConfig, layered(TrainConfig, [*layers, data, overrides]), "config")


def family_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The model-family settings of ``cfg``, the one place a run's family options are read from:
    ``family``, the family the run names (``"videocrafter2"`` for task t2v with video_model
    videocrafter2; None: the model's ``model_index.json`` or tiny name says it), and each setting a
    family takes as an option, by its name (:data:`~halforder.diffusion.models.families.OPTION_SETTINGS`:
    ``scheduler``, ``t5``, ``shift``, ``noise``, ``fps``, ``video_base``). They are the keywords of
    :func:`~halforder.diffusion.models.families.load_components` and
    :func:`~halforder.diffusion.models.families.tiny_model`."""
    family = "videocrafter2" if cfg.task == "t2v" and cfg.video_model == "videocrafter2" else None
    return {"family": family, **{name: getattr(cfg, name) for name in OPTION_SETTINGS}}


def family_options(cfg: TrainConfig, family: str):
    """The options record of the model family named ``family`` under ``cfg``'s settings (``ValueError``
    for a setting the family does not take or a value it refuses)."""
    settings = {k: v for k, v in family_settings(cfg).items() if k != "family"}
    return options_of(named_family(family), repr(cfg.model), **settings)

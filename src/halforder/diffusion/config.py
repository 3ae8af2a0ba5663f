"""Training configuration: one frozen dataclass, every knob documented in one place.

Values come, in increasing precedence, from the field defaults, a preset (``--preset
tiny``), a YAML or TOML file, and command-line overrides:

    cfg = load_config("run.yaml", overrides={"lr": 1e-4})
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..estimators.samplers import FAMILIES, J_SAMPLING
from .video import TINY_VIDEO_PRESET

TINY_MODEL = "tiny"

PRESETS: dict[str, dict[str, Any]] = {
    # Offline, CPU, tiny random components: a smoke run of the whole pipeline in well under 2 minutes.
    "tiny": dict(model=TINY_MODEL, reward="brightness", T=6, guidance_scale=2.0, steps=6, batch_size=2,
                 grad_accum=1, lr=1e-2, lora_rank=2, lora_alpha=2.0, h=2, eval_every=3, checkpoint_every=3,
                 eval_num=4, output_dir=os.path.join("runs", "tiny")),
    # Offline, CPU, a tiny random UNet3D (with --task t2v; see halforder.diffusion.video).
    "tiny-video": TINY_VIDEO_PRESET,
}

TINY_PROMPTS = ("a red square", "a blue circle", "a green field", "a yellow sun",
                "a white cloud", "a black cat", "an orange fox", "a purple flower")
TINY_EVAL_PROMPTS = ("a grey stone", "a pink house", "a brown dog", "a silver car")


@dataclass(frozen=True)
class TrainConfig:
    """Reward fine-tuning of a diffusion model's LoRA adapter with a gradient estimator."""

    # ------------------------------------------------------------------ model
    task: str = "t2i"
    """``"t2i"`` (text-to-image, a UNet2DConditionModel) or ``"t2v"`` (text-to-video, a
    UNet3DConditionModel; its options are in ``halforder.diffusion.video.VideoOptions``)."""
    model: str = "CompVis/stable-diffusion-v1-4"
    """Hub id or local directory (diffusers layout) of the Stable Diffusion model; ``"tiny"``
    builds tiny random components offline (tests, ``--preset tiny``)."""
    revision: str | None = None
    """Hub revision of ``model`` (None: the default branch)."""
    scheduler: str = "ddim"
    """Sampler of the chain: ``"ddim"`` or ``"dpm"`` (DPM-Solver++ SDE, order 2)."""
    T: int = 50
    """Number of sampler steps of the chain (the paper uses 50 DDIM steps)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance weight (1.0 turns guidance off)."""
    mixed_precision: str = "no"
    """``"no"``, ``"bf16"`` or ``"fp16"``, passed to accelerate (autocast where the device allows).
    The estimators' gradients are taken without loss scaling, so prefer bf16 to fp16; and a ZO
    perturbation of relative size zo_sigma / |theta| below bf16's resolution (about 4e-3) is
    partly rounded away inside autocast regions."""
    gradient_checkpointing: bool = False
    """Recompute each step's graph in backward (keeps only the step inputs): memory of full or
    truncated backprop no longer grows with the number of first-order steps, time roughly doubles."""

    # ------------------------------------------------------------------ data
    prompts: str | None = None
    """Text file with one training prompt per line (blank lines ignored). None is allowed only
    with ``model="tiny"``, which then uses a few built-in prompts."""
    eval_prompts: str | None = None
    """Text file of held-out prompts for the sample grids (None: the first ``eval_num``
    training prompts; the tiny model has its own built-in held-out prompts)."""
    eval_num: int = 4
    """Number of held-out prompts (images) in each sample grid."""

    # ------------------------------------------------------------------ reward
    reward: str = "aesthetic"
    """Name in the reward registry (``halforder.diffusion.rewards.REWARDS``)."""
    reward_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward factory (e.g. a local path of the reward model)."""

    # ------------------------------------------------------------------ estimator
    estimator: str = "rlr"
    """Estimator family: ``full``, ``truncated``, ``reinforce``, ``zeroth_order`` or ``rlr``."""
    h: int = 2
    """RLR: length of the half-order block (0 <= h <= T-1; the paper uses 2)."""
    k: int = 1
    """Truncated backprop: length K of the first-order prefix (DRaFT-K / AlignProp)."""
    j_sampling: str = "uniform"
    """RLR: how the block start j is drawn each step: ``uniform``, ``softmax`` (of running
    per-block gradient norms, sec. 4.2), ``window`` (uniform on ``j_window``) or ``fixed`` (``j``)."""
    j: int | None = None
    """RLR with ``j_sampling="fixed"``: the block start (2 <= j <= T-h+1)."""
    j_window: tuple[int, int] | None = None
    """RLR with ``j_sampling="window"``: (a, b), j uniform on a..b, b - a > h (DCoT)."""
    j_temperature: float = 1.0
    """RLR with ``j_sampling="softmax"``: temperature dividing the gradient norms."""
    j_decay: float = 0.9
    """RLR with ``j_sampling="softmax"``: decay of the running average of the gradient norms."""
    zo_sigma: float = 1e-3
    """Standard deviation tau of the parameter noise on zeroth-order steps (paper: 1e-3)."""
    eta: float | str = "plan"
    """DDIM eta: ``"plan"`` puts eta_plan > 0 only where an HO block ends (the paper's recipe),
    a number uses that eta at every step."""
    eta_plan: float = 0.1
    """The eta used at HO block ends when ``eta="plan"`` (paper, App. G: 0.1)."""
    baseline: str | None = "loo"
    """Control variate of the likelihood-ratio terms: ``"loo"`` (leave-one-out batch mean,
    needs batch_size >= 2) or None."""

    # ------------------------------------------------------------------ LoRA
    lora_rank: int = 4
    """LoRA rank of the UNet's attention projections."""
    lora_alpha: float = 4.0
    """LoRA scaling alpha (the update is scaled by alpha / rank)."""

    # ------------------------------------------------------------------ optimisation
    steps: int = 100
    """Number of optimiser updates."""
    lr: float = 5e-4
    """Adam learning rate (paper: 5e-4)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) on the LoRA weights."""
    batch_size: int = 4
    """Samples per micro-batch and process (paper: 4)."""
    grad_accum: int = 2
    """Micro-batches averaged into one update (paper: 2)."""
    clip_norm: float | None = 1.0
    """Clip the gradient's global norm to this value (None: no clipping)."""
    seed: int = 0
    """Seed of every random draw (plans, prompts, noise); process r uses seed + r for its data and noise."""

    # ------------------------------------------------------------------ output
    output_dir: str = os.path.join("runs", "halforder")
    """Directory of metrics.jsonl, checkpoints/, samples/, the final LoRA adapter and config."""
    eval_every: int = 50
    """Write a PNG sample grid of the held-out prompts every this many updates (0: never)."""
    checkpoint_every: int = 50
    """Write a checkpoint every this many updates (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    resume: str | None = None
    """Resume from a checkpoint directory, or ``"latest"`` for the newest in ``output_dir``."""
    progress: bool = True
    """Show a tqdm progress bar (main process only)."""
    preset: str | None = None
    """The preset these values started from (informational; applied by :func:`load_config`)."""

    def __post_init__(self):
        for name in ("adam_betas", "j_window"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))
        object.__setattr__(self, "reward_kwargs", dict(self.reward_kwargs or {}))
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` on values that cannot work, before anything is written."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.task in ("t2i", "t2v"), f"unknown task {self.task!r}; use 't2i' or 't2v'")
        need(self.estimator in FAMILIES, f"unknown estimator {self.estimator!r}; known: {', '.join(FAMILIES)}")
        need(self.j_sampling in J_SAMPLING, f"unknown j sampling {self.j_sampling!r}; known: {', '.join(J_SAMPLING)}")
        need(self.scheduler in ("ddim", "dpm"), f"unknown scheduler {self.scheduler!r}; use 'ddim' or 'dpm'")
        need(isinstance(self.T, int) and self.T >= 1, f"T must be a positive integer, got {self.T!r}")
        if self.estimator == "rlr":
            need(0 <= self.h <= self.T - 1,
                 f"h={self.h} is too large: RLR needs 0 <= h <= T-1 = {self.T - 1} (one first-order step)")
        if self.estimator == "truncated":
            need(1 <= self.k <= self.T, f"truncated backprop needs 1 <= k <= T={self.T}, got k={self.k}")
        need(self.zo_sigma > 0, f"zo_sigma must be > 0, got {self.zo_sigma}")
        need(self.eta == "plan" or (isinstance(self.eta, (int, float)) and self.eta >= 0),
             f"eta must be 'plan' or a number >= 0, got {self.eta!r}")
        need(self.baseline in (None, "loo"), f"baseline must be 'loo' or None, got {self.baseline!r}")
        need(self.baseline != "loo" or self.batch_size >= 2, "the 'loo' baseline needs batch_size >= 2")
        for name in ("steps", "batch_size", "grad_accum", "lora_rank", "eval_num"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.clip_norm is None or self.clip_norm > 0, f"clip_norm must be > 0 or None, got {self.clip_norm}")
        need(self.mixed_precision in ("no", "bf16", "fp16"),
             f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        need(self.j_window is None or len(self.j_window) == 2, f"j_window must be (a, b), got {self.j_window!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples), as written to ``output_dir/config.yaml``."""
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml`` or ``.toml`` file (ValueError on anything else)."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yaml", ".yml"):
        import yaml
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"config file {path!r} is not valid YAML: {e}") from e
    elif ext == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ValueError("TOML config files need Python >= 3.11 or `pip install tomli`; "
                                 "or use a .yaml file") from None
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {path!r} is not valid TOML: {e}") from e
    else:
        raise ValueError(f"config file {path!r} must end in .yaml, .yml or .toml")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of option names to values")
    return data


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None,
                preset: str | None = None) -> TrainConfig:
    """Defaults, then ``preset`` (or the file's ``preset`` key), then the file, then ``overrides``
    (entries with value None are ignored). Unknown keys raise ``ValueError``."""
    data = read_config_file(path) if path else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset = overrides.get("preset", preset or data.get("preset"))
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset], preset=preset)
    for source, d in (("config file", data), ("overrides", overrides)):
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown option(s) in {source}: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(FIELDS))}")
        values.update(d)
    return TrainConfig(**values)

"""Text-to-video: a ``UNet3DConditionModel`` sampler as a chain, with LoRA and rewards on frames.

The chain is D1's :class:`~halforder.diffusion.chain.DiffusionChain` unchanged: the
denoiser is :class:`~halforder.diffusion.chain.ModuleDenoiser` over a UNet3D whose latents
are ``[N, C, F, h, w]`` (F frames), and the DDIM / DPM-Solver steps act elementwise, so
every estimator works as for images. What video adds:

* **Frame subsets** (:func:`frame_indices`). The reward decodes only some frames: one
  random frame per sample, the first/middle/last frames, or all of them. The VAE decodes
  frames independently, so a subset costs (and keeps for backward) only its share of the
  decoder's activations: the main memory lever (``benchmarks/video_memory.py``). The random
  frame is drawn from its own generator, never from the chain's noise, so every plan stays
  unbiased for the objective E_f E[R(frame f)] (the expectation now also over f).
* **fps conditioning** (:class:`FPSUNet3DConditionModel`). VideoCrafter2 adds an embedding
  of the frame rate to the timestep embedding (its UNet's ``forward``:
  ``emb = time_embed(t) + fps_embedding(sinusoid(fps))``). Stock ``UNet3DConditionModel``
  has no such modules: loading the diffusers conversion ``adamdad/videocrafterv2_diffusers``
  into it drops the ``fps_*`` weights with only a log warning, i.e. a silently different
  model. The subclass adds the two modules under the conversion's names and feeds their
  output into the stock ``forward`` through its ``timestep_cond`` channel.
* Loading of the ``TextToVideoSDPipeline`` layout (ModelScope T2V, Zeroscope) and of
  VideoCrafter2 (:func:`load_video_components`, :func:`load_videocrafter2`), tiny random
  parts for tests (:func:`tiny_video_components`), and :class:`VideoTask` for the trainer.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from ..estimators import Plan
from .chain import (DiffusionChain, ModuleDenoiser, Prompts, Schedule, decode_latents, eta_schedule,
                    make_solver, rollout, tau_schedule, text_conditioning)
from .components import SD_SCHEDULER_CONFIG, Components, make_scheduler, tiny_tokenizer

FrameSpec = Union[str, int, Sequence[int]]
FRAME_MODES = ("all", "random", "ends", "first", "middle", "last")
VIDEOCRAFTER2_UNET = "adamdad/videocrafterv2_diffusers"
VIDEOCRAFTER2_BASE = "cerspense/zeroscope_v2_576w"


# ----------------------------------------------------------------------------- fps conditioning
def _fps_unet_class():
    from diffusers import UNet3DConditionModel
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    class _TimeEmbedding(TimestepEmbedding):
        """``TimestepEmbedding`` whose ``condition`` is added to its *output* (the fps
        embedding), with the same parameter names (``linear_1``, ``linear_2``)."""

        def forward(self, sample, condition=None):
            out = super().forward(sample)
            return out if condition is None else out + condition

    class FPSUNet3DConditionModel(UNet3DConditionModel):
        """``UNet3DConditionModel`` with VideoCrafter2's frame-rate conditioning.

        Two modules are added, named as in the diffusers conversion of VideoCrafter2:
        ``fps_proj = Timesteps(c0, flip_sin_to_cos=True, shift=0)`` (VideoCrafter's
        ``timestep_embedding``: [cos, sin] of fps * 10000^(-k/(c0/2))) and
        ``fps_embedding = TimestepEmbedding(c0, 4 c0)`` (linear, SiLU, linear); their output is
        added to the timestep embedding. ``forward`` takes ``fps`` (default: the config's
        ``fps``), so pipelines and :class:`ModuleDenoiser` that never pass it still work.

        Config: ``fps_cond`` (False: exactly the stock model), ``fps`` (default frame rate).
        """

        @register_to_config
        def __init__(self, sample_size=None, in_channels=4, out_channels=4,
                     down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
                     up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
                     block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
                     mid_block_scale_factor=1.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                     cross_attention_dim=1024, attention_head_dim=64, num_attention_heads=None,
                     time_cond_proj_dim=None, fps_cond: bool = True, fps: float = 24.0):
            super().__init__(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                             down_block_types=down_block_types, up_block_types=up_block_types,
                             block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                             downsample_padding=downsample_padding, mid_block_scale_factor=mid_block_scale_factor,
                             act_fn=act_fn, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
                             cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
                             num_attention_heads=num_attention_heads, time_cond_proj_dim=time_cond_proj_dim)
            if not fps_cond:
                return
            if self.config.time_cond_proj_dim is not None:
                raise ValueError("fps conditioning uses the timestep_cond channel; time_cond_proj_dim must be None")
            c0 = self.config.block_out_channels[0]
            act = self.config.act_fn
            self.time_embedding = _TimeEmbedding(c0, 4 * c0, act_fn=act)
            self.fps_proj = Timesteps(c0, True, 0)
            self.fps_embedding = TimestepEmbedding(c0, 4 * c0, act_fn=act)

        def forward(self, sample, timestep, encoder_hidden_states, *args, fps=None, timestep_cond=None, **kwargs):
            if not self.config.fps_cond:
                return super().forward(sample, timestep, encoder_hidden_states, *args,
                                       timestep_cond=timestep_cond, **kwargs)
            if timestep_cond is not None:
                raise ValueError("FPSUNet3DConditionModel uses timestep_cond for the fps embedding; do not pass it")
            fps = self.config.fps if fps is None else fps
            fps = torch.as_tensor(fps, dtype=torch.float32, device=sample.device).reshape(-1)
            fps = fps.expand(sample.shape[0]) if fps.numel() == 1 else fps
            emb = self.fps_embedding(self.fps_proj(fps).to(self.dtype))
            return super().forward(sample, timestep, encoder_hidden_states, *args, timestep_cond=emb, **kwargs)

    return FPSUNet3DConditionModel


_FPS_CLASS = None


def fps_unet_class():
    """The class :class:`FPSUNet3DConditionModel` (built on first use, so that importing this
    module does not import diffusers)."""
    global _FPS_CLASS
    if _FPS_CLASS is None:
        _FPS_CLASS = _fps_unet_class()
    return _FPS_CLASS


def __getattr__(name):  # module-level lazy attribute: FPSUNet3DConditionModel
    if name == "FPSUNet3DConditionModel":
        return fps_unet_class()
    raise AttributeError(name)


# ----------------------------------------------------------------------------- components
def tiny_video_components(seed: int = 0, *, scheduler: str = "ddim", latent_size: int = 8, text_length: int = 16,
                          fps_cond: bool = False, fps: float = 24.0) -> Components:
    """Tiny random text-to-video parts built from configs (no download), frozen, float32, CPU.

    A two-level ``UNet3DConditionModel`` (8 and 16 channels, cross-attention width 16; with
    ``fps_cond`` the :class:`FPSUNet3DConditionModel` of the same size), a tiny
    ``AutoencoderKL`` (latent ``latent_size`` -> image ``2 * latent_size``) and a one-layer
    CLIP text encoder over a byte-level vocabulary. The number of frames is free (chosen by
    the chain). The UNet uses diffusers' classic ``AttnProcessor``, which ``torch.func.vmap``
    batches (per-sample parameter noise), unlike the fused CPU attention kernel.
    """
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(text_length)
    with torch.random.fork_rng(devices=[]):  # the libraries initialise weights from the global RNG
        torch.manual_seed(seed)
        kw = dict(sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                  up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
        unet = fps_unet_class()(**kw, fps_cond=True, fps=fps) if fps_cond else UNet3DConditionModel(**kw)
        # the classic attention processor: torch.func.vmap (per-sample parameters) has a batching
        # rule for its ops, not for the fused CPU attention kernel, which it would run sample by sample
        unet.set_attn_processor(AttnProcessor())
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            layers_per_block=1, norm_num_groups=4, sample_size=2 * latent_size,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=text_length, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16))
    return Components(unet, vae, text_encoder, tokenizer, make_scheduler(scheduler, SD_SCHEDULER_CONFIG)).freeze()


def _looks_local(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model) or model.count("/") > 1


def _offline_hint(what: str, model: str, e: Exception) -> OSError:
    return OSError(f"could not load {what} {model!r}: {e}\nWithout internet access, download it elsewhere "
                   f"(`huggingface-cli download {model} --local-dir DIR`), copy DIR here and pass its path, "
                   f"or set HF_HOME to a cache that holds it.")


def _check_dir(model: str, subfolders: Sequence[str]) -> str:
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {model!r} does not exist. Pass a hub id or a local directory in the "
                                f"diffusers layout (subfolders {', '.join(subfolders)}).")
    missing = [s for s in subfolders if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise FileNotFoundError(f"model directory {model!r} lacks the subfolders {missing}")
    return path


def _load_base(model, unet_cls, *, dtype, device, local_files_only, revision, scheduler, with_unet=True):
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    subs = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if with_unet else \
        ("vae", "text_encoder", "tokenizer", "scheduler")
    if _looks_local(model):
        model = _check_dir(model, subs)
    kw = dict(local_files_only=local_files_only, revision=revision)
    try:
        unet = unet_cls.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kw) if with_unet else None
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw)
        sched = make_scheduler(scheduler, DDIMScheduler.load_config(model, subfolder="scheduler", **kw))
    except (OSError, ValueError) as e:
        raise _offline_hint("the text-to-video model", model, e) from e
    mods = [m.to(device) if m is not None else None for m in (unet, vae, text_encoder)]
    return mods, tokenizer, sched


def load_video_components(model: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                          local_files_only: bool = False, revision: str | None = None,
                          scheduler: str = "ddim") -> Components:
    """A model of the ``TextToVideoSDPipeline`` family (e.g. ``damo-vilab/text-to-video-ms-1.7b``,
    ``cerspense/zeroscope_v2_576w``): hub id or local directory with subfolders ``unet``
    (``UNet3DConditionModel``), ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``.
    The scheduler is rebuilt as DDIM or DPM-Solver (``"ddim"``/``"dpm"``) from its config.

    Raises ``FileNotFoundError`` for a missing local path, ``OSError`` (saying how to point
    at a local copy) when the model cannot be loaded."""
    from diffusers import UNet3DConditionModel

    (unet, vae, te), tok, sched = _load_base(model, UNet3DConditionModel, dtype=dtype, device=device,
                                             local_files_only=local_files_only, revision=revision,
                                             scheduler=scheduler)
    return Components(unet, vae, te, tok, sched).freeze()


def load_videocrafter2(unet: str = VIDEOCRAFTER2_UNET, base: str = VIDEOCRAFTER2_BASE, *, fps: float = 24.0,
                       unet_subfolder: str | None = None, dtype: torch.dtype = torch.float32, device="cpu",
                       local_files_only: bool = False, revision: str | None = None,
                       scheduler: str = "ddim") -> Components:
    """VideoCrafter2 in diffusers format: the converted UNet (``adamdad/videocrafterv2_diffusers``,
    a single ``config.json`` + ``diffusion_pytorch_model.safetensors``; ``unet_subfolder`` if
    your copy keeps it in a subfolder) loaded as :class:`FPSUNet3DConditionModel` with frame
    rate ``fps``, and the VAE, OpenCLIP-H text encoder, tokenizer and scheduler config of a
    ``TextToVideoSDPipeline`` model ``base`` (Zeroscope, as the conversion's own pipeline does).

    Raises ``ValueError`` if the UNet checkpoint has no fps-embedding weights (it is then not
    a VideoCrafter2 conversion: use :func:`load_video_components`)."""
    (_, vae, te), tok, sched = _load_base(base, None, dtype=dtype, device=device, local_files_only=local_files_only,
                                          revision=revision, scheduler=scheduler, with_unet=False)
    if _looks_local(unet) and not os.path.isdir(os.path.expanduser(unet)):
        raise FileNotFoundError(f"VideoCrafter2 UNet path {unet!r} does not exist")
    cls = fps_unet_class()
    kw = dict(local_files_only=local_files_only, torch_dtype=dtype, fps_cond=True, fps=float(fps))
    if unet_subfolder:
        kw["subfolder"] = unet_subfolder
    try:
        model, info = cls.from_pretrained(os.path.expanduser(unet) if _looks_local(unet) else unet,
                                          output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise _offline_hint("the VideoCrafter2 UNet", unet, e) from e
    missing = [k for k in info["missing_keys"] if k.startswith("fps_")]
    if missing:
        raise ValueError(f"{unet!r} has no fps-embedding weights ({missing[:2]}...): not a VideoCrafter2 "
                         "conversion; load a plain UNet3D model with load_video_components")
    return Components(model.to(device), vae, te, tok, sched).freeze()


# ----------------------------------------------------------------------------- frames
def frame_indices(spec: FrameSpec, num_frames: int, n: int, generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
    """The frames the reward decodes, ``[n, k]`` (row i: sample i's frames, in time order).

    ``spec``: ``"all"``; ``"random"`` (one frame per sample, uniform, drawn from
    ``generator``); ``"ends"`` (first, middle = F // 2, last; duplicates dropped when F < 3);
    ``"first"``, ``"middle"``, ``"last"``; an index or a sequence of indices (negative
    indices count from the end)."""
    F = int(num_frames)
    if F < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(spec, str):
        if spec not in FRAME_MODES:
            raise ValueError(f"unknown frame selection {spec!r}; use one of {', '.join(FRAME_MODES)} "
                             f"or frame indices")
        if spec == "random":
            return torch.randint(F, (n, 1), generator=generator, device=device)
        idx = {"all": list(range(F)), "ends": sorted({0, F // 2, F - 1}), "first": [0], "middle": [F // 2],
               "last": [F - 1]}[spec]
    else:
        raw = [spec] if isinstance(spec, int) else list(spec)
        if not raw:
            raise ValueError("an empty list of frames")
        if any(not -F <= int(i) < F for i in raw):
            raise ValueError(f"frame indices {raw} out of range for {F} frames")
        idx = sorted({int(i) % F for i in raw})
    return torch.tensor(idx, device=device).unsqueeze(0).expand(n, -1)


def take_frames(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Latent frames ``[N, k, C, h, w]`` of video latents ``z`` ``[N, C, F, h, w]`` at ``idx`` ``[N, k]``."""
    zf = z.transpose(1, 2)  # [N, F, C, h, w]
    return zf[torch.arange(z.shape[0], device=z.device).unsqueeze(1), idx.to(z.device)]


def decode_frames(vae, z: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Frames ``[N, k, 3, H, W]`` in [0, 1], differentiably, from video latents ``[N, C, F, h, w]``
    (all frames if ``idx`` is None). Frames are decoded independently, as
    ``TextToVideoSDPipeline.decode_latents`` does."""
    if z.dim() != 5:
        raise ValueError(f"video latents must be [N, C, F, h, w], got shape {tuple(z.shape)}")
    if idx is None:
        idx = torch.arange(z.shape[2], device=z.device).unsqueeze(0).expand(z.shape[0], -1)
    lat = take_frames(z, idx)
    n, k = lat.shape[:2]
    img = decode_latents(vae, lat.reshape(n * k, *lat.shape[2:]))
    return img.reshape(n, k, *img.shape[1:])


VideoReward = Callable[[torch.Tensor, list], torch.Tensor]


@dataclass(frozen=True, eq=False)
class DecodedVideoReward:
    """``reward_fn`` of a video chain: latents ``[N, C, F, h, w]`` -> decode the selected
    frames -> ``reward(frames [N, k, 3, H, W] in [0, 1], prompts) -> [N]`` (see
    :mod:`.video_rewards`).

    ``frame_generator`` draws the ``"random"`` frames (the global RNG if None); it is
    separate from the chain's noise, so the frame does not depend on the sample's noise.
    """

    reward: VideoReward
    prompts: tuple[str, ...]
    vae: torch.nn.Module
    frames: FrameSpec = "all"
    frame_generator: torch.Generator | None = None

    def __post_init__(self):
        frame_indices(self.frames, 3, 1, torch.Generator())  # validates the spec early

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        n, k = len(z), len(self.prompts)
        if k not in (1, n):
            raise ValueError(f"{k} reward prompts for {n} samples; give 1 or {n}")
        gen = self.frame_generator
        idx = frame_indices(self.frames, z.shape[2], n, gen, device=gen.device if gen is not None else None)
        return self.reward(decode_frames(self.vae, z, idx), list(self.prompts) * (n // k))


# ----------------------------------------------------------------------------- the chain
def make_video_chain(components: Components, plan: Plan, prompts: Prompts, reward: VideoReward, *,
                     num_frames: int = 16, latent_size: int | tuple[int, int] | None = None,
                     frames: FrameSpec = "all", frame_generator: torch.Generator | None = None,
                     eta: Schedule = "plan", ho_eta: float = 1.0, tau: Schedule = "plan", zo_sigma: float = 1e-3,
                     guidance_scale: float = 7.5, negative_prompt: str = "",
                     reward_prompts: Sequence[str] | None = None, per_sample: str = "vmap") -> DiffusionChain:
    """The text-to-video chain for ``plan``: latents ``[N, C, num_frames, h, w]``.

    Same arguments as :func:`~halforder.diffusion.chain.make_sd_chain` (prompts may be a
    callable ``t -> prompts`` for per-step conditioning, e.g. DCoT), plus

      num_frames: F.
      latent_size: (h, w) of the latent (default: the UNet's ``sample_size``).
      frames, frame_generator: which frames the reward decodes (:func:`frame_indices`).
      reward: a video reward ``(frames [N, k, 3, H, W], prompts) -> [N]``.
    """
    solver = make_solver(components.scheduler, plan.T, eta_schedule(plan, eta, ho_eta))
    context, negative, final = text_conditioning(components, prompts, plan.T, guidance_scale, negative_prompt)
    unet = components.unet
    size = latent_size if latent_size is not None else unet.config.sample_size
    if size is None:
        raise ValueError("the UNet config has no sample_size: pass latent_size=(h, w)")
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if int(num_frames) < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    denoiser = ModuleDenoiser(unet, solver.timesteps, context, negative, guidance_scale, per_sample)
    reward_fn = DecodedVideoReward(reward, tuple(reward_prompts) if reward_prompts is not None else final,
                                   components.vae, frames, frame_generator)
    return DiffusionChain(denoiser, solver, tau_schedule(plan, tau, zo_sigma), reward_fn,
                          (unet.config.in_channels, int(num_frames), *size),
                          float(components.scheduler.init_noise_sigma))


# ----------------------------------------------------------------------------- training task
@dataclass(frozen=True, eq=False)
class VideoTask:
    """Text-to-video with a LoRA adapter, trained on a video reward (the trainer's ``Task``).

    Attributes:
      components: frozen parts; ``components.unet`` (a UNet3D) carries the adapter.
      params: the adapter weights by name.
      reward: a video reward ``(frames [N, k, 3, H, W], prompts) -> [N]``.
      T: sampler steps (the paper uses 25 DDIM steps for video).
      num_frames, latent_size, frames: see :func:`make_video_chain`.
      guidance_scale, eta, eta_plan, zo_sigma, negative_prompt: as ``SDTask``.
      step_prompts: None, or ``prompts -> (t -> prompts)`` (per-step conditioning, DCoT).
    """

    components: Components
    params: dict[str, torch.nn.Parameter]
    reward: VideoReward
    T: int
    num_frames: int = 16
    latent_size: int | tuple[int, int] | None = None
    frames: FrameSpec = "random"
    guidance_scale: float = 7.5
    eta: float | str = "plan"
    eta_plan: float = 0.1
    zo_sigma: float = 1e-3
    negative_prompt: str = ""
    step_prompts: Callable[[Sequence[str]], Callable[[int], Sequence[str]]] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return self.params

    def _chain(self, plan: Plan, prompts: Sequence[str], **kw) -> DiffusionChain:
        prompts = list(prompts)
        p = self.step_prompts(prompts) if self.step_prompts is not None else prompts
        kw.setdefault("eta", self.eta)
        return make_video_chain(self.components, plan, p, self.reward, num_frames=self.num_frames,
                                latent_size=self.latent_size, ho_eta=self.eta_plan, zo_sigma=self.zo_sigma,
                                guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt,
                                reward_prompts=prompts, **kw)

    def chain(self, plan: Plan, prompts: Sequence[str]) -> DiffusionChain:
        return self._chain(plan, prompts, frames=self.frames, frame_generator=torch.Generator(device=self.device))

    def start(self, chain: DiffusionChain, n: int, generator: torch.Generator):
        """x_T from ``generator``; first, the chain's frame generator is seeded from it, so the
        random frames are reproducible (and checkpointed with the trainer's generator) but
        drawn apart from the sample's noise."""
        gen = getattr(chain.reward_fn, "frame_generator", None)
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator, device=generator.device))
        if gen is not None:
            gen.manual_seed(seed)
        return chain.sample_start(n, generator, device=self.device)

    def videos(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Deterministic (eta = 0) samples with the current weights: ``[N, F, 3, H, W]`` in [0, 1]."""
        chain = self._chain(Plan.full(self.T), prompts, eta=0.0, tau=0.0, frames="all")
        z = rollout(chain, {}, chain.sample_start(len(prompts), generator, device=self.device))
        with torch.no_grad():
            return decode_frames(self.components.vae, z)

    def images(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Film strips for the trainer's PNG grids: each video's frames side by side, ``[N, 3, H, F*W]``."""
        v = self.videos(prompts, generator)
        return v.permute(0, 2, 3, 1, 4).reshape(v.shape[0], v.shape[2], v.shape[3], -1)

    def save_adapter(self, directory: str) -> None:
        from .lora import save_lora
        save_lora(self.components.unet, directory)


def write_video(videos: torch.Tensor, path: str, fps: float = 8.0) -> str:
    """Write videos ``[N, F, 3, H, W]`` in [0, 1] as one animated GIF (the N videos side by
    side, 1-pixel gaps, looping) through imageio; returns ``path``."""
    import imageio

    v = videos.detach().float().cpu().clamp(0, 1)
    if v.dim() != 5 or v.shape[2] != 3:
        raise ValueError(f"videos must be [N, F, 3, H, W], got shape {tuple(v.shape)}")
    n, F, _, H, W = v.shape
    strip = torch.ones(F, 3, H, n * (W + 1) - 1)
    for i in range(n):
        strip[..., i * (W + 1):i * (W + 1) + W] = v[i]
    arr = (strip.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.gif"
    imageio.mimsave(tmp, list(arr), duration=1000.0 / fps, loop=0)
    os.replace(tmp, path)
    return path


def write_video_samples(task: VideoTask, prompts: Sequence[str], path: str, seed: int = 0, fps: float = 8.0) -> str:
    """Render ``prompts`` with the task's current weights (fixed seed) and write a GIF."""
    g = torch.Generator(device=task.device).manual_seed(seed)
    return write_video(task.videos(list(prompts), g), path, fps)


# ----------------------------------------------------------------------------- presets
TINY_VIDEO_PROMPTS = ("a red ball bouncing", "a blue car driving", "a green tree swaying", "a yellow bird flying",
                      "a white boat sailing", "a black cat jumping")
TINY_VIDEO_EVAL_PROMPTS = ("a grey horse running", "a pink kite flying")

#: TrainConfig overrides of ``--task t2v --preset tiny-video`` (offline, CPU, well under 3 minutes).
TINY_VIDEO_PRESET: dict[str, Any] = dict(
    task="t2v", model="tiny", reward="brightness+0.5*temporal", T=4, guidance_scale=2.0, steps=4, batch_size=2, grad_accum=1,
    lr=1e-2, lora_rank=2, lora_alpha=2.0, h=2, eta_plan=1.0, zo_sigma=1e-2, eval_every=2, checkpoint_every=2,
    eval_num=2, output_dir=os.path.join("runs", "tiny-video"))


@dataclass(frozen=True)
class VideoOptions:
    """Video settings that ``TrainConfig`` lacks.

    Attributes:
      num_frames: frames per video (VideoCrafter2: 16).
      frames: which frames the reward decodes (``"random"``, ``"ends"``, ``"all"``, ...).
      latent_size: latent (h, w); None: the UNet's ``sample_size`` (VideoCrafter2 at
        320x512: (40, 64)).
      model_kind: ``"t2v"`` (``TextToVideoSDPipeline`` layout) or ``"videocrafter2"``
        (``cfg.model`` is then the converted UNet, ``base`` the VAE/text encoder source).
      base: see ``model_kind``.
      fps: VideoCrafter2's frame-rate conditioning (its conversion's pipeline uses 24; the
        official v2 inference script passes 28).
      gif_fps: frame rate of the written GIFs.
    """

    num_frames: int = 16
    frames: FrameSpec = "random"
    latent_size: int | tuple[int, int] | None = None
    model_kind: str = "t2v"
    base: str = VIDEOCRAFTER2_BASE
    fps: float = 24.0
    gif_fps: float = 8.0


TINY_VIDEO_OPTIONS = VideoOptions(num_frames=4, frames="ends", gif_fps=4.0)


def parse_frames(text: str) -> FrameSpec:
    """A frame selection from the command line: a mode name or comma-separated indices."""
    text = text.strip()
    if text in FRAME_MODES:
        return text
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"frames must be one of {', '.join(FRAME_MODES)} or indices like 0,8,15; got {text!r}") \
            from None


def add_video_arguments(parser) -> None:
    """The ``--task t2v`` flags of ``halforder train`` (all default to None: the preset's or
    :class:`VideoOptions`' values)."""
    v = parser.add_argument_group("text-to-video (--task t2v)")
    v.add_argument("--num-frames", type=int, help="frames per video (default 16; tiny-video: 4)")
    v.add_argument("--frames", help=f"frames the reward decodes: {', '.join(FRAME_MODES)} or indices like 0,8,15 "
                                    "(default random; tiny-video: ends)")
    v.add_argument("--video-model", choices=("t2v", "videocrafter2"),
                   help="t2v: TextToVideoSDPipeline layout; videocrafter2: --model is the converted UNet")
    v.add_argument("--video-base", help=f"videocrafter2: VAE/text-encoder source (default {VIDEOCRAFTER2_BASE})")
    v.add_argument("--fps", type=float, help="videocrafter2: frame-rate conditioning (default 24)")
    v.add_argument("--latent-size", type=int, nargs=2, metavar=("H", "W"),
                   help="latent height and width (default: the UNet's sample_size; 320x512 video: 40 64)")


VIDEO_ARGS = ("num_frames", "frames", "video_model", "video_base", "fps", "latent_size")


def video_options(preset: str | None = None, flags: Mapping[str, Any] | None = None) -> VideoOptions:
    """The :class:`VideoOptions` of a preset (``"tiny-video"``) with the flags of
    :func:`add_video_arguments` on top (``vars(args)``; None values keep the preset's)."""
    f = dict(flags or {})
    base = TINY_VIDEO_OPTIONS if preset == "tiny-video" else VideoOptions()
    given = dict(num_frames=f.get("num_frames"), model_kind=f.get("video_model"), base=f.get("video_base"),
                 fps=f.get("fps"), frames=None if f.get("frames") is None else parse_frames(f["frames"]),
                 latent_size=None if f.get("latent_size") is None else tuple(f["latent_size"]))
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def build_video_task(cfg, options: VideoOptions = VideoOptions(), device="cpu", reward=None) -> VideoTask:
    """The :class:`VideoTask` of a ``TrainConfig`` (``cfg.model == "tiny"``: tiny random parts,
    no download) with a LoRA adapter of ``cfg.lora_rank``; ``reward`` defaults to
    ``make_video_reward(cfg.reward, **cfg.reward_kwargs)``."""
    from .lora import add_lora
    from .video_rewards import make_video_reward, min_frames

    if reward is None:
        reward = make_video_reward(cfg.reward, **dict(cfg.reward_kwargs))
    k = frame_indices(options.frames, options.num_frames, 1, torch.Generator()).shape[1]
    if k < min_frames(reward):
        raise ValueError(f"the reward {cfg.reward!r} needs at least {min_frames(reward)} decoded frames per video, "
                         f"but frames={options.frames!r} decodes {k}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if cfg.model == "tiny":
        comp = tiny_video_components(cfg.seed, scheduler=cfg.scheduler)
    elif options.model_kind == "videocrafter2":
        comp = load_videocrafter2(cfg.model, options.base, fps=options.fps, device=device, revision=cfg.revision,
                                  scheduler=cfg.scheduler, local_files_only=offline)
    elif options.model_kind == "t2v":
        comp = load_video_components(cfg.model, device=device, revision=cfg.revision, scheduler=cfg.scheduler,
                                     local_files_only=offline)
    else:
        raise ValueError(f"unknown video model kind {options.model_kind!r}; use 't2v' or 'videocrafter2'")
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.to(device)
    if isinstance(reward, torch.nn.Module):
        reward.to(device)
    params = add_lora(comp.unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
    for p in params.values():
        p.data = p.data.to(device)
    return VideoTask(comp, params, reward, cfg.T, options.num_frames, options.latent_size, options.frames,
                     cfg.guidance_scale, cfg.eta, cfg.eta_plan, cfg.zo_sigma, device=torch.device(device))


def prepare_video(cfg, device="cpu", options: VideoOptions = VideoOptions()):
    """``--task t2v``: check every input and build (task, sampler, prompts, eval prompts), like
    ``halforder.diffusion.cli.prepare`` does for images; nothing is written."""
    from ..estimators.samplers import make_sampler
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .task import read_prompts
    from .trainer import check_output_dir

    if cfg.prompts is None:
        if cfg.model != "tiny":
            raise ValueError("a prompt file is needed (--prompts FILE, one prompt per line)")
        prompts, eval_prompts = list(TINY_VIDEO_PROMPTS), list(TINY_VIDEO_EVAL_PROMPTS)
    else:
        prompts, eval_prompts = read_prompts(cfg.prompts), None
    if cfg.eval_prompts is not None:
        eval_prompts = read_prompts(cfg.eval_prompts)
    sampler = make_sampler(cfg.estimator, cfg.T, h=cfg.h, k=cfg.k, j_sampling=cfg.j_sampling, j=cfg.j,
                           window=cfg.j_window, temperature=cfg.j_temperature, decay=cfg.j_decay)
    check_output_dir(cfg)
    resume = latest_checkpoint(os.path.join(cfg.output_dir, "checkpoints")) if cfg.resume == "latest" else cfg.resume
    if resume:
        load_checkpoint(resume)   # verified before anything is written
    task = build_video_task(cfg, options, device)
    plan = sampler.sample(sampler.init(), torch.Generator().manual_seed(cfg.seed))
    plan.validate(task.chain(plan, prompts[:1]))   # e.g. an HO block needs eta > 0 where it ends
    return task, sampler, prompts, eval_prompts


def tiny_video_preset():
    """What ``halforder train --task t2v --preset tiny-video`` needs: (TrainConfig overrides,
    :class:`VideoOptions`, sample writer ``(task, prompts, output_dir, seed) -> path``)."""
    options = TINY_VIDEO_OPTIONS

    def writer(task, prompts, output_dir, seed=0):
        return write_video_samples(task, prompts, os.path.join(output_dir, "samples", "final.gif"), seed,
                                   options.gif_fps)
    return dict(TINY_VIDEO_PRESET), options, writer

"""Text-to-video models: loaded (the ``TextToVideoSDPipeline`` layout, VideoCrafter2) or
built tiny from configs for tests (no download).

A video model's parts are :class:`~halforder.diffusion.models.components.Components` like an
image model's, with a ``UNet3DConditionModel`` whose latents are ``[N, C, F, h, w]``
(F frames); the DDIM and DPM-Solver steps act elementwise, so the same chain, task and
estimators serve video (:mod:`halforder.diffusion.models.video.frames` decodes frames for the
reward). VideoCrafter2's parts carry its options (:class:`VideoCrafter2Options`: fps, base
model, sampler and its latent scale :data:`VIDEOCRAFTER2_SCALE`, which every chain of the model
samples with, DDIM only; docs/video.md); its family is :mod:`halforder.diffusion.models.families.videocrafter2`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..components import SD_SCHEDULER_CONFIG, Components, load_parts, make_scheduler, tiny_clip_config, tiny_tokenizer
from ..hub import load_error, local_dir, looks_local, offline
from ..model_options import option, scheduler_option
from ...sampling.solvers import LatentScale, make_solver
from .fps_unet import fps_unet_class

VIDEOCRAFTER2_UNET = "adamdad/videocrafterv2_diffusers"
VIDEOCRAFTER2_BASE = "cerspense/zeroscope_v2_576w"
# VideoCrafter2's forward process scales x_0 by linspace(1, 0.7, 400) over the first 400 training
# timesteps, then 0.7 (its inference config: use_scale true, scale_b 0.7); docs/video.md
VIDEOCRAFTER2_SCALE = LatentScale(1.0, 0.7, 400)


def check_videocrafter2_scheduler(scheduler: str, latent_scale: LatentScale | None = VIDEOCRAFTER2_SCALE) -> None:
    """Raise ``ValueError`` unless the sampler ``scheduler`` (``"ddim"`` or ``"dpm"``) has a
    solver for VideoCrafter2's latent scale (DDIM has; DPM-Solver is refused), before
    anything is loaded."""
    make_solver(make_scheduler(scheduler, SD_SCHEDULER_CONFIG), 1, latent_scale=latent_scale)


@dataclass(frozen=True)
class VideoCrafter2Options:
    """The options of VideoCrafter2 (its family: :mod:`halforder.diffusion.models.families.videocrafter2`).

    Attributes:
      fps: the frame rate its UNet is conditioned on.
      video_base: the ``TextToVideoSDPipeline`` model whose VAE, text encoder and tokenizer it uses.
      scheduler: its sampler: ``"ddim"`` (DPM-Solver has no solver for its latent scale).
      latent_scale: the latent scale of its forward process, which every chain of the model
        samples with (not a run's setting).
    """

    fps: float = option(24.0, "VideoCrafter2 models (task t2v, video_model videocrafter2)")
    video_base: str = option(VIDEOCRAFTER2_BASE, "VideoCrafter2 models (task t2v, video_model videocrafter2)")
    scheduler: str = scheduler_option()
    latent_scale: LatentScale | None = VIDEOCRAFTER2_SCALE

    def __post_init__(self):
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        check_videocrafter2_scheduler(self.scheduler, self.latent_scale)


def tiny_video_components(seed: int = 0, *, scheduler: str = "ddim", latent_size: int = 8, text_length: int = 16,
                          fps_cond: bool = False, fps: float = 24.0,
                          latent_scale: LatentScale | None = None) -> Components:
    """Tiny random text-to-video parts built from configs (no download), frozen, float32, CPU.

    A two-level ``UNet3DConditionModel`` (8 and 16 channels, cross-attention width 16; with
    ``fps_cond`` the :class:`FPSUNet3DConditionModel` of the same size), a tiny
    ``AutoencoderKL`` (latent ``latent_size`` -> image ``2 * latent_size``) and a one-layer
    CLIP text encoder over a byte-level vocabulary. The number of frames is free (chosen by
    the chain). The UNet uses diffusers' classic ``AttnProcessor``, which ``torch.func.vmap``
    batches (per-sample parameter noise), unlike the fused CPU attention kernel.
    ``fps_cond=True, latent_scale=VIDEOCRAFTER2_SCALE`` gives a tiny VideoCrafter2 (family
    ``"videocrafter2"``, whose options carry the scale); without a scale the parts are of family ``"sd"``.
    """
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextModel

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
        text_encoder = CLIPTextModel(tiny_clip_config(len(tokenizer), text_length))
    vc2 = None if latent_scale is None else VideoCrafter2Options(fps, scheduler=scheduler, latent_scale=latent_scale)
    return Components(unet, vae, text_encoder, tokenizer, make_scheduler(scheduler, SD_SCHEDULER_CONFIG),
                      family="sd" if vc2 is None else "videocrafter2", options=vc2).freeze()


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

    return load_parts(model, UNet3DConditionModel, "the text-to-video model", dtype=dtype, device=device,
                      local_files_only=local_files_only, revision=revision, scheduler=scheduler).freeze()


def load_videocrafter2(unet: str = VIDEOCRAFTER2_UNET, base: str = VIDEOCRAFTER2_BASE, *, fps: float = 24.0,
                       unet_subfolder: str | None = None, dtype: torch.dtype = torch.float32, device="cpu",
                       local_files_only: bool = False, revision: str | None = None,
                       scheduler: str = "ddim") -> Components:
    """VideoCrafter2 in diffusers format: the converted UNet (``adamdad/videocrafterv2_diffusers``,
    a single ``config.json`` + ``diffusion_pytorch_model.safetensors``; ``unet_subfolder`` if
    your copy keeps it in a subfolder) loaded as :class:`FPSUNet3DConditionModel` with frame
    rate ``fps``, and the VAE, OpenCLIP-H text encoder and tokenizer of a
    ``TextToVideoSDPipeline`` model ``base`` (Zeroscope, as the conversion's own pipeline does).
    The sampler is VideoCrafter2's own: DDIM on its training schedule (SD v1's scheduler
    settings, whatever ``base`` ships) with :data:`VIDEOCRAFTER2_SCALE`, which the parts
    carry so that every chain of the model uses it (docs/video.md).

    Raises ``ValueError`` for ``scheduler="dpm"`` (before loading anything) and if the UNet
    checkpoint has no fps-embedding weights (it is then not a VideoCrafter2 conversion: use
    :func:`load_video_components`)."""
    options = VideoCrafter2Options(float(fps), base, scheduler)
    parts = load_parts(base, None, "the text-to-video model", dtype=dtype, device=device,
                       local_files_only=local_files_only, revision=revision, scheduler=scheduler)
    if looks_local(unet):
        unet = local_dir(unet, "VideoCrafter2 UNet")
    kw = dict(local_files_only=local_files_only or offline(), torch_dtype=dtype, fps_cond=True, fps=float(fps))
    if unet_subfolder:
        kw["subfolder"] = unet_subfolder
    try:
        model, info = fps_unet_class().from_pretrained(unet, output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise load_error("the VideoCrafter2 UNet", unet, e) from e
    missing = [k for k in info["missing_keys"] if k.startswith("fps_")]
    if missing:
        raise ValueError(f"{unet!r} has no fps-embedding weights ({missing[:2]}...): not a VideoCrafter2 "
                         "conversion; load a plain UNet3D model with load_video_components")
    # VideoCrafter2's schedule: 1000 steps, sqrt-linear betas 0.00085..0.012, epsilon prediction; its
    # DDIM: timesteps range(0, 1000, 1000 // T) + 1, last step to abar_0. These are SD v1's settings.
    return dataclasses.replace(parts, unet=model.to(device), scheduler=make_scheduler(scheduler, SD_SCHEDULER_CONFIG),
                               family="videocrafter2", options=options).freeze()

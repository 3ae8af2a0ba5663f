"""Stable Diffusion 1/2 (and the UNet3D video models, ``TextToVideoSDPipeline`` and
VideoCrafter2): a UNet on CLIP embeddings, DDIM or DPM-Solver, classifier-free guidance
(``StableDiffusionPipeline``)."""
from __future__ import annotations

from ..components import load_sd_components, tiny_components, unet_latent_shape
from ..denoiser import unet_call
from ..solvers import make_solver
from ..text import encode_prompts
from ..video.components import load_video_components
from ..video.frames import video_view
from .protocol import ModelFamily


def _load(model, *, dtype, kw, scheduler="ddim", t5=True, video=False):
    return (load_video_components if video else load_sd_components)(model, dtype=dtype, scheduler=scheduler, **kw)


def _pipeline(c):
    """``StableDiffusionPipeline`` over an image UNet's parts (no safety checker)."""
    import diffusers

    if not isinstance(c.unet, diffusers.UNet2DConditionModel):
        raise ValueError(f"a {type(c.unet).__name__} has no diffusers pipeline that loads LoRA; export its LoRA file")
    return diffusers.StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                             scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def _solver(components, T, latent_shape, noise="sde"):
    return make_solver(components.scheduler, T, latent_scale=components.latent_scale, noise=noise)


FAMILY = ModelFamily(
    name="sd", pipelines={"StableDiffusionPipeline": "t2i", "TextToVideoSDPipeline": "t2v"}, tiny_model="tiny",
    lora_prefix="unet",
    load=_load, tiny=lambda seed, scheduler="ddim": tiny_components(seed, scheduler=scheduler),
    encode=encode_prompts, network=lambda components, shape, w: (unet_call, w),
    latent_shape=lambda components, size: unet_latent_shape(components.unet, size),
    unpack=lambda components, shape: None, solver=_solver, video_view=video_view, pipeline=_pipeline)

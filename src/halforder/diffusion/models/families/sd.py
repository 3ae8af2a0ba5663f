"""Stable Diffusion 1/2 (and the UNet3D video models of ``TextToVideoSDPipeline``): a UNet on CLIP
embeddings, DDIM or DPM-Solver, classifier-free guidance (``StableDiffusionPipeline``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..components import load_sd_components, tiny_components, unet_latent_shape
from ...sampling.denoiser import unet_call
from ...sampling.solvers import make_solver
from ...sampling.text import encode_prompts
from ..video.components import load_video_components, tiny_video_components
from ..video.frames import video_view
from ..model_options import scheduler_option
from .protocol import ModelFamily

SCHEDULERS = ("ddim", "dpm")


@dataclass(frozen=True)
class UNetOptions:
    """The options of a UNet model.

    Attributes:
      scheduler: its sampler, ``"ddim"`` or ``"dpm"`` (``DPMSolverMultistepScheduler``), built from
        the model's scheduler config.
    """

    scheduler: str = scheduler_option()

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; use 'ddim' or 'dpm'")


def load(model, *, pipeline_class, options: UNetOptions, dtype, kw):
    """An SD 1/2 folder or hub id, or a UNet3D text-to-video one (``TextToVideoSDPipeline``)."""
    video = pipeline_class == "TextToVideoSDPipeline"
    return (load_video_components if video else load_sd_components)(model, dtype=dtype, scheduler=options.scheduler,
                                                                     **kw)


def tiny(seed: int = 0, *, pipeline_class: str = "StableDiffusionPipeline", options: UNetOptions | None = None):
    """Tiny random SD parts, or a tiny UNet3D text-to-video model (``TextToVideoSDPipeline``)."""
    video = pipeline_class == "TextToVideoSDPipeline"
    options = options or UNetOptions()
    return (tiny_video_components if video else tiny_components)(seed, scheduler=options.scheduler)


def pipeline(c):
    """``StableDiffusionPipeline`` over an image UNet's parts (no safety checker)."""
    import diffusers

    if not isinstance(c.unet, diffusers.UNet2DConditionModel):
        raise ValueError(f"a {type(c.unet).__name__} has no diffusers pipeline that loads LoRA; export its LoRA file")
    return diffusers.StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                             scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def solver(components, T, latent_shape):
    """DDIM or DPM-Solver of the scheduler, with the model's latent scale (VideoCrafter2's)."""
    return make_solver(components.scheduler, T, latent_scale=components.latent_scale)


def latent_shape(components, size):
    """``(C, h, w)`` (video: ``(C, F, h, w)`` by the view) of the UNet's latents."""
    return unet_latent_shape(components.unet, size)


FAMILY = ModelFamily(
    name="sd", title="an SD 1/2 or UNet3D model",
    pipelines={"StableDiffusionPipeline": "t2i", "TextToVideoSDPipeline": "t2v"}, tiny_model="tiny",
    lora_prefix="unet", options=UNetOptions, load=load, tiny=tiny, encode=encode_prompts,
    network=lambda components, shape, w: (unet_call, w), latent_shape=latent_shape,
    unpack=lambda components, shape: None, solver=solver, video_view=video_view, pipeline=pipeline)

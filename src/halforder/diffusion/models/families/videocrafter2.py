"""VideoCrafter2: a UNet3D text-to-video model with frame-rate conditioning
(:class:`~halforder.diffusion.models.video.fps_unet.FPSUNet3DConditionModel`) and a latent scale in its
forward process, which every chain of the model samples with (DDIM only; docs/video.md).

Its converted UNet (``adamdad/videocrafterv2_diffusers``) has no ``model_index.json``: the family is
named by a run (``video_model videocrafter2``), and its VAE, OpenCLIP-H text encoder and tokenizer
come from a ``TextToVideoSDPipeline`` model (``video_base``). Prompts, the network's call, the
solver and the video view are SD's (:mod:`.sd`).
"""
from __future__ import annotations

from ...sampling.text import encode_prompts
from ..video.components import VideoCrafter2Options, load_videocrafter2, tiny_video_components
from ..video.frames import video_view
from . import sd
from .protocol import ModelFamily, video_only


def load(model, *, pipeline_class, options: VideoCrafter2Options, dtype, kw):
    """The converted UNet ``model`` with the parts of ``options.video_base``
    (:func:`~halforder.diffusion.models.video.components.load_videocrafter2`)."""
    return load_videocrafter2(model, options.video_base, fps=options.fps, scheduler=options.scheduler, dtype=dtype,
                              **kw)


def tiny(seed: int = 0, *, pipeline_class=None, options: VideoCrafter2Options | None = None):
    """A tiny VideoCrafter2: a tiny fps-conditioned UNet3D with the latent scale, no download."""
    options = options or VideoCrafter2Options()
    return tiny_video_components(seed, scheduler=options.scheduler, fps_cond=True, fps=options.fps,
                                 latent_scale=options.latent_scale)


FAMILY = ModelFamily(
    name="videocrafter2", title="a VideoCrafter2 model", pipelines={"TextToVideoSDPipeline": "t2v"},
    tiny_model="tiny-videocrafter2", lora_prefix="unet", options=VideoCrafter2Options, load=load, tiny=tiny,
    encode=encode_prompts, network=sd.FAMILY.network, latent_shape=video_only("VideoCrafter2"),
    unpack=sd.FAMILY.unpack, solver=sd.solver, video_view=video_view, pipeline=sd.pipeline)

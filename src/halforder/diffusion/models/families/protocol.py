"""What a model family adds to the shared machinery: one frozen record of functions.

A family is one kind of diffusers pipeline (SD 1/2, SD3, FLUX, Wan, Qwen-Image, SANA,
VideoCrafter2). The chain, the solvers, the estimators, the task, the training loop and the CLI are
shared; a family says which options it takes and how they adjust its parts, how its parts load,
how prompts become conditioning, how its network is called and its guidance combined, what its
latents look like, how they decode and which sampler schedule its pipeline uses. A new family is
one module defining a :class:`ModelFamily` and one entry in the registry
(:mod:`halforder.diffusion.models.families`).
Below it, the pieces the flow-matching families share.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.func import functional_call

from ..components import Components
from ...sampling.denoiser import Conditioning, Guidance, NetworkCall, cfg
from ..model_options import option
from ...sampling.solvers import FLOW_NOISE, make_solver
from ...sampling.views import Decoder, decode_latents


@dataclass(frozen=True)
class FlowOptions:
    """The options of a flow-matching model (``FlowMatchEulerDiscreteScheduler``): its sampler's settings.

    Attributes:
      shift: the scheduler's shift (None: the model's own).
      noise: the sampler's stochastic family where eta > 0: ``"sde"`` (Flow-GRPO's reverse SDE) or
        ``"cps"`` (coefficient-preserving sampling); the family's ``solver`` reads it (:func:`flow_noise`).
    """

    shift: float | None = option(None, "flow-matching models (SD3, FLUX, Wan, Qwen-Image)")
    noise: str = option("sde", "flow-matching models (SD3, FLUX, Wan) and Qwen-Image, where eta > 0", verb="is for")

    def __post_init__(self):
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.noise not in FLOW_NOISE:
            raise ValueError(f"noise must be one of {', '.join(FLOW_NOISE)}, got {self.noise!r}")


def flow_noise(components: Components) -> str:
    """The flow noise family that the components' options record carries (``"sde"`` where it carries
    none: parts put together by hand, or a family that takes no ``noise``)."""
    return getattr(components.options, "noise", "sde")


def keep(components: Components, options) -> Components:
    """The parts as they were made (a family whose options need no adjustment)."""
    return components


def shifted(components: Components, options: FlowOptions) -> Components:
    """The parts with the scheduler rebuilt at ``options.shift`` (unchanged where it is None)."""
    if options.shift is None:
        return components
    sched = components.scheduler
    return dataclasses.replace(components, scheduler=type(sched).from_config(sched.config, shift=options.shift))


@dataclass(frozen=True)
class ModelFamily:
    """One model family.

    Attributes:
      name: the name a :class:`~halforder.diffusion.models.components.Components` carries (``family``).
      title: what a model of the family is called in messages (``"a FLUX.1 model"``).
      pipelines: the ``_class_name`` values of ``model_index.json`` that this family loads, each
        with what it generates: ``"t2i"`` (images) or ``"t2v"`` (video).
      tiny_model: the model name that builds its tiny random parts offline (e.g. ``"tiny-sd3"``).
      lora_prefix: the key prefix of its LoRA files (``"unet"`` or ``"transformer"``).
      options: the frozen record type of its options (e.g. SD3's ``t5`` and ``shift``); its fields
        made with :func:`~halforder.diffusion.models.model_options.option` are settings of a run, of the same
        name in ``TrainConfig``, and its ``__post_init__`` refuses values the family cannot take. A
        setting that another family takes is refused unless at its default
        (:func:`~halforder.diffusion.models.model_options.make_options`).
      load: ``(model, *, pipeline_class, options, dtype, kw) -> Components``: the model's parts
        (``pipeline_class``: one of ``pipelines``; ``kw``: ``from_pretrained``'s
        ``local_files_only`` and ``revision``; not frozen, on the CPU).
      tiny: ``(seed, *, pipeline_class, options) -> Components``: tiny random parts, frozen.
      encode: ``(components, prompts) -> conditioning`` rows ``[N, ...]``, as the pipeline encodes.
      network: ``(components, latent_shape, guidance_scale) -> (call, cfg_weight)``: how the
        network is called and the classifier-free-guidance weight (1: none).
      latent_shape: ``(components, size) -> shape`` of one latent as the chain holds it
        (``size``: None, an int or (h, w) of the VAE latent).
      unpack: ``(components, latent_shape) -> f or None``: the chain's latents ``[N, ...]`` as the
        VAE's ``[N, C, h, w]`` (None: already so).
      solver: ``(components, T, latent_shape) -> solver`` with the pipeline's schedule and the
        sampler's settings of ``components.options`` (a flow model's ``noise``: :func:`flow_noise`).
      video_view: ``(components, num_frames, frames, latent_size) -> view`` of a text-to-video
        model (:class:`~halforder.diffusion.models.video.frames.VideoView`); None for an image model.
      pipeline: ``components -> diffusers pipeline`` over the parts (e.g. to save a model
        folder with ``save_pretrained``).
      guidance: ``(uncond, cond, w) -> output``: how classifier-free guidance combines the network's
        two outputs (default: u + w (c - u)).
      decode: ``(vae, z) -> what the reward sees`` of the VAE's latents (after ``unpack``),
        differentiably: images ``[N, 3, H, W]`` in [0, 1] (default:
        :func:`~halforder.diffusion.sampling.views.decode_latents`); a video model's frames ``[N, F, 3, H, W]``.
      adjust: ``(components, options) -> components``: what the options change in loaded or
        tiny parts (e.g. SD3 without T5, a flow scheduler's shift); default: nothing.
    """

    name: str
    title: str
    pipelines: Mapping[str, str]
    tiny_model: str
    lora_prefix: str
    options: type
    load: Callable[..., Components]
    tiny: Callable[..., Components]
    encode: Callable[[Components, Sequence[str]], Conditioning]
    network: Callable[[Components, tuple, float], tuple[NetworkCall, float]]
    latent_shape: Callable[[Components, Any], tuple[int, ...]]
    unpack: Callable[[Components, tuple], Callable | None]
    solver: Callable[..., Any]
    video_view: Callable[..., Any] | None = None
    pipeline: Callable[[Components], Any] | None = None
    guidance: Guidance = cfg
    decode: Decoder = decode_latents
    adjust: Callable[[Components, Any], Components] = keep

    def pipeline_for(self, video: bool) -> str:
        """The pipeline class that generates video (``video``) or images, where the family has one;
        else its first."""
        want = "t2v" if video else "t2i"
        return next((p for p, made in self.pipelines.items() if made == want), next(iter(self.pipelines)))


def video_only(name: str) -> Callable:
    """The ``latent_shape`` of a text-to-video family (``name``): the image task is refused."""
    def latent_shape(components, size=None):
        raise ValueError(f"{name} is a text-to-video model: train it with task t2v")
    return latent_shape


def transformer_call(module, params, x, timestep, c):
    """A diffusion transformer's output, called as SD3's and Wan's pipelines call it: the
    hidden states, the timestep (sigma * 1000) per sample and the conditioning by name."""
    kwargs = dict(hidden_states=x, timestep=timestep.expand(x.shape[0]), **c)
    return functional_call(module, params, (), kwargs).sample


def latent_hw(size, default: int) -> tuple[int, int]:
    """``(h, w)`` of a latent: ``size`` (an int or (h, w)) or ``default``."""
    size = default if size is None else size
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


def packed_solver(c: Components, T: int, shape):
    """The schedule of a pipeline over 2x2-packed latents ``[h/2, w/2, 4C]`` (FLUX, Qwen-Image):
    sigmas linspace(1, 1/T, T), shifted by mu from the number of packed tokens."""
    import numpy as np

    mu = dynamic_shift(c.scheduler.config, shape[0] * shape[1], 1.15)
    return make_solver(c.scheduler, T, noise=flow_noise(c), mu=mu, sigmas=np.linspace(1.0, 1 / T, T))


def dynamic_shift(config, seq_len: int, max_shift: float) -> float:
    """The dynamic shift mu of a flow-matching pipeline for ``seq_len`` image tokens: linear
    from ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``
    (the scheduler config's values, with the pipeline's defaults)."""
    b0, b1 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    s0, s1 = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    return s0 + (s1 - s0) * (seq_len - b0) / (b1 - b0)


def t5_embeddings(tokenizer, encoder, prompts, length):
    """T5's last hidden states ``[N, length, D]`` (max-length padding, as the pipelines)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(encoder.device))[0]


def unpack_patches(z):
    """Packed 2x2 latent patches ``[N, h/2, w/2, 4C]`` -> the VAE's latents ``[N, C, h, w]`` (channel
    ``4c + 2i + j`` of a patch is channel c at offset (i, j), as FLUX and Qwen-Image pack them)."""
    n, h2, w2, ch = z.shape
    return z.view(n, h2, w2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, ch // 4, 2 * h2, 2 * w2)


def unnormalise(vae, z):
    """Latents ``[N, C, F, h, w]`` of a video VAE (Wan's, Qwen-Image's) at the VAE's scale:
    z * latents_std + latents_mean per channel, written as the pipelines compute it."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
    return z / inv_std + mean


def tiny_vae(shift: float, scale: float):
    """A tiny ``AutoencoderKL`` without quant convs (as SD3's and FLUX's): 4 latent channels, 2x."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, sample_size=16, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def flow_pipeline(name: str, c: Components):
    """The diffusers pipeline ``name`` over a flow model's parts (the network as its ``transformer``)."""
    import diffusers

    return getattr(diffusers, name)(**c.parts)

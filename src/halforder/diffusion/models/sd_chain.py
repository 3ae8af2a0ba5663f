"""The chain builder: a diffusion model, a batch of prompts and a reward as a chain.

:func:`make_chain` builds a :class:`~halforder.diffusion.sampling.chain.DiffusionChain` without
noise (eta = 0, tau = 0) for T steps; give it a plan's noise with ``.for_plan(plan)``
or any scales with ``.with_noise(etas, taus)``. A *view* says what the reward sees of the
final latent: :class:`ImageView` (decoded images, the default) or the video view
(:class:`halforder.diffusion.models.video.frames.VideoView`: decoded frames).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..sampling.chain import DiffusionChain
from .components import Components
from ..sampling.denoiser import ModuleDenoiser
from .families import family_of, prompt_encoder
from ..sampling.text import Prompts, text_conditioning
from ..sampling.views import ImageView, Reward, View


def image_view(components: Components, latent_size=None) -> ImageView:
    """The :class:`ImageView` of a text-to-image model at ``latent_size`` (None: its default), with its
    family's unpacking and decoder."""
    family = family_of(components)
    shape = family.latent_shape(components, latent_size)
    return ImageView(components.vae, shape, family.unpack(components, shape), family.decode)


def model_solver(components: Components, T: int, latent_shape: tuple[int, ...] | None = None):
    """The solver of T steps for ``components``, as its pipeline schedules it (the latent shape
    sets a flow model's dynamic shift; default: the model's own size), with the sampler's settings
    of ``components.options`` (a flow model's shift and noise family, VideoCrafter2's latent scale).
    Every chain of a model gets its solver here."""
    family = family_of(components)
    shape = latent_shape if latent_shape is not None else family.latent_shape(components, None)
    return family.solver(components, T, shape)


def make_chain(components: Components, T: int, prompts: Prompts, reward: Reward, *, view: View | None = None,
               guidance_scale: float = 7.5, negative_prompt: str = "", reward_prompts: Sequence[str] | None = None,
               batching: str = "vmap", encoder: Callable | None = None, solver=None,
               generator: torch.Generator | None = None, compile: str | None = None) -> DiffusionChain:
    """The chain of ``components`` for T steps and a batch of prompts, without noise.

    Args:
      components: a :class:`~halforder.diffusion.models.components.Components` (DDIM or DPM scheduler;
        no text encoder: an unconditional model; no VAE: a pixel-space model).
      T: sampler steps.
      prompts: N prompts used at every step, or a callable ``t -> N prompts`` (per-step
        conditioning, e.g. DCoT). A single prompt is broadcast over any number of samples.
      reward: ``(what the view decodes, prompts) -> [N]`` (see :mod:`halforder.diffusion.rewards`).
      view: what the reward sees (default: :func:`image_view` at the model's own size).
      guidance_scale, negative_prompt: classifier-free guidance (FLUX: the guidance embedding).
      reward_prompts: the prompts the reward sees (default: the prompts of step 1).
      batching: how per-sample parameters reach the UNet
        (:class:`~halforder.diffusion.sampling.denoiser.ModuleDenoiser`).
      encoder: prompts -> conditioning (default: a fresh :func:`~.families.prompt_encoder`).
      solver: the solver of T steps (default: :func:`model_solver`).
      generator: draws the randomness of the view (random video frames).
      compile: None, or a ``torch.compile`` mode for the denoiser
        (:class:`~halforder.diffusion.sampling.denoiser.ModuleDenoiser`).
    """
    unet, family = components.unet, family_of(components)
    view = view if view is not None else image_view(components)
    solver = solver if solver is not None else model_solver(components, T, view.latent_shape)
    if encoder is None:
        encoder = prompt_encoder(components)
    call, cfg_weight = family.network(components, view.latent_shape, guidance_scale)
    context, negative, final = text_conditioning(encoder, prompts, T, cfg_weight, negative_prompt)
    denoiser = ModuleDenoiser(unet, solver.timesteps, context, negative, cfg_weight, batching, compile, call,
                              family.guidance)
    reward_fn = view.reward_fn(reward, list(reward_prompts) if reward_prompts is not None else list(final), generator)
    return DiffusionChain(denoiser, solver, 0.0, reward_fn, view.latent_shape,
                          float(getattr(components.scheduler, "init_noise_sigma", 1.0)), next(unet.parameters()).device)

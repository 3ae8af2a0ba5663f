"""The chain builder: a diffusion model, a batch of prompts and a reward as a chain.

:func:`make_chain` builds a :class:`~halforder.diffusion.chain.DiffusionChain` without
noise (eta = 0, tau = 0) for T steps; give it a plan's noise with ``.for_plan(plan)``
or any scales with ``.with_noise(etas, taus)``. A *view* says what the reward sees of the
final latent: :class:`ImageView` (decoded images, the default) or the video view
(:class:`halforder.diffusion.video.frames.VideoView`: decoded frames).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .chain import DiffusionChain
from .components import Components
from .denoiser import ModuleDenoiser
from .families import family_of, prompt_encoder
from .text import Prompts, text_conditioning

Reward = Callable[[torch.Tensor, list], torch.Tensor]


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from latents, differentiably (as the pipelines' decode + postprocess:
    z / scaling_factor + shift_factor, the shift being SD3's and FLUX's), in the latents' dtype
    whatever the VAE's; with ``vae=None`` the latents are already images in [-1, 1]."""
    if vae is None:
        img = z
    else:
        z = z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        img = vae.decode(z.to(vae.dtype)).sample.to(z.dtype)
    return (img / 2 + 0.5).clamp(0, 1)


@dataclass(frozen=True, eq=False)
class DecodedReward:
    """``reward_fn`` for a chain: latents -> images in [0, 1] -> ``reward(images, prompts)``."""

    reward: Reward
    prompts: tuple[str, ...]
    vae: torch.nn.Module | None = None
    unpack: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        n, k = len(z), len(self.prompts)
        if k not in (1, n):
            raise ValueError(f"{k} reward prompts for {n} samples; give 1 or {n}")
        z = z if self.unpack is None else self.unpack(z)
        return self.reward(decode_latents(self.vae, z), list(self.prompts) * (n // k))


class View(Protocol):
    """What the reward and the previews see of a final latent."""

    latent_shape: tuple[int, ...]

    def reward_fn(self, reward: Reward, prompts: Sequence[str], generator: torch.Generator | None
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The chain's ``reward_fn`` for a batch; ``generator`` draws any randomness it needs."""

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] of final latents, for sample grids."""


@dataclass(frozen=True, eq=False)
class ImageView:
    """Images: the VAE's decoding of latents ``[C, H, W]`` (pixels when ``vae`` is None);
    ``unpack`` first turns the chain's latents into the VAE's (FLUX's packed patches)."""

    vae: torch.nn.Module | None
    latent_shape: tuple[int, ...]
    unpack: Callable[[torch.Tensor], torch.Tensor] | None = None

    def reward_fn(self, reward: Reward, prompts: Sequence[str], generator=None) -> DecodedReward:
        return DecodedReward(reward, tuple(prompts), self.vae, self.unpack)

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return decode_latents(self.vae, z if self.unpack is None else self.unpack(z))


def image_view(components: Components, latent_size=None) -> ImageView:
    """The :class:`ImageView` of a text-to-image model at ``latent_size`` (None: its default)."""
    family = family_of(components)
    shape = family.latent_shape(components, latent_size)
    return ImageView(components.vae, shape, family.unpack(components, shape))


def model_solver(components: Components, T: int, latent_shape: tuple[int, ...] | None = None, noise: str = "sde"):
    """The solver of T steps for ``components``, as its pipeline schedules it (the latent shape
    sets a flow model's dynamic shift; default: the model's own size); with the model's latent
    scale (VideoCrafter2); ``noise``: a flow model's stochastic family. Every chain of a model
    gets its solver here."""
    family = family_of(components)
    shape = latent_shape if latent_shape is not None else family.latent_shape(components, None)
    return family.solver(components, T, shape, noise)


def make_chain(components: Components, T: int, prompts: Prompts, reward: Reward, *, view: View | None = None,
               guidance_scale: float = 7.5, negative_prompt: str = "", reward_prompts: Sequence[str] | None = None,
               batching: str = "vmap", encoder: Callable | None = None, solver=None,
               generator: torch.Generator | None = None, compile: str | None = None) -> DiffusionChain:
    """The chain of ``components`` for T steps and a batch of prompts, without noise.

    Args:
      components: a :class:`~halforder.diffusion.components.Components` (DDIM or DPM scheduler;
        no text encoder: an unconditional model; no VAE: a pixel-space model).
      T: sampler steps.
      prompts: N prompts used at every step, or a callable ``t -> N prompts`` (per-step
        conditioning, e.g. DCoT). A single prompt is broadcast over any number of samples.
      reward: ``(what the view decodes, prompts) -> [N]`` (see :mod:`.rewards`).
      view: what the reward sees (default: :func:`image_view` at the model's own size).
      guidance_scale, negative_prompt: classifier-free guidance (FLUX: the guidance embedding).
      reward_prompts: the prompts the reward sees (default: the prompts of step 1).
      batching: how per-sample parameters reach the UNet (:class:`~.denoiser.ModuleDenoiser`).
      encoder: prompts -> conditioning (default: a fresh :func:`~.families.prompt_encoder`).
      solver: the solver of T steps (default: :func:`model_solver`).
      generator: draws the randomness of the view (random video frames).
      compile: None, or a ``torch.compile`` mode for the denoiser (:class:`~.denoiser.ModuleDenoiser`).
    """
    unet, family = components.unet, family_of(components)
    view = view if view is not None else image_view(components)
    solver = solver if solver is not None else model_solver(components, T, view.latent_shape)
    if encoder is None:
        encoder = prompt_encoder(components)
    call, cfg_weight = family.network(components, view.latent_shape, guidance_scale)
    context, negative, final = text_conditioning(encoder, prompts, T, cfg_weight, negative_prompt)
    denoiser = ModuleDenoiser(unet, solver.timesteps, context, negative, cfg_weight, batching, compile, call)
    reward_fn = view.reward_fn(reward, list(reward_prompts) if reward_prompts is not None else list(final), generator)
    return DiffusionChain(denoiser, solver, 0.0, reward_fn, view.latent_shape,
                          float(getattr(components.scheduler, "init_noise_sigma", 1.0)), next(unet.parameters()).device)

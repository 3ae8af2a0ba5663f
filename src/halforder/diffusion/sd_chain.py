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
from .solvers import make_solver
from .text import Prompts, PromptEncoder, text_conditioning

Reward = Callable[[torch.Tensor, list], torch.Tensor]


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from SD latents, differentiably (as the pipeline's decode +
    postprocess), in the latents' dtype whatever the VAE's; with ``vae=None`` the latents
    are already images in [-1, 1]."""
    img = z if vae is None else vae.decode((z / vae.config.scaling_factor).to(vae.dtype)).sample.to(z.dtype)
    return (img / 2 + 0.5).clamp(0, 1)


@dataclass(frozen=True, eq=False)
class DecodedReward:
    """``reward_fn`` for a chain: latents -> images in [0, 1] -> ``reward(images, prompts)``."""

    reward: Reward
    prompts: tuple[str, ...]
    vae: torch.nn.Module | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        n, k = len(z), len(self.prompts)
        if k not in (1, n):
            raise ValueError(f"{k} reward prompts for {n} samples; give 1 or {n}")
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
    """Images: the VAE's decoding of latents ``[C, H, W]`` (pixels when ``vae`` is None)."""

    vae: torch.nn.Module | None
    latent_shape: tuple[int, ...]

    def reward_fn(self, reward: Reward, prompts: Sequence[str], generator=None) -> DecodedReward:
        return DecodedReward(reward, tuple(prompts), self.vae)

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return decode_latents(self.vae, z)


def unet_latent_shape(unet, latent_size=None) -> tuple[int, ...]:
    """``(C, h, w)`` of the UNet's latents: ``latent_size`` (an int or (h, w)) or its
    config's ``sample_size``."""
    size = latent_size if latent_size is not None else unet.config.sample_size
    if size is None:
        raise ValueError("the UNet config has no sample_size: give the latent size (h, w)")
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    return (unet.config.in_channels, *size)


def model_solver(components: Components, T: int):
    """The solver of T steps for ``components``: its scheduler's, with the model's latent
    scale (VideoCrafter2); every chain of a model gets its solver here."""
    return make_solver(components.scheduler, T, latent_scale=components.latent_scale)


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
      view: what the reward sees (default: :class:`ImageView` of the VAE and the UNet's sample size).
      guidance_scale, negative_prompt: classifier-free guidance.
      reward_prompts: the prompts the reward sees (default: the prompts of step 1).
      batching: how per-sample parameters reach the UNet (:class:`~.denoiser.ModuleDenoiser`).
      encoder: prompts -> embeddings (default: a fresh :class:`~.text.PromptEncoder`).
      solver: the solver of T steps (default: :func:`model_solver`).
      generator: draws the randomness of the view (random video frames).
      compile: None, or a ``torch.compile`` mode for the denoiser (:class:`~.denoiser.ModuleDenoiser`).
    """
    unet = components.unet
    solver = solver if solver is not None else model_solver(components, T)
    if encoder is None and components.text_encoder is not None:
        encoder = PromptEncoder(components)
    context, negative, final = text_conditioning(encoder, prompts, T, guidance_scale, negative_prompt)
    view = view if view is not None else ImageView(components.vae, unet_latent_shape(unet))
    denoiser = ModuleDenoiser(unet, solver.timesteps, context, negative, guidance_scale, batching, compile)
    reward_fn = view.reward_fn(reward, list(reward_prompts) if reward_prompts is not None else list(final), generator)
    return DiffusionChain(denoiser, solver, 0.0, reward_fn, view.latent_shape,
                          float(components.scheduler.init_noise_sigma), next(unet.parameters()).device)

"""Views: what the reward and the previews see of a chain's final latent.

:class:`ImageView` decodes images with its model family's decoder (by default
:func:`decode_latents`, as the image pipelines decode); the video view (:class:`halforder.diffusion.models.video.frames.VideoView`) decodes frames. A view
gives a chain its ``reward_fn`` for a batch of prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch

Reward = Callable[[torch.Tensor, list], torch.Tensor]
#: ``decode(vae, z) -> images [N, 3, H, W]`` in [0, 1] of the VAE's latents ``z``, differentiably (``vae``
#: None: a pixel-space model's images): :func:`decode_latents`, or a model family's
Decoder = Callable[[Optional[torch.nn.Module], torch.Tensor], torch.Tensor]


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
    """``reward_fn`` for a chain: latents -> (``unpack``) the VAE's latents -> (``decode``) images in
    [0, 1] -> ``reward(images, prompts)``."""

    reward: Reward
    prompts: tuple[str, ...]
    vae: torch.nn.Module | None = None
    unpack: Callable[[torch.Tensor], torch.Tensor] | None = None
    decode: Decoder = decode_latents

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        n, k = len(z), len(self.prompts)
        if k not in (1, n):
            raise ValueError(f"{k} reward prompts for {n} samples; give 1 or {n}")
        z = z if self.unpack is None else self.unpack(z)
        return self.reward(self.decode(self.vae, z), list(self.prompts) * (n // k))


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
    ``unpack`` first turns the chain's latents into the VAE's (packed patches), ``decode`` is the
    model family's decoder (:data:`Decoder`)."""

    vae: torch.nn.Module | None
    latent_shape: tuple[int, ...]
    unpack: Callable[[torch.Tensor], torch.Tensor] | None = None
    decode: Decoder = decode_latents

    def reward_fn(self, reward: Reward, prompts: Sequence[str], generator=None) -> DecodedReward:
        return DecodedReward(reward, tuple(prompts), self.vae, self.unpack, self.decode)

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.decode(self.vae, z if self.unpack is None else self.unpack(z))

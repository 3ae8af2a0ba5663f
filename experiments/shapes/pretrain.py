"""Pretrain a small pixel-space diffusion model on :mod:`.data`, on CPU, with a cache.

The model is a diffusers ``UNet2DModel`` trained with the DDPM noise-prediction loss
(``DDPMScheduler.add_noise``) and an exponential moving average of its weights; it is
sampled with DDIM (:func:`ddim_scheduler`). ``pretrained_unet(config, cache_dir)``
trains once and stores the EMA weights as ``unet-<hash>.safetensors`` keyed by a hash
of the configuration, so later runs load the same weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .cache import cached_module, config_key
from .data import sample_shapes


@dataclass(frozen=True)
class PretrainConfig:
    """How the base model is built and trained.

    Attributes:
      size: image side in pixels.
      channels: ``block_out_channels`` of the UNet (one down/up block per entry).
      layers_per_block: ResNet layers per block.
      steps: optimiser steps.
      batch: images per step.
      lr: peak AdamW learning rate (cosine decay to 0 after a short warm-up).
      ema: EMA decay of the stored weights.
      num_train_timesteps: DDPM training timesteps.
      seed: seeds the initial weights, the data and the noise.
    """

    size: int = 16
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    ema: float = 0.995
    num_train_timesteps: int = 1000
    seed: int = 0

    def key(self) -> str:
        """A short hash of the configuration (the cache key)."""
        return config_key(self)


def build_unet(config: PretrainConfig):
    """A freshly initialised ``UNet2DModel`` for ``config`` (no attention, GroupNorm of 8)."""
    from diffusers import UNet2DModel

    n = len(config.channels)
    return UNet2DModel(sample_size=config.size, in_channels=3, out_channels=3,
                       layers_per_block=config.layers_per_block, block_out_channels=tuple(config.channels),
                       down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
                       norm_num_groups=8, add_attention=False)


def ddpm_scheduler(config: PretrainConfig):
    """The training scheduler (linear betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, clip_sample=False)


def ddim_scheduler(config: PretrainConfig):
    """The sampling scheduler, with the same betas as :func:`ddpm_scheduler`.

    Trailing timesteps start from pure noise (t = 999); ``set_alpha_to_one=False`` (as
    Stable Diffusion) keeps a little noise in the last step, so a likelihood ratio can be
    taken at every step (sigma_1 > 0, though small, when eta > 0)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(ddpm_scheduler(config).config, clip_sample=False, set_alpha_to_one=False,
                                     timestep_spacing="trailing")


def train_unet(config: PretrainConfig, progress: bool = True):
    """Train a UNet on :func:`~experiments.shapes.data.sample_shapes`; returns the EMA model (eval mode)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # diffusers initialises weights from the global RNG
        torch.manual_seed(config.seed)
        unet = build_unet(config)
        ema = build_unet(config)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    sched = ddpm_scheduler(config)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    warm = max(1, config.steps // 20)
    lr_at = (lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / config.steps)).item()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema_p, p = list(ema.parameters()), list(unet.parameters())
    for _ in tqdm(range(config.steps), desc="pretrain", disable=not progress):
        x0, _, _ = sample_shapes(config.batch, config.size, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, config.num_train_timesteps, (config.batch,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_p, p, 1 - config.ema)
    return ema.eval()


def pretrained_unet(config: PretrainConfig, cache_dir: str | os.PathLike, progress: bool = True):
    """The EMA UNet for ``config``: loaded from ``cache_dir/unet-<key>.safetensors`` if
    present, otherwise trained and stored there. Its parameters are frozen."""
    return cached_module("unet", config, cache_dir, lambda: build_unet(config), lambda: train_unet(config, progress))

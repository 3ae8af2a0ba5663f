"""A prompt-conditioned flow-matching model of :mod:`.data`, pretrained on CPU, with a cache.

The model is the library's SD3 family at toy size, in pixel space: an ``SD3Transformer2DModel``
on 16x16 RGB images (patch 2, 64 tokens) with two tiny CLIP text encoders over byte-level
symbols and no T5 (the pipeline's zeros in its place). It predicts the flow velocity
v = eps - x_0 on x_sigma = (1 - sigma) x_0 + sigma eps, with the timestep sigma * 1000, as SD3
is trained. Prompts name a colour and a shape ("red circle"); the text encoders are random and
frozen, so the transformer learns to read their states. A fraction ``caption_noise`` of the
training captions names a shape and a colour drawn at random instead of the image's (as web
captions are noisy), so the model follows its prompts only partly and a prompt-following
reward has headroom. ``pretrained_components`` trains once and stores the transformer's EMA
weights, with the text encoders' weights, as ``flow-<hash>.safetensors``.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from halforder.diffusion import Components
from halforder.diffusion.models.components import tiny_clip_config, tiny_tokenizer
from halforder.diffusion.models.families.sd3 import SD3Options, encode

from .cache import config_key
from .data import COLOURS, SHAPES, sample_shapes

TOKENS = 20   # CLIP tokens per prompt: the longest, "<start>yellow triangle<end>", is 17

#: Every prompt, "<colour> <shape>", and its (shape, colour) indices into SHAPES and COLOURS.
PROMPTS = {f"{c} {s}": (i, j) for (j, c), (i, s) in itertools.product(enumerate(COLOURS), enumerate(SHAPES))}


def prompt_of(shape: torch.Tensor, colour: torch.Tensor) -> list[str]:
    """The prompts of label tensors ``[n]`` (indices into SHAPES and COLOURS)."""
    names = list(COLOURS)
    return [f"{names[int(c)]} {SHAPES[int(s)]}" for s, c in zip(shape, colour)]


@dataclass(frozen=True)
class FlowPretrainConfig:
    """How the base model is built and trained.

    Attributes:
      size: image side in pixels.
      layers, heads, head_dim: the transformer's depth, attention heads and their width.
      steps, batch, lr: AdamW steps, images per step and peak rate (cosine decay after warm-up).
      ema: EMA decay of the stored weights.
      shift: the sampler's shift (FlowMatchEulerDiscreteScheduler).
      caption_noise: the fraction of captions drawn at random (module docstring).
      seed: seeds the weights, the data and the noise.
    """

    size: int = 16
    layers: int = 4
    heads: int = 4
    head_dim: int = 16
    steps: int = 5000
    batch: int = 64
    lr: float = 2e-3
    ema: float = 0.995
    shift: float = 1.0
    caption_noise: float = 0.5
    seed: int = 0

    def key(self) -> str:
        """A short hash of the configuration (the cache key)."""
        return config_key(self)


def build_components(config: FlowPretrainConfig) -> Components:
    """Freshly initialised parts for ``config`` (the text encoders are seeded and never trained)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):   # the libraries initialise weights from the global RNG
        torch.manual_seed(config.seed)
        width = config.heads * config.head_dim
        transformer = SD3Transformer2DModel(
            sample_size=config.size, patch_size=2, in_channels=3, out_channels=3, num_layers=config.layers,
            attention_head_dim=config.head_dim, num_attention_heads=config.heads, joint_attention_dim=32,
            caption_projection_dim=width, pooled_projection_dim=32, pos_embed_max_size=config.size // 2)
        tokenizer = tiny_tokenizer(TOKENS)
        clip_l = CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer), TOKENS, layers=2))
        clip_g = CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer), TOKENS, layers=2))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=config.shift)
    return Components(transformer, None, clip_l, tokenizer, scheduler,
                      dict(text_encoder_2=clip_g, tokenizer_2=tiny_tokenizer(TOKENS)), family="sd3",
                      network="transformer", max_sequence_length=1,
                      options=SD3Options(t5=False, shift=config.shift)).freeze()


def train_transformer(c: Components, config: FlowPretrainConfig, progress: bool = True) -> torch.nn.Module:
    """Train ``c.transformer`` by flow matching on every prompt; returns the EMA copy (eval mode)."""
    import copy

    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(config.seed)
    net = c.transformer.train().requires_grad_(True)
    ema = copy.deepcopy(net).requires_grad_(False)
    names = list(PROMPTS)
    table = encode(c, names)                                  # every prompt once: [12, ...]
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    warm = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / config.steps)).item()))
    for _ in tqdm(range(config.steps), desc="pretrain (flow)", disable=not progress):
        x0, shape, colour = sample_shapes(config.batch, config.size, generator=g)
        idx = torch.tensor([names.index(p) for p in prompt_of(shape, colour)])
        noisy = torch.rand(config.batch, generator=g) < config.caption_noise
        idx = torch.where(noisy, torch.randint(len(names), (config.batch,), generator=g), idx)
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(config.batch, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        v = net(hidden_states=(1 - s) * x0 + s * eps, timestep=sigma * 1000,
                **{k: t[idx] for k, t in table.items()}).sample
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - config.ema)
    return ema.eval()


def pretrained_components(config: FlowPretrainConfig, cache_dir: str | os.PathLike,
                          progress: bool = True) -> Components:
    """The parts for ``config`` with the transformer loaded from
    ``cache_dir/flow-<key>.safetensors`` if present, otherwise trained and stored there; frozen."""
    from safetensors.torch import load_file, save_file

    from halforder.training.files import atomic_file

    c = build_components(config)
    parts = {"transformer": c.transformer, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2}
    path = os.path.join(os.fspath(cache_dir), f"flow-{config.key()}.safetensors")
    if os.path.exists(path):
        stored = load_file(path)
        for name, module in parts.items():   # the encoders are stored too: a library's initialisation may change
            module.load_state_dict({k.split(".", 1)[1]: v for k, v in stored.items() if k.split(".", 1)[0] == name})
    else:
        parts["transformer"].load_state_dict(train_transformer(c, config, progress).state_dict())
        os.makedirs(os.fspath(cache_dir), exist_ok=True)
        with atomic_file(path, ".safetensors") as tmp:
            save_file({f"{name}.{k}": v.contiguous() for name, m in parts.items() for k, v in m.state_dict().items()}, tmp)
    return c.freeze()

"""Stable Diffusion 3 and 3.5: an MMDiT transformer (``SD3Transformer2DModel``) predicting the
flow velocity, on two CLIP encoders and optionally T5, with classifier-free guidance
(``StableDiffusion3Pipeline``).

The prompt embedding is the pipeline's: the penultimate hidden states of CLIP-L and CLIP-G
side by side, zero-padded to T5's width and followed by T5's tokens (zeros without T5), and
the two CLIP pooled projections side by side. The network is called with the pipeline's
timestep, sigma * 1000.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..components import Components, load_modules, tiny_clip_config, tiny_t5, tiny_tokenizer
from ..hub import local_dir, looks_local
from ...sampling.solvers import make_solver
from ..model_options import option
from .protocol import (FlowOptions, ModelFamily, dynamic_shift, flow_noise, flow_pipeline, latent_hw, shifted,
                       t5_embeddings, tiny_vae, transformer_call)

T5_LENGTH = 256      # the pipeline's max_sequence_length
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


@dataclass(frozen=True)
class SD3Options(FlowOptions):
    """The options of an SD3 model.

    Attributes:
      shift, noise: the sampler's settings (:class:`~.protocol.FlowOptions`).
      t5: load the T5 encoder (False: the pipeline's zeros in its place, about 9.5 GB less in bf16
        for SD3.5's T5-XXL).
    """

    t5: bool = option(True, "SD3 models")


def clip_embeddings(tokenizer, encoder, prompts, length):
    """(penultimate hidden states ``[N, L, D]``, pooled projection ``[N, P]``) of a CLIP text model."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def encode(c: Components, prompts):
    """``{"encoder_hidden_states", "pooled_projections"}`` as ``StableDiffusion3Pipeline.encode_prompt``."""
    prompts, L = list(prompts), c.max_sequence_length or T5_LENGTH
    with torch.no_grad():
        e1, p1 = clip_embeddings(c.tokenizer, c.text_encoder, prompts, c.tokenizer.model_max_length)
        e2, p2 = clip_embeddings(c.tokenizer_2, c.text_encoder_2, prompts, c.tokenizer.model_max_length)
        if c.extra.get("text_encoder_3") is None:
            t5 = torch.zeros(len(prompts), L, c.unet.config.joint_attention_dim, dtype=e1.dtype, device=e1.device)
        else:
            t5 = t5_embeddings(c.tokenizer_3, c.text_encoder_3, prompts, L)
        clip = torch.cat([e1, e2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat([p1, p2], dim=-1)}


def latent_shape(c: Components, size=None):
    """``(C, h, w)``: the transformer's ``sample_size`` (1024 px for SD3.5) or ``size``."""
    return (c.unet.config.in_channels, *latent_hw(size, c.unet.config.sample_size))


def solver(c: Components, T, shape):
    """The pipeline's schedule: ``set_timesteps(T)``, with mu from the image tokens under dynamic shifting."""
    mu = None
    if c.scheduler.config.get("use_dynamic_shifting"):
        p = c.unet.config.patch_size
        mu = dynamic_shift(c.scheduler.config, (shape[-2] // p) * (shape[-1] // p), 1.16)
    return make_solver(c.scheduler, T, noise=flow_noise(c), mu=mu)


def load(model, *, pipeline_class, options: SD3Options, dtype, kw):
    """An SD3 / SD3.5 folder or hub id; ``options.t5`` False leaves T5 out (the pipeline then feeds zeros)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    t5 = options.t5
    if looks_local(model):
        model = local_dir(model, "model", SUBFOLDERS + (("text_encoder_3", "tokenizer_3") if t5 else ()))
    parts = {"transformer": (SD3Transformer2DModel, "torch_dtype"), "vae": (AutoencoderKL, "torch_dtype"),
             "text_encoder": (CLIPTextModelWithProjection, "dtype"), "tokenizer": (AutoTokenizer, None),
             "text_encoder_2": (CLIPTextModelWithProjection, "dtype"), "tokenizer_2": (AutoTokenizer, None),
             "scheduler": (FlowMatchEulerDiscreteScheduler, None)}
    if t5:
        parts.update(text_encoder_3=(T5EncoderModel, "dtype"), tokenizer_3=(AutoTokenizer, None))
    m = load_modules(model, parts, "the SD3 model", dtype=dtype, kw=kw)
    return Components(m["transformer"], m["vae"], m["text_encoder"], m["tokenizer"], m["scheduler"],
                      {p: m.get(p) for p in ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")},
                      family="sd3", network="transformer")


def tiny(seed: int = 0, *, pipeline_class=None, options=None) -> Components:
    """Tiny random SD3 parts (no download): a two-layer MMDiT on 8x8 latents (patch 2), two
    one-layer CLIPs and a one-layer T5 (16 tokens), SD3's shift 3; frozen, float32, CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer(16)
    with torch.random.fork_rng(devices=[]):   # the libraries initialise weights from the global RNG
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=8)
        clip_l = CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer), layers=2))
        clip_g = CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer), layers=2))
        t5, t5_tokenizer = tiny_t5(width=32)
        vae = tiny_vae(0.0609, 1.5305)
    return Components(transformer, vae, clip_l, tokenizer, FlowMatchEulerDiscreteScheduler(shift=3.0),
                      dict(text_encoder_2=clip_g, tokenizer_2=tiny_tokenizer(16), text_encoder_3=t5,
                           tokenizer_3=t5_tokenizer), family="sd3", network="transformer",
                      max_sequence_length=16).freeze()


def adjust(c: Components, options: SD3Options) -> Components:
    """Without T5 where ``options.t5`` is False (a tiny model is built with it); the shift."""
    if not options.t5:
        c = c.with_parts(text_encoder_3=None, tokenizer_3=None)
    return shifted(c, options)



FAMILY = ModelFamily(name="sd3", title="an SD3 model", pipelines={"StableDiffusion3Pipeline": "t2i"},
                     tiny_model="tiny-sd3", lora_prefix="transformer", options=SD3Options, load=load, tiny=tiny,
                     encode=encode, network=lambda c, shape, w: (transformer_call, w), latent_shape=latent_shape,
                     unpack=lambda c, shape: None, solver=solver,
                     pipeline=lambda c: flow_pipeline("StableDiffusion3Pipeline", c), adjust=adjust)

"""FLUX.1: a rectified-flow transformer (``FluxTransformer2DModel``) on packed 2x2 latent
patches, T5 tokens and a pooled CLIP embedding, with the guidance scale fed to the network as
an embedding and no classifier-free guidance (``FluxPipeline`` with ``true_cfg_scale=1``).

The chain's latent is the pipeline's packed one with its rows unflattened, ``[h/2, w/2, 4C]``
(``z.flatten(1, 2)`` is the pipeline's ``[(h/2)(w/2), 4C]``): Euler steps act elementwise,
and start noise drawn packed has the law of noise drawn unpacked and then packed. The schedule
is the pipeline's: sigmas linspace(1, 1/T, T), dynamically shifted by mu from the number of
packed tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..components import Components, load_modules, tiny_clip_config, tiny_t5, tiny_tokenizer
from ..hub import local_dir, looks_local
from .protocol import (FlowOptions, ModelFamily, flow_pipeline, latent_hw, packed_solver, shifted,
                       t5_embeddings, tiny_vae, unpack_patches)

T5_LENGTH = 512      # the pipeline's max_sequence_length
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


def encode(c: Components, prompts):
    """``{"encoder_hidden_states", "pooled_projections"}`` as ``FluxPipeline.encode_prompt``:
    T5's tokens and CLIP's pooled output."""
    prompts = list(prompts)
    with torch.no_grad():
        ids = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
        pooled = c.text_encoder(ids.to(c.text_encoder.device), output_hidden_states=False).pooler_output
        t5 = t5_embeddings(c.tokenizer_2, c.text_encoder_2, prompts, c.max_sequence_length or T5_LENGTH)
    return {"encoder_hidden_states": t5, "pooled_projections": pooled}


@dataclass(frozen=True, eq=False)
class FluxCall:
    """The transformer's velocity, called as the pipeline calls it: timestep sigma * 1000 / 1000,
    the guidance embedding (None for a model without one), text and image position ids."""

    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: float | None

    def __call__(self, module, params, x, timestep, c):
        n = x.shape[0]
        g = None if self.guidance is None else torch.full([n], self.guidance, device=x.device, dtype=torch.float32)
        kwargs = dict(hidden_states=x.flatten(1, 2), timestep=timestep.expand(n).to(x.dtype) / 1000, guidance=g,
                      txt_ids=self.txt_ids.to(x.device, x.dtype), img_ids=self.img_ids.to(x.device, x.dtype), **c)
        return functional_call(module, params, (), kwargs).sample.view_as(x)


def image_ids(h: int, w: int) -> torch.Tensor:
    """The position ids ``[(h/2)(w/2), 3]`` of the packed latent patches (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def network(c: Components, shape, guidance_scale):
    """(the call with FLUX's guidance embedding, CFG weight 1)."""
    h, w = 2 * shape[0], 2 * shape[1]
    guidance = float(guidance_scale) if c.unet.config.guidance_embeds else None
    return FluxCall(image_ids(h, w), torch.zeros(c.max_sequence_length or T5_LENGTH, 3), guidance), 1.0


def vae_scale(c: Components) -> int:
    return 2 ** (len(c.vae.config.block_out_channels) - 1)


def latent_shape(c: Components, size=None):
    """The packed latent ``(h/2, w/2, 4C)`` of a VAE latent ``(h, w)`` (default: the VAE's
    ``sample_size``, 1024 px for FLUX.1)."""
    h, w = latent_hw(size, c.vae.config.sample_size // vae_scale(c))
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: the latent size must be even, got {h}x{w}")
    return (h // 2, w // 2, 4 * c.vae.config.latent_channels)


def unpack(c: Components, shape):
    """Packed latents ``[N, h/2, w/2, 4C]`` -> ``[N, C, h, w]`` (``FluxPipeline._unpack_latents``)."""
    return unpack_patches


def load(model, *, pipeline_class, options: FlowOptions, dtype, kw):
    """A FLUX.1 folder or hub id (T5 is FLUX's prompt encoder: it cannot be left out)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    if looks_local(model):
        model = local_dir(model, "model", SUBFOLDERS)
    m = load_modules(model, {"transformer": (FluxTransformer2DModel, "torch_dtype"),
                             "vae": (AutoencoderKL, "torch_dtype"), "text_encoder": (CLIPTextModel, "dtype"),
                             "tokenizer": (AutoTokenizer, None), "text_encoder_2": (T5EncoderModel, "dtype"),
                             "tokenizer_2": (AutoTokenizer, None),
                             "scheduler": (FlowMatchEulerDiscreteScheduler, None)}, "the FLUX model", dtype=dtype,
                     kw=kw)
    return Components(m["transformer"], m["vae"], m["text_encoder"], m["tokenizer"], m["scheduler"],
                      {p: m[p] for p in ("text_encoder_2", "tokenizer_2")}, family="flux", network="transformer")


def tiny(seed: int = 0, *, pipeline_class=None, options=None) -> Components:
    """Tiny random FLUX parts (no download): one double and one single block on 8x8 latents
    (16 packed tokens), guidance embedding, a one-layer CLIP and T5 (16 tokens), FLUX.1-dev's
    dynamic shifting; frozen, float32, CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer(16)
    with torch.random.fork_rng(devices=[]):   # the libraries initialise weights from the global RNG
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
        clip = CLIPTextModel(tiny_clip_config(len(tokenizer)))
        t5, t5_tokenizer = tiny_t5(width=16)
        vae = tiny_vae(0.1159, 0.3611)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return Components(transformer, vae, clip, tokenizer, sched, dict(text_encoder_2=t5, tokenizer_2=t5_tokenizer),
                      family="flux", network="transformer", max_sequence_length=16).freeze()


FAMILY = ModelFamily(name="flux", title="a FLUX.1 model", pipelines={"FluxPipeline": "t2i"}, tiny_model="tiny-flux",
                     lora_prefix="transformer", options=FlowOptions, load=load, tiny=tiny, encode=encode,
                     network=network, latent_shape=latent_shape, unpack=unpack, solver=packed_solver,
                     pipeline=lambda c: flow_pipeline("FluxPipeline", c), adjust=shifted)

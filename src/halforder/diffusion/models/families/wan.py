"""Wan 2.1 text-to-video: a video diffusion transformer (``WanTransformer3DModel``) predicting
the flow velocity on latents ``[16, F', h, w]`` of a causal video VAE (``AutoencoderKLWan``,
F = 4 (F' - 1) + 1 frames, 8x smaller images), UMT5 prompt embeddings and classifier-free
guidance (``WanPipeline``).

The video VAE decodes a whole latent video (its frames are not independent), so the reward's
frame selection picks frames from the decoded video. Sampling is the flow-matching Euler
solver: the published Wan 2.1 folders ship a UniPC multistep scheduler, which is replaced by
``FlowMatchEulerDiscreteScheduler`` with the same ``flow_shift`` (the samplers of Flow-GRPO
and DanceGRPO on Wan are Euler steps too).
"""
from __future__ import annotations

import torch

from ..components import Components, load_modules, tiny_t5
from ..hub import local_dir, looks_local
from ...sampling.solvers import make_solver
from ..video.frames import VideoView
from .protocol import (FlowOptions, ModelFamily, flow_noise, flow_pipeline, latent_hw, shifted, transformer_call,
                       unnormalise, video_only)

T5_LENGTH = 226      # the pipeline's max_sequence_length
LATENT_SIZE = (60, 104)   # 480 x 832 px, Wan 2.1's published resolution
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def encode(c: Components, prompts):
    """``{"encoder_hidden_states"}`` as ``WanPipeline.encode_prompt``: UMT5's hidden states of the
    cleaned prompt's tokens, zero beyond its length."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    L = c.max_sequence_length or T5_LENGTH
    tok = c.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=L, truncation=True,
                      add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    te = c.text_encoder
    with torch.no_grad():
        e = te(tok.input_ids.to(te.device), tok.attention_mask.to(te.device)).last_hidden_state
    keep = tok.attention_mask.to(e.device).bool().unsqueeze(-1)
    return {"encoder_hidden_states": e * keep}


def decode(vae, z: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Frames ``[N, k, 3, H, W]`` in [0, 1] of latent videos ``z`` ``[N, 16, F', h, w]``, differentiably:
    the pipeline's un-normalisation (latents_mean, latents_std), the whole video decoded, then
    the frames ``idx`` ``[N, k]`` (all if None)."""
    video = vae.decode(unnormalise(vae, z).to(vae.dtype)).sample.to(z.dtype)      # [N, 3, F, H, W]
    video = (video / 2 + 0.5).clamp(0, 1).transpose(1, 2)
    if idx is None:
        return video
    return video[torch.arange(len(z), device=z.device).unsqueeze(1), idx.to(z.device)]


def video_view(c: Components, num_frames: int, frames="random", latent_size=None) -> VideoView:
    """The view of ``num_frames`` decoded frames (4 k + 1) at ``latent_size`` (default 480 x 832 px)."""
    F, t = int(num_frames), c.vae.config.get("scale_factor_temporal", 4)
    if F < 1 or (F - 1) % t:
        raise ValueError(f"Wan decodes {t} k + 1 frames per video (1, 5, ..., 81); got num_frames={num_frames}")
    h, w = latent_hw(latent_size, LATENT_SIZE)
    return VideoView(c.vae, (c.vae.config.z_dim, (F - 1) // t + 1, h, w), frames, FAMILY.decode, F)


def solver(c: Components, T, shape):
    """The pipeline's schedule: ``set_timesteps(T)`` of the flow-matching scheduler."""
    return make_solver(c.scheduler, T, noise=flow_noise(c))


def flow_scheduler(config: dict):
    """``FlowMatchEulerDiscreteScheduler`` from a Wan folder's scheduler config (UniPC's ``flow_shift``
    becomes the Euler scheduler's ``shift``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000),
                                           shift=float(config.get("flow_shift") or 1.0))


def load(model, *, pipeline_class, options: FlowOptions, dtype, kw):
    """A Wan 2.1 text-to-video folder or hub id (``WanPipeline`` layout); the VAE stays float32,
    as the published examples load it."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    if looks_local(model):
        model = local_dir(model, "model", SUBFOLDERS)
    m = load_modules(model, {"transformer": (WanTransformer3DModel, "torch_dtype"),
                             "text_encoder": (UMT5EncoderModel, "dtype"), "tokenizer": (AutoTokenizer, None)},
                     "the Wan model", dtype=dtype, kw=kw)
    m.update(load_modules(model, {"vae": (AutoencoderKLWan, "torch_dtype")}, "the Wan model", dtype=torch.float32,
                          kw=kw))
    config = FlowMatchEulerDiscreteScheduler.load_config(model, subfolder="scheduler", **kw)
    return Components(m["transformer"], m["vae"], m["text_encoder"], m["tokenizer"], flow_scheduler(config),
                      family="wan", network="transformer")


def tiny(seed: int = 0, *, pipeline_class=None, options=None) -> Components:
    """Tiny random Wan parts (no download): a two-layer transformer (patches 1x2x2), a tiny causal
    video VAE (8x smaller images, 4x fewer frames), a one-layer UMT5 (16 tokens), shift 3;
    frozen, float32, CPU."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):   # the libraries initialise weights from the global RNG
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        _, tokenizer = tiny_t5()
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32,
                                                   num_layers=1, num_heads=2, relative_attention_num_buckets=8))
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    return Components(transformer, vae, text_encoder, tokenizer, FlowMatchEulerDiscreteScheduler(shift=3.0),
                      family="wan", network="transformer", max_sequence_length=16).freeze()


FAMILY = ModelFamily(name="wan", title="a Wan 2.1 model", pipelines={"WanPipeline": "t2v"}, tiny_model="tiny-wan",
                     lora_prefix="transformer", options=FlowOptions, load=load, tiny=tiny, encode=encode,
                     network=lambda c, shape, w: (transformer_call, w), latent_shape=video_only("Wan"),
                     unpack=lambda c, shape: None, solver=solver, video_view=video_view,
                     pipeline=lambda c: flow_pipeline("WanPipeline", c), decode=decode, adjust=shifted)

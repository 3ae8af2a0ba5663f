"""Qwen-Image: an MMDiT (``QwenImageTransformer2DModel``) predicting the flow velocity on packed
2x2 latent patches of a video-style VAE (``AutoencoderKLQwenImage``, one latent frame), conditioned
on Qwen2.5-VL's hidden states of the prompt, with norm-preserving "true" classifier-free guidance
(``QwenImagePipeline``).

The prompt is wrapped in the pipeline's chat template and the hidden states of its first
:data:`DROP` tokens (the template's system prompt) are dropped; the rest, up to
``max_sequence_length`` tokens, are the conditioning. The pipeline pads them to the longest prompt
of its batch; here they are zero-padded to ``max_sequence_length`` with a mask of the prompt's
tokens, so that every prompt's rows have one shape (the padded tokens are masked out of the joint
attention, and the text positions of the prompt's tokens are the same). The chain's latent is
FLUX's layout, ``[h/2, w/2, 4C]``; the schedule is the pipeline's, sigmas linspace(1, 1/T, T)
shifted dynamically by mu from the packed tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..components import Components, load_modules
from ..hub import local_dir, looks_local
from .protocol import (FlowOptions, ModelFamily, flow_pipeline, latent_hw, packed_solver, shifted,
                       unnormalise, unpack_patches)

TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34              # the template's tokens before the prompt, whose hidden states the pipeline drops
TOKENS = 1024          # the pipeline's tokenizer length past the dropped tokens
PROMPT_LENGTH = 512    # the pipeline's max_sequence_length
LATENT_SIZE = 128      # the pipeline's default_sample_size: 1024 px
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def encode(c: Components, prompts):
    """``{"encoder_hidden_states", "encoder_hidden_states_mask"}`` as ``QwenImagePipeline.encode_prompt``:
    the last hidden states of the templated prompt's tokens past the first :data:`DROP`, at most
    ``max_sequence_length`` of them, zero-padded to that length, and the mask of those tokens."""
    L, te = c.max_sequence_length or PROMPT_LENGTH, c.text_encoder
    tok = c.tokenizer([TEMPLATE.format(p) for p in prompts], max_length=TOKENS + DROP, padding=True,
                      truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = te(input_ids=tok.input_ids.to(te.device), attention_mask=tok.attention_mask.to(te.device),
               output_hidden_states=True).hidden_states[-1]
    states = h.new_zeros(len(h), L, h.shape[-1])
    mask = torch.zeros(len(h), L, dtype=torch.long, device=h.device)
    for i, keep in enumerate(tok.attention_mask.to(h.device).bool()):
        rows = h[i][keep][DROP:DROP + L]
        states[i, :len(rows)], mask[i, :len(rows)] = rows, 1
    return {"encoder_hidden_states": states, "encoder_hidden_states_mask": mask}


@dataclass(frozen=True, eq=False)
class QwenImageCall:
    """The transformer's velocity, called as the pipeline calls it: the packed tokens, timestep
    sigma * 1000 / 1000, the latent's (frames, rows, columns) of patches for the rotary positions,
    the prompt's states and mask."""

    patches: tuple[int, int, int]

    def __call__(self, module, params, x, timestep, c):
        n = x.shape[0]
        kwargs = dict(hidden_states=x.flatten(1, 2), timestep=timestep.expand(n).to(x.dtype) / 1000,
                      img_shapes=[[self.patches]] * n, **c)
        return functional_call(module, params, (), kwargs).sample.view_as(x)


def network(c: Components, shape, guidance_scale):
    """(the pipeline's call, the true-CFG weight ``guidance_scale``)."""
    if c.unet.config.guidance_embeds:
        raise ValueError("a guidance-distilled Qwen-Image transformer (guidance_embeds) is not supported: its "
                         "guidance embedding and true CFG would need two scales")
    return QwenImageCall((1, shape[0], shape[1])), float(guidance_scale)


def guidance(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """True CFG as the pipeline combines it: u + w (c - u), rescaled per latent token (the last axis,
    the packed patch) to the norm of the conditional output c."""
    out = uncond + w * (cond - uncond)
    return out * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(out, dim=-1, keepdim=True))


def latent_shape(c: Components, size=None):
    """The packed latent ``(h/2, w/2, 4C)`` of a VAE latent ``(h, w)`` (default 128 x 128, 1024 px)."""
    h, w = latent_hw(size, LATENT_SIZE)
    if h % 2 or w % 2:
        raise ValueError(f"Qwen-Image packs 2x2 latent patches: the latent size must be even, got {h}x{w}")
    return (h // 2, w // 2, c.unet.config.in_channels)


def unpack(c: Components, shape):
    """Packed latents ``[N, h/2, w/2, 4C]`` -> the VAE's one-frame latents ``[N, C, 1, h, w]``."""
    return lambda z: unpack_patches(z).unsqueeze(2)


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] of the VAE's latents ``[N, C, 1, h, w]``, differentiably: the
    pipeline's un-normalisation (latents_mean, latents_std), then the VAE's one decoded frame."""
    img = vae.decode(unnormalise(vae, z).to(vae.dtype)).sample[:, :, 0].to(z.dtype)
    return (img / 2 + 0.5).clamp(0, 1)


def load(model, *, pipeline_class, options: FlowOptions, dtype, kw):
    """A Qwen-Image folder or hub id (``QwenImagePipeline`` layout)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    if looks_local(model):
        model = local_dir(model, "model", SUBFOLDERS)
    m = load_modules(model, {"transformer": (QwenImageTransformer2DModel, "torch_dtype"),
                             "vae": (AutoencoderKLQwenImage, "torch_dtype"),
                             "text_encoder": (Qwen2_5_VLForConditionalGeneration, "dtype"),
                             "tokenizer": (AutoTokenizer, None),
                             "scheduler": (FlowMatchEulerDiscreteScheduler, None)}, "the Qwen-Image model",
                     dtype=dtype, kw=kw)
    return Components(m["transformer"], m["vae"], m["text_encoder"], m["tokenizer"], m["scheduler"],
                      family="qwen-image", network="transformer")


def tiny_tokenizer():
    """A byte-level BPE tokenizer whose merges make each word of :data:`TEMPLATE` one token (so its
    first :data:`DROP` tokens are the system prompt, as Qwen2's), built offline."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges, split = [], pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for part in TEMPLATE.replace("<|im_end|>", "<|im_start|>").split("<|im_start|>"):
        for word, _ in split.pre_tokenize_str(part.replace("{}", "")):
            for i in range(1, len(word)):
                if word[:i + 1] not in vocab:
                    merges.append((word[:i], word[i]))
                    vocab[word[:i + 1]] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny(seed: int = 0, *, pipeline_class=None, options=None) -> Components:
    """Tiny random Qwen-Image parts (no download): a two-layer transformer on 4 latent channels, a
    one-layer Qwen2.5-VL (32 prompt tokens), a 2x video-style VAE with per-channel statistics,
    dynamic exponential shifting with a terminal sigma; frozen, float32, CPU."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):   # the libraries initialise weights from the global RNG
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
        text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=None,
                    eos_token_id=None, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=2,
                      spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0])
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
        vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                     latents_std=[1.5, 0.7, 2.0, 1.1])
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                            time_shift_type="exponential")
    return Components(transformer, vae, text_encoder, tokenizer, sched, family="qwen-image", network="transformer",
                      max_sequence_length=32).freeze()


FAMILY = ModelFamily(name="qwen-image", title="a Qwen-Image model", pipelines={"QwenImagePipeline": "t2i"},
                     tiny_model="tiny-qwen-image", lora_prefix="transformer", options=FlowOptions, load=load, tiny=tiny,
                     encode=encode, network=network, latent_shape=latent_shape, unpack=unpack, solver=packed_solver,
                     pipeline=lambda c: flow_pipeline("QwenImagePipeline", c), guidance=guidance, decode=decode,
                     adjust=shifted)

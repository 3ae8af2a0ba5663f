"""SANA: a linear-attention diffusion transformer (``SanaTransformer2DModel``) predicting the flow
velocity on the latents of a deep-compression autoencoder (``AutoencoderDC``, 32x in the published
models), conditioned on Gemma 2's hidden states of the prompt, with classifier-free guidance and
DPM-Solver++(2M) on flow sigmas (``SanaPipeline``).

The pipeline lowercases and strips every prompt, prepends its complex human instruction
(:data:`INSTRUCTION`) to the prompt (not to the negative prompt), pads to the instruction's tokens
plus ``max_sequence_length`` - 2 and keeps the first token (BOS) and the last
``max_sequence_length`` - 1, with their attention mask; the negative prompt is padded to
``max_sequence_length`` and kept whole. A prompt's conditioning here carries both forms: with the
instruction (``encoder_hidden_states``, ``encoder_attention_mask``) and without it
(``plain_hidden_states``, ``plain_attention_mask``), each prompt being encoded once whatever its
role; under guidance the network's rows are the unconditional half then the conditional half (as
the denoiser stacks them), and the unconditional half is given the form without the instruction.
The network is called with the scheduler's timestep (sigma * 1000 truncated to an integer) times
the transformer's ``timestep_scale`` and the mask; the latents are the VAE's ``[C, h, w]`` and decode as
z / scaling_factor (no shift).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..components import Components, load_modules
from ..hub import local_dir, looks_local
from ...sampling.solvers import make_solver
from ..model_options import scheduler_option
from .protocol import ModelFamily, flow_pipeline, latent_hw

INSTRUCTION = "\n".join((
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: "))
PROMPT_LENGTH = 300    # the pipeline's max_sequence_length
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def gemma_states(c: Components, texts, length: int):
    """(Gemma's last hidden states ``[N, length, D]``, attention mask ``[N, length]``) of ``texts``,
    right-padded or truncated to ``length`` tokens (BOS first)."""
    te = c.text_encoder
    tok = c.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                      padding_side="right", return_tensors="pt")
    mask = tok.attention_mask.to(te.device)
    with torch.no_grad():
        return te(tok.input_ids.to(te.device), attention_mask=mask)[0], mask


def encode(c: Components, prompts):
    """The prompts' conditioning as ``SanaPipeline.encode_prompt`` computes it, in both forms: with
    the instruction (the prompt's) and without it (the negative prompt's); see the module docstring."""
    L = c.max_sequence_length or PROMPT_LENGTH
    prompts = [p.lower().strip() for p in prompts]
    n = len(c.tokenizer.encode(INSTRUCTION))
    states, mask = gemma_states(c, [INSTRUCTION + p for p in prompts], n + L - 2)
    keep = [0, *range(states.shape[1] - L + 1, states.shape[1])]
    plain, plain_mask = gemma_states(c, prompts, L)
    return {"encoder_hidden_states": states[:, keep], "encoder_attention_mask": mask[:, keep],
            "plain_hidden_states": plain, "plain_attention_mask": plain_mask}


@dataclass(frozen=True, eq=False)
class SanaCall:
    """The transformer's velocity, called as the pipeline calls it: the latents, timestep times
    ``scale`` (the transformer's ``timestep_scale``), the prompt states and their mask; ``guided``:
    the rows are [unconditional; conditional], and the unconditional half gets the form without
    the instruction."""

    guided: bool
    scale: float

    def __call__(self, module, params, x, timestep, c):
        states, mask = c["encoder_hidden_states"], c["encoder_attention_mask"]
        if self.guided:
            k = len(x) // 2
            states = torch.cat([c["plain_hidden_states"][:k], states[k:]])
            mask = torch.cat([c["plain_attention_mask"][:k], mask[k:]])
        kwargs = dict(hidden_states=x, encoder_hidden_states=states, encoder_attention_mask=mask,
                      timestep=timestep.expand(len(x)) * self.scale)
        out = functional_call(module, params, (), kwargs).sample
        return out if out.shape[1] == x.shape[1] else out.chunk(2, dim=1)[0]   # a learned variance is dropped


def network(c: Components, shape, guidance_scale):
    """(the pipeline's call, the CFG weight ``guidance_scale``: guidance when above 1)."""
    return SanaCall(float(guidance_scale) > 1, float(c.unet.config.timestep_scale)), float(guidance_scale)


def latent_shape(c: Components, size=None):
    """``(C, h, w)``: the transformer's ``sample_size`` (32 x 32 for SANA 1024 px) or ``size``."""
    h, w = latent_hw(size, c.unet.config.sample_size)
    p = c.unet.config.patch_size
    if h % p or w % p:
        raise ValueError(f"the SANA transformer's patches are {p}x{p}: the latent size must be a multiple, got {h}x{w}")
    return (c.unet.config.in_channels, h, w)


def solver(c: Components, T, shape):
    """The pipeline's schedule: DPM-Solver++(2M) of the scheduler's ``set_timesteps(T)`` on flow sigmas
    (its stochastic steps are DPM-Solver's at eta > 0: SANA's options take no flow ``noise``)."""
    return make_solver(c.scheduler, T)


@dataclass(frozen=True)
class SanaOptions:
    """The options of a SANA model.

    Attributes:
      scheduler: taken as it is given (``"ddim"`` or ``"dpm"``) and left alone: SANA samples with its
        own DPMSolverMultistepScheduler.
    """

    scheduler: str = scheduler_option()

    def __post_init__(self):
        if self.scheduler not in ("ddim", "dpm"):
            raise ValueError(f"unknown scheduler {self.scheduler!r}; SANA samples with its own "
                             "DPMSolverMultistepScheduler (leave scheduler at its default)")


def load(model, *, pipeline_class, options: SanaOptions, dtype, kw):
    """A SANA folder or hub id (``SanaPipeline`` layout)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import AutoTokenizer, Gemma2Model

    if looks_local(model):
        model = local_dir(model, "model", SUBFOLDERS)
    m = load_modules(model, {"transformer": (SanaTransformer2DModel, "torch_dtype"),
                             "vae": (AutoencoderDC, "torch_dtype"), "text_encoder": (Gemma2Model, "dtype"),
                             "tokenizer": (AutoTokenizer, None), "scheduler": (DPMSolverMultistepScheduler, None)},
                     "the SANA model", dtype=dtype, kw=kw)
    return Components(m["transformer"], m["vae"], m["text_encoder"], m["tokenizer"], m["scheduler"], family="sana",
                      network="transformer")


def tiny_tokenizer():
    """A Gemma tokenizer (BPE with byte fallback, BOS added) over the printable ASCII characters, whose
    merges make each word of :data:`INSTRUCTION` one token with its leading space (as Gemma's), built
    offline."""
    import re
    import string

    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{i:02X}>": 5 + i for i in range(256)})
    for ch in string.printable.replace(" ", "\u2581"):    # Gemma's normaliser writes a space as U+2581
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in re.split("(?=\u2581)", INSTRUCTION.replace(" ", "\u2581")):
        for i in range(1, len(word)):
            if word[:i + 1] not in vocab:
                merges.append((word[:i], word[i]))
                vocab[word[:i + 1]] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def tiny(seed: int = 0, *, pipeline_class=None, options=None) -> Components:
    """Tiny random SANA parts (no download): a two-layer transformer on 16x16 latents of 4 channels,
    a one-layer Gemma 2 (32 prompt tokens), a 2x DC autoencoder, SANA's scheduler (flow shift 3);
    frozen, float32, CPU."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):   # the libraries initialise weights from the global RNG
        torch.manual_seed(seed)
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=16, patch_size=1)
        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
            bos_token_id=2))
        blocks = ("ResBlock", "EfficientViTBlock")
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=blocks,
            decoder_block_types=blocks, encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)), scaling_factor=0.41407)
    sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=3.0)
    return Components(transformer, vae, text_encoder, tokenizer, sched, family="sana", network="transformer",
                      max_sequence_length=32).freeze()


FAMILY = ModelFamily(name="sana", title="a SANA model", pipelines={"SanaPipeline": "t2i"}, tiny_model="tiny-sana",
                     lora_prefix="transformer", options=SanaOptions, load=load, tiny=tiny, encode=encode,
                     network=network, latent_shape=latent_shape, unpack=lambda c, shape: None, solver=solver,
                     pipeline=lambda c: flow_pipeline("SanaPipeline", c))

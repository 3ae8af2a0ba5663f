"""The parts of a latent text-to-image diffusion model, loaded or built tiny.

:class:`Components` holds a model's parts under the names of its diffusers pipeline.
``load_sd_components`` reads a Stable Diffusion 1/2 checkpoint (hub id or local directory
in the diffusers layout) with ``from_pretrained``; ``tiny_components`` builds the same five
parts from small configs with random weights, for tests and offline demos (nothing is
downloaded: the tokenizer's vocabulary is the 256 byte-level symbols, with no merges).
Other model families (SD3, FLUX, Wan, ...) load and build theirs in :mod:`halforder.diffusion.models.families`,
which also reads a folder's ``model_index.json`` to pick the family (``load_components``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .hub import load_error, local_dir, looks_local, offline

_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True, eq=False)
class Components:
    """A diffusion model split into its parts (diffusers objects), named as in its pipeline.

    Attributes:
      unet: the denoising network, held in this field whatever the pipeline calls it: a UNet
        (``UNet2DConditionModel``, ``UNet3DConditionModel``) or a transformer (``SD3Transformer2DModel``,
        ``FluxTransformer2DModel``, ``WanTransformer3DModel``, ...); also reachable by its pipeline
        name (``network``): ``components.transformer``, ``parts["transformer"]``, ``with_parts(transformer=...)``.
      vae: the autoencoder (latents <-> images), or None for a pixel-space model.
      text_encoder: the (first) text encoder, or None for an unconditional model.
      tokenizer: its tokenizer (None with no text encoder).
      scheduler: a diffusers scheduler.
      extra: the pipeline's further parts under their names in ``model_index.json``, e.g. SD3's
        ``text_encoder_2``, ``tokenizer_2``, ``text_encoder_3``, ``tokenizer_3`` (None where the
        pipeline runs without one); each is also an attribute (``components.text_encoder_2``).
      family: the model family's name (:data:`halforder.diffusion.models.families.FAMILIES`): ``"sd"``,
        ``"sd3"``, ``"flux"``, ``"wan"``, ``"qwen-image"``, ``"sana"``, ``"videocrafter2"``.
      max_sequence_length: the prompt length in tokens (the pipeline's ``max_sequence_length``;
        None: the family's default).
      options: the family's options record that the parts were made with (None: parts put
        together by hand).
      network: the pipeline's name for the network in ``model_index.json`` (``"unet"`` or
        ``"transformer"``).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    family: str = "sd"
    max_sequence_length: int | None = None
    options: Any = None
    network: str = "unet"

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == self.__dict__.get("network"):
            return self.__dict__["unet"]
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def latent_scale(self):
        """The :class:`~halforder.diffusion.sampling.solvers.LatentScale` of the model's forward process where
        its family's options carry one (VideoCrafter2), which its solvers use; None: the standard process."""
        return getattr(self.options, "latent_scale", None)

    @property
    def parts(self) -> dict[str, Any]:
        """Every part under its name in ``model_index.json`` (the network as ``network``)."""
        return {self.network: self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer, "scheduler": self.scheduler, **self.extra}

    def with_parts(self, **parts) -> "Components":
        """A copy with the parts ``parts`` (by their pipeline names) replaced or added."""
        if self.network in parts:
            parts["unet"] = parts.pop(self.network)
        fields = {k: v for k, v in parts.items() if k in _SUBFOLDERS}
        extra = {**self.extra, **{k: v for k, v in parts.items() if k not in _SUBFOLDERS}}
        return dataclasses.replace(self, extra=extra, **fields)

    def freeze(self) -> "Components":
        """Put every module in eval mode with ``requires_grad=False``; returns self."""
        for m in self.modules():
            m.eval()
            m.requires_grad_(False)
        return self

    def modules(self) -> list:
        """The networks that are present (denoiser, VAE, text encoders)."""
        return [m for m in (self.unet, self.vae, self.text_encoder, *self.extra.values())
                if isinstance(m, torch.nn.Module)]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Components":
        """Move every network to ``device`` and cast it to ``dtype``; returns self. For
        models built from configs: a checkpoint's modules that must stay float32 are
        kept so only by ``from_pretrained(torch_dtype=...)`` (:func:`load_sd_components`)."""
        for m in self.modules():
            torch.nn.Module.to(m, device, dtype)   # diffusers' own .to warns about those modules
        return self


def load_sd_components(model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    local_files_only: bool = False, revision: str | None = None,
                    scheduler: str = "ddim") -> Components:
    """Load the parts of a Stable Diffusion model with ``from_pretrained``.

    Args:
      model: a hub id (``"CompVis/stable-diffusion-v1-4"``) or a local directory in the
        diffusers layout (subfolders ``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
        ``scheduler``).
      dtype, device: where the modules live; every module is frozen (``freeze``).
      local_files_only: never touch the network (implied by ``HF_HUB_OFFLINE=1``).
      revision: a hub revision.
      scheduler: ``"ddim"`` or ``"dpm"`` (``DPMSolverMultistepScheduler``); built from the
        checkpoint's scheduler config.

    Raises:
      FileNotFoundError: ``model`` looks like a path but does not exist.
      OSError: the model could not be loaded (offline without a cached copy, a typo in the
        hub id, ...); the message says how to point at a local copy.
    """
    from diffusers import UNet2DConditionModel

    return load_parts(model, UNet2DConditionModel, "the diffusion model", dtype=dtype, device=device,
                      local_files_only=local_files_only, revision=revision, scheduler=scheduler).freeze()


def load_parts(model: str, unet_cls, what: str, *, dtype: torch.dtype = torch.float32, device="cpu",
               local_files_only: bool = False, revision: str | None = None, scheduler: str = "ddim") -> Components:
    """The parts of a diffusers model (hub id or local directory), the UNet as ``unet_cls``
    (None: no UNet, e.g. when it comes from elsewhere); not frozen. ``what`` names the
    model in errors."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    if looks_local(model):
        model = local_dir(model, "model", _SUBFOLDERS if unet_cls is not None else _SUBFOLDERS[1:])
    kw = dict(local_files_only=local_files_only or offline(), revision=revision)
    try:
        unet = unet_cls.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kw) if unet_cls else None
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw)
        sched = make_scheduler(scheduler, load_scheduler_config(model, kw))
    except (OSError, ValueError) as e:
        raise load_error(what, model, e) from e
    return Components(unet, vae, text_encoder, tokenizer, sched).to(device)


def load_modules(model: str, parts: Mapping[str, tuple[Any, str | None]], what: str, *, dtype: torch.dtype,
                 kw: dict) -> dict[str, Any]:
    """``{subfolder: cls.from_pretrained(model, subfolder=subfolder, ...)}`` for ``parts``
    ``{subfolder: (cls, dtype keyword)}`` (``"torch_dtype"`` for diffusers models, ``"dtype"`` for
    transformers models, None for tokenizers and schedulers); a failure is :func:`load_error`."""
    out = {}
    try:
        for sub, (cls, dtype_kw) in parts.items():
            out[sub] = cls.from_pretrained(model, subfolder=sub, **kw, **({dtype_kw: dtype} if dtype_kw else {}))
    except (OSError, ValueError) as e:
        raise load_error(what, model, e) from e
    return out


def unet_latent_shape(unet, latent_size=None) -> tuple[int, ...]:
    """``(C, h, w)`` of the UNet's latents: ``latent_size`` (an int or (h, w)) or its
    config's ``sample_size``."""
    size = latent_size if latent_size is not None else unet.config.sample_size
    if size is None:
        raise ValueError("the UNet config has no sample_size: give the latent size (h, w)")
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    return (unet.config.in_channels, *size)


def load_scheduler_config(model: str, kw: dict) -> dict:
    """The ``scheduler`` subfolder's config of a diffusers model directory or hub id."""
    from diffusers import DDIMScheduler
    return DDIMScheduler.load_config(model, subfolder="scheduler", **kw)


def make_scheduler(kind: str, config: dict | None = None):
    """A fresh scheduler of ``kind`` (``"ddim"`` or ``"dpm"``) from a scheduler config.

    ``"dpm"`` is ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
    solver_order=2)``, the paper's Table 8 sampler; the chain decides per step whether
    its noise is used (see :mod:`halforder.diffusion.sampling.chain`).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = dict(config or {})
    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {kind!r}; use 'ddim' or 'dpm'")


# Stable Diffusion v1's scheduler configuration (scheduler/scheduler_config.json).
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                           steps_offset=1, prediction_type="epsilon")


def tiny_t5(vocab_size: int | None = None, max_length: int = 16, width: int = 16):
    """A one-layer T5 encoder of width ``width`` and its tokenizer (one token per character of
    printable ASCII, ``</s>`` appended), built offline; weights from the global RNG."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        model_max_length=max_length)
    encoder = T5EncoderModel(T5Config(vocab_size=vocab_size or len(vocab), d_model=width, d_kv=8, d_ff=2 * width,
                                      num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                      decoder_start_token_id=0))
    return encoder, tokenizer


def tiny_clip_config(vocab_size: int, max_length: int = 16, width: int = 16, layers: int = 1):
    """The ``CLIPTextConfig`` of the tiny CLIP text encoders (byte-level vocabulary)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=max_length,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=width)


def tiny_tokenizer(max_length: int = 16):
    """A CLIP tokenizer over the 256 byte-level symbols (no merges), built offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_components(seed: int = 0, *, scheduler: str = "ddim", latent_size: int = 8,
                    text_length: int = 16) -> Components:
    """Tiny random SD components built from configs (no download), frozen, float32, CPU.

    The weights are drawn from ``seed`` in a forked RNG; the global torch RNG is left alone.

    The UNet has two resolution levels (8 and 16 channels, cross-attention dimension 16),
    the VAE upsamples the ``[N, 4, latent_size, latent_size]`` latent by 2, the text
    encoder is a one-layer CLIP of width 16 over a 514-symbol byte-level vocabulary.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer(text_length)
    # diffusers and transformers initialise weights from the global RNG: fork it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, sample_size=2 * latent_size,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text_encoder = CLIPTextModel(tiny_clip_config(len(tokenizer), text_length))
    return Components(unet, vae, text_encoder, tokenizer, make_scheduler(scheduler, SD_SCHEDULER_CONFIG)).freeze()

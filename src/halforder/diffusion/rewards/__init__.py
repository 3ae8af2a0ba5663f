"""Rewards on decoded images: a registry of small factories.

Every reward is a callable ``reward(images, prompts) -> [N]`` with ``images`` of shape
``[N, 3, H, W]`` in [0, 1] and ``prompts`` a list of N strings, differentiable in the
images unless the reward (and its factory) says ``differentiable = False``: read it with
:func:`differentiable`. ``make_reward(name, **kwargs)`` builds one from :data:`REWARDS`.

Built-in, CPU-cheap (tests and demos): ``brightness``, ``color``, ``random_cnn``.
Learned (loaded with ``from_pretrained`` from a hub id or a local directory; offline, a
missing model raises ``OSError`` saying how to point at a local copy):

* ``aesthetic`` — LAION aesthetic predictor v2: CLIP ViT-L/14 image embedding,
  L2-normalised, into the MLP head 768-1024-128-64-16-1 (``sac+logos+ava1-l14-linearMSE.pth``
  of christophschuhmann/improved-aesthetic-predictor, mirrored on the hub by TRL as
  ``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``; keys ``layers.{0,2,4,6,7}.*``).
* ``pickscore`` — PickScore v1: CLIP ViT-H/14 fine-tuned on Pick-a-Pic; score =
  exp(logit_scale) * cos(image embedding, prompt embedding). Its preprocessing and tokenizer
  come from the processor's files alone (no second model is loaded).
* ``clipscore`` — text-image alignment: 100 * cos(CLIP image embedding, prompt embedding) with
  OpenAI's CLIP ViT-L/14 (the CLIPScore of Hessel et al. without its clipping at 0), the usual
  check against reward hacking beside an aesthetic reward.
* ``hpsv2`` — HPS v2 / v2.1: an open_clip ViT-H/14 checkpoint, renamed into transformers'
  CLIPModel (:mod:`.open_clip_weights`; the architecture and tokenizer from the files of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); score = cos(image, prompt), as HPSv2 scores, on
  images preprocessed as HPSv2 does (longest edge to 224, padded to a square: a non-square video
  frame is scored whole, not cropped).
* ``ocr`` — Flow-GRPO's OCR reward (:mod:`.ocr`): 1 minus the normalised edit distance between
  the text the prompt quotes and the text RapidOCR reads. No gradient; needs the ``ocr`` extra.
* ``jpeg_compressibility`` — DDPO's compressibility (:mod:`.compressibility`): minus the JPEG size
  in kB at quality 95. No gradient.
* ``imagereward`` — not available: the ``image-reward`` package (1.5, its latest) imports helpers
  that transformers removed after 4.55 (``apply_chunking_to_forward``, ``prune_linear_layer``, ...)
  while halforder needs transformers >= 4.56 (``from_pretrained(dtype=...)``), and its BLIP
  model has no transformers port; asking for it is an error that says so.

The default hub ids and file names below were taken from public code that uses them
(TRL's DDPO config, the PickScore model card, HPSv2's version map, ImageReward's README)
but could not be opened here (no internet): the real weights were never loaded. The
aesthetic, PickScore, CLIP-score and HPSv2 code paths are tested end to end on tiny random CLIP
models saved to local directories (HPSv2's as an open_clip state dict).

The rest of the rewards layer of :mod:`halforder.diffusion`: :mod:`.clip_preprocess` (CLIP's
preprocessing, differentiably), :mod:`.open_clip_weights`, :mod:`.ocr` and :mod:`.video`
(rewards on frames). Below it are the chain machinery and the models (only ``hub``, the
offline behaviour, is used); the application is above it.
"""
from __future__ import annotations

import inspect
import os
import pickle
import re
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .clip_preprocess import ClipPreprocess, clip_preprocess
from ..models.hub import load_error, local_dir, looks_local, offline
from .compressibility import JpegCompressibility
from .ocr import OcrReward
from .open_clip_weights import clip_from_open_clip

Reward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
REWARDS: dict[str, Callable[..., Reward]] = {}

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth"  # TRL DDPO's copy of the head
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"
HPSV2_CHECKPOINT = "xswu/HPSv2:HPS_v2.1_compressed.pt"
HPSV2_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"   # the config and tokenizer of HPSv2's ViT-H/14
IMAGEREWARD_MODEL = "ImageReward-v1.0"


def register(name: str):
    """Decorator: add a reward factory to :data:`REWARDS` under ``name``."""
    def wrap(factory):
        REWARDS[name] = factory
        return factory
    return wrap


def make_reward(name: str, **kwargs) -> Reward:
    """The reward ``name`` from :data:`REWARDS`, built with ``kwargs``; ``ValueError`` on an
    unknown name, option or value."""
    check_reward_options(name, kwargs)
    try:
        return REWARDS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"reward {name!r} cannot take the options {kwargs}: {e}") from None


def check_options(name: str, factory: Callable, options) -> None:
    """``ValueError`` unless ``options`` is a mapping whose names the reward factory ``factory``
    (of the reward ``name``) accepts, read from its signature; the message lists them."""
    if not isinstance(options, Mapping):
        raise ValueError(f"the options of reward {name!r} must be a mapping of names to values (JSON object), "
                         f"got {options!r}")
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(f"reward {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(accepted) or 'none'}")


def check_reward_options(name: str, options) -> None:
    """``ValueError`` unless ``name`` is in :data:`REWARDS` and takes ``options`` (checked
    before anything is built)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    check_options(name, REWARDS[name], options)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _integer(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


def _check(images: torch.Tensor):
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"a reward takes images [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")


# ----------------------------------------------------------------------------- built-in
@register("brightness")
def brightness(target: float | None = None) -> Reward:
    """Mean pixel value, or -(mean - target)^2 when ``target`` is given."""
    target = None if target is None else _number(target, "the brightness target")

    def reward(images, prompts=None):
        _check(images)
        m = images.mean((1, 2, 3))
        return m if target is None else -(m - target) ** 2
    return reward


@register("color")
def color(target: Sequence[float] = (1.0, 0.0, 0.0)) -> Reward:
    """Minus the mean squared distance of every pixel to the RGB colour ``target``."""
    if not isinstance(target, (list, tuple)) or len(target) != 3:
        raise ValueError(f"the color target must be 3 numbers (RGB in [0, 1], e.g. [0, 1, 0]), got {target!r}")
    t = torch.tensor([_number(v, "each number of the color target") for v in target])

    def reward(images, prompts=None):
        _check(images)
        return -((images - t.to(images).view(1, 3, 1, 1)) ** 2).sum(1).mean((1, 2))
    return reward


class RandomCNN(nn.Module):
    """A fixed small random conv net: conv(3->8, stride 2), SiLU, conv(8->8, stride 2),
    SiLU, global mean, linear(8->1). A nonlinear, cheap, differentiable reward."""

    def __init__(self, seed: int = 0, width: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1, self.conv2 = nn.Conv2d(3, width, 3, 2, 1), nn.Conv2d(width, width, 3, 2, 1)
        self.head = nn.Linear(width, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        self.requires_grad_(False)

    def forward(self, images, prompts=None):
        _check(images)
        h = nn.functional.silu(self.conv2(nn.functional.silu(self.conv1(images * 2 - 1))))
        return self.head(h.mean((2, 3))).squeeze(-1)


@register("random_cnn")
def random_cnn(seed: int = 0, width: int = 8) -> Reward:
    """:class:`RandomCNN` with weights drawn from ``seed``."""
    return RandomCNN(_integer(seed, "the random_cnn seed"), _integer(width, "the random_cnn width"))


# ----------------------------------------------------------------------------- loading
def _resolve_file(spec: str, local_files_only: bool) -> str:
    """A local file for ``spec``: an existing path, or ``"repo_id:filename"`` on the hub."""
    if os.path.isfile(spec):
        return spec
    if ":" not in spec:
        raise FileNotFoundError(f"{spec!r} is neither a file nor 'hub_repo_id:filename'")
    from huggingface_hub import hf_hub_download
    repo, filename = spec.split(":", 1)
    return hf_hub_download(repo, filename, local_files_only=local_files_only or offline())


def _clip_model(source: str, local_files_only: bool, dtype):
    """A CLIPModel from a hub id or a local directory, frozen."""
    from transformers import CLIPModel
    if looks_local(source):
        source = local_dir(source, "CLIP model")
    model = CLIPModel.from_pretrained(source, local_files_only=local_files_only or offline(), dtype=dtype)
    return model.eval().requires_grad_(False)


def _clip_processor(source: str, local_files_only: bool, tokenizer: bool = True):
    """(:class:`ClipPreprocess`, tokenizer or None) from a CLIP processor's files (no model weights read)."""
    from transformers import AutoTokenizer, CLIPImageProcessor
    if looks_local(source):
        source = local_dir(source, "CLIP processor")
    kw = dict(local_files_only=local_files_only or offline())
    return (ClipPreprocess.from_processor(CLIPImageProcessor.from_pretrained(source, **kw)),
            AutoTokenizer.from_pretrained(source, **kw) if tokenizer else None)


def _image_embed(model, pixels):
    e = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return e / e.norm(dim=-1, keepdim=True)


def _text_embed(model, tokenizer, prompts, device):
    tok = tokenizer(list(prompts), padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").to(device)
    e = model.text_projection(model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output)
    return e / e.norm(dim=-1, keepdim=True)


def aesthetic_head(dim: int = 768) -> nn.Module:
    """The LAION aesthetic MLP (no activations, as trained): dim-1024-128-64-16-1."""
    head = nn.Module()
    head.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    head.forward = head.layers.forward
    return head


class AestheticReward(nn.Module):
    """LAION aesthetic score of images in [0, 1] (see module docstring)."""

    def __init__(self, clip, head, preprocess: ClipPreprocess):
        super().__init__()
        self.clip, self.head, self.preprocess = clip, head, preprocess

    def forward(self, images, prompts=None):
        _check(images)
        pixels = clip_preprocess(images, self.preprocess).to(next(self.clip.parameters()).dtype)
        return self.head(_image_embed(self.clip, pixels).to(self.head.layers[0].weight.dtype)).squeeze(-1)


@register("aesthetic")
def load_aesthetic(clip: str = AESTHETIC_CLIP, head: str = AESTHETIC_HEAD, *, local_files_only: bool = False,
                   dtype: torch.dtype = torch.float32, device="cpu") -> Reward:
    """The LAION aesthetic predictor: ``clip`` a hub id or local CLIP directory, ``head``
    a local ``.pth`` state dict or ``"hub_repo_id:filename"``."""
    try:
        model = _clip_model(clip, local_files_only, dtype)
        pre, _ = _clip_processor(clip, local_files_only, tokenizer=False)
        state = torch.load(_resolve_file(head, local_files_only), map_location="cpu", weights_only=True)
    except (OSError, ValueError) as e:
        raise load_error("the aesthetic predictor", f"{clip} + {head}", e) from e
    mlp = aesthetic_head(model.config.projection_dim)
    mlp.load_state_dict(state)
    return AestheticReward(model, mlp.eval().requires_grad_(False), pre).to(device)


class ClipScoreReward(nn.Module):
    """scale * cos(image embedding, prompt embedding) of a CLIP model (PickScore)."""

    def __init__(self, clip, tokenizer, preprocess: ClipPreprocess, scale: float | None = None):
        super().__init__()
        self.clip, self.tokenizer, self.preprocess = clip, tokenizer, preprocess
        self.scale = float(clip.logit_scale.exp()) if scale is None else float(scale)

    def forward(self, images, prompts):
        _check(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        dtype = next(self.clip.parameters()).dtype
        img = _image_embed(self.clip, clip_preprocess(images, self.preprocess).to(dtype))
        with torch.no_grad():
            txt = _text_embed(self.clip, self.tokenizer, prompts, images.device)
        return self.scale * (img * txt).sum(-1).to(images.dtype)


@register("pickscore")
def load_pickscore(model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, *,
                   local_files_only: bool = False, dtype: torch.dtype = torch.float32, device="cpu") -> Reward:
    """PickScore: ``model`` (CLIPModel) and ``processor`` (tokenizer and image-processor files,
    no model needed), each a hub id or a local directory."""
    try:
        clip = _clip_model(model, local_files_only, dtype)
        pre, tok = _clip_processor(processor, local_files_only)
    except (OSError, ValueError) as e:
        raise load_error("PickScore", f"{model} + {processor}", e) from e
    return ClipScoreReward(clip, tok, pre).to(device)


@register("clipscore")
def load_clipscore(model: str = CLIPSCORE_MODEL, *, local_files_only: bool = False, dtype: torch.dtype = torch.float32,
                   device="cpu") -> Reward:
    """Text-image alignment: 100 * cos(image, prompt) of the CLIP model ``model`` (a hub id or a
    local directory holding the model, its tokenizer and its image processor)."""
    try:
        clip = _clip_model(model, local_files_only, dtype)
        pre, tok = _clip_processor(model, local_files_only)
    except (OSError, ValueError) as e:
        raise load_error("the CLIP score", model, e) from e
    return ClipScoreReward(clip, tok, pre, scale=100.0).to(device)


@register("hpsv2")
def load_hpsv2(checkpoint: str = HPSV2_CHECKPOINT, processor: str = HPSV2_PROCESSOR, *, local_files_only: bool = False,
               dtype: torch.dtype = torch.float32, device="cpu") -> Reward:
    """HPS v2(.1): the open_clip checkpoint ``checkpoint`` (a local ``.pt`` or
    ``"hub_repo_id:filename"``) in transformers' CLIPModel, whose architecture (``config.json``)
    and tokenizer come from ``processor`` (a hub id or a local directory; no weights are read
    there); score = cos(image, prompt) on HPSv2's padded 224-pixel preprocessing."""
    from transformers import AutoTokenizer, CLIPConfig
    try:
        source = local_dir(processor, "CLIP config and tokenizer") if looks_local(processor) else processor
        kw = dict(local_files_only=local_files_only or offline())
        config, tokenizer = CLIPConfig.from_pretrained(source, **kw), AutoTokenizer.from_pretrained(source, **kw)
        state = torch.load(_resolve_file(checkpoint, local_files_only), map_location="cpu", weights_only=True)
        clip = clip_from_open_clip(state.get("state_dict", state), config, dtype)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        raise load_error("HPSv2", f"{checkpoint} + {processor}", e) from e
    size = config.vision_config.image_size   # HPSv2's ResizeMaxSize: to the model's image size (224)
    return ClipScoreReward(clip, tokenizer, ClipPreprocess(size, size, fit="pad"), scale=1.0).to(device)


register("ocr")(OcrReward)
register("jpeg_compressibility")(JpegCompressibility)


def differentiable(spec: str) -> bool:
    """Whether the reward ``spec`` (a name of :data:`REWARDS`, or a video reward's weighted sum of
    names) has a gradient in the images: none of its rewards' factories says
    ``differentiable = False``. Plans with first-order steps need it."""
    return all(getattr(REWARDS.get(name), "differentiable", True) for name in re.findall(r"[A-Za-z_]\w*", spec))


@register("imagereward")
def load_imagereward(**kwargs) -> Reward:
    """Not available (see the module docstring): raises ``ValueError`` saying why."""
    raise ValueError("the imagereward reward is not available: the image-reward package (1.5) needs transformers "
                     "<= 4.55 and halforder needs >= 4.56, and its BLIP model has no transformers port; use "
                     "pickscore, hpsv2, aesthetic or clipscore")

"""Differentiable rewards on decoded images: a registry of small factories.

Every reward is a callable ``reward(images, prompts) -> [N]`` with ``images`` of shape
``[N, 3, H, W]`` in [0, 1] and ``prompts`` a list of N strings, differentiable in the
images. ``make_reward(name, **kwargs)`` builds one from :data:`REWARDS`.

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
* ``hpsv2`` — HPS v2 / v2.1: an open_clip ViT-H/14 checkpoint; score = cos(image, prompt), on
  images preprocessed as HPSv2 does (longest edge to 224, padded to a square: a non-square video
  frame is scored whole, not cropped). Needs the ``open_clip_torch`` package, which needs
  torchvision (README, "Rewards").
* ``imagereward`` — not available: the ``image-reward`` package (1.5, its latest) imports helpers
  that transformers removed after 4.55 (``apply_chunking_to_forward``, ``prune_linear_layer``, ...)
  while halforder needs transformers >= 4.56 (``from_pretrained(dtype=...)``), and its BLIP
  model has no transformers port; asking for it is an error that says so.

The default hub ids and file names below were taken from public code that uses them
(TRL's DDPO config, the PickScore model card, HPSv2's version map, ImageReward's README)
but could not be opened here (no internet): the real weights were never loaded. The
hpsv2 code path is untested (open_clip is not installed in the test environment); the
aesthetic, PickScore and CLIP-score code paths are tested end to end on tiny random CLIP models
saved to local directories.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import nn

from .clip_preprocess import ClipPreprocess, clip_preprocess
from .hub import load_error, local_dir, looks_local, offline

Reward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
REWARDS: dict[str, Callable[..., Reward]] = {}

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth"  # TRL DDPO's copy of the head
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"
HPSV2_CHECKPOINT = "xswu/HPSv2:HPS_v2.1_compressed.pt"
IMAGEREWARD_MODEL = "ImageReward-v1.0"


def register(name: str):
    """Decorator: add a reward factory to :data:`REWARDS` under ``name``."""
    def wrap(factory):
        REWARDS[name] = factory
        return factory
    return wrap


def make_reward(name: str, **kwargs) -> Reward:
    """The reward ``name`` from :data:`REWARDS`, built with ``kwargs``."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**kwargs)


def _check(images: torch.Tensor):
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"a reward takes images [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")


# ----------------------------------------------------------------------------- built-in
@register("brightness")
def brightness(target: float | None = None) -> Reward:
    """Mean pixel value, or -(mean - target)^2 when ``target`` is given."""
    def reward(images, prompts=None):
        _check(images)
        m = images.mean((1, 2, 3))
        return m if target is None else -(m - target) ** 2
    return reward


@register("color")
def color(target: Sequence[float] = (1.0, 0.0, 0.0)) -> Reward:
    """Minus the mean squared distance of every pixel to the RGB colour ``target``."""
    t = torch.as_tensor(target, dtype=torch.float32)
    if t.shape != (3,):
        raise ValueError(f"color target must be 3 numbers (RGB), got {tuple(target)}")

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
    return RandomCNN(seed, width)


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
def load_hpsv2(checkpoint: str = HPSV2_CHECKPOINT, *, arch: str = "ViT-H-14", local_files_only: bool = False,
               device="cpu") -> Reward:
    """HPS v2(.1): an open_clip model ``arch`` (HPSv2's: ViT-H-14) with the HPS checkpoint (a
    local ``.pt`` or ``"hub_repo_id:filename"``); score = cos(image, prompt) on HPSv2's padded
    224-pixel preprocessing. Needs ``open_clip_torch``."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("the hpsv2 reward needs open_clip: pip install open_clip_torch") from e
    try:
        path = _resolve_file(checkpoint, local_files_only)
        model = open_clip.create_model(arch, pretrained=None)
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("state_dict", state))
    except (OSError, ValueError) as e:
        raise load_error("HPSv2", checkpoint, e) from e
    model = model.eval().requires_grad_(False).to(device)
    tokenizer = open_clip.get_tokenizer(arch)
    preprocess = ClipPreprocess(fit="pad")

    def reward(images, prompts):
        _check(images)
        img = model.encode_image(clip_preprocess(images, preprocess))
        with torch.no_grad():
            txt = model.encode_text(tokenizer(list(prompts)).to(images.device))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1)
    return reward


@register("imagereward")
def load_imagereward(**kwargs) -> Reward:
    """Not available (see the module docstring): raises ``ValueError`` saying why."""
    raise ValueError("the imagereward reward is not available: the image-reward package (1.5) needs transformers "
                     "<= 4.55 and halforder needs >= 4.56, and its BLIP model has no transformers port; use "
                     "pickscore, hpsv2, aesthetic or clipscore")

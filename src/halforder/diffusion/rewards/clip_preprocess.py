"""Differentiable CLIP image preprocessing (what ``CLIPImageProcessor`` does, in torch).

``CLIPImageProcessor`` resizes the shortest edge to ``size`` (bicubic), centre-crops to
``crop_size``, rescales to [0, 1] and normalises with the CLIP mean and std. Its PIL
path works on uint8 pixels and returns to uint8 after resizing, which cuts the gradient;
:func:`clip_preprocess` does the same on float images in [0, 1] with
``F.interpolate(mode="bicubic", antialias=True)`` (the PIL filter: Keys cubic a = -0.5,
support scaled with the downsampling factor), so rewards stay differentiable.

HPSv2 preprocesses differently (its ``ResizeMaxSize``): the longest edge is resized to ``size``
and the short side padded with black to a square, so a non-square frame is seen whole;
``ClipPreprocess(fit="pad")`` does that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocess:
    """Settings of a CLIP image processor (defaults: OpenAI CLIP at 224 pixels). ``fit``:
    ``"crop"`` (shortest edge to ``size``, centre crop to ``crop_size``) or ``"pad"`` (longest
    edge to ``size``, the rest padded with black: HPSv2)."""

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    fit: str = "crop"

    def __post_init__(self):
        if self.fit not in ("crop", "pad"):
            raise ValueError(f"fit must be 'crop' or 'pad', got {self.fit!r}")

    @classmethod
    def from_processor(cls, processor) -> "ClipPreprocess":
        """The settings of a ``transformers`` CLIP image processor."""
        size, crop = dict(processor.size), processor.crop_size
        size = size.get("shortest_edge") or size.get("height")
        crop = crop if isinstance(crop, int) else dict(crop)["height"]
        return cls(int(size), int(crop), tuple(processor.image_mean), tuple(processor.image_std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return clip_preprocess(images, self)


def clip_preprocess(images: torch.Tensor, cfg: ClipPreprocess = ClipPreprocess()) -> torch.Tensor:
    """Resize (shortest edge), centre-crop and normalise images ``[N, 3, H, W]`` in [0, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    target = _longest_edge(h, w, cfg.size) if cfg.fit == "pad" else _shortest_edge(h, w, cfg.size)
    if (h, w) != target:
        nh, nw = target
        # PIL resamples horizontally, then vertically, saturating to [0, 1] after each pass
        for size in ((h, nw), (nh, nw)):
            if images.shape[-2:] != size:
                images = F.interpolate(images, size=size, mode="bicubic", antialias=True,
                                       align_corners=False).clamp(0, 1)
    h, w = images.shape[-2:]
    if cfg.fit == "pad":      # HPSv2's ResizeMaxSize: black borders, the extra pixel right and below
        ph, pw = cfg.size - h, cfg.size - w
        images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = images.shape[-2:]
    c = cfg.crop_size
    if h < c or w < c:
        images = F.pad(images, (max(0, (c - w) // 2), max(0, (c - w + 1) // 2),
                                max(0, (c - h) // 2), max(0, (c - h + 1) // 2)))
        h, w = images.shape[-2:]
    top, left = (h - c) // 2, (w - c) // 2
    images = images[..., top:top + c, left:left + c]
    mean = images.new_tensor(cfg.mean).view(1, 3, 1, 1)
    std = images.new_tensor(cfg.std).view(1, 3, 1, 1)
    return (images - mean) / std


def _longest_edge(h: int, w: int, size: int) -> tuple[int, int]:
    # HPSv2's ResizeMaxSize: both sides scaled by size / longest side, rounded
    scale = size / max(h, w)
    return round(h * scale), round(w * scale)


def _shortest_edge(h: int, w: int, size: int) -> tuple[int, int]:
    # transformers' get_resize_output_image_size with default_to_square=False
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if h <= w else (new_long, new_short)

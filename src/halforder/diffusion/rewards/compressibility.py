"""DDPO's compressibility reward: minus the size of the image's JPEG file in kilobytes.

As in DDPO (``ddpo_pytorch/rewards.py``): each image in [0, 1] is rounded to 8 bits, saved by
Pillow as a JPEG at quality 95, and scored -bytes / 1000. A smaller file is a higher reward,
so the reward favours flat, smooth images. It has no gradient in the images
(``differentiable = False``): only plans without first-order steps can train on it.
"""
from __future__ import annotations

import io
from typing import Sequence

import torch


class JpegCompressibility:
    """``reward(images, prompts) -> [N]``: -(JPEG size in kB) of each image ``[N, 3, H, W]`` in
    [0, 1] at ``quality`` (the prompts are ignored). No gradient."""

    differentiable = False

    def __init__(self, quality: int = 95):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must lie in 1..100, got {quality}")
        self.quality = int(quality)

    def size_kb(self, image) -> float:
        """The JPEG size in kB of one RGB uint8 image ``[H, W, 3]`` (numpy)."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=self.quality)
        return buffer.tell() / 1000

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"a reward takes images [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        # one encoder call per image: a JPEG file is one image's
        return -torch.tensor([self.size_kb(p) for p in pixels], dtype=images.dtype, device=images.device)

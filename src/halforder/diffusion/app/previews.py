"""Sample grids (PNG) and videos (GIF), written atomically."""
from __future__ import annotations

import math

import torch

from ...training.files import atomic_file


def save_grid(images: torch.Tensor, path: str, ncol: int | None = None) -> str:
    """Write images ``[N, 3, H, W]`` in [0, 1] as one PNG grid (1-pixel gaps); returns ``path``."""
    from PIL import Image

    images = images.detach().float().cpu().clamp(0, 1)
    n, c, hgt, wid = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.ones(c, nrow * (hgt + 1) - 1, ncol * (wid + 1) - 1)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, r * (hgt + 1):r * (hgt + 1) + hgt, q * (wid + 1):q * (wid + 1) + wid] = images[i]
    arr = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    with atomic_file(path, ".png") as tmp:
        Image.fromarray(arr.squeeze(-1) if c == 1 else arr).save(tmp)
    return path


def write_video(videos: torch.Tensor, path: str, fps: float = 8.0) -> str:
    """Write videos ``[N, F, 3, H, W]`` in [0, 1] as one looping animated GIF (the N videos
    side by side, 1-pixel gaps) through imageio; returns ``path``."""
    import imageio

    v = videos.detach().float().cpu().clamp(0, 1)
    if v.dim() != 5 or v.shape[2] != 3:
        raise ValueError(f"videos must be [N, F, 3, H, W], got shape {tuple(v.shape)}")
    n, F, _, H, W = v.shape
    strip = torch.ones(F, 3, H, n * (W + 1) - 1)
    for i in range(n):
        strip[..., i * (W + 1):i * (W + 1) + W] = v[i]
    arr = (strip.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    with atomic_file(path, ".gif") as tmp:
        imageio.mimsave(tmp, list(arr), duration=1000.0 / fps, loop=0)
    return path

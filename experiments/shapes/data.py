"""A synthetic image distribution with visible structure: coloured shapes on black.

Each image is ``size x size`` RGB in [-1, 1] with one shape (circle, square or
triangle, uniformly) in one of four colours (uniformly), of random size and position,
drawn with anti-aliased edges from a signed distance. The shape label gives a known
reward distribution: one third of the data are circles.
"""
from __future__ import annotations

import math

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.15, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}


def _signed_distance(shape: torch.Tensor, cx, cy, r, px, py) -> torch.Tensor:
    """Signed distance (negative inside) of each image's shape at pixel centres [n, S, S]."""
    dx, dy = px - cx, py - cy
    circle = torch.sqrt(dx ** 2 + dy ** 2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r       # about the circle's area
    # Upright equilateral triangle with circumradius 1.25 r: max over its three edges of
    # the distance along the outward normal (exact inside and near the edges).
    rt = 1.25 * r
    d = torch.stack([-dy - rt / 2,
                     dx * math.cos(math.pi / 6) + dy * math.sin(math.pi / 6) - rt / 2,
                     -dx * math.cos(math.pi / 6) + dy * math.sin(math.pi / 6) - rt / 2]).amax(0)
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, d))


def sample_shapes(n: int, size: int = 16, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n images ``[n, 3, size, size]`` in [-1, 1], their shape labels ``[n]`` (index into
    ``SHAPES``) and colour labels ``[n]`` (index into ``COLOURS``)."""
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    u = torch.rand(n, 5, generator=generator)
    shape = torch.randint(0, len(SHAPES), (n,), generator=generator)
    colour = torch.randint(0, len(COLOURS), (n,), generator=generator)
    r = size * (0.18 + 0.14 * u[:, 0])                        # 2.9 .. 5.1 pixels at size 16
    margin = 1.1 * r
    cx = margin + (size - 2 * margin) * u[:, 1]
    cy = margin + (size - 2 * margin) * u[:, 2]
    return draw(shape, colour, cx, cy, r, size), shape, colour


def draw(shape: torch.Tensor, colour: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor,
         size: int = 16) -> torch.Tensor:
    """Images ``[n, 3, size, size]`` in [-1, 1] of the given shapes (indices into ``SHAPES``),
    colours (indices into ``COLOURS``), centres (cx, cy) and sizes r in pixels, all ``[n]``."""
    n = shape.shape[0]
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    py, px = torch.meshgrid(grid, grid, indexing="ij")
    b = (lambda v: v.view(n, 1, 1))
    sd = _signed_distance(b(shape), b(cx), b(cy), b(r), px, py)
    alpha = (0.5 - sd).clamp(0, 1)                             # anti-aliased coverage
    rgb = torch.tensor(list(COLOURS.values()))[colour]          # [n, 3]
    img = alpha.unsqueeze(1) * rgb.view(n, 3, 1, 1)
    return img * 2 - 1

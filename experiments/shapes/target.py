"""A reward with headroom: how close a sample is to one target image.

    R(x) = exp(-mean_pixels (x - x*)^2 / s),   x, x* in [0, 1]

x* is one drawing of :mod:`.data` (by default a blue circle of radius 4.5 in the centre).
R = 1 only if the sample is x* exactly, so reaching the ceiling means collapsing every
start noise onto one image: far from the pretrained model (mean R on its data is about
0.05 at s = 0.03) and reached only gradually, which leaves room to tell estimators apart.
It is smooth, so every estimator family applies; it cannot be hacked, since it is its
own ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import COLOURS, SHAPES, draw


@dataclass(frozen=True)
class TargetConfig:
    """The target image and the reward's scale.

    Attributes:
      shape, colour: names from ``SHAPES`` and ``COLOURS``.
      radius: size in pixels; the shape is centred.
      size: image side in pixels.
      scale: s, the mean squared pixel error at which R = 1/e.
    """

    shape: str = "circle"
    colour: str = "blue"
    radius: float = 4.5
    size: int = 16
    scale: float = 0.03

    def image(self) -> torch.Tensor:
        """x* as ``[3, size, size]`` in [0, 1]."""
        one = (lambda v: torch.tensor([v]))
        c = self.size / 2
        x = draw(one(SHAPES.index(self.shape)), one(list(COLOURS).index(self.colour)), one(c), one(c),
                 one(self.radius), self.size)
        return (x[0] + 1) / 2


@dataclass(frozen=True, eq=False)
class TargetReward:
    """``reward(images, prompts) -> [N]``: R of the module docstring, images in [0, 1]."""

    target: torch.Tensor
    scale: float

    @classmethod
    def from_config(cls, config: TargetConfig) -> "TargetReward":
        return cls(config.image(), config.scale)

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        return torch.exp(-(images - self.target).pow(2).flatten(1).mean(1) / self.scale)

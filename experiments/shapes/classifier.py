"""A differentiable reward on :mod:`.data` images: the probability that the shape is a circle.

A small CNN is trained in-process to tell circles, squares and triangles apart (with
Gaussian pixel noise as augmentation, so that it is defined on imperfect samples). The
reward is its softmax probability of "circle", in [0, 1]; on the data its mean is about
1/3, the fraction of circles. Being a learned classifier it can be hacked: pushing its
probability up need not make better circles, and a second classifier trained from
another seed (:func:`pretrained_classifier` with ``seed=1``) measures that.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .cache import cached_module, config_key
from .data import SHAPES, sample_shapes


@dataclass(frozen=True)
class ClassifierConfig:
    """How the shape classifier is built and trained.

    Attributes:
      size: image side in pixels.
      width: channels of the first convolution (doubled twice).
      steps: optimiser steps.
      batch: images per step.
      lr: Adam learning rate.
      noise: augmentation: pixel noise with std uniform in [0, noise] (images in [-1, 1]).
      seed: seeds the weights, the data and the augmentation.
    """

    size: int = 16
    width: int = 16
    steps: int = 400
    batch: int = 128
    lr: float = 3e-3
    noise: float = 0.3
    seed: int = 0

    def key(self) -> str:
        """A short hash of the configuration (the cache key)."""
        return config_key(self)


class ShapeClassifier(nn.Module):
    """Images ``[N, 3, S, S]`` in [-1, 1] -> logits ``[N, outputs]`` (by default over :data:`SHAPES`)."""

    def __init__(self, width: int = 16, outputs: int = len(SHAPES)):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(config: ClassifierConfig) -> ShapeClassifier:
    """Train a :class:`ShapeClassifier` on fresh samples every step; returns it in eval mode."""
    g = torch.Generator().manual_seed(1000 + config.seed)
    with torch.random.fork_rng(devices=[]):  # torch.nn initialises weights from the global RNG
        torch.manual_seed(config.seed)
        model = ShapeClassifier(config.width)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in range(config.steps):
        x, y, _ = sample_shapes(config.batch, config.size, generator=g)
        s = config.noise * torch.rand(config.batch, 1, 1, 1, generator=g)
        x = x + s * torch.randn(x.shape, generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def pretrained_classifier(config: ClassifierConfig, cache_dir: str | os.PathLike) -> ShapeClassifier:
    """The classifier for ``config``: loaded from ``cache_dir/classifier-<key>.safetensors``
    if present, otherwise trained and stored there. Its parameters are frozen."""
    return cached_module("classifier", config, cache_dir, lambda: ShapeClassifier(config.width),
                         lambda: train_classifier(config))


@dataclass(frozen=True, eq=False)
class CircleReward:
    """An image reward ``reward(images, prompts) -> [N]``: the classifier's probability that
    each image (in [0, 1], as a sampler's output is displayed) is a circle."""

    classifier: ShapeClassifier

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        return self.classifier(images * 2 - 1).softmax(-1)[:, SHAPES.index("circle")]

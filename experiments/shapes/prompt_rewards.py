"""Rewards with no gradient on :mod:`.data` images and the prompts of :mod:`.prompted`.

:class:`PromptFollowing` is a reward of GenEval's kind: 1 when a fixed classifier finds the
prompt's shape and the prompt's colour in the image, else 0. The classifier
(:class:`~.classifier.ShapeClassifier` with seven outputs: three shape logits, four colour
logits) is trained in-process with pixel-noise augmentation and cached. The reward is a
decision, computed without autograd, so it declares ``differentiable = False``; a second
classifier trained from another seed scores the same decision, as the check for hacking.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .cache import cached_module
from .classifier import ClassifierConfig, ShapeClassifier
from .data import COLOURS, SHAPES, sample_shapes
from .prompted import PROMPTS

OUTPUTS = len(SHAPES) + len(COLOURS)


def train_prompt_classifier(config: ClassifierConfig) -> ShapeClassifier:
    """A classifier of shape and colour, trained on fresh noisy samples every step (eval mode)."""
    g = torch.Generator().manual_seed(2000 + config.seed)
    with torch.random.fork_rng(devices=[]):  # torch.nn initialises weights from the global RNG
        torch.manual_seed(config.seed)
        model = ShapeClassifier(config.width, OUTPUTS)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in range(config.steps):
        x, shape, colour = sample_shapes(config.batch, config.size, generator=g)
        s = config.noise * torch.rand(config.batch, 1, 1, 1, generator=g)
        logits = model(x + s * torch.randn(x.shape, generator=g))
        loss = (nn.functional.cross_entropy(logits[:, :len(SHAPES)], shape)
                + nn.functional.cross_entropy(logits[:, len(SHAPES):], colour))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def prompt_classifier(config: ClassifierConfig, cache_dir: str | os.PathLike) -> ShapeClassifier:
    """The shape-and-colour classifier for ``config``, from ``cache_dir`` or trained and stored there."""
    return cached_module("prompt-classifier", config, cache_dir, lambda: ShapeClassifier(config.width, OUTPUTS),
                         lambda: train_prompt_classifier(config))


@dataclass(frozen=True, eq=False)
class PromptFollowing:
    """``reward(images, prompts) -> [N]`` in {0, 1}: whether the classifier's most likely shape
    and most likely colour of each image (in [0, 1]) are its prompt's. No gradient."""

    classifier: ShapeClassifier

    differentiable = False

    @torch.no_grad()
    def decide(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's (shape, colour) indices ``[N]`` of images in [0, 1]."""
        logits = self.classifier(images.float() * 2 - 1)
        return logits[:, :len(SHAPES)].argmax(-1), logits[:, len(SHAPES):].argmax(-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        unknown = sorted(set(prompts) - set(PROMPTS))
        if unknown:
            raise ValueError(f"prompts must name a colour and a shape, e.g. 'red circle'; got {unknown[:3]}")
        want = torch.tensor([PROMPTS[p] for p in prompts])
        shape, colour = self.decide(images)
        return ((shape == want[:, 0]) & (colour == want[:, 1])).to(images.dtype)

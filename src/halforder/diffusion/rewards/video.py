"""Rewards on decoded video frames.

A video reward is ``reward(frames, prompts) -> [N]`` with ``frames`` of shape
``[N, k, 3, H, W]`` in [0, 1] (the k decoded frames of each sample, in time order, see
:func:`halforder.diffusion.models.video.frames.frame_indices`), differentiable in the frames.

* :func:`per_frame` — an image reward of :mod:`halforder.diffusion.rewards` averaged over the decoded frames.
* :func:`temporal_consistency` — mean cosine similarity of adjacent frames' features
  (in the spirit of VBench's subject/background consistency, which use DINO/CLIP
  features). Features: ``"pixels"`` (centred, 4x4-pooled pixels; CPU-cheap),
  ``"random_cnn"`` (a fixed random conv net; CPU-cheap) or ``"clip"`` (a CLIP image
  encoder from a hub id or local path, with the differentiable CLIP preprocessing).
* :func:`weighted` — sum_i w_i R_i.

``make_video_reward(spec)`` reads a spec such as ``"aesthetic"`` (any image reward name,
applied per frame), ``"temporal"``, or ``"brightness+0.5*temporal"`` (a weighted sum).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip_preprocess import ClipPreprocess, clip_preprocess
from ..models.hub import load_error, local_dir, looks_local, offline
from . import REWARDS, check_options, make_reward

VideoReward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
VIDEO_REWARDS: dict[str, Callable[..., VideoReward]] = {}


def _check(frames: torch.Tensor) -> None:
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"a video reward takes frames [N, k, 3, H, W] in [0, 1], got shape {tuple(frames.shape)}")


class PerFrame(nn.Module):
    """The mean over decoded frames of an image reward (see :func:`per_frame`); a module, so
    that ``.to(device)`` moves a learned image reward with it."""

    def __init__(self, image_reward: Callable[[torch.Tensor, list], torch.Tensor]):
        super().__init__()
        self.image_reward = image_reward

    def forward(self, frames, prompts):
        _check(frames)
        n, k = frames.shape[:2]
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} videos")
        rep = [p for p in prompts for _ in range(k)]
        return self.image_reward(frames.reshape(n * k, *frames.shape[2:]), rep).reshape(n, k).mean(1)


def per_frame(image_reward: Callable[[torch.Tensor, list], torch.Tensor]) -> PerFrame:
    """The mean over decoded frames of an image reward ``(images [M, 3, H, W], prompts) -> [M]``
    (each frame is scored with its video's prompt)."""
    return PerFrame(image_reward)


class PixelFeatures(nn.Module):
    """Frame features: 4x4 average-pooled pixels, centred per frame (a cheap, fixed feature)."""

    def forward(self, images):
        f = F.adaptive_avg_pool2d(images, 4).flatten(1)
        return f - f.mean(1, keepdim=True)


class RandomConvFeatures(nn.Module):
    """A fixed random conv net (3 -> width -> width, stride 2, SiLU, global mean): cheap features."""

    def __init__(self, seed: int = 0, width: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1, self.conv2 = nn.Conv2d(3, width, 3, 2, 1), nn.Conv2d(width, width, 3, 2, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        self.requires_grad_(False)

    def forward(self, images):
        return F.silu(self.conv2(F.silu(self.conv1(images * 2 - 1)))).mean((2, 3))


class ClipFeatures(nn.Module):
    """CLIP image embeddings of frames in [0, 1] (differentiable preprocessing)."""

    def __init__(self, model, preprocess):
        super().__init__()
        self.model, self.preprocess = model.eval().requires_grad_(False), preprocess

    def forward(self, images):
        px = clip_preprocess(images, self.preprocess).to(next(self.model.parameters()).dtype)
        return self.model(pixel_values=px).image_embeds.to(images.dtype)


def load_clip_features(model: str = "openai/clip-vit-large-patch14", *, local_files_only: bool = False,
                       dtype: torch.dtype = torch.float32) -> ClipFeatures:
    """:class:`ClipFeatures` from a hub id or a local CLIP directory (``CLIPVisionModelWithProjection``)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    if looks_local(model):
        model = local_dir(model, "CLIP model")
    kw = dict(local_files_only=local_files_only or offline())
    try:
        m = CLIPVisionModelWithProjection.from_pretrained(model, dtype=dtype, **kw)
        proc = CLIPImageProcessor.from_pretrained(model, **kw)
    except (OSError, ValueError) as e:
        raise load_error("CLIP features", model, e) from e
    return ClipFeatures(m, ClipPreprocess.from_processor(proc))


class TemporalConsistency(nn.Module):
    """Mean cosine similarity of adjacent frames' features, in [-1, 1] (needs k >= 2 frames)."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, frames, prompts=None):
        _check(frames)
        n, k = frames.shape[:2]
        if k < 2:
            raise ValueError("the temporal-consistency reward needs at least 2 decoded frames per video "
                             "(frames='all' or 'ends', not 'random')")
        f = self.features(frames.reshape(n * k, *frames.shape[2:])).reshape(n, k, -1)
        return F.cosine_similarity(f[:, 1:], f[:, :-1], dim=-1, eps=1e-8).mean(1)


def min_frames(reward) -> int:
    """The fewest decoded frames per video that ``reward`` accepts (2 for temporal terms)."""
    if isinstance(reward, TemporalConsistency):
        return 2
    if isinstance(reward, Weighted):
        return max(min_frames(r) for r in reward.rewards)
    return 1


def register(name: str):
    """Decorator: add a video reward factory to :data:`VIDEO_REWARDS`."""
    def wrap(factory):
        VIDEO_REWARDS[name] = factory
        return factory
    return wrap


@register("temporal")
def temporal_consistency(features: str | nn.Module = "pixels", *, seed: int = 0, model: str | None = None,
                         local_files_only: bool = False) -> TemporalConsistency:
    """Temporal consistency with ``features``: ``"pixels"``, ``"random_cnn"`` (seeded),
    ``"clip"`` (``model``: hub id or local path) or any module ``[M, 3, H, W] -> [M, D]``."""
    if isinstance(features, nn.Module):
        return TemporalConsistency(features)
    if features == "pixels":
        return TemporalConsistency(PixelFeatures())
    if features == "random_cnn":
        return TemporalConsistency(RandomConvFeatures(seed))
    if features == "clip":
        kw = {} if model is None else {"model": model}
        return TemporalConsistency(load_clip_features(local_files_only=local_files_only, **kw))
    raise ValueError(f"unknown features {features!r}; use 'pixels', 'random_cnn', 'clip' or a module")


class Weighted(nn.Module):
    """sum_i w_i R_i(frames, prompts) of video rewards."""

    def __init__(self, terms: Sequence[tuple[float, VideoReward]]):
        super().__init__()
        if not terms:
            raise ValueError("a weighted reward needs at least one term")
        self.weights = tuple(float(w) for w, _ in terms)
        self.rewards = list(r for _, r in terms)
        self.parts = nn.ModuleList([r for r in self.rewards if isinstance(r, nn.Module)])

    def forward(self, frames, prompts):
        return sum(w * r(frames, prompts) for w, r in zip(self.weights, self.rewards))


def weighted(terms: Sequence[tuple[float, VideoReward]] | Mapping[float, VideoReward]) -> Weighted:
    """The weighted sum of video rewards given as ``[(weight, reward), ...]``."""
    return Weighted(list(terms.items()) if isinstance(terms, Mapping) else list(terms))


_TERM = re.compile(r"^\s*(?:([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*$")


def parse_spec(spec: str) -> list[tuple[float, str]]:
    """The terms ``[(weight, name), ...]`` of a video reward spec (see :func:`make_video_reward`);
    ``ValueError`` on a term that cannot be read or an unknown name."""
    parsed = []
    for t in (spec.split("+") if spec else []):
        m = _TERM.match(t)
        if m is None:
            raise ValueError(f"cannot read reward term {t!r} of {spec!r}; write e.g. 'aesthetic+0.5*temporal'")
        parsed.append((float(m.group(1)) if m.group(1) else 1.0, m.group(2)))
    if not parsed:
        raise ValueError("empty reward spec")
    known = sorted(set(VIDEO_REWARDS) | set(REWARDS))
    for _, name in parsed:
        if name not in known:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(known)}")
    return parsed


def check_video_reward_options(spec: str, options) -> None:
    """``ValueError`` unless the video reward ``spec`` takes ``options``: a single name's options
    are checked against its factory's signature; a sum's must be ``{term name: {options}}``."""
    parsed = parse_spec(spec)
    factory = {**REWARDS, **VIDEO_REWARDS}
    if len(parsed) == 1 and parsed[0][0] == 1.0:
        return check_options(parsed[0][1], factory[parsed[0][1]], options)
    if not isinstance(options, Mapping):
        raise ValueError(f"the options of reward {spec!r} must be a mapping of names to values, got {options!r}")
    names = [name for _, name in parsed]
    for key, value in options.items():
        if key not in names:
            raise ValueError(f"reward {spec!r} is a sum: its options are given per term, as {{term: {{option: "
                             f"value}}}} with a term of {', '.join(names)}; got {key!r}")
        check_options(key, factory[key], value)


def make_video_reward(spec: str, **kwargs) -> VideoReward:
    """A video reward from a spec: a name in :data:`VIDEO_REWARDS` (``temporal``), an image
    reward name of :data:`~halforder.diffusion.rewards.REWARDS` (averaged over frames), or a
    sum of weighted terms ``"w1*name1+w2*name2"``. ``kwargs`` go to a single name's factory;
    for a sum, ``kwargs[name]`` (a dict) goes to that term's factory."""
    check_video_reward_options(spec, kwargs)
    parsed = parse_spec(spec)

    def one(name, kw):
        if name not in VIDEO_REWARDS:
            return per_frame(make_reward(name, **kw))
        try:
            return VIDEO_REWARDS[name](**kw)
        except TypeError as e:
            raise ValueError(f"reward {name!r} cannot take the options {kw}: {e}") from None

    if len(parsed) == 1 and parsed[0][0] == 1.0:
        return one(parsed[0][1], kwargs)
    return weighted([(w, one(name, dict(kwargs.get(name, {})))) for w, name in parsed])

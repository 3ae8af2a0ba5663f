"""Video frames for the reward: which frames, decoded how, and the video view of a task.

The reward decodes only some frames (:func:`frame_indices`): one random frame per sample,
the first/middle/last frames, or all of them. The VAE decodes frames independently, so a
subset costs (and keeps for backward) only its share of the decoder's activations: the
main memory lever (``benchmarks/video_memory.py``). The random frame is drawn from its
own generator, never from the chain's noise, so every plan stays unbiased for the
objective E_f E[R(frame f)] (the expectation now also over f).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from ..components import unet_latent_shape
from ...sampling.views import Reward, decode_latents

FrameSpec = Union[str, int, Sequence[int]]
#: ``decode(vae, z, idx) -> frames [N, k, 3, H, W]`` in [0, 1] of video latents ``z`` at frame indices ``idx``
#: ``[N, k]`` (all frames if None): :func:`decode_frames` (frame by frame), or a video VAE's (Wan)
FrameDecoder = Callable[[torch.nn.Module, torch.Tensor, Union[torch.Tensor, None]], torch.Tensor]
FRAME_MODES = ("all", "random", "ends", "first", "middle", "last")


def frame_indices(spec: FrameSpec, num_frames: int, n: int, generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
    """The frames the reward decodes, ``[n, k]`` (row i: sample i's frames, in time order).

    ``spec``: ``"all"``; ``"random"`` (one frame per sample, uniform, drawn from
    ``generator``); ``"ends"`` (first, middle = F // 2, last; duplicates dropped when F < 3);
    ``"first"``, ``"middle"``, ``"last"``; an index or a sequence of indices (negative
    indices count from the end)."""
    F = int(num_frames)
    if F < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(spec, str):
        if spec not in FRAME_MODES:
            raise ValueError(f"unknown frame selection {spec!r}; use one of {', '.join(FRAME_MODES)} "
                             f"or frame indices")
        if spec == "random":
            return torch.randint(F, (n, 1), generator=generator, device=device)
        idx = {"all": list(range(F)), "ends": sorted({0, F // 2, F - 1}), "first": [0], "middle": [F // 2],
               "last": [F - 1]}[spec]
    else:
        raw = [spec] if isinstance(spec, int) else list(spec)
        if not raw:
            raise ValueError("an empty list of frames")
        if any(not -F <= int(i) < F for i in raw):
            raise ValueError(f"frame indices {raw} out of range for {F} frames")
        idx = sorted({int(i) % F for i in raw})
    return torch.tensor(idx, device=device).unsqueeze(0).expand(n, -1)


def take_frames(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Latent frames ``[N, k, C, h, w]`` of video latents ``z`` ``[N, C, F, h, w]`` at ``idx`` ``[N, k]``."""
    zf = z.transpose(1, 2)  # [N, F, C, h, w]
    return zf[torch.arange(z.shape[0], device=z.device).unsqueeze(1), idx.to(z.device)]


def decode_frames(vae, z: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Frames ``[N, k, 3, H, W]`` in [0, 1], differentiably, from video latents ``[N, C, F, h, w]``
    (all frames if ``idx`` is None). Frames are decoded independently, as
    ``TextToVideoSDPipeline.decode_latents`` does."""
    if z.dim() != 5:
        raise ValueError(f"video latents must be [N, C, F, h, w], got shape {tuple(z.shape)}")
    if idx is None:
        idx = torch.arange(z.shape[2], device=z.device).unsqueeze(0).expand(z.shape[0], -1)
    lat = take_frames(z, idx)
    n, k = lat.shape[:2]
    img = decode_latents(vae, lat.reshape(n * k, *lat.shape[2:]))
    return img.reshape(n, k, *img.shape[1:])


@dataclass(frozen=True, eq=False)
class DecodedVideoReward:
    """``reward_fn`` of a video chain: latents ``[N, C, F, h, w]`` -> decode the selected
    frames -> ``reward(frames [N, k, 3, H, W] in [0, 1], prompts) -> [N]`` (see
    :mod:`halforder.diffusion.rewards.video`).

    ``frame_generator`` draws the ``"random"`` frames (the global RNG if None); it is
    separate from the chain's noise, so the frame does not depend on the sample's noise.
    ``decode`` and ``num_frames``: the model's :data:`FrameDecoder` and its decoded frames per
    video (None: one per latent frame).
    """

    reward: Reward
    prompts: tuple[str, ...]
    vae: torch.nn.Module
    frames: FrameSpec = "all"
    frame_generator: torch.Generator | None = None
    decode: FrameDecoder = decode_frames
    num_frames: int | None = None

    def __post_init__(self):
        frame_indices(self.frames, 3, 1, torch.Generator())  # validates the spec early

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        n, k = len(z), len(self.prompts)
        if k not in (1, n):
            raise ValueError(f"{k} reward prompts for {n} samples; give 1 or {n}")
        gen = self.frame_generator
        idx = frame_indices(self.frames, self.num_frames or z.shape[2], n, gen,
                            device=gen.device if gen is not None else None)
        return self.reward(self.decode(self.vae, z, idx), list(self.prompts) * (n // k))


@dataclass(frozen=True, eq=False)
class VideoView:
    """Video: latents ``[C, F, h, w]``; the reward sees the frames of ``frames`` decoded,
    previews show every frame side by side (a film strip per sample). ``decode`` and
    ``num_frames``: a video VAE's decoder and its frames per video (Wan: 4(F - 1) + 1)."""

    vae: torch.nn.Module
    latent_shape: tuple[int, ...]
    frames: FrameSpec = "random"
    decode: FrameDecoder = decode_frames
    num_frames: int | None = None

    def __post_init__(self):
        frame_indices(self.frames, self.num_frames or self.latent_shape[1], 1, torch.Generator())  # validates the spec

    def reward_fn(self, reward: Reward, prompts: Sequence[str], generator: torch.Generator | None = None
                  ) -> DecodedVideoReward:
        """The frames' generator is seeded from ``generator``: random frames are reproducible
        (and checkpointed with it) but drawn apart from the samples' noise."""
        if generator is None:   # evaluation (DiffusionTask.evaluate): frames from a fixed seed
            frames_gen = torch.Generator().manual_seed(0)
        else:
            frames_gen = torch.Generator(device=generator.device)
            frames_gen.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=generator, device=generator.device)))
        return DecodedVideoReward(reward, tuple(prompts), self.vae, self.frames, frames_gen, self.decode,
                                  self.num_frames)

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        v = self.videos(z)                                      # [N, F, 3, H, W]
        return v.permute(0, 2, 3, 1, 4).reshape(v.shape[0], v.shape[2], v.shape[3], -1)

    def videos(self, z: torch.Tensor) -> torch.Tensor:
        """Every frame of final latents, ``[N, F, 3, H, W]`` in [0, 1]."""
        with torch.no_grad():
            return self.decode(self.vae, z, None)


def video_view(components, num_frames: int, frames: FrameSpec = "all", latent_size=None) -> VideoView:
    """The :class:`VideoView` of a video model: ``num_frames`` frames of the UNet's latent
    size (or ``latent_size``, an int or (h, w)); the reward decodes ``frames``."""
    if int(num_frames) < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    c, h, w = unet_latent_shape(components.unet, latent_size)
    return VideoView(components.vae, (c, int(num_frames), h, w), frames)


def parse_frames(text: str) -> FrameSpec:
    """A frame selection from the command line: a mode name or comma-separated indices."""
    text = text.strip()
    if text in FRAME_MODES:
        return text
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"frames must be one of {', '.join(FRAME_MODES)} or indices like 0,8,15; got {text!r}") \
            from None

"""Text conditioning: CLIP embeddings of prompts, each distinct prompt encoded once.

``encode_prompts`` computes the embeddings as ``StableDiffusionPipeline.encode_prompt``
does (other model families encode in :mod:`halforder.diffusion.models.families`);
:class:`PromptEncoder` caches any encoder's rows per prompt, so a training run encodes each
of its prompts once however many batches draw it; :func:`text_conditioning` gives a chain
its context, fixed or per step (DCoT).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import torch

from .denoiser import map_conditioning

Prompts = Union[Sequence[str], Callable[[int], Sequence[str]]]


def encode_prompts(components, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings ``[N, L, D]`` as ``StableDiffusionPipeline.encode_prompt``
    computes them (max-length padding, last hidden state, no clip skip)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tok = components.tokenizer(list(prompts), padding="max_length", max_length=components.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
    te = components.text_encoder
    mask = tok.attention_mask.to(te.device) if getattr(te.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return te(tok.input_ids.to(te.device), attention_mask=mask)[0]


@dataclass(frozen=True, eq=False)
class PromptEncoder:
    """``encoder(prompts) -> conditioning``: ``encode(prompts)`` (rows ``[N, ...]``: one tensor,
    or a dict of them) with each distinct prompt encoded once and kept (the newest
    ``capacity`` prompts)."""

    encode: Callable[[list[str]], Union[torch.Tensor, Mapping[str, torch.Tensor]]]
    capacity: int = 1024
    _cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    def __call__(self, prompts: Sequence[str]):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            out = self.encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = map_conditioning(lambda v: v[i], out)
        for p in prompts:
            self._cache.move_to_end(p)
        got = [self._cache[p] for p in prompts]
        out = {k: torch.stack([g[k] for g in got]) for k in got[0]} if isinstance(got[0], Mapping) else torch.stack(got)
        while len(self._cache) > max(self.capacity, len(prompts)):
            self._cache.popitem(last=False)
        return out


def text_conditioning(encoder: Callable[[Sequence[str]], torch.Tensor] | None, prompts: Prompts, T: int,
                      guidance_scale: float, negative_prompt: str = ""):
    """Text embeddings for a chain of T steps: ``(context, negative, final_prompts)``.

    ``context`` is one ``[N, L, D]`` tensor for fixed prompts, or a callable ``t -> [N, L, D]``
    when ``prompts`` is a callable ``t -> prompts`` (per-step conditioning). ``negative`` is
    the unconditional embedding for classifier-free guidance (None when ``guidance_scale
    <= 1``); ``final_prompts`` are the prompts of step 1, the ones a reward sees by
    default. With ``encoder=None`` (an unconditional model) both embeddings are None."""
    if callable(prompts):
        per_step = {t: tuple(prompts(t)) for t in range(1, T + 1)}
        if not all(per_step.values()):
            raise ValueError("prompts(t) must give at least one prompt at every step")
        final = per_step[1]
    else:
        final = tuple([prompts] if isinstance(prompts, str) else prompts)
        if not final:
            raise ValueError("prompts must not be empty")
    if encoder is None:
        return None, None, final
    if callable(prompts):
        embedded = {ps: encoder(ps) for ps in set(per_step.values())}
        context = (lambda t: embedded[per_step[t]])
    else:
        context = encoder(final)
    negative = encoder([negative_prompt]) if guidance_scale > 1 else None
    return context, negative, final

"""The denoiser: a diffusers network called functionally, with classifier-free guidance
and per-sample parameters.

``denoiser(x_t, t, params) -> model output`` (what the scheduler's ``prediction_type``
names: epsilon, v or sample; a flow-matching model's velocity). Any network drives a chain
this way: ``UNet2DConditionModel`` (latents [N,C,H,W], text conditioning), ``UNet2DModel``
(pixels, unconditional), ``UNet3DConditionModel`` (latents [N,C,F,H,W]) through
:func:`unet_call`, and the transformers of SD3, FLUX and Wan through their model family's call
(:mod:`halforder.diffusion.models.families`), whose conditioning is a dict of tensors. ``params`` are the
trainable tensors (the LoRA weights) by name, given to ``torch.func.functional_call``; a
value with a leading sample axis (parameter noise, per-sample gradients) gives every
sample its own copy.

Precision: the network may hold its frozen weights in bfloat16 or float16 while the
trainable ``params`` stay float32. The denoiser casts its inputs (state and text
conditioning) to the network's dtype and its output back to the state's dtype, so the
chain's states, noise and every estimator sum stay float32 and nothing relies on autocast.

Compute: every call is reported to :mod:`halforder.estimators.compute` as n evaluations of
its n samples (and n more for each backward pass through its output), outside ``vmap``, the
loop over samples and ``torch.compile``, so the count is the same under each of them.

Per-sample parameters under ``vmap`` on CUDA: the fused attention kernels
(memory-efficient, flash, cuDNN) fail in vmap's backward, so the calls run with PyTorch's
math attention there (:func:`vmap_attention_backends`); the math kernel keeps the attention
matrix, so ``batching="loop"`` is the lighter choice when that matrix is large.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import torch
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...estimators.compute import record

Params = Mapping[str, torch.Tensor]
Denoiser = Callable[[torch.Tensor, int, Params], torch.Tensor]
#: text conditioning, rows [N, ...] per sample: one tensor (a UNet's encoder_hidden_states) or a dict of them
Conditioning = Union[torch.Tensor, Mapping[str, torch.Tensor]]
#: ``call(module, params, x, timestep, conditioning or None) -> network output`` for one kind of network
NetworkCall = Callable[[torch.nn.Module, Params, torch.Tensor, torch.Tensor, Optional[Conditioning]], torch.Tensor]
#: ``guidance(uncond, cond, w) -> output``: how classifier-free guidance combines the two branches
Guidance = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
BATCHING = ("vmap", "loop")
# torch warns when vmap falls back to a loop for an operator without a batching rule (the CPU
# flash attention of diffusers' attention processors): the result is right, only slower.
VMAP_FALLBACK = "There is a performance drop because we have not yet implemented the batching rule"


def vmap_attention_backends(device_type: str) -> list[SDPBackend] | None:
    """The attention kernels that ``torch.func.vmap`` may use on ``device_type`` with
    gradients: on CUDA only the math kernel (the fused kernels' backward fails under vmap);
    None (no restriction) elsewhere."""
    return [SDPBackend.MATH] if device_type == "cuda" else None


def _attention(device_type: str):
    backends = vmap_attention_backends(device_type)
    return contextlib.nullcontext() if backends is None else sdpa_kernel(backends)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a network's frozen weights (trainable adapters may be float32)."""
    frozen = [p.dtype for p in module.parameters() if not p.requires_grad and p.is_floating_point()]
    return frozen[0] if frozen else next(module.parameters()).dtype


def unet_call(module, params: Params, x: torch.Tensor, timestep: torch.Tensor, c: torch.Tensor | None):
    """A diffusers UNet's output: ``module(x, timestep, encoder_hidden_states=c).sample``."""
    if c is None:
        return functional_call(module, params, (x, timestep)).sample
    return functional_call(module, params, (x, timestep), {"encoder_hidden_states": c}).sample


def cfg(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance as the pipelines combine it: ``uncond + w * (cond - uncond)``."""
    return uncond + w * (cond - uncond)


def map_conditioning(f, c):
    """``f`` applied to every tensor of a conditioning (None stays None)."""
    if c is None:
        return None
    return {k: f(v) for k, v in c.items()} if isinstance(c, Mapping) else f(c)


def rows(c) -> int:
    """The number of rows of a conditioning."""
    return len(next(iter(c.values()))) if isinstance(c, Mapping) else len(c)


@dataclass(frozen=True, eq=False)
class ModuleDenoiser:
    """``denoiser(x, t, params)`` for a diffusers network (UNet2DConditionModel,
    UNet2DModel, UNet3DConditionModel, ...): ``module(x, timestep, encoder_hidden_states=c).sample``.

    Attributes:
      module: the network; its own parameters stay frozen, ``params`` replace some of them
        (by name) through ``functional_call``.
      timesteps: ``timesteps[t-1]`` is the model timestep of chain step t (``solver.timesteps``).
      context: None (unconditional), a tensor ``[N or 1, L, D]`` used at every step, or a
        callable ``t -> tensor`` (per-step conditioning, e.g. different prompts for
        different step ranges).
      negative_context: the unconditional embedding ``[N or 1, L, D]`` for classifier-free guidance.
      guidance_scale: CFG weight w: out = ``guidance(u, c, w)``; CFG is off when w <= 1 or no
        negative context is given.
      batching: how params with a leading sample axis (one copy per sample) are applied:
        ``"vmap"`` (``torch.func.vmap`` over samples, only the params batched) or ``"loop"``
        (one call per sample; slower, for modules that vmap cannot trace).
      compile: None (eager), or a ``torch.compile`` mode (``"default"``,
        ``"reduce-overhead"``, ``"max-autotune"``) for the network's call together with
        the functional call, vmap and guidance.
      call: how the network is called (:data:`NetworkCall`): :func:`unet_call`, or a model
        family's; contexts are then that family's conditioning (a tensor or a dict of tensors).
      guidance: how the unconditional and conditional outputs combine under CFG (:data:`Guidance`):
        :func:`cfg` (u + w (c - u), as ``StableDiffusionPipeline`` with ``guidance_rescale=0``), or
        a model family's.
    """

    module: torch.nn.Module
    timesteps: torch.Tensor
    context: None | torch.Tensor | Callable[[int], torch.Tensor] = None
    negative_context: torch.Tensor | None = None
    guidance_scale: float = 1.0
    batching: str = "vmap"
    compile: str | None = None
    call: NetworkCall = unet_call
    guidance: Guidance = cfg
    _shapes: dict = field(init=False, repr=False)
    _dtype: torch.dtype = field(init=False, repr=False)

    def __post_init__(self):
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be 'vmap' or 'loop', got {self.batching!r}")
        object.__setattr__(self, "_shapes", {k: v.shape for k, v in self.module.named_parameters()})
        object.__setattr__(self, "_dtype", module_dtype(self.module))

    @property
    def cfg(self) -> bool:
        return self.context is not None and self.negative_context is not None and self.guidance_scale > 1

    def _context(self, t: int, n: int):
        if self.context is None:
            return None, None
        def fit(v):   # one row broadcast to n, in the network's dtype
            v = v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v
            return v.to(self._dtype) if v.is_floating_point() else v

        c = map_conditioning(fit, self.context(t) if callable(self.context) else self.context)
        u = map_conditioning(fit, self.negative_context) if self.cfg else None
        if rows(c) != n or (u is not None and rows(u) != n):
            raise ValueError(f"context has {rows(c)} rows but the state has {n} samples")
        return c, u

    def __call__(self, x: torch.Tensor, t: int, params: Params) -> torch.Tensor:
        n = x.shape[0]
        timestep = self.timesteps[t - 1].to(x.device)
        c, u = self._context(t, n)
        unknown = [k for k in params if k not in self._shapes]
        if unknown:
            raise ValueError(f"not parameters of the denoiser's module: {unknown[:3]} (was LoRA added "
                             f"after the denoiser was built?)")
        batched = {k: v.dim() == len(self._shapes[k]) + 1 for k, v in params.items()}
        for k, v in params.items():
            if batched[k] and v.shape[0] != n:
                raise ValueError(f"per-sample parameter {k} has {v.shape[0]} copies for {n} samples")
        how = "plain" if not any(batched.values()) else self.batching
        run = _apply if self.compile is None else _compiled(self.compile)
        with _attention(x.device.type) if how == "vmap" else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=VMAP_FALLBACK, category=UserWarning)
            out = run(self.module, dict(params), batched, how, x.to(self._dtype), timestep, c, u,
                      self.guidance_scale if u is not None else None, self.call, self.guidance).to(x.dtype)
        record(n, out)
        return out


def _call(module, params, x, timestep, c, u, w, call, guidance):
    if u is None:
        return call(module, params, x, timestep, c)
    both = {k: torch.cat([u[k], c[k]]) for k in c} if isinstance(c, Mapping) else torch.cat([u, c])
    out = call(module, params, torch.cat([x, x]), timestep, both)
    uncond, cond = out.to(torch.promote_types(out.dtype, torch.float32)).chunk(2)
    return guidance(uncond, cond, w)


def _apply(module, params, batched, how, x, timestep, c, u, w, call, guidance):
    """The network on a batch: one call (``how="plain"``), or per-sample parameters by
    ``vmap`` or a loop over samples."""
    if how == "plain":
        return _call(module, params, x, timestep, c, u, w, call, guidance)

    def one(p, xi, ci, ui):
        add = (lambda v: v.unsqueeze(0))
        return _call(module, p, xi.unsqueeze(0), timestep, map_conditioning(add, ci), map_conditioning(add, ui), w,
                     call, guidance).squeeze(0)

    if how == "loop":
        return torch.stack([one({k: v[i] if batched[k] else v for k, v in params.items()}, x[i],
                                map_conditioning(lambda v: v[i], c), map_conditioning(lambda v: v[i], u))
                            for i in range(len(x))])
    dims = {k: 0 if b else None for k, b in batched.items()}
    return vmap(one, in_dims=(dims, 0, None if c is None else 0, None if u is None else 0),
                randomness="error")(params, x, c, u)


@functools.cache
def _compiled(mode: str):
    """:func:`_apply` under ``torch.compile(mode=mode)``: functional call, vmap and guidance
    traced together, once per process for every chain (tensors are its inputs)."""
    return torch.compile(_apply, mode=mode)

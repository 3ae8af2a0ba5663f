"""Gradient checkpointing that the activation meter sees: per step of a chain, or per
block of any module.

:func:`checkpoint` runs ``fn(*args)`` keeping only its tensor arguments; backward
recomputes ``fn`` and backpropagates through the recomputed graph. It differs from
``torch.utils.checkpoint`` in one respect that matters here: the recomputation runs under
the saved-tensor hooks active during backward, so :class:`~halforder.estimators.memory.SavedTensorMeter`
measures the recomputed graph too (inside ``torch.utils.checkpoint``'s non-reentrant mode
it is hidden from those hooks, and its reentrant mode does not work with
``torch.autograd.grad``). Gradients reach only the tensor arguments (tuples of tensors
included): ``fn`` must not use tensors that need gradients in any other way (a module
with trainable weights is refused; a closure is not checked), and it must be
deterministic, since no random state is replayed (a chain's step takes its noise from
outside). The estimate is unchanged; each checkpointed region costs a second forward pass;
it is differentiable once.

``Checkpointed(chain, steps)`` checkpoints the chosen steps of a chain (every step by
default): full backprop through T checkpointed steps keeps T states and one step graph at
a time instead of T step graphs. :func:`checkpoint_blocks` checkpoints the blocks of a
diffusers model (``enable_gradient_checkpointing``), e.g. the VAE decoder that the reward
differentiates through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection

import torch
from torch.autograd.function import once_differentiable

from .protocol import Params, State


def checkpoint(fn: Callable, *args):
    """``fn(*args)`` without keeping its graph: recomputed in backward (module docstring).

    ``args`` may be tensors, tuples of tensors (or None) and other values; the result a
    tensor or a tuple of tensors (or None). Without grad mode this is ``fn(*args)``."""
    if not torch.is_grad_enabled():
        return fn(*args)
    if isinstance(fn, torch.nn.Module) and any(p.requires_grad for p in fn.parameters()):
        raise ValueError(f"checkpoint: {type(fn).__name__} has parameters that need gradients; gradients "
                         f"reach only tensor arguments, so pass trainable tensors as arguments")
    tensors, rebuild_args = _flatten(args)
    out_spec: list = []

    def call(*ts):
        out = fn(*rebuild_args(ts))
        flat, rebuild = _flatten((out,))
        out_spec[:] = [rebuild]
        return flat

    flat_out = _Recompute.apply(call, *tensors)
    return out_spec[0](flat_out)[0]


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, *tensors):
        ctx.call = call
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        return tuple(call(*tensors))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad():
            outs = ctx.call(*inputs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [x for x in inputs if x.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (None, *(next(found) if x.requires_grad else None for x in inputs))


def _flatten(values) -> tuple[list[torch.Tensor], Callable]:
    """The tensors in ``values`` (one level of tuples/lists looked into), and the
    function that puts other tensors back in their places. The layout holds no tensor, so
    it keeps none alive."""
    flat, layout = [], []
    for v in values:
        if isinstance(v, (tuple, list)) and any(isinstance(e, torch.Tensor) for e in v):
            layout.append((type(v), [None if isinstance(e, torch.Tensor) else (e,) for e in v]))
            flat.extend(e for e in v if isinstance(e, torch.Tensor))
        elif isinstance(v, torch.Tensor):
            layout.append((None, None))
            flat.append(v)
        else:
            layout.append((None, (v,)))

    def rebuild(ts):
        it = iter(ts)
        out = []
        for kind, spec in layout:
            if kind is None:
                out.append(next(it) if spec is None else spec[0])
            else:
                out.append(kind(next(it) if e is None else e[0] for e in spec))
        return out

    return flat, rebuild


@dataclass(frozen=True, eq=False)
class Checkpointed:
    """``chain`` with the given steps checkpointed (see module docstring); other attributes
    (``sample_start``, ...) are the wrapped chain's.

    Attributes:
      chain: any chain.
      steps: the steps t to checkpoint (None: every step). Checkpointing applies only where
        a step is evaluated with gradients: the FO steps and the HO blocks' recomputation.
    """

    chain: Any
    steps: Collection[int] | None = None

    def __post_init__(self):
        if self.steps is not None:
            steps = frozenset(int(t) for t in self.steps)
            bad = sorted(t for t in steps if not 1 <= t <= self.chain.T)
            if bad:
                raise ValueError(f"Checkpointed: steps {bad[:3]} are outside 1..{self.chain.T}")
            object.__setattr__(self, "steps", steps)

    @property
    def T(self) -> int:
        return self.chain.T

    def step(self, t: int, x: State, params: Params) -> State:
        if self.steps is not None and t not in self.steps:
            return self.chain.step(t, x, params)
        names = list(params)
        return checkpoint(lambda x_, *values: self.chain.step(t, x_, dict(zip(names, values))), x, *params.values())

    def sigma(self, t: int) -> float:
        return self.chain.sigma(t)

    def tau(self, t: int) -> float:
        return self.chain.tau(t)

    def reward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.chain.reward(x0)

    def sample_start(self, n: int, generator: torch.Generator | None = None, *args, **kwargs) -> State:
        return self.chain.sample_start(n, generator, *args, **kwargs)

    def __getattr__(self, name):
        if name == "chain":
            raise AttributeError(name)
        return getattr(self.chain, name)


def checkpoint_blocks(model: torch.nn.Module, enable: bool = True) -> torch.nn.Module:
    """Checkpoint the blocks of a diffusers model (its ``enable_gradient_checkpointing``)
    with :func:`checkpoint`, e.g. ``checkpoint_blocks(vae)`` for the reward's decode; its
    weights must be frozen. ``enable=False`` turns it off. Returns ``model``."""
    if enable:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    else:
        model.disable_gradient_checkpointing()
    return model

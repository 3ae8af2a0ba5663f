"""What a plan costs in activation memory on a chain, measured (docs/plan-search.md).

:func:`measure_memory` measures, for a batch of N start states and per step t, with
:class:`~halforder.estimators.memory.SavedTensorMeter`: the bytes one step evaluated with
gradients saves for backward (``graph``; ``graph_in`` when its input needs no gradient, as
for the first step of an FO prefix or of an HO block), the bytes a checkpointed step
keeps (``held``: its inputs) and what its recomputation adds in backward (``recompute``:
the graph less the inputs already held); the bytes two consecutive steps' graphs share;
and the reward's graph and a state's bytes.

:func:`predicted_memory` follows the engine (docs/design.md, "The memory model"): the
largest of the phases, plus what the engine holds outside autograd,

    FO phase   sum over steps 1..K of (graph, or held if checkpointed), less the shared
               bytes counted more than once
               + max(reward graph, the most a checkpointed step's recomputation adds)
    HO phase   per block, the same over its h steps, with the score's eps_j and weights
               in place of the reward graph
    held       one stored state per HO block, and N copies of theta for the ZO running sum

(the FO graph is freed by its backward pass before the HO blocks are recomputed, one at a
time). The saved part is what the meter measures of a whole estimate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import torch

from ..estimators.rollout import draw_noise, noisy_step, roll_out
from ..estimators.gradient_checkpointing import Checkpointed
from ..estimators.memory import SavedTensorMeter
from ..estimators.plan import ChainFor, Plan, Role
from ..estimators.protocol import State, latent



@dataclass(frozen=True)
class MemoryCosts:
    """Measured memory costs of one chain at batch size ``n`` (see module docstring).

    Attributes:
      n: samples per estimate.
      graph, graph_in, held, recompute: bytes per step, ``[t-1]`` for step t; ``recompute``
        is what a checkpointed step adds to ``held`` while backward recomputes its graph.
      shared: bytes two consecutive steps' graphs share (the same storage saved by both,
        e.g. the text conditioning of a diffusion chain), counted once in a segment.
      reward_graph: bytes the reward saves for backward.
      state: bytes of one state (n samples).
      score: bytes the HO score saves (the noise eps_j and the n weights).
      zo_sum: bytes of the ZO running sum (n copies of theta).
    """

    n: int
    graph: tuple[int, ...]
    graph_in: tuple[int, ...]
    held: tuple[int, ...]
    recompute: tuple[int, ...]
    shared: int
    reward_graph: int
    state: int
    score: int
    zo_sum: int

    @property
    def T(self) -> int:
        """Steps of the measured chain."""
        return len(self.graph)


def predicted_memory(costs: MemoryCosts, plan: Plan, checkpoint: Collection[int] = ()) -> int:
    """Activation memory (bytes) of ``plan`` with the steps ``checkpoint`` checkpointed:
    the largest phase plus the bytes held outside autograd (module docstring)."""
    return predicted_saved(costs, plan, checkpoint) + predicted_held(costs, plan)


def predicted_saved(costs: MemoryCosts, plan: Plan, checkpoint: Collection[int] = ()) -> int:
    """Peak bytes autograd saves (what :class:`SavedTensorMeter` measures of one estimate)."""
    K = plan.fo_steps
    phases = [0]
    if K:
        phases.append(_segment(costs, K, 1, checkpoint, costs.reward_graph))
    phases += [_segment(costs, j + h - 1, j, checkpoint, costs.score) for j, h in plan.blocks]
    return max(phases)


def predicted_held(costs: MemoryCosts, plan: Plan) -> int:
    """Bytes the engine keeps outside autograd: stored block inputs, the ZO running sum."""
    return costs.state * len(plan.blocks) + (costs.zo_sum if Role.ZO in plan.roles else 0)


def _segment(costs: MemoryCosts, top: int, bottom: int, checkpoint, extra: int) -> int:
    """Steps top..bottom evaluated with gradients from an input without them, then a
    head that saves ``extra`` bytes; checkpointed steps keep their inputs and recompute
    their graphs one at a time in backward, after the head's backward pass."""
    kept, recompute, plain = 0, 0, 0
    for t in range(top, bottom - 1, -1):
        if t in checkpoint:
            kept += costs.held[t - 1]
            recompute = max(recompute, costs.recompute[t - 1])
        else:
            kept += costs.graph_in[t - 1] if t == top else costs.graph[t - 1]
            plain += 1
    return kept - costs.shared * max(plain - 1, 0) + max(extra, recompute)


# ----------------------------------------------------------------------------- measurement
def measure_memory(chain, params, n: int, *, generator: torch.Generator,
                   chain_for: ChainFor | None = None) -> MemoryCosts:
    """Measure the memory costs of ``chain`` at batch size ``n`` (module docstring).

    Args:
      chain: the chain; ``chain_for(plan)`` gives a plan's chain when its noise scales
        depend on the plan (a diffusion chain's ``for_plan``); by default ``chain`` itself.
        The steps are measured on the chain of full backprop.
      params: name -> tensor.
      n: samples per estimate (the batch size).
      generator: start states and noise.
    """
    chain_for = chain_for or (lambda plan: chain)
    T = chain.T
    base = chain_for(Plan.full(T))
    dtype = next(iter(params.values())).dtype
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    frozen = {k: v.detach() for k, v in params.items()}
    exclude = list(params.values())
    graph, graph_in, held, recompute = [0] * T, [0] * T, [0] * T, [0] * T
    pair = None

    def measure(t, x, noise):   # step t's graphs, before the rollout applies it
        nonlocal pair
        if t == 2:
            pair = (x, noise)
        for x_in, out in ((x, graph_in), (_requiring_grad(x), graph)):
            with torch.enable_grad(), SavedTensorMeter(exclude) as meter:
                y = noisy_step(base, t, x_in, leaves, noise)
            out[t - 1] = meter.peak
            del y
        x_in = _requiring_grad(x)
        with torch.enable_grad(), SavedTensorMeter(exclude) as meter:
            y = latent(noisy_step(Checkpointed(base, (t,)), t, x_in, leaves, noise))
            held[t - 1] = meter.live
            meter.reset_peak()
            torch.autograd.grad(y.sum(), [*leaves.values(), latent(x_in)], allow_unused=True)
            recompute[t - 1] = meter.peak - held[t - 1]
        del y

    x = roll_out(base, chain.sample_start(n, generator, dtype), frozen, generator=generator, visit=measure).x
    shared = 0
    if pair is not None:   # steps 2 and 1 together, against their graphs apart
        x2, noise2 = pair
        noise1 = draw_noise(base, 1, x2, params, generator)
        with torch.enable_grad(), SavedTensorMeter(exclude) as meter:
            y = noisy_step(base, 2, x2, leaves, noise2)
            y = noisy_step(base, 1, y, leaves, noise1)
        shared = graph_in[1] + graph[0] - meter.peak
        del y
    x0 = _requiring_grad(latent(x))
    with torch.enable_grad(), SavedTensorMeter(exclude) as meter:
        r = base.reward(x0)
    reward_graph = meter.peak
    del r

    P = sum(v.numel() * v.element_size() for v in params.values())
    lat = latent(x)
    return MemoryCosts(n, tuple(graph), tuple(graph_in), tuple(held), tuple(recompute), shared, reward_graph, _bytes(x),
                     lat.numel() * lat.element_size() + n * lat.element_size(), n * P)


def _requiring_grad(x: State) -> State:
    if isinstance(x, tuple):
        return tuple(v.detach().requires_grad_() for v in x)
    return x.detach().requires_grad_()


def _bytes(x: State) -> int:
    return sum(v.numel() * v.element_size() for v in (x if isinstance(x, tuple) else (x,)))

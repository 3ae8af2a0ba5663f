"""Compute, counted: how many times the model was evaluated, per sample.

The unit is one *evaluation*: one sample through the model once, forward or backward. A
call of the denoiser on a batch of n samples is n forward evaluations, and a backward pass
through its output n backward evaluations, whatever runs underneath: ``torch.func.vmap``
over per-sample parameters, a loop over samples, ``torch.compile``, or the second forward
pass of a gradient-checkpointed step. (A classifier-free-guided call runs its network on
2n rows and counts n: every method pays the same factor.)

A model reports its calls by :func:`record`, once per call on the whole batch (the
library's :class:`~halforder.diffusion.sampling.denoiser.ModuleDenoiser` and the toy chains' steps
do); :class:`ComputeMeter` adds up what is recorded while it is open:

    with ComputeMeter() as meter:
        est = estimate(chain, plan, params, x_T)
    meter.forward, meter.backward     # == expected_evaluations(plan, N) on an unchecked chain

The count a plan should cost follows from :meth:`Plan.cost` (:func:`expected_evaluations`);
the tests hold the meter to it for every plan family, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Plan

_OPEN: list["ComputeMeter"] = []


@dataclass(eq=False)
class ComputeMeter:
    """Evaluations per sample recorded while the meter is open (a context manager; meters
    nest, and each open one counts). A backward pass is credited to the meters that were open
    when its forward pass ran, even if it runs later or on autograd's device thread.

    Attributes:
      forward: forward evaluations (rollout, HO recomputation, checkpoint recomputation).
      backward: backward evaluations.
    """

    forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        """forward + backward."""
        return self.forward + self.backward

    def __enter__(self) -> "ComputeMeter":
        _OPEN.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _OPEN.remove(self)


def record(n: int, output: torch.Tensor | None = None) -> None:
    """Report one call of the model on ``n`` samples, with its ``output``: n forward
    evaluations now, and n backward evaluations each time a gradient flows through
    ``output`` (a tensor hook; nothing if it does not need gradients)."""
    if not _OPEN:
        return
    meters = tuple(_OPEN)
    for m in meters:
        m.forward += n
    if isinstance(output, torch.Tensor) and output.requires_grad:
        def backward(grad):
            for m in meters:
                m.backward += n
        output.register_hook(backward)


def expected_evaluations(plan: Plan, n: int, checkpointed: bool = False) -> dict[str, int]:
    """The evaluations one :func:`~halforder.estimators.estimate` of ``plan`` on ``n`` samples
    costs: ``n`` times ``plan.cost()``'s step counts, and with every step checkpointed one more
    forward pass for each step that is backpropagated (the FO prefix and the HO blocks)."""
    cost = plan.cost()
    return {"forward": n * (cost["forward"] + (cost["backward"] if checkpointed else 0)),
            "backward": n * cost["backward"]}

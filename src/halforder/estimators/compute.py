"""Compute, counted: how many times the model was evaluated, per sample.

The unit is one *evaluation*: one sample through the model once, forward or backward. A
call of the denoiser on a batch of n samples is n forward evaluations, and a backward pass
through its output n backward evaluations, whatever runs underneath: ``torch.func.vmap``
over per-sample parameters, a loop over samples, ``torch.compile``, or the second forward
pass of a gradient-checkpointed step. (A classifier-free-guided call runs its network on
2n rows and counts n: every method pays the same factor.)

A model reports its calls by :func:`record`, once per call on the whole batch (the
library's :class:`~halforder.diffusion.denoiser.ModuleDenoiser` and the toy chains' steps
do); :class:`ComputeMeter` adds up what is recorded while it is open:

    with ComputeMeter() as meter:
        est = estimate(chain, plan, params, x_T)
    meter.forward, meter.backward     # == expected_evaluations(plan, N) on an unchecked chain

The count a plan should cost follows from :meth:`Plan.cost` (:func:`expected_evaluations`);
the tests hold the meter to it for every plan family, exactly.

:class:`SearchCost` is what a metered computation (the plan search) spent, against the
run it serves.
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


@dataclass(frozen=True)
class SearchCost:
    """What a search spent, counted by the compute meter: model evaluations per sample, forward
    and backward, wall-clock seconds, and the evaluations of the run it plans (0: not known)."""

    forward: int
    backward: int
    seconds: float
    run_evaluations: int = 0

    @property
    def evaluations(self) -> int:
        return self.forward + self.backward

    def share(self) -> float | None:
        """The search's evaluations as a fraction of the run's (None if the run's are not known)."""
        return self.evaluations / self.run_evaluations if self.run_evaluations else None

    def record(self) -> dict:
        """The JSON form (``metrics.jsonl``)."""
        return {"evaluations": self.evaluations, "evaluations_forward": self.forward,
                "evaluations_backward": self.backward, "seconds": round(self.seconds, 3),
                "run_evaluations": self.run_evaluations, "share_of_run": self.share()}

    def line(self) -> str:
        """One line for the report."""
        share = self.share()
        return (f"search cost: {self.evaluations:,} model evaluations ({self.forward:,} forward, {self.backward:,} "
                f"backward; one per sample and step), {self.seconds:.1f} s"
                + ("" if share is None else f"; {share:.1%} of the {self.run_evaluations:,} of the run it plans"))

"""What a plan search spent, counted by the compute meter, against the run it plans."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchCost:
    """What a search spent, counted by the compute meter: model evaluations per sample, forward
    and backward, wall-clock seconds, and the evaluations of the run it plans (0: not known);
    with the chain's ``T`` and the search's ``budget`` of chain evaluations (0: not known),
    its chain evaluations (forward / T) against that budget; ``floor``: the chain evaluations
    a search may take however short the run (0: none), which is why the search of a short run
    can cost more than the run."""

    forward: int
    backward: int
    seconds: float
    run_evaluations: int = 0
    T: int = 0
    budget: float = 0.0
    floor: float = 0.0

    @property
    def evaluations(self) -> int:
        return self.forward + self.backward

    @property
    def chain_evaluations(self) -> float | None:
        """Forward model evaluations / T: rollouts of one sample (None if T is not known)."""
        return self.forward / self.T if self.T else None

    def share(self) -> float | None:
        """The search's evaluations as a fraction of the run's (None if the run's are not known)."""
        return self.evaluations / self.run_evaluations if self.run_evaluations else None

    def record(self) -> dict:
        """The JSON form (``metrics.jsonl``)."""
        return {"evaluations": self.evaluations, "evaluations_forward": self.forward,
                "evaluations_backward": self.backward, "seconds": round(self.seconds, 3),
                "run_evaluations": self.run_evaluations, "share_of_run": self.share(),
                "chain_evaluations": self.chain_evaluations, "chain_evaluation_budget": self.budget or None}

    def line(self) -> str:
        """One line for the report; where the search costs more than the run, how many times
        more, and why."""
        share = self.share()
        if share is not None and share > 1:
            why = (f" (a search may take {self.floor:,.0f} chain evaluations, however short the run)"
                   if self.floor else "")
            of_run = f"; {share:.3g} times the {self.run_evaluations:,} of the run it plans{why}"
        else:
            of_run = "" if share is None else f"; {share:.1%} of the {self.run_evaluations:,} of the run it plans"
        return (f"search cost: {self.evaluations:,} model evaluations ({self.forward:,} forward, {self.backward:,} "
                f"backward; one per sample and step), {self.seconds:.1f} s{of_run}"
                + ("" if not (self.T and self.budget) else
                   f"; {self.chain_evaluations:,.0f} chain evaluations of its budget of {self.budget:,.0f}"))

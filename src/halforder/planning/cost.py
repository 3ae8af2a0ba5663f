"""What a plan search spent, counted by the compute meter, against the run it plans."""
from __future__ import annotations

from dataclasses import dataclass


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

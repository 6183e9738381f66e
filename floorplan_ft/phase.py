"""The one shape every phase returns: `PhaseResult`.

Each phase's domain entry point (`floorplan_ft.sampling.run`, `floorplan_ft.retrieval.phase.run`,
...) returns one. It says what happened (status, counts, failures with their reasons), where the
outputs are, and carries what a person reads: the artifacts (a markdown page or a table) and the
warnings to log. The task layer publishes those to Prefect; the flow's report row of the phase is
`result.report()`. Nothing here imports Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DONE = "done"
DONE_WITH_FAILURES = "done with failures"


@dataclass(frozen=True)
class Failure:
    """One item (a plan, usually) the phase could not do, and why."""

    item: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Artifact:
    """What the run page shows for a phase: a markdown page or a table (rows of scalars)."""

    key: str
    description: str
    markdown: str | None = None
    table: list[dict[str, Any]] | None = None

    @property
    def kind(self) -> Literal["markdown", "table"]:
        return "markdown" if self.markdown is not None else "table"


@dataclass
class PhaseResult:
    """What one phase did.

    - `status`: "done", "done with failures", or the phase's own word for a state a person must
      act on ("pending batch jobs", "not configured").
    - `counts`: how many of what (plans sampled, graphs built, answers cached, ...).
    - `outputs`: the files it wrote that later phases or people read, by name (None: not written).
    - `details`: the other figures of the report row (the teacher selected, the last loss, ...).
    - `failures`: the items that failed, each with its reason (the report row counts them).
    - `artifacts`, `warnings`: what the task layer publishes and logs.
    """

    step: str
    status: str = DONE
    counts: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == DONE

    def report(self) -> dict[str, Any]:
        """The flow's report row: status, then the counts, details and outputs by name."""
        return {"status": self.status, **self.counts, **self.details, **self.outputs}

    def markdown(self) -> str:
        """The first markdown artifact's text ("" when the phase has none)."""
        return next((a.markdown for a in self.artifacts if a.markdown is not None), "")


def not_configured(step: str, reason: str) -> PhaseResult:
    """A selected step with nothing to run (e.g. step 3b when one teacher is listed)."""
    return PhaseResult(step=step, status="not configured", details={"reason": reason})

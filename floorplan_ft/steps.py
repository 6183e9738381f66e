"""Step selection for the parent flow: "0,1,2,3a,3b,4,5,6", ranges and "all"."""

from __future__ import annotations

ALL_STEPS: tuple[str, ...] = ("0", "1", "2", "3a", "3b", "4", "5", "6")
TEACHER_STEPS: tuple[str, ...] = ("3a", "3b")  # the first and second teacher of teachers.teachers
STEP_TITLES: dict[str, str] = {
    "0": "sample representative plans",
    "1": "CV inference → topology graphs",
    "2": "retrieve evaluation criteria",
    "3a": "label with teacher A (OpenAI)",
    "3b": "label with teacher B (Gemini)",
    "4": "compare teachers, pick one",
    "5": "build train/val JSONL",
    "6": "fine-tune and evaluate the student",
}


_STEP = r"(?:[aA][lL][lL]|3[abAB]?|[0-24-6])"  # no inline flags: the UI checks it as a JS regex
_ITEM = rf"\s*{_STEP}(?:\s*-\s*{_STEP})?\s*"
# The shape of a step selection, for the flows' typed `steps` parameter: Prefect checks it when a
# run is created (a deployment run from the UI or the CLI fails there, not on a worker). What the
# pattern cannot see (a range that runs backwards) `parse_steps` refuses before any work.
STEPS_PATTERN = rf"^{_ITEM}(?:,{_ITEM})*$"


def parse_steps(spec: str | list[str] | None) -> list[str]:
    """Parse a step selection into canonical step names in pipeline order.

    Accepts "all", a comma list ("0,1,3a"), "3" for both teachers, and ranges ("2-5").
    Unknown steps raise ValueError naming them.
    """
    if spec is None:
        return list(ALL_STEPS)
    items = spec if isinstance(spec, list) else str(spec).split(",")
    chosen: set[str] = set()
    for raw in items:
        item = str(raw).strip().lower()
        if not item:
            continue
        if item == "all":
            chosen.update(ALL_STEPS)
        elif item == "3":
            chosen.update({"3a", "3b"})
        elif "-" in item:
            start, _, end = item.partition("-")
            names = _expand_range(start.strip(), end.strip(), spec)
            chosen.update(names)
        elif item in ALL_STEPS:
            chosen.add(item)
        else:
            raise ValueError(f"steps {spec!r}: unknown step {item!r} (choose from {', '.join(ALL_STEPS)} or 'all')")
    if not chosen:
        raise ValueError(f"steps {spec!r}: no step selected")
    return [s for s in ALL_STEPS if s in chosen]


def _expand_range(start: str, end: str, spec: object) -> list[str]:
    def index(name: str, first: bool) -> int:
        if name == "3":
            name = "3a" if first else "3b"
        if name not in ALL_STEPS:
            raise ValueError(f"steps {spec!r}: unknown step {name!r} in range")
        return ALL_STEPS.index(name)

    lo, hi = index(start, True), index(end, False)
    if lo > hi:
        raise ValueError(f"steps {spec!r}: range {start}-{end} runs backwards")
    return list(ALL_STEPS[lo : hi + 1])

"""Phase 4: compare the teachers' answers with evidence and pick one.

- ``metrics``: one answer scored on the eight weighted metrics and the checks beside them.
- ``compare``: every teacher scored on a stratified sample, bootstrap intervals, the winner rule.
- ``report``: the ``QualityReport``, its markdown and the files it leaves; ``chart``: its PNG.
- ``review``: the blind side-by-side review page and the preferences a person saves from it.
- ``inputs``: what the phase reads from the data root; ``lenient``: field access that tolerates
  answers off the schema.
"""

from floorplan_ft.quality.compare import NoQualifiedTeacher, compare_teachers, compared_teachers, decide
from floorplan_ft.quality.errors import QualityError
from floorplan_ft.quality.metrics import CHECKS, METRICS, score_answer
from floorplan_ft.quality.report import quality_markdown, read_selection, write_outputs
from floorplan_ft.quality.review import PreferencesError, export_review_page, load_preferences

__all__ = [
    "CHECKS",
    "METRICS",
    "NoQualifiedTeacher",
    "PreferencesError",
    "QualityError",
    "compare_teachers",
    "compared_teachers",
    "decide",
    "export_review_page",
    "load_preferences",
    "quality_markdown",
    "read_selection",
    "score_answer",
    "write_outputs",
]

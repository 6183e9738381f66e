"""The domain package never imports Prefect, flows/ or tasks/ (ARCHITECTURE.md)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("prefect", "flows", "tasks", "blocks", "ft_pipeline")


def test_domain_package_has_no_orchestration_imports():
    offenders = []
    for path in (ROOT / "floorplan_ft").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_phases_never_import_the_service_and_providers_import_no_phase():
    """`floorplan_ft.serving` (service, API, vector store) sits on top: the phases, tasks and flows
    never import it. `floorplan_ft.providers` (the model and embedding clients) sits underneath:
    it imports no phase package and not the service."""
    offenders = []
    for folder in ("floorplan_ft", "tasks", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            for name in _imports(path):
                if name.startswith("floorplan_ft.serving") and not rel.startswith("floorplan_ft/serving/"):
                    offenders.append(f"{rel}: {name}")
                phase_packages = (
                    "floorplan_ft.serving",
                    "floorplan_ft.teachers",
                    "floorplan_ft.training",
                    "floorplan_ft.cv",
                    "floorplan_ft.quality",
                    "floorplan_ft.dataset",
                )
                # Known exception: the RunPod Serverless client is also phase 1's CV source and still
                # lives in cv/runpod.py; the RunPod embeddings client uses it.
                allowed = rel == "floorplan_ft/providers/runpod_embeddings.py" and name == "floorplan_ft.cv.runpod"
                if rel.startswith("floorplan_ft/providers/") and name.startswith(phase_packages) and not allowed:
                    offenders.append(f"{rel}: {name}")
    assert offenders == []

"""The artifact store: one data root (a local directory or an fsspec URL) and its layout.

Every write is atomic: the bytes go to a temporary name beside the target, which is then renamed,
so a file's existence means it is complete (a killed run never leaves half a JSON behind). On
object stores, where a single PUT is already atomic, the object is written directly. Local files
get the process umask like any tool's (0644 under the usual 022), so a data root shared between a
workstation and a pod stays readable by the group (`atomic_write`, used by every writer).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import fsspec

if TYPE_CHECKING:
    from floorplan_ft.schemas import TopologyGraph


class Layout:
    """Every path of `docs/data-formats.md` under one data root, by name.

    Only this class spells the layout; the phases ask it for paths (``store.layout.topology(stem)``,
    ``store.layout.cost_ledger(teacher)``). Paths are strings joined with "/", so the same layout
    serves a local directory and an fsspec URL."""

    TOPOLOGY = "topology_graph.json"
    TOPOLOGY_SIDECAR = "topology_graph.meta.json"  # phase 1's provenance of a graph
    OVERLAY = "topology_overlay.png"
    LOW_RESULT = "low_result.json"  # the team CV's merged detections, kept for provenance
    RAG_CONTEXT = "rag_context.json"
    RUN_FILES: ClassVar[dict[str, str]] = {
        "sample": "sampled_images.json",
        "cv_failures": "cv_failures.json",
        "retrieval_failures": "retrieval_failures.json",
        "quality_report": "quality_report.json",
        "selected_model": "selected_model.txt",
        "train": "train.jsonl",
        "val": "val.jsonl",
        "stats_report": "stats_report.json",
    }

    def __init__(self, root: str):
        self.root = root

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # ---------------------------------------------------------------- inputs
    @property
    def images_dir(self) -> str:
        return self.path("images")

    @property
    def annotations_dir(self) -> str:
        return self.path("annotations")

    @property
    def truth_dir(self) -> str:
        return self.path("truth")

    # ---------------------------------------------------------------- per plan: output/{stem}/
    @property
    def output_dir(self) -> str:
        return self.path("output")

    def plan_dir(self, stem: str) -> str:
        return self.path("output", stem)

    def topology(self, stem: str) -> str:
        """Phase 1: the plan's topology graph."""
        return self.path("output", stem, self.TOPOLOGY)

    def topology_meta(self, stem: str) -> str:
        """Phase 1: the graph's provenance sidecar (key, source, stale mark)."""
        return self.path("output", stem, self.TOPOLOGY_SIDECAR)

    def overlay(self, stem: str) -> str:
        """Phase 1: the graph drawn over the plan (optional)."""
        return self.path("output", stem, self.OVERLAY)

    def low_result(self, stem: str) -> str:
        """Phase 1 with the team's CV: their merged detections."""
        return self.path("output", stem, self.LOW_RESULT)

    def rag_context(self, stem: str) -> str:
        """Phase 2: the criteria retrieved for the plan."""
        return self.path("output", stem, self.RAG_CONTEXT)

    def analysis(self, stem: str, teacher: str) -> str:
        """Phase 3: one teacher's analysis of the plan."""
        return self.path("output", stem, f"llm_analysis_{teacher}.json")

    def analysis_meta(self, stem: str, teacher: str) -> str:
        """Phase 3: the analysis' provenance sidecar."""
        return self.path("output", stem, f"llm_analysis_{teacher}.meta.json")

    # ---------------------------------------------------------------- run level: the root
    def run_file(self, key: str) -> str:
        """One of `RUN_FILES` (the sample, failure ledgers, quality report, JSONL, stats)."""
        return self.path(self.RUN_FILES[key])

    def embeddings_cache(self) -> str:
        """Phase 2: content-keyed embedding cache (``cache/embeddings/{key}.npy|.json``)."""
        return self.path("cache", "embeddings")

    def label_failures(self, teacher: str) -> str:
        return self.path(f"label_failures_{teacher}.json")

    def cost_ledger(self, teacher: str) -> str:
        return self.path(f"cost_ledger_{teacher}.json")

    def cost_journal(self, teacher: str) -> str:
        """The write-ahead journal of requests sent but not yet settled in the ledger."""
        return self.path(f"cost_ledger_{teacher}.journal.jsonl")

    def labeling_summary(self, teacher: str) -> str:
        return self.path(f"labeling_{teacher}.json")

    def rate_window(self, teacher: str) -> str:
        """The rate limiter's history of one teacher."""
        return self.path(f"rate_window_{teacher}.json")

    def batch_state(self, teacher: str) -> str:
        """Batch labeling: the teacher's submitted jobs."""
        return self.path("batches", f"{teacher}.json")

    def import_report(self, teacher: str) -> str:
        """`ft-pipeline import analyses`: what was imported for a teacher."""
        return self.path(f"import_analyses_{teacher}.json")

    def quality_chart(self) -> str:
        return self.path("quality_chart.png")

    def review_page(self) -> str:
        return self.path("review", "review.html")

    def review_preferences(self) -> str:
        return self.path("review", "preferences.json")

    def lease(self) -> str:
        """The lease naming the run that writes to this data root now (`floorplan_ft.lease`)."""
        return self.path(".ft-pipeline.lease.json")

    def student_dir(self, student: str, *parts: str) -> str:
        """Phase 6: the student's checkpoints, adapter, merged model and reports."""
        return self.path(student, *parts)


TOPOLOGY_SIDECAR = Layout.TOPOLOGY_SIDECAR
RUN_FILES = Layout.RUN_FILES


def atomic_write(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write `data` to a local `path` atomically, the file's mode set by the process umask.

    The bytes go to a new hidden file beside the target (created with mode 0666, which the kernel
    narrows by the umask, as `open()` does; `tempfile.mkstemp` would force 0600), then replace it.
    With `fsync`, the data reaches the disk before the rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(f"{target}: could not create a temporary file beside it")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


@dataclass(frozen=True)
class PlanTopology:
    """A plan's topology as a phase finds it: the graph (and, when asked, the file as stored), or
    the reason it cannot be used and a detail naming the file."""

    stem: str
    graph: TopologyGraph | None = None
    raw: dict | None = None
    reason: str | None = None  # missing_topology | stale_topology | bad_topology
    detail: str = ""
    error: Exception | None = field(default=None, compare=False, repr=False)  # what the reader raised


def _is_url(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


class ArtifactStore:
    """Reads and writes artifacts under one root with the pipeline's per-image layout."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/") or "/"
        self.is_local = not _is_url(self.root)
        if self.is_local:
            local = self.root.removeprefix("file://")
            self.root = str(Path(local).expanduser().resolve())
            self.fs = None
        else:
            self.fs, _ = fsspec.core.url_to_fs(self.root)
        self.layout = Layout(self.root)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # ------------------------------------------------------------------ layout
    def path(self, *parts: str) -> str:
        """A path under the root, for what `Layout` does not name (tests, ad-hoc files)."""
        return self.layout.path(*parts)

    # ------------------------------------------------------------------ io
    def exists(self, path: str) -> bool:
        return os.path.exists(path) if self.is_local else self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        if self.is_local:
            return Path(path).read_bytes()
        return self.fs.cat_file(path)

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    def read_json(self, path: str) -> Any:
        """Parse a JSON artifact; a broken file raises a ValueError naming it."""
        try:
            return json.loads(self.read_text(path))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None

    def write_bytes(self, path: str, data: bytes) -> str:
        if not self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, data)
            return path
        atomic_write(path, data)
        return path

    def write_text(self, path: str, text: str) -> str:
        return self.write_bytes(path, text.encode("utf-8"))

    def write_json(self, path: str, obj: Any, *, indent: int | None = 2) -> str:
        text = json.dumps(obj, ensure_ascii=False, indent=indent, sort_keys=False)
        return self.write_text(path, text + "\n")

    def write_jsonl(self, path: str, rows: list[Any]) -> str:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return self.write_text(path, text)

    def delete(self, path: str) -> None:
        if self.is_local:
            Path(path).unlink(missing_ok=True)
        elif self.fs.exists(path):
            self.fs.rm(path)

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) directly under `path`, sorted; empty if it does not exist."""
        if self.is_local:
            p = Path(path)
            return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
        if not self.fs.exists(path):
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(path, detail=False))

    # ------------------------------------------------------------------ the plan's topology
    def plan_topology(self, stem: str, *, keep_raw: bool = False, skip_stale: bool = True) -> PlanTopology:
        """The one reader of a plan's `topology_graph.json`, whatever dialect it is in
        (`floorplan_ft.topology_io`), normalised to our schema, or why it cannot be used:
        ``missing_topology``, ``stale_topology`` (phase 1 marked it: its inputs no longer build;
        only with `skip_stale`) or ``bad_topology`` (not JSON, not a graph of any dialect, not
        readable), with a detail naming the file and the problem. With `keep_raw`, the file as
        stored comes too (the team's prompt builder must see the graph as production sends it)."""
        import copy

        from floorplan_ft.topology_io import read_topology_bytes, read_topology_dict

        path = self.layout.topology(stem)
        try:
            if not self.exists(path):
                return PlanTopology(stem, reason="missing_topology", detail=f"{path}: no topology graph")
            if skip_stale and (mark := self.topology_stale(stem)) is not None:
                detail = f"{path}: marked stale by phase 1 ({mark.get('reason')})"
                return PlanTopology(stem, reason="stale_topology", detail=detail)
            data = self.read_bytes(path)
        except OSError as exc:
            detail = f"{path}: cannot be read ({type(exc).__name__}: {exc})"
            return PlanTopology(stem, reason="bad_topology", detail=detail, error=exc)
        try:
            if not keep_raw:
                return PlanTopology(stem, graph=read_topology_bytes(data, origin=path))
            try:
                raw = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: a topology graph must be a JSON object")  # noqa: TRY004 (bad input)
            return PlanTopology(stem, graph=read_topology_dict(copy.deepcopy(raw), origin=path), raw=raw)
        except ValueError as exc:  # TopologyFormatError is a ValueError naming the file and the field
            return PlanTopology(stem, reason="bad_topology", detail=str(exc), error=exc)

    def read_topology(self, stem: str) -> TopologyGraph | None:
        """The plan's graph, or None when it is missing or cannot be read (a stale mark aside)."""
        return self.plan_topology(stem, skip_stale=False).graph

    def load_topology(self, stem: str) -> TopologyGraph:
        """Like `read_topology`, but a missing file raises FileNotFoundError and a bad one a
        ValueError naming the file and the field."""
        found = self.plan_topology(stem, skip_stale=False)
        if found.reason == "missing_topology":
            raise FileNotFoundError(found.detail)
        if found.graph is None:
            raise found.error or ValueError(found.detail)
        return found.graph

    def topology_problem(self, stem: str) -> str | None:
        """None when the plan's graph reads and validates; otherwise what is wrong, naming the
        file (missing, not JSON, not a topology graph of any dialect)."""
        return self.plan_topology(stem, skip_stale=False).detail or None

    def topology_stale(self, stem: str) -> dict | None:
        """The `stale` mark phase 1 left in the graph's sidecar when the plan's inputs stopped
        building (``{"reason", "error_type", "at"}``), or None. Such a graph was built from inputs
        that no longer exist as they were: phases 2 and 3 skip it. An unreadable sidecar is no
        mark (phase 1 rebuilds that graph anyway)."""
        path = self.layout.topology_meta(stem)
        try:
            if not self.exists(path):
                return None
            meta = self.read_json(path)
        except (ValueError, OSError):
            return None
        mark = meta.get("stale") if isinstance(meta, dict) else None
        return mark if isinstance(mark, dict) else None

    def read_topology_raw(self, stem: str) -> dict:
        """The topology file exactly as stored; FileNotFoundError / ValueError naming the file."""
        found = self.plan_topology(stem, keep_raw=True, skip_stale=False)
        if found.reason == "missing_topology":
            raise FileNotFoundError(found.detail)
        if found.raw is None:
            raise found.error or ValueError(found.detail)
        return found.raw

    def file_hash(self, path: str) -> str:
        """SHA-256 of a file's content (cache keys are built on content, not on names)."""
        return hashlib.sha256(self.read_bytes(path)).hexdigest()

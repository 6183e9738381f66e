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
from pathlib import Path
from typing import Any

import fsspec

TOPOLOGY_SIDECAR = "topology_graph.meta.json"  # phase 1's provenance of a graph (cv/runner.py)

RUN_FILES = {
    "sample": "sampled_images.json",
    "cv_failures": "cv_failures.json",
    "retrieval_failures": "retrieval_failures.json",
    "quality_report": "quality_report.json",
    "selected_model": "selected_model.txt",
    "train": "train.jsonl",
    "val": "val.jsonl",
    "stats_report": "stats_report.json",
}


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

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # ------------------------------------------------------------------ layout
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def image_output_dir(self, stem: str) -> str:
        return self.path("output", stem)

    def topology_path(self, stem: str) -> str:
        return self.path("output", stem, "topology_graph.json")

    def topology_meta_path(self, stem: str) -> str:
        return self.path("output", stem, TOPOLOGY_SIDECAR)

    def rag_context_path(self, stem: str) -> str:
        return self.path("output", stem, "rag_context.json")

    def analysis_path(self, stem: str, teacher: str) -> str:
        return self.path("output", stem, f"llm_analysis_{teacher}.json")

    def run_file(self, key: str) -> str:
        return self.path(RUN_FILES[key])

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

    def read_topology(self, stem: str):
        """The plan's topology graph, normalised to our schema whatever dialect the file is in
        (`floorplan_ft.topology_io`), or None when it is missing or cannot be read."""
        from floorplan_ft.topology_io import read_topology_bytes

        path = self.topology_path(stem)
        if not self.exists(path):
            return None
        try:
            return read_topology_bytes(self.read_bytes(path), origin=path)
        except ValueError:
            return None

    def load_topology(self, stem: str):
        """Like `read_topology`, but a missing file raises FileNotFoundError and a bad one a
        `TopologyFormatError` naming the file and the field."""
        from floorplan_ft.topology_io import read_topology_bytes

        path = self.topology_path(stem)
        if not self.exists(path):
            raise FileNotFoundError(f"{path}: no topology graph")
        return read_topology_bytes(self.read_bytes(path), origin=path)

    def topology_problem(self, stem: str) -> str | None:
        """None when the plan's graph reads and validates; otherwise what is wrong, naming the
        file (missing, not JSON, not a topology graph of any dialect)."""
        try:
            self.load_topology(stem)
        except (FileNotFoundError, ValueError) as exc:  # TopologyFormatError is a ValueError
            return str(exc)
        except OSError as exc:
            return f"{self.topology_path(stem)}: cannot be read ({type(exc).__name__}: {exc})"
        return None

    def topology_stale(self, stem: str) -> dict | None:
        """The `stale` mark phase 1 left in the graph's sidecar when the plan's inputs stopped
        building (``{"reason", "error_type", "at"}``), or None. Such a graph was built from inputs
        that no longer exist as they were: phases 2 and 3 skip it. An unreadable sidecar is no
        mark (phase 1 rebuilds that graph anyway)."""
        path = self.topology_meta_path(stem)
        try:
            if not self.exists(path):
                return None
            meta = self.read_json(path)
        except (ValueError, OSError):
            return None
        mark = meta.get("stale") if isinstance(meta, dict) else None
        return mark if isinstance(mark, dict) else None

    def read_topology_raw(self, stem: str) -> dict:
        """The topology file exactly as stored (the team's prompt builder must see the graph as
        production sends it); FileNotFoundError / ValueError naming the file."""
        path = self.topology_path(stem)
        if not self.exists(path):
            raise FileNotFoundError(f"{path}: no topology graph")
        data = self.read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a topology graph must be a JSON object")  # noqa: TRY004 (bad input)
        return data

    def file_hash(self, path: str) -> str:
        """SHA-256 of a file's content (cache keys are built on content, not on names)."""
        return hashlib.sha256(self.read_bytes(path)).hexdigest()

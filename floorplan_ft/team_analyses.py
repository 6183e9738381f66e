"""The team's stored analyses, read leniently into our `FloorPlanAnalysis` and written as the
answers of an imported teacher (``production``) so that phase 4 can put them beside the LLM
teachers (``quality.extra_teachers``). Phase 3 never labels with an imported teacher.

Inputs (JSON; TEAM_SYSTEM.md "Their formats"):

* a ChromaDB export: a list of records ``{document_id, metadata, document}`` (their
  ``chromadb_content.json``) or ChromaDB's columnar ``{ids, documents, metadatas}``. The image
  name is ``metadata.image_name`` (else ``document_id`` / ``id``). ``document`` is either the
  analysis as JSON, or their natural-language rendering (``to_natural_language``: summary,
  ``key은(는) value`` design sentences, ``space: comment`` lines, ``사내 기준 적합성: grade``,
  ``부적합(category): item - recommendation``), completed from ``metadata``'s numbers;
* a plain list of analysis dicts (each with ``image_name``), or a dict ``{image name: analysis}``.

Their model is looser than ours: free strings for the enums, ``design_evaluation`` as any dict
(English keys ``lighting`` / ``ventilation`` / ``family_harmony`` / ``storage`` exist), defaults
for lists and ``has_window``. Every change made on the way is named and counted; a record that
still does not validate is rejected with its reason, and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from floorplan_ft.schemas import SCHEMA_VERSION, FloorPlanAnalysis, schema_hash
from floorplan_ft.store import ArtifactStore

IMPORTED_TEACHER = "production"
IMPORTER_VERSION = "1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

DESIGN_KEYS = {
    "채광": "채광",
    "lighting": "채광",
    "daylight": "채광",
    "daylighting": "채광",
    "light": "채광",
    "환기": "환기",
    "ventilation": "환기",
    "airflow": "환기",
    "가족융화": "가족융화",
    "가족 융화": "가족융화",
    "family_harmony": "가족융화",
    "family": "가족융화",
    "familyharmony": "가족융화",
    "수납": "수납",
    "storage": "수납",
}
STRUCTURE = {"판상형": ("판상", "flat", "plate"), "타워형": ("타워", "tower"), "혼합형": ("혼합", "복합", "mixed")}
VENTILATION = {
    "우수": ("우수", "excellent"),
    "양호": ("양호", "good"),
    "보통": ("보통", "average", "fair"),
    "미흡": ("미흡", "불량", "부족", "부적합", "불합격", "poor", "bad"),
}
GRADE = {
    "최우수": ("최우수",),
    "우수": ("우수",),
    "보통": ("보통",),
    "미흡": ("미흡",),
    "불합격": ("불합격", "부적합", "fail"),
}
LIMITS = {"short": 200, "comment": 600, "summary": 1000}
_TOP_KEYS = (
    "image_name",
    "structure_type",
    "bay_count",
    "total_spaces",
    "room_count",
    "bathroom_count",
    "balcony_ratio",
    "windowless_ratio",
    "ventilation_quality",
    "summary",
    "spaces",
    "design_evaluation",
    "recommendations",
    "compliance",
)


class AnalysesFileError(ValueError):
    """The export cannot be read at all (the message names the file)."""


@dataclass
class Mapped:
    """One record's reading: what changed on the way (`notes`, one per change)."""

    notes: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.notes.append(what)


@dataclass
class ImportedRecord:
    index: int
    image_name: str
    stem: str
    analysis: FloorPlanAnalysis
    mappings: list[str]
    source_form: str  # json | natural-language


@dataclass
class RejectedRecord:
    index: int
    image_name: str | None
    reason: str


@dataclass
class ImportReport:
    source_file: str
    teacher: str
    records: int
    imported: list[ImportedRecord]
    rejected: list[RejectedRecord]
    written: list[str]

    @property
    def mapping_counts(self) -> Counter[str]:
        return Counter(note for rec in self.imported for note in rec.mappings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source_file": self.source_file,
            "teacher": self.teacher,
            "records": self.records,
            "imported": len(self.imported),
            "rejected": len(self.rejected),
            "mappings": dict(self.mapping_counts.most_common()),
            "rejects": [{"index": r.index, "image_name": r.image_name, "reason": r.reason} for r in self.rejected],
        }


# =========================================================================== reading the export


def load_export(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnalysesFileError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise AnalysesFileError(f"{path}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise AnalysesFileError(f"{path}: not valid JSON ({exc})") from None


def iter_records(data: Any, origin: str) -> list[tuple[str | None, Any, dict[str, Any]]]:
    """(image name or None, payload, metadata) per record, in file order."""
    if isinstance(data, Mapping) and isinstance(data.get("documents"), list):  # ChromaDB get()
        ids = list(data.get("ids") or [])
        metas = list(data.get("metadatas") or [])
        out = []
        for i, doc in enumerate(data["documents"]):
            meta = metas[i] if i < len(metas) and isinstance(metas[i], Mapping) else {}
            name = meta.get("image_name") or (ids[i] if i < len(ids) else None)
            out.append((_str_or_none(name), doc, dict(meta)))
        return out
    if isinstance(data, Mapping):
        for key in ("records", "analyses", "items"):
            if isinstance(data.get(key), list):
                return iter_records(data[key], origin)
        return [(str(name), value, {}) for name, value in data.items()]
    if not isinstance(data, list):
        raise AnalysesFileError(
            f"{origin}: expected a list of records or an object keyed by image name, got {type(data).__name__}"
        )
    out = []
    for rec in data:
        if isinstance(rec, Mapping) and ("document" in rec or "metadata" in rec):
            meta = rec.get("metadata") if isinstance(rec.get("metadata"), Mapping) else {}
            name = meta.get("image_name") or rec.get("image_name") or rec.get("document_id") or rec.get("id")
            out.append((_str_or_none(name), rec.get("document"), dict(meta)))
        elif isinstance(rec, Mapping):
            out.append((_str_or_none(rec.get("image_name")), rec, {}))
        else:
            out.append((None, rec, {}))
    return out


def _str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


# =========================================================================== lenient mapping


def _pick_enum(value: Any, table: Mapping[str, tuple[str, ...]], field_name: str, m: Mapped) -> str:
    text = str(value).strip() if value is not None else ""
    if text in table:
        return text
    lowered = text.lower()
    # A leading exact value first ("우수 (맞통풍)"), then one unambiguous keyword in the string.
    head = re.split(r"[\s(,.:/]", text, maxsplit=1)[0] if text else ""
    if head in table:
        m.note(f"{field_name}: {text!r} → {head}")
        return head
    hits = {target for target, words in table.items() for w in words if w in lowered}
    if "최우수" in hits and "우수" in hits:
        hits.discard("우수")
    if len(hits) == 1:
        target = hits.pop()
        m.note(f"{field_name}: {text!r} → {target}")
        return target
    allowed = "/".join(table)
    why = "ambiguous" if hits else "unknown"
    raise ValueError(f"{field_name} {text!r} is {why} (expected {allowed})")


def _clip(value: Any, limit: int, where: str, m: Mapped) -> str:
    text = "" if value is None else str(value)
    if len(text) > limit:
        m.note(f"{where}: cut to {limit} characters")
        text = text[:limit]
    return text


def _number(value: Any, where: str, m: Mapped, *, integer: bool) -> Any:
    if isinstance(value, bool):
        raise TypeError(f"{where} is a boolean, expected a number")
    if isinstance(value, int | float):
        if integer and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{where} {value!r} is not a whole number")
            m.note(f"{where}: float → int")
            return int(value)
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(%|bay|베이|개)?\s*", value, flags=re.IGNORECASE)
        if match:
            m.note(f"{where}: text → number")
            num = float(match.group(1))
            return int(num) if integer and num.is_integer() else num
    raise ValueError(f"{where} {value!r} is not a number")


def _list(value: Any, where: str, m: Mapped, limit: int) -> list:
    if value is None:
        m.note(f"{where}: missing → []")
        return []
    if isinstance(value, str):
        m.note(f"{where}: one string → a list")
        value = [value] if value.strip() else []
    if not isinstance(value, list):
        raise TypeError(f"{where} is {type(value).__name__}, expected a list")
    if len(value) > limit:
        m.note(f"{where}: cut to {limit} entries")
        value = value[:limit]
    return value


def _design(value: Any, m: Mapped) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"design_evaluation is {type(value).__name__}, expected an object")
    out: dict[str, str] = {}
    for key, text in value.items():
        target = DESIGN_KEYS.get(str(key).strip().lower()) or DESIGN_KEYS.get(str(key).strip())
        if target is None:
            m.note(f"design_evaluation: unknown key {key!r} dropped")
            continue
        if target != key:
            m.note(f"design_evaluation key {key} → {target}")
        if target in out:
            raise ValueError(f"design_evaluation names {target} twice")
        out[target] = _clip(text, LIMITS["comment"], f"design_evaluation.{target}", m)
    if not out:
        m.note("design_evaluation: no known key → null")
        return None
    for key in ("채광", "환기", "가족융화", "수납"):
        if key not in out:
            m.note(f"design_evaluation.{key}: missing → ''")
            out[key] = ""
    return out


def _space(value: Any, i: int, m: Mapped) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"spaces[{i}] is {type(value).__name__}, expected an object")
    s = dict(value)
    out: dict[str, Any] = {}
    for key, default in (("space_name", "공간"), ("space_type", "공통공간")):
        if not s.get(key):
            m.note(f"spaces[].{key}: missing → {default}")
        out[key] = _clip(s.get(key) or default, LIMITS["short"], f"spaces[].{key}", m)
    for key in ("area_m2", "area_ratio"):
        v = s.get(key)
        out[key] = None if v is None else _number(v, f"spaces[].{key}", m, integer=False)
    if "has_window" not in s or s["has_window"] is None:
        m.note("spaces[].has_window: missing → true (their default)")
        out["has_window"] = True
    else:
        out["has_window"] = s["has_window"]
    out["features"] = [
        _clip(x, LIMITS["short"], "spaces[].features[]", m)
        for x in _list(s.get("features"), "spaces[].features", m, 10)
    ]
    out["connected_spaces"] = [
        _clip(x, LIMITS["short"], "spaces[].connected_spaces[]", m)
        for x in _list(s.get("connected_spaces"), "spaces[].connected_spaces", m, 12)
    ]
    out["evaluation_comment"] = _clip(s.get("evaluation_comment"), LIMITS["comment"], "spaces[].evaluation_comment", m)
    for extra in sorted(set(s) - set(out)):
        m.note(f"spaces[].{extra}: unknown key dropped")
    return out


def _compliance(value: Any, m: Mapped) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"compliance is {type(value).__name__}, expected an object")
    c = dict(value)
    items = []
    for i, item in enumerate(_list(c.get("non_compliant_items"), "compliance.non_compliant_items", m, 20)):
        if not isinstance(item, Mapping):
            raise TypeError(f"compliance.non_compliant_items[{i}] is {type(item).__name__}, expected an object")
        category = str(item.get("category") or "").strip()
        mapped = DESIGN_KEYS.get(category.lower(), category)
        if mapped != category:
            m.note(f"non_compliant_items[].category {category} → {mapped}")
        items.append(
            {
                "category": _clip(mapped, LIMITS["short"], "non_compliant_items[].category", m),
                "item": _clip(item.get("item"), LIMITS["short"], "non_compliant_items[].item", m),
                "reason": _clip(item.get("reason"), LIMITS["comment"], "non_compliant_items[].reason", m),
                "recommendation": _clip(
                    item.get("recommendation"), LIMITS["comment"], "non_compliant_items[].recommendation", m
                ),
            }
        )
    return {
        "overall_grade": _pick_enum(c.get("overall_grade"), GRADE, "compliance.overall_grade", m),
        "compliant_items": [
            _clip(x, LIMITS["short"], "compliant_items[]", m)
            for x in _list(c.get("compliant_items"), "compliance.compliant_items", m, 20)
        ],
        "non_compliant_items": items,
        "summary": _clip(c.get("summary"), LIMITS["comment"], "compliance.summary", m),
    }


def lenient_analysis(
    payload: Mapping[str, Any], image_name: str | None, metadata: Mapping[str, Any] | None = None
) -> tuple[FloorPlanAnalysis, list[str]]:
    """Our `FloorPlanAnalysis` from one of their analysis dicts (metadata fills what the dict
    lacks), with the list of changes made. Raises ValueError naming the field that cannot map."""
    m = Mapped()
    a = dict(payload)
    meta = dict(metadata or {})
    for key, meta_key in (
        ("structure_type", "structure_type"),
        ("bay_count", "bay_count"),
        ("room_count", "room_count"),
        ("bathroom_count", "bathroom_count"),
        ("balcony_ratio", "balcony_ratio"),
        ("windowless_ratio", "windowless_ratio"),
        ("ventilation_quality", "ventilation_quality"),
    ):
        if a.get(key) is None and meta.get(meta_key) is not None:
            m.note(f"{key}: from metadata")
            a[key] = meta[meta_key]
    out: dict[str, Any] = {}
    name = a.get("image_name") or image_name
    if not name or name == "unknown":
        raise ValueError("no image name (metadata.image_name or image_name)")
    if image_name and a.get("image_name") and a["image_name"] != image_name:
        m.note("image_name: the record's name replaced by the metadata's")
        name = image_name
    out["image_name"] = _clip(name, LIMITS["short"], "image_name", m)
    for key in ("structure_type", "ventilation_quality"):
        if a.get(key) is None:
            raise ValueError(f"{key} is missing")
    out["structure_type"] = _pick_enum(a["structure_type"], STRUCTURE, "structure_type", m)
    out["ventilation_quality"] = _pick_enum(a["ventilation_quality"], VENTILATION, "ventilation_quality", m)
    for key in ("bay_count", "room_count", "bathroom_count", "total_spaces"):
        if a.get(key) is None:
            if key != "total_spaces":
                raise ValueError(f"{key} is missing")
            out[key] = len(a.get("spaces") or [])
            m.note("total_spaces: missing → number of spaces")
            continue
        out[key] = _number(a[key], key, m, integer=True)
    for key in ("balcony_ratio", "windowless_ratio"):
        out[key] = 0.0 if a.get(key) is None else _number(a[key], key, m, integer=False)
        if a.get(key) is None:
            m.note(f"{key}: missing → 0")
    out["summary"] = _clip(a.get("summary"), LIMITS["summary"], "summary", m)
    out["spaces"] = [_space(s, i, m) for i, s in enumerate(_list(a.get("spaces"), "spaces", m, 40))]
    out["design_evaluation"] = _design(a.get("design_evaluation"), m)
    recs = a.get("recommendations")
    out["recommendations"] = (
        None
        if recs is None
        else [_clip(r, LIMITS["comment"], "recommendations[]", m) for r in _list(recs, "recommendations", m, 10)]
    )
    compliance = a.get("compliance")
    if compliance is None and meta.get("compliance_grade") not in (None, "", "미평가"):
        compliance = {"overall_grade": meta["compliance_grade"]}
        m.note("compliance: from metadata.compliance_grade")
    out["compliance"] = _compliance(compliance, m)
    for extra in sorted(set(a) - set(_TOP_KEYS)):
        m.note(f"{extra}: unknown key dropped")
    try:
        analysis = FloorPlanAnalysis.model_validate(out)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)[:5]
        )
        raise ValueError(f"does not validate as FloorPlanAnalysis: {problems}") from None
    return analysis, m.notes


# --------------------------------------------------------------------------- natural language

_NL_HEADER = re.compile(r"\[(전체 평가|설계 평가|공간 분석)\]\s*")
_NL_DESIGN = re.compile(
    r"(lighting|ventilation|family_harmony|storage|채광|환기|가족융화)은\(는\)\s*([^,.]*(?:\([^)]*\))?)"
)
_NL_GRADE = re.compile(r"사내 기준 적합성:\s*([^\s.]+)\.?\s*")
_NL_NONCOMPLIANT = re.compile(r"부적합\(([^)]+)\):\s*(.+?)\s+-\s+(.+?)(?=\s*부적합\(|$)")
_NL_SPACE = re.compile(r"([^\s.:][^.:]{0,30}?):\s+(.+?)(?=(?:\s+[^\s.:][^.:]{0,30}?:\s)|$)")


def analysis_from_document(document: str, metadata: Mapping[str, Any], m: Mapped) -> dict[str, Any]:
    """An analysis dict from their natural-language rendering plus the record's metadata (the
    numbers); what the text does not hold (per-space windows, features) takes their defaults."""
    text = " ".join(document.split())
    if _NL_HEADER.search(text):  # the newer rendering: [전체 평가] … [설계 평가] … [공간 분석] …
        parts = dict(zip(_NL_HEADER.findall(text), _NL_HEADER.split(text)[2::2], strict=False))
        summary = parts.get("전체 평가", "").strip()
        design_text, spaces_text, compliance_text = parts.get("설계 평가", ""), parts.get("공간 분석", ""), ""
        spaces = [
            {"space_name": n.strip(), "evaluation_comment": c.strip()}
            for n, c in re.findall(r"(\S+)은\(는\)\s*(.+?)(?=\s+\S+은\(는\)|$)", spaces_text)
        ]
    else:  # the stored rendering: summary, design sentences, "space: comment", grade, 부적합(...)
        first = _NL_DESIGN.search(text)
        summary = text[: first.start()].strip() if first else ""
        rest = text[first.start() :] if first else text
        grade = _NL_GRADE.search(rest)
        head, compliance_text = (rest[: grade.start()], rest[grade.start() :]) if grade else (rest, "")
        last = None
        for last in _NL_DESIGN.finditer(head):
            pass
        design_text = head[: last.end()] if last else ""
        spaces_text = head[last.end() :].lstrip(" .") if last else head
        spaces = [{"space_name": n.strip(), "evaluation_comment": c.strip()} for n, c in _NL_SPACE.findall(spaces_text)]
    design = {k: v.strip() for k, v in _NL_DESIGN.findall(design_text)} or None
    out: dict[str, Any] = {
        "image_name": metadata.get("image_name"),
        "summary": summary,
        "spaces": spaces,
        "design_evaluation": design,
    }
    m.note("document: natural-language rendering read (numbers from metadata)")
    grade = _NL_GRADE.search(compliance_text) if compliance_text else None
    if grade:
        after = compliance_text[grade.end() :]
        cut = after.find("부적합(")
        items = [
            {"category": c.strip(), "item": i.strip(), "reason": i.strip(), "recommendation": r.strip()}
            for c, i, r in _NL_NONCOMPLIANT.findall(after[cut:] if cut >= 0 else "")
        ]
        if items:
            m.note("non_compliant_items[].reason: not in the text → the item")
        out["compliance"] = {
            "overall_grade": grade.group(1),
            "summary": (after[:cut] if cut >= 0 else after).strip(),
            "non_compliant_items": items,
        }
    return out


def read_record(
    name: str | None, payload: Any, metadata: Mapping[str, Any]
) -> tuple[FloorPlanAnalysis, list[str], str]:
    """(analysis, mappings, source form) of one record; ValueError with the reason otherwise."""
    m = Mapped()
    form = "json"
    if isinstance(payload, str):
        stripped = payload.strip()
        if stripped.startswith("{"):
            try:
                payload = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ValueError(f"document looks like JSON but does not parse: {exc}") from None
        elif stripped:
            payload = analysis_from_document(stripped, {"image_name": name, **metadata}, m)
            form = "natural-language"
        else:
            raise ValueError("empty document")
    if not isinstance(payload, Mapping):
        raise TypeError(f"expected an analysis object, got {type(payload).__name__}")
    analysis, notes = lenient_analysis(payload, name, metadata)
    return analysis, m.notes + notes, form


# =========================================================================== import


def known_stems(store: ArtifactStore, image_dir: str | None = None) -> set[str]:
    """Stems of the data root's plans: images (any case of .png/.jpg) and output folders."""
    stems = {
        Path(n).stem
        for n in store.listdir(image_dir or store.layout.images_dir)
        if Path(n).suffix.lower() in IMAGE_SUFFIXES
    }
    return stems | set(store.listdir(store.layout.output_dir))


def match_stem(image_name: str, stems: set[str]) -> str | None:
    stem = Path(image_name.replace("\\", "/")).name
    stem = Path(stem).stem if Path(stem).suffix.lower() in IMAGE_SUFFIXES else stem
    if stem in stems:
        return stem
    folded = [s for s in stems if s.lower() == stem.lower()]
    return folded[0] if len(folded) == 1 else None


def import_analyses(
    store: ArtifactStore, path: str | Path, *, teacher: str = IMPORTED_TEACHER, image_dir: str | None = None
) -> ImportReport:
    """Read the export, map every record, write the good ones as ``teacher``'s answers
    (``output/{stem}/llm_analysis_{teacher}.json`` + sidecar) and report the rest."""
    from floorplan_ft.teachers.factory import TEACHER_NAMES

    if teacher in TEACHER_NAMES:
        raise AnalysesFileError(
            f"teacher {teacher!r} is labeled in phase 3: import under another name "
            f"(default {IMPORTED_TEACHER!r}) so no labeled answer is overwritten"
        )
    path = Path(path)
    raw = path.read_bytes() if path.is_file() else b""
    data = load_export(path)
    records = iter_records(data, str(path))
    source_hash = hashlib.sha256(raw).hexdigest()[:16]
    stems = known_stems(store, image_dir)
    imported, rejected, written = [], [], []
    seen: dict[str, int] = {}
    for index, (name, payload, metadata) in enumerate(records):
        try:
            analysis, notes, form = read_record(name, payload, metadata)
            image_name = name or analysis.image_name
            stem = match_stem(image_name, stems)
            if stem is None:
                raise ValueError(f"no plan named {image_name!r} in {store.root} (images/ or output/)")
            if stem in seen:
                raise ValueError(f"a second analysis of {stem} (record {seen[stem]} was imported)")
        except (ValueError, TypeError) as exc:
            rejected.append(RejectedRecord(index, name, str(exc)))
            continue
        seen[stem] = index
        store.write_text(store.layout.analysis(stem, teacher), analysis.model_dump_json(indent=1) + "\n")
        meta = {
            "teacher": teacher,
            "provider": "imported",
            "model": teacher,
            "imported": True,
            "source_file": str(path),
            "source_sha256": source_hash,
            "source_record": index,
            "source_image_name": image_name,
            "source_form": form,
            "mappings": notes,
            "importer_version": IMPORTER_VERSION,
            "schema_version": SCHEMA_VERSION,
            "schema_hash": schema_hash(),
            "cost_usd": None,
            "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        store.write_json(store.layout.analysis_meta(stem, teacher), meta)
        written.append(store.layout.analysis(stem, teacher))
        imported.append(ImportedRecord(index, image_name, stem, analysis, notes, form))
    report = ImportReport(str(path), teacher, len(records), imported, rejected, written)
    store.write_json(store.layout.import_report(teacher), report.as_dict())
    return report


def is_imported_teacher(store: ArtifactStore, stems: list[str], teacher: str) -> bool:
    """Whether `teacher`'s answers in this data root were imported (their sidecars say so)."""
    for stem in stems:
        mpath = store.layout.analysis_meta(stem, teacher)
        if store.exists(mpath):
            try:
                return bool(store.read_json(mpath).get("imported"))
            except (ValueError, AttributeError):
                return False
    return False


def report_text(report: ImportReport, *, limit: int = 40) -> str:
    """The end-of-import summary: counts, every mapping applied (a table), each reject's reason."""
    lines = [
        (
            f"{report.source_file}: {report.records} records → {len(report.imported)} imported as "
            f"teacher '{report.teacher}', {len(report.rejected)} rejected"
        ),
    ]
    counts = report.mapping_counts
    if counts:
        width = max(len(k) for k, _ in counts.most_common(limit))
        lines += ["", f"{'mapping applied':<{width}}  records", f"{'-' * width}  -------"]
        per_record = Counter(note for rec in report.imported for note in set(rec.mappings))
        lines += [
            f"{k:<{width}}  {per_record[k]:>7}" + (f"  ({n} times)" if n != per_record[k] else "")
            for k, n in counts.most_common(limit)
        ]
        if len(counts) > limit:
            lines.append(f"(+{len(counts) - limit} more kinds in import_analyses_{report.teacher}.json)")
    if report.rejected:
        lines += ["", "rejected:"]
        lines += [f"  record {r.index} ({r.image_name or 'no image name'}): {r.reason}" for r in report.rejected]
    return "\n".join(lines)

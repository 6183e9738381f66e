"""Phase 4, manual review beside the automatic decision.

``export_review_page`` writes ``review/review.html`` (blind side-by-side answers, structured fields
that disagree highlighted, a form whose choices download as JSON); the person saves the file as
``review/preferences.json``; ``load_preferences`` validates it and ``compare_teachers`` reports it
beside the decision (it does not change the decision).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError

from floorplan_ft.criteria import CRITERIA
from floorplan_ft.quality.errors import QualityError
from floorplan_ft.quality.inputs import read_answer, stratified_pick
from floorplan_ft.quality.lenient import as_dict, as_list, as_text, as_texts
from floorplan_ft.quality.metrics import score_answer
from floorplan_ft.sampling import stable_hash
from floorplan_ft.schemas import FloorPlanAnalysis, TopologyGraph
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.reference import reference_analysis

PREFERENCES_FORMAT = "ftp-review-preferences/1"
NON_TEACHER_CHOICES = ("tie", "both_bad")


class PreferencesError(QualityError):
    """The human preferences file is malformed; the message names the file."""


def _pct_or_unknown(value: float | None) -> str:
    return "미상" if value is None else f"{value:.1f}%"


_REVIEW_FIELDS: tuple[tuple[str, str], ...] = (
    ("structure_type", "구조 유형"),
    ("bay_count", "베이 수"),
    ("total_spaces", "내부 공간 수"),
    ("room_count", "침실 수"),
    ("bathroom_count", "화장실 수"),
    ("balcony_ratio", "발코니 비율 %"),
    ("windowless_ratio", "무창실 비율 %"),
    ("ventilation_quality", "환기 품질"),
    ("overall_grade", "종합 등급"),
    ("spaces", "공간 목록"),
    ("non_compliant", "부적합 항목"),
    ("recommendation_count", "개선 제안 수"),
)
_TEXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("summary", "요약"),
    ("채광", "채광"),
    ("환기", "환기"),
    ("가족융화", "가족융화"),
    ("수납", "수납"),
    ("recommendations", "개선 제안"),
    ("compliance_summary", "기준 종합"),
)


def _review_values(raw: str | None) -> tuple[dict[str, Any], str | None]:
    """Comparable field values of one answer (structured and text), or an error text."""
    if raw is None:
        return {}, "no answer"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return {}, f"not JSON: {exc}"
    if not isinstance(obj, dict):
        return {}, "not a JSON object"
    comp = as_dict(obj.get("compliance"))
    design = as_dict(obj.get("design_evaluation"))
    vals: dict[str, Any] = {
        k: obj.get(k)
        for k in (
            "structure_type",
            "bay_count",
            "total_spaces",
            "room_count",
            "bathroom_count",
            "balcony_ratio",
            "windowless_ratio",
            "ventilation_quality",
        )
    }
    vals["overall_grade"] = comp.get("overall_grade")
    vals["spaces"] = sorted(as_text(as_dict(s).get("space_name")) for s in as_list(obj.get("spaces")))
    vals["non_compliant"] = sorted(
        f"{as_text(as_dict(i).get('category'))}: {as_text(as_dict(i).get('item'))}"
        for i in as_list(comp.get("non_compliant_items"))
    )
    recs = as_texts(obj.get("recommendations"))
    vals["recommendation_count"] = len(recs)
    vals["summary"] = as_text(obj.get("summary"))
    for k in CRITERIA:
        vals[k] = as_text(design.get(k))
    vals["recommendations"] = recs
    vals["compliance_summary"] = as_text(comp.get("summary"))
    try:
        FloorPlanAnalysis.model_validate(obj)
        err = None
    except ValidationError as exc:
        err = f"schema: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}"
    return vals, err


def _same(a: Any, b: Any) -> bool:
    if (
        isinstance(a, float | int)
        and isinstance(b, float | int)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return abs(a - b) < 0.05
    return a == b


def _topology_truth(graph: TopologyGraph, ref: FloorPlanAnalysis) -> dict[str, Any]:
    st = graph.statistics
    return {
        "structure_type": st.structure_type,
        "bay_count": st.bay_count,
        "total_spaces": st.inside_space_count,
        "room_count": st.room_count,
        "bathroom_count": st.bathroom_count,
        "balcony_ratio": st.balcony_ratio,
        "windowless_ratio": st.windowless_ratio,
        "overall_grade": ref.compliance.overall_grade if ref.compliance else None,
        "spaces": sorted(s.space_name for s in ref.spaces),
    }


def _cell(v: Any) -> str:
    if isinstance(v, list):
        return "<br>".join(html.escape(str(x)) for x in v) if v else "<i>(none)</i>"
    if v is None or v == "":
        return "<i>(none)</i>"
    return html.escape(str(v))


_PAGE_CSS = """
body{font-family:system-ui,'Noto Sans KR','Malgun Gothic',sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;width:100%;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 6px;
vertical-align:top;text-align:left;font-size:14px}th{background:#f3f3f3}tr.diff td{background:#fff3b0}
td.off{color:#b00020;font-weight:600}section.plan{border-top:3px solid #333;margin-top:2em;padding-top:.5em}
.err{color:#b00020}.topo{font-size:13px;color:#333}fieldset{margin:.5em 0}#bar{position:sticky;top:0;
background:#fff;padding:.5em 0;border-bottom:1px solid #ccc}
"""

_PAGE_JS = """
const KEY='ftp-review:'+document.body.dataset.pageId;
function collect(){const prefs={},notes={};
 document.querySelectorAll('section.plan').forEach(s=>{const stem=s.dataset.stem;
  const c=s.querySelector('input[type=radio]:checked');if(c)prefs[stem]=c.value;
  const n=s.querySelector('textarea').value.trim();if(n)notes[stem]=n;});
 return {format:document.body.dataset.format,created_at:new Date().toISOString(),
  reviewer:document.getElementById('reviewer').value.trim()||null,
  teachers:JSON.parse(document.body.dataset.teachers),plans:JSON.parse(document.body.dataset.plans),
  preferences:prefs,notes:notes};}
function save(){const d=collect();localStorage.setItem(KEY,JSON.stringify(d));
 document.getElementById('count').textContent=Object.keys(d.preferences).length;}
function restore(){const raw=localStorage.getItem(KEY);if(!raw)return;const d=JSON.parse(raw);
 document.getElementById('reviewer').value=d.reviewer||'';
 document.querySelectorAll('section.plan').forEach(s=>{const stem=s.dataset.stem;
  s.querySelectorAll('input[type=radio]').forEach(r=>{r.checked=(d.preferences[stem]===r.value);});
  s.querySelector('textarea').value=(d.notes&&d.notes[stem])||'';});save();}
function download(){const blob=new Blob([JSON.stringify(collect(),null,1)],{type:'application/json'});
 const a=document.createElement('a');a.href=URL.createObjectURL(blob);a.download='preferences.json';
 document.body.appendChild(a);a.click();a.remove();}
document.addEventListener('change',save);document.addEventListener('input',save);
document.getElementById('download').addEventListener('click',download);restore();
"""


def export_review_page(
    store: ArtifactStore,
    stems: Sequence[str],
    teachers: Sequence[str],
    n: int,
    *,
    seed: int = 42,
    group_pattern: Any = None,
    group_prefix_len: int = 3,
) -> str:
    """Write ``review/review.html``: ``n`` plans (stratified by complex, seeded) answered by every
    teacher, side by side and blind (columns A, B … in a per-plan random order), structured fields
    that disagree between the answers highlighted and values that contradict the topology in red.
    A radio choice per plan (a teacher, tie or both bad) and a note are kept in the browser and
    downloaded as ``preferences.json``, to be saved as ``review/preferences.json``."""
    teachers = list(dict.fromkeys(teachers))
    if not teachers:
        raise QualityError("export_review_page: no teachers given")
    candidates = [
        s
        for s in stems
        if store.exists(store.layout.topology(s)) and all(store.exists(store.layout.analysis(s, t)) for t in teachers)
    ]
    if not candidates:
        raise QualityError(f"no plan has a topology and an answer from every teacher {teachers}: nothing to review")
    plans = stratified_pick(candidates, max(1, n), seed, group_pattern, group_prefix_len)
    sections = []
    for p_i, stem in enumerate(plans):
        section = _plan_section(store, p_i, stem, teachers, seed)
        if section is not None:
            sections.append(section)
    return store.write_text(store.layout.review_page(), _page_html(sections, plans, teachers))


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _plan_section(store: ArtifactStore, p_i: int, stem: str, teachers: list[str], seed: int) -> str | None:
    """One plan's ``<section>``: the topology, the blind answers (seeded order per plan) field by
    field, and the choice; None when the topology is unreadable."""
    graph = store.read_topology(stem)
    if graph is None:
        return None
    ref = reference_analysis(graph.image_info.file_name, graph)
    truth = _topology_truth(graph, ref)
    order = list(teachers)
    np.random.default_rng(seed + stable_hash(stem)).shuffle(order)
    answers = {t: _review_values(read_answer(store, stem, t)) for t in order}
    head = (
        "<tr><th>항목</th><th>위상 그래프</th>"
        + "".join(f"<th>답변 {_LETTERS[i]}</th>" for i in range(len(order)))
        + "</tr>"
    )
    errs = "".join(
        f"<p class='err'>답변 {_LETTERS[i]}: {html.escape(answers[t][1])}</p>"
        for i, t in enumerate(order)
        if answers[t][1]
    )
    rows = _answer_rows([answers[t][0] for t in order], truth)
    return (
        f"<section class='plan' data-stem='{html.escape(stem, quote=True)}'><h2>{p_i + 1}. {html.escape(stem)}</h2>"
        f"{_topology_paragraph(graph, truth)}{errs}<table>{head}{''.join(rows)}</table>"
        f"<fieldset><legend>어느 답변이 더 좋습니까?</legend>{_choice_radios(f'p{p_i}', order)}<br>"
        f"<textarea rows='2' cols='100' placeholder='메모 (선택)'></textarea></fieldset></section>"
    )


def _topology_paragraph(graph: TopologyGraph, truth: Mapping[str, Any]) -> str:
    st = graph.statistics
    labels = ", ".join(html.escape(nd.label) + (" (외부)" if nd.is_outside else "") for nd in graph.nodes)
    return (
        f"<p class='topo'><b>위상 그래프</b>: {html.escape(st.structure_type)}, {st.bay_count}베이, "
        f"내부 공간 {st.inside_space_count}, 침실 {st.room_count}, 화장실 {st.bathroom_count}, "
        f"발코니 {st.balcony_count} · 무창실 {st.windowless_ratio:.1f}%, 발코니 비율 {st.balcony_ratio:.1f}%, "
        f"LDK {_pct_or_unknown(st.ldk_ratio)}, 수납 {_pct_or_unknown(st.storage_ratio)} · 연결 {len(graph.edges)}개 · "
        f"규칙 기반 등급 <b>{html.escape(str(truth['overall_grade']))}</b><br>공간: {labels}</p>"
    )


def _answer_rows(answers: list[dict[str, Any]], truth: Mapping[str, Any]) -> list[str]:
    """Table rows, one per field: structured fields (highlighted where the answers disagree, a value
    red where it contradicts the topology), then the free texts."""
    rows = []
    for key, title in _REVIEW_FIELDS:
        vals = [a.get(key) for a in answers]
        differ = any(not _same(vals[0], v) for v in vals[1:])
        cells = []
        for v in vals:
            off = key in truth and v is not None and not _same(v, truth[key])
            cells.append(
                f"<td class='off' title='위상 그래프와 다름'>{_cell(v)}</td>" if off else f"<td>{_cell(v)}</td>"
            )
        rows.append(
            f"<tr class='{'diff' if differ else 'same'}' data-field='{key}'><th>{title}</th>"
            f"<td>{_cell(truth.get(key, ''))}</td>{''.join(cells)}</tr>"
        )
    for key, title in _TEXT_FIELDS:
        rows.append(
            f"<tr class='text' data-field='{key}'><th>{title}</th><td></td>"
            + "".join(f"<td>{_cell(a.get(key))}</td>" for a in answers)
            + "</tr>"
        )
    return rows


def _choice_radios(sid: str, order: list[str]) -> str:
    return "".join(
        f"<label><input type='radio' name='{sid}' value='{html.escape(t, quote=True)}'> 답변 {_LETTERS[i]}</label> "
        for i, t in enumerate(order)
    ) + (
        f"<label><input type='radio' name='{sid}' value='tie'> 비슷함</label> "
        f"<label><input type='radio' name='{sid}' value='both_bad'> 둘 다 부족</label>"
    )


def _page_html(sections: list[str], plans: list[str], teachers: list[str]) -> str:
    """The whole page: the plans' sections under the instructions and the download bar."""
    page_id = f"{stable_hash(json.dumps([plans, teachers], ensure_ascii=False)):08x}"
    return (
        "<!DOCTYPE html><html lang='ko'><head><meta charset='utf-8'><title>Teacher review</title>"
        f"<style>{_PAGE_CSS}</style></head>"
        f"<body data-page-id='{page_id}' data-format='{PREFERENCES_FORMAT}' "
        f"data-teachers='{html.escape(json.dumps(teachers, ensure_ascii=False), quote=True)}' "
        f"data-plans='{html.escape(json.dumps(plans, ensure_ascii=False), quote=True)}'>"
        "<h1>Teacher answers: side-by-side review</h1>"
        "<p>Answers are shown blind (A, B … in a random order per plan). Highlighted rows: the answers "
        "disagree; red values: they contradict the topology graph. Choose the better answer per plan, then "
        "press <b>Download preferences JSON</b> and save the file as <code>review/preferences.json</code> "
        "under the data root; the next phase-4 run reports it. Choices are kept in this browser meanwhile.</p>"
        "<div id='bar'>Reviewer: <input id='reviewer' size='20'> · chosen: <span id='count'>0</span>/"
        f"{len(sections)} · <button id='download' type='button'>Download preferences JSON</button></div>"
        + "".join(sections)
        + f"<script>{_PAGE_JS}</script></body></html>\n"
    )


def load_preferences(store: ArtifactStore) -> dict[str, Any]:
    """The validated ``review/preferences.json``; {} when there is none. Raises
    ``PreferencesError`` naming the file when it is malformed."""
    path = store.layout.review_preferences()
    if not store.exists(path):
        return {}
    try:
        data = json.loads(store.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PreferencesError(f"{path}: not valid JSON ({exc})") from None

    def bad(msg: str) -> PreferencesError:
        return PreferencesError(f"{path}: {msg} (download it again from review/review.html)")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    teachers = data.get("teachers")
    if not isinstance(teachers, list) or not teachers or not all(isinstance(t, str) and t for t in teachers):
        raise bad("'teachers' must be a non-empty list of teacher names")
    prefs = data.get("preferences")
    if not isinstance(prefs, dict):
        raise bad("'preferences' must be an object {plan stem: choice}")
    allowed = set(teachers) | set(NON_TEACHER_CHOICES)
    for stem, choice in prefs.items():
        if not isinstance(choice, str) or choice not in allowed:
            raise bad(f"plan {stem!r}: choice {choice!r} is not one of {sorted(allowed)}")
    notes = data.get("notes") or {}
    if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
        raise bad("'notes' must be an object {plan stem: text}")
    reviewer = data.get("reviewer")
    if reviewer is not None and not isinstance(reviewer, str):
        raise bad("'reviewer' must be a string")
    return {
        "path": path,
        "reviewer": reviewer,
        "teachers": list(teachers),
        "preferences": dict(prefs),
        "notes": dict(notes),
    }


def preference_summary(
    prefs: dict[str, Any],
    winner: str | None,
    scored: dict[str, dict],
    store: ArtifactStore,
    weights: Mapping[str, float],
) -> dict[str, Any]:
    choices = prefs["preferences"]
    counts = Counter(choices.values())
    decisive = {s: c for s, c in choices.items() if c not in NON_TEACHER_CHOICES}
    winner_share = (sum(c == winner for c in decisive.values()) / len(decisive)) if decisive and winner else None
    agree = compared = 0
    for stem, choice in choices.items():
        row = scored.get(stem)
        if row is None:  # reviewed but not in the sample: score it now
            graph = store.read_topology(stem)
            if graph is None:
                continue
            ref = reference_analysis(graph.image_info.file_name, graph)
            row = {
                "teachers": {
                    t: score_answer(read_answer(store, stem, t), graph, ref).to_dict(weights) for t in prefs["teachers"]
                }
            }
        w = {t: v["weighted"] for t, v in row["teachers"].items() if t in prefs["teachers"]}
        if len(w) < 2:
            continue
        best = max(w.values())
        top = [t for t, v in w.items() if best - v < 1e-9]
        auto = top[0] if len(top) == 1 else "tie"
        compared += 1
        agree += (choice == auto) or (choice == "both_bad" and best < 0.5)
    return {
        "path": prefs["path"],
        "reviewer": prefs["reviewer"],
        "reviewed": len(choices),
        "counts": dict(sorted(counts.items())),
        "decisive": len(decisive),
        "winner": winner,
        "winner_share": winner_share,
        "compared_with_scores": compared,
        "agreement_with_scores": agree / compared if compared else None,
        "notes": prefs["notes"],
    }

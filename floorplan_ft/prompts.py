"""The prompts every teacher sees and the student is trained and served on.

Teachers, training rows and the analysis service all build their messages here, so the student sees
at serving time exactly what it was trained on. `PROMPT_VERSION` is a hash of the template text:
editing a template changes it, which invalidates cached teacher answers and training data.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from floorplan_ft.schemas import TopologyGraph

SYSTEM_PROMPT = """\
당신은 아파트 평면도를 분석하는 건축 전문가입니다.
입력으로 평면도의 공간 위상 그래프(공간, 연결 관계, 통계)와 사내 평가 기준 일부가 주어집니다.
규칙:
1. 모든 서술은 한국어로, 평면에서 확인되는 사실과 수치에 근거해 작성합니다.
2. 구조 유형, 베이 수, 방·화장실 수, 비율은 그래프의 statistics 값과 일치해야 합니다.
3. 그래프에 없는 공간이나 연결을 지어내지 않습니다.
4. 평가는 제공된 사내 기준(채광, 환기, 가족융화, 수납)을 적용하고, 부적합 항목에는 근거와 개선 방안을 씁니다.
5. 응답은 지정된 JSON 스키마를 따르는 JSON 객체 하나뿐이며, 다른 문장을 덧붙이지 않습니다."""

ANALYSIS_TEMPLATE = """\
다음 평면도를 분석해 FloorPlanAnalysis JSON을 작성하세요.

## 평면도
이미지 이름: {image_name}

## 공간 위상 그래프 (픽셀 좌표 제외)
```json
{topology_json}
```

## 관련 사내 평가 기준
{criteria_block}

## 작성 요령
- image_name에는 위 이미지 이름을 그대로 씁니다.
- structure_type, bay_count, room_count, bathroom_count, balcony_ratio, windowless_ratio는 statistics 값을 씁니다.
- total_spaces는 세대 내부 공간 수(inside_space_count)입니다.
- spaces에는 세대 내부의 각 공간을 그래프의 label 이름으로 적고, 창 유무와 연결된 공간, 특징, 평가 의견을 씁니다.
- design_evaluation에는 채광, 환기, 가족융화, 수납을 각각 기준에 비추어 평가합니다.
- compliance에는 종합 등급과 충족·부적합 항목을 기준에 따라 정리합니다.
- recommendations에는 실행 가능한 개선 제안을 씁니다."""

NO_CRITERIA = "(검색된 기준 없음)"

# Keys that carry pixel geometry: the model cannot use them and they cost tokens.
_GEOMETRY_KEYS = frozenset({"bbox", "segmentation", "centroid"})
_PIXEL_STATISTICS = frozenset({"total_image_area", "total_space_area", "total_inside_area"})


def _version(*texts: str) -> str:
    return hashlib.sha256("\n\x00".join(texts).encode()).hexdigest()[:12]


# Bump when the code that fills the template changes (the topology slimming, its JSON layout): the
# version must change whenever the text a teacher or the student sees can change.
PROMPT_FORMAT = "2"  # 2: compact topology JSON without ocr_labels
PROMPT_VERSION = _version(PROMPT_FORMAT, SYSTEM_PROMPT, ANALYSIS_TEMPLATE, NO_CRITERIA)


def slim_topology(topology: TopologyGraph | Mapping[str, Any]) -> dict[str, Any]:
    """The topology as the model sees it: no pixel geometry, no pixel areas, no wall lists."""
    data = topology.model_dump() if isinstance(topology, TopologyGraph) else dict(topology)
    nodes = []
    for node in data.get("nodes", []):
        contains = node.get("contains") or {}
        structures = contains.get("structures") or {}
        nodes.append(
            {
                "node_id": node["node_id"],
                "label": node["label"],
                "category_name": node["category_name"],
                "space_type": node["space_type"],
                "is_outside": node["is_outside"],
                "area_ratio": node.get("area_ratio"),
                "objects": [o["category_name"] for o in contains.get("objects", [])],
                "door_count": len(structures.get("doors", [])),
                "window_count": len(structures.get("windows", [])),
            }
        )
    edges = [{k: e[k] for k in ("source_node", "target_node", "connection_type")} for e in data.get("edges", [])]
    statistics = {k: v for k, v in (data.get("statistics") or {}).items() if k not in _PIXEL_STATISTICS}
    slim = {"nodes": nodes, "edges": edges, "statistics": statistics}
    _assert_no_geometry(slim)
    return slim


def _assert_no_geometry(value: Any) -> None:
    if isinstance(value, Mapping):
        leaked = _GEOMETRY_KEYS & set(value)
        if leaked:
            raise AssertionError(f"pixel geometry leaked into the prompt: {sorted(leaked)}")
        for v in value.values():
            _assert_no_geometry(v)
    elif isinstance(value, list):
        for v in value:
            _assert_no_geometry(v)


def format_criteria(chunks: Iterable[Mapping[str, Any] | Any]) -> str:
    """Numbered criteria block; accepts corpus chunks or retrieval hits (dicts with content/source)."""
    lines = []
    for i, chunk in enumerate(chunks, start=1):
        item = chunk if isinstance(chunk, Mapping) else chunk.model_dump()
        lines.append(f"{i}. [{item.get('source', '')}] {item['content']}")
    return "\n".join(lines) if lines else NO_CRITERIA


def build_user_prompt(
    image_name: str,
    topology: TopologyGraph | Mapping[str, Any],
    criteria: Iterable[Mapping[str, Any] | Any] = (),
) -> str:
    # Compact JSON: indentation alone costs ~500 tokens per plan, and the answer must fit beside the
    # prompt in the student's max length (4,096 in the plan).
    topology_json = json.dumps(slim_topology(topology), ensure_ascii=False, separators=(",", ":"))
    return ANALYSIS_TEMPLATE.format(
        image_name=image_name,
        topology_json=topology_json,
        criteria_block=format_criteria(criteria),
    )


def build_messages(
    image_name: str,
    topology: TopologyGraph | Mapping[str, Any],
    criteria: Iterable[Mapping[str, Any] | Any] = (),
) -> list[dict[str, str]]:
    """System + user chat messages: identical for every teacher, the training rows and serving."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": build_user_prompt(image_name, topology, criteria)},
    ]


# ============================================================================ the team's prompt
#
# prompts.style = "team": the team's production service builds its messages with its own module
# (`prompts.module`, default CV.rag_system.prompts): SYSTEM_PROMPT as the system turn and
# build_analysis_prompt(topology_data, rag_context) as the user turn, on the topology dict exactly
# as stored and a context of "[참고 i]" blocks. Every phase and the service call
# `build_messages_for`, so teachers, training rows, evaluation and serving send the same bytes.

TEAM_STYLE, PROJECT_STYLE = "team", "project"


class PromptModuleError(ValueError):
    """The team's prompt module cannot be loaded or lacks its interface (names the settings)."""


@dataclass(frozen=True)
class TeamPrompts:
    module: str
    origin: str | None
    system_prompt: str
    build_analysis_prompt: Callable[[dict, str], str]
    version: str


# A fixed probe plan: the built prompt's hash is part of the version, so an edit anywhere in the
# team's template or slimming code (not only SYSTEM_PROMPT) invalidates cached labels.
_PROBE_TOPOLOGY: dict[str, Any] = {
    "image_info": {"file_name": "probe.png", "width": 100, "height": 100},
    "nodes": [
        {
            "node_id": "space_0",
            "node_type": "space",
            "category_id": 1,
            "category_name": "공간_거실",
            "label": "거실",
            "space_type": "공통공간",
            "is_outside": False,
            "bbox": [0, 0, 10, 10],
            "area": 100.0,
            "area_ratio": 0.5,
            "centroid": [5.0, 5.0],
            "contains": {
                "objects": [],
                "ocr_labels": ["거실"],
                "structures": {"doors": [], "windows": [], "walls": []},
            },
        }
    ],
    "edges": [],
    "statistics": {"structure_type": "판상형", "bay_count": 3, "room_count": 2, "bathroom_count": 1},
}
_PROBE_CONTEXT = "[참고 1]\n기준\n"


def _team_code_path(team_code: str | None) -> str | None:
    if not team_code:
        return None
    path = Path(team_code).expanduser().resolve()
    if not path.is_dir():
        raise PromptModuleError(
            f"paths.team_code = {team_code!r} is not a folder: point it at the team repository's "
            "python/ folder (it holds CV/rag_system/prompts.py)"
        )
    return str(path)


def _import_fresh(module: str, root: str | None):
    """Import `module` with `root` first on the path; a module of that name imported from elsewhere
    (another team_code) is imported again from `root`."""
    if root is not None:
        if root not in sys.path:
            sys.path.insert(0, root)
        loaded = sys.modules.get(module)
        origin = getattr(loaded, "__file__", None) if loaded is not None else None
        if loaded is not None and (origin is None or not str(Path(origin).resolve()).startswith(root + os.sep)):
            for name in [
                m
                for m in sys.modules
                if m == module or m.startswith(module.split(".")[0] + ".") or m == module.split(".")[0]
            ]:
                del sys.modules[name]
            importlib.invalidate_caches()
    return importlib.import_module(module)


@functools.lru_cache(maxsize=8)
def _load_team_prompts(module: str, team_code: str | None) -> TeamPrompts:
    root = _team_code_path(team_code)
    where = f"paths.team_code = {team_code!r}" if team_code else "the import path (paths.team_code is not set)"
    try:
        mod = _import_fresh(module, root)
    except Exception as exc:  # noqa: BLE001 - any import failure is a configuration error
        raise PromptModuleError(
            f"prompts.style = 'team' but prompts.module = {module!r} cannot be imported from {where}: "
            f"{type(exc).__name__}: {exc}. Set paths.team_code to the team repository's python/ folder "
            "or prompts.module to the module that defines SYSTEM_PROMPT and build_analysis_prompt"
        ) from None
    system_prompt = getattr(mod, "SYSTEM_PROMPT", None)
    builder = getattr(mod, "build_analysis_prompt", None)
    missing = [
        n
        for n, v in (("SYSTEM_PROMPT", isinstance(system_prompt, str)), ("build_analysis_prompt", callable(builder)))
        if not v
    ]
    if missing:
        raise PromptModuleError(
            f"prompts.module = {module!r} (from {getattr(mod, '__file__', where)}) lacks "
            f"{' and '.join(missing)}: it must define SYSTEM_PROMPT (str) and "
            "build_analysis_prompt(topology_data: dict, rag_context: str) -> str"
        )
    try:
        probe = builder(copy.deepcopy(_PROBE_TOPOLOGY), _PROBE_CONTEXT)
    except Exception as exc:  # noqa: BLE001
        raise PromptModuleError(
            f"prompts.module = {module!r}: build_analysis_prompt failed on a minimal topology: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(probe, str):
        raise PromptModuleError(
            f"prompts.module = {module!r}: build_analysis_prompt returned {type(probe).__name__}, not str"
        )
    version = "team-" + _version(TEAM_STYLE, module, system_prompt, probe)
    return TeamPrompts(module, getattr(mod, "__file__", None), system_prompt, builder, version)


def team_prompts(settings: Any) -> TeamPrompts:
    """The team's prompt module named by the settings (loaded once); `PromptModuleError` otherwise."""
    return _load_team_prompts(settings.prompts.module, settings.paths.team_code)


def prompt_style(settings: Any) -> str:
    prompts_settings = getattr(settings, "prompts", None) if settings is not None else None
    return getattr(prompts_settings, "style", PROJECT_STYLE) or PROJECT_STYLE


def prompt_version_for(settings: Any) -> str:
    """The prompt's provenance key: `PROMPT_VERSION` in project style; in team style the style, the
    module's SYSTEM_PROMPT and a prompt it built (so any change of theirs invalidates labels)."""
    if prompt_style(settings) == TEAM_STYLE:
        return team_prompts(settings).version
    return PROMPT_VERSION


def check_prompts(settings: Any) -> str:
    """Fail early (before any request) when the configured prompt cannot be built; the version."""
    return prompt_version_for(settings)


def team_context_text(documents: Iterable[str | Mapping[str, Any] | Any]) -> str:
    """The retrieval context as the team's service writes it: "[참고 i]\\n{document}\\n" per hit,
    numbered from 1, joined with newlines ("" without hits)."""
    texts = []
    for doc in documents:
        if isinstance(doc, str):
            texts.append(doc)
        elif isinstance(doc, Mapping):
            texts.append(str(doc.get("content", doc.get("document", ""))))
        else:
            texts.append(str(doc.content))
    return "\n".join(f"[참고 {i}]\n{text}\n" for i, text in enumerate(texts, start=1))


def format_context(chunks: Iterable[Mapping[str, Any] | Any], style: str = PROJECT_STYLE) -> str:
    """The context text of a prompt in this style (project: `format_criteria`)."""
    chunks = list(chunks)
    return team_context_text(chunks) if style == TEAM_STYLE else format_criteria(chunks)


def team_query(stats: Any) -> str:
    """The team's retrieval query: "{structure_type} 건축물 {bay_count}Bay 침실 {room_count}개"
    (their defaults for a missing value: 혼합형, 0, 0)."""
    if isinstance(stats, TopologyGraph):
        stats = stats.statistics
    if isinstance(stats, Mapping) and "statistics" in stats and "nodes" in stats:
        stats = stats["statistics"]

    def get(name: str, default: Any) -> Any:
        value = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
        return default if value is None else value

    return f"{get('structure_type', '혼합형')} 건축물 {get('bay_count', 0)}Bay 침실 {get('room_count', 0)}개"


def _chunks_of(rag_context: Any) -> list[Any]:
    if rag_context is None:
        return []
    if isinstance(rag_context, Mapping):
        return list(rag_context.get("chunks") or [])
    if hasattr(rag_context, "chunks"):
        return list(rag_context.chunks)
    return list(rag_context)


def build_messages_for(
    settings: Any,
    topology_raw: Mapping[str, Any] | TopologyGraph,
    rag_context: Any,
    *,
    image_name: str | None = None,
    graph: TopologyGraph | None = None,
) -> list[dict[str, str]]:
    """The messages every phase and the service send for one plan, in the configured style.

    ``topology_raw``: the topology as stored (or as the client sent it); ``rag_context``: a
    `RagContext`, the rag_context.json dict, or its chunks (team style also takes the context text). Project style: `build_messages` on the
    normalised graph (``graph``, else read from ``topology_raw``) with ``image_name`` (default: the
    graph's file name). Team style: their SYSTEM_PROMPT and build_analysis_prompt(a copy of the
    dict as stored, the "[참고 i]" context), exactly what their service sends.
    """
    if prompt_style(settings) == TEAM_STYLE:
        team = team_prompts(settings)
        raw = topology_raw.model_dump(mode="json") if isinstance(topology_raw, TopologyGraph) else topology_raw
        context = rag_context if isinstance(rag_context, str) else team_context_text(_chunks_of(rag_context))
        user = team.build_analysis_prompt(copy.deepcopy(dict(raw)), context)
        return [{"role": "system", "content": team.system_prompt}, {"role": "user", "content": user}]
    if graph is None:
        if isinstance(topology_raw, TopologyGraph):
            graph = topology_raw
        else:
            from floorplan_ft.topology_io import read_topology_dict

            graph = read_topology_dict(dict(topology_raw), origin="topology")
    name = image_name or graph.image_info.file_name
    return build_messages(name, graph, _chunks_of(rag_context))

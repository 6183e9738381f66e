"""The prompts every teacher sees and the student is trained and served on.

Teachers, training rows and the analysis service all build their messages here, so the student sees
at serving time exactly what it was trained on. `PROMPT_VERSION` is a hash of the template text:
editing a template changes it, which invalidates cached teacher answers and training data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
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
    edges = [
        {k: e[k] for k in ("source_node", "target_node", "connection_type")}
        for e in data.get("edges", [])
    ]
    statistics = {
        k: v for k, v in (data.get("statistics") or {}).items() if k not in _PIXEL_STATISTICS
    }
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

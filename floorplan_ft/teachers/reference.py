"""The reference teacher: a rule-based analyst, not a language model.

It fills every `FloorPlanAnalysis` field from the topology and the criteria rules in
`floorplan_ft.criteria`, with templated Korean text. Deterministic and free: the demo's offline
teacher and phase 4's factual yardstick.
"""

from __future__ import annotations

from collections import defaultdict

from floorplan_ft.criteria import DIRECTION_KO, Assessment, assess
from floorplan_ft.schemas import (
    Compliance,
    DesignEvaluation,
    FloorPlanAnalysis,
    NonCompliantItem,
    SpaceAnalysis,
    TopologyGraph,
)

TEACHER_NAME = "reference"
REFERENCE_VERSION = "reference/1.0"


def _neighbours(graph: TopologyGraph) -> dict[str, list[str]]:
    labels = {n.node_id: n.label for n in graph.nodes}
    out: dict[str, list[str]] = defaultdict(list)
    for e in graph.edges:
        out[e.source_node].append(labels[e.target_node])
        out[e.target_node].append(labels[e.source_node])
    return {k: sorted(set(v)) for k, v in out.items()}


def _space_comment(space: dict, a: Assessment) -> str:
    name, label = space["name"], space["label"]
    if space["window_count"]:
        light = f"{DIRECTION_KO[space['main_direction']]} 창이 있어 채광과 환기가 가능합니다."
    else:
        light = "창이 없는 무창실로 자연 채광이 어렵습니다."
    if name == "침실" and space is max(
        (s for s in a.facts["spaces"] if s["name"] == "침실"), key=lambda s: s["area"], default=None
    ):
        role = f"{label}은(는) 가장 큰 침실로 안방 역할을 합니다. "
    elif name == "거실":
        role = "가족 공용 공간의 중심입니다. "
    elif name == "주방":
        role = "조리와 식사가 이루어지는 공간입니다. "
    elif name in {"드레스룸", "팬트리", "세탁실"}:
        role = "수납을 담당하는 공간입니다. "
    else:
        role = ""
    return f"{role}{light} 내부 면적의 {space['area_ratio']:.1f}%를 차지합니다."


def _features(space: dict) -> list[str]:
    feats = [f"{DIRECTION_KO[d]} 창" for d in space["directions"]] or ["무창"]
    if space["window_count"] > 1:
        feats.append(f"창 {space['window_count']}개")
    return feats


def reference_analysis(image_name: str, graph: TopologyGraph) -> FloorPlanAnalysis:
    """The rule-based analysis of one plan."""
    st = graph.statistics
    a = assess(graph)
    neighbours = _neighbours(graph)
    spaces = [
        SpaceAnalysis(
            space_name=s["label"],
            space_type=s["space_type"],
            area_m2=None,  # the topology is in pixels; no scale is known
            area_ratio=round(min(s["area_ratio"], 100.0), 2),
            has_window=s["window_count"] > 0,
            features=_features(s)[:10],
            connected_spaces=neighbours.get(s["node_id"], [])[:12],
            evaluation_comment=_space_comment(s, a),
        )
        for s in a.facts["spaces"]
    ][:40]
    by_cat = {c: [f for f in a.findings if f.category == c] for c in ("채광", "환기", "가족융화", "수납")}

    def verdict(category: str) -> str:
        parts = ", ".join(f.evidence for f in by_cat[category])
        return f"{parts}. {'기준을 충족합니다' if a.met[category] else '기준을 충족하지 못합니다'}."

    non_compliant = [
        NonCompliantItem(
            category=f.category,
            item=f.item + (" (필수)" if f.mandatory else ""),
            reason=f"{f.evidence}로 사내 기준에 미달합니다.",
            recommendation=f.recommendation,
        )
        for f in a.findings
        if not f.met
    ]
    compliant = [f"{f.category}: {f.item} ({f.evidence})" for f in a.findings if f.met]
    summary = (
        f"{st.structure_type} {st.bay_count}베이 평면으로 침실 {st.room_count}개, 화장실 {st.bathroom_count}개, "
        f"내부 공간 {st.inside_space_count}개로 구성됩니다. 무창실 비율 {st.windowless_ratio:.1f}%, "
        f"발코니 비율 {st.balcony_ratio:.1f}%이며 사내 기준 종합 등급은 {a.grade}입니다."
    )
    return FloorPlanAnalysis(
        image_name=image_name,
        structure_type=st.structure_type,
        bay_count=st.bay_count,
        total_spaces=st.inside_space_count,
        room_count=st.room_count,
        bathroom_count=st.bathroom_count,
        balcony_ratio=round(min(st.balcony_ratio, 100.0), 2),
        windowless_ratio=round(st.windowless_ratio, 2),
        ventilation_quality=a.ventilation_quality,
        summary=summary,
        spaces=spaces,
        design_evaluation=DesignEvaluation(
            채광=verdict("채광"), 환기=verdict("환기"), 가족융화=verdict("가족융화"), 수납=verdict("수납")
        ),
        recommendations=[f.recommendation for f in a.findings if not f.met][:10] or None,
        compliance=Compliance(
            overall_grade=a.grade,
            compliant_items=compliant[:20],
            non_compliant_items=non_compliant[:20],
            summary=(
                f"네 가지 핵심 가치 중 {a.met_count}개 충족"
                + (", 필수 조건(안방 외기창) 미충족으로 불합격" if a.mandatory_failed else "")
                + f" → {a.grade}."
            ),
        ),
    )

"""The company's four criteria applied to a topology graph, as rules (DOMAIN.md).

Used by the rule-based reference teacher (which writes its answer from this assessment) and by the
phase-4 metrics (a teacher's grade is checked against it). One place decides what "compliant"
means, so the reference answers and the yardstick cannot drift apart.

Rules (the corpus in data/criteria_ko.json states them in Korean):
- 채광 met: bay_count ≥ 3 and windowless_ratio ≤ 30 %. Mandatory: the master bedroom (largest
  침실) has a window, otherwise the plan fails (불합격).
- 환기 met: 판상형 (cross ventilation), a kitchen window, and at least one bathroom window.
- 가족융화 met: LDK share 30-40 %.
- 수납 met: storage share ≥ 5 % (≥ 10 % 우수, 5-10 % 보통, < 5 % 부족).
- Grade: 불합격 if a mandatory condition fails, else by criteria met: 4 최우수, 3 우수, 2 보통,
  otherwise 미흡.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from floorplan_ft import vocab
from floorplan_ft.cv.topology import bbox_direction
from floorplan_ft.schemas import TopologyGraph

CRITERIA = ("채광", "환기", "가족융화", "수납")
DIRECTION_KO = {"S": "남향", "N": "북향", "E": "동향", "W": "서향"}


@dataclass
class Finding:
    category: str
    item: str
    met: bool
    evidence: str
    recommendation: str = ""
    mandatory: bool = False


@dataclass
class Assessment:
    findings: list[Finding]
    met: dict[str, bool]
    mandatory_failed: bool
    grade: str
    ventilation_quality: str
    storage_level: str
    daylight_level: str
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def met_count(self) -> int:
        return sum(self.met.values())


def space_facts(graph: TopologyGraph) -> dict[str, Any]:
    """Window facts per inside space: canonical name, label, window directions, main direction."""
    spaces = []
    for node in graph.nodes:
        if node.is_outside:
            continue
        windows = node.contains.structures.windows
        main = max(windows, key=lambda w: max(w.bbox[2], w.bbox[3]), default=None)
        name = vocab.canonical_name(node.label)
        if name not in vocab.SPACE_CLASS:
            name = vocab.canonical_name(node.category_name)
        spaces.append(
            {
                "node_id": node.node_id,
                "label": node.label,
                "name": name,
                "space_type": node.space_type,
                "area": node.area,
                "area_ratio": node.area_ratio,
                "window_count": len(windows),
                "directions": sorted({bbox_direction(w.bbox, node.centroid) for w in windows}),
                "main_direction": bbox_direction(main.bbox, node.centroid) if main else None,
            }
        )
    return {"spaces": spaces}


def _largest(spaces: list[dict], name: str) -> dict | None:
    matches = [s for s in spaces if s["name"] == name]
    return max(matches, key=lambda s: s["area"], default=None)


def assess(graph: TopologyGraph) -> Assessment:
    st = graph.statistics
    spaces = space_facts(graph)["spaces"]
    kitchen = _largest(spaces, "주방")
    master = _largest(spaces, "침실")
    baths = [s for s in spaces if s["name"] == "화장실"]
    kitchen_window = bool(kitchen and kitchen["window_count"])
    bath_window = any(b["window_count"] for b in baths)
    master_window = bool(master and master["window_count"])

    findings: list[Finding] = []
    bays_ok = st.bay_count >= 3
    daylight_level = (
        "최우수" if st.bay_count >= 4 else "우수" if st.bay_count == 3 else "보통" if st.bay_count == 2 else "미흡"
    )
    findings.append(
        Finding(
            "채광",
            "베이 수",
            bays_ok,
            f"{st.bay_count}베이 ({daylight_level})",
            "거실과 침실을 같은 방향으로 나란히 배치해 베이 수를 늘리는 방안을 검토하세요.",
        )
    )
    windowless_ok = st.windowless_ratio <= 30.0
    findings.append(
        Finding(
            "채광",
            "무창실 비율",
            windowless_ok,
            f"무창실 비율 {st.windowless_ratio:.1f}% (기준 30% 이하)",
            "무창실 일부에 외기창을 두거나 실 배치를 조정하세요.",
        )
    )
    if master is not None:
        findings.append(
            Finding(
                "채광",
                "안방 외기창",
                master_window,
                f"안방({master['label']}) 창 {'있음' if master_window else '없음'}",
                "안방을 외벽에 면하도록 재배치해 외기창을 확보해야 합니다.",
                mandatory=True,
            )
        )
    findings.append(
        Finding(
            "환기",
            "맞통풍 구조",
            st.structure_type == "판상형",
            f"구조 유형 {st.structure_type}",
            "맞통풍이 가능하도록 거실과 주방 창을 마주 보게 배치하는 방안을 검토하세요.",
        )
    )
    findings.append(
        Finding(
            "환기",
            "주방 창",
            kitchen_window,
            f"주방 창 {'있음' if kitchen_window else '없음'}",
            "주방에 창을 두거나 기계 환기를 보강하세요.",
        )
    )
    findings.append(
        Finding(
            "환기",
            "화장실 창",
            bath_window,
            f"창이 있는 화장실 {sum(1 for b in baths if b['window_count'])}/{len(baths)}곳",
            "화장실 한 곳 이상에 창을 두거나 환기팬 용량을 검토하세요.",
        )
    )
    # A ratio the graph could not give (None) is no finding at all, never a 0% one.
    storage_level = "미상"
    if st.ldk_ratio is not None:
        ldk_ok = 30.0 <= st.ldk_ratio <= 40.0
        findings.append(
            Finding(
                "가족융화",
                "LDK 비율",
                ldk_ok,
                f"LDK 비율 {st.ldk_ratio:.1f}% (적정 30~40%)",
                "거실·주방 면적 비율을 30~40% 범위로 조정하세요.",
            )
        )
    if st.storage_ratio is not None:
        storage_level = "우수" if st.storage_ratio >= 10 else "보통" if st.storage_ratio >= 5 else "부족"
        findings.append(
            Finding(
                "수납",
                "수납 비율",
                st.storage_ratio >= 5.0,
                f"수납 공간 비율 {st.storage_ratio:.1f}% ({storage_level})",
                "드레스룸·팬트리를 추가하거나 알파룸을 수납 공간으로 활용하세요.",
            )
        )

    met = {c: all(f.met for f in findings if f.category == c and not f.mandatory) for c in CRITERIA}
    mandatory_failed = any(f.mandatory and not f.met for f in findings)
    if mandatory_failed:
        grade = "불합격"
    else:
        grade = {4: "최우수", 3: "우수", 2: "보통"}.get(sum(met.values()), "미흡")
    ventilation = {"판상형": 0, "혼합형": 2, "타워형": 3}[st.structure_type]
    if st.structure_type == "판상형" and not (kitchen_window and bath_window):
        ventilation = 1
    if not kitchen_window:
        ventilation = min(3, ventilation + 1)
    return Assessment(
        findings=findings,
        met=met,
        mandatory_failed=mandatory_failed,
        grade=grade,
        ventilation_quality=("우수", "양호", "보통", "미흡")[ventilation],
        storage_level=storage_level,
        daylight_level=daylight_level,
        facts={
            "kitchen_window": kitchen_window,
            "bath_window": bath_window,
            "master_window": master_window,
            "spaces": spaces,
        },
    )

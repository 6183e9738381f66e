"""Pydantic models for the two contracts: the topology graph and the FloorPlanAnalysis answer.

`FloorPlanAnalysis` is sent to OpenAI (strict structured outputs) and Gemini (JSON schema) as is,
so it has no free-form dict fields: every object has fixed keys and forbids extra ones. Counts are
bounded below by 0 and strings and lists have maximum lengths so that constrained decoding of a
weak student cannot run away.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.0"

StructureType = Literal["판상형", "타워형", "혼합형"]
VentilationQuality = Literal["우수", "양호", "보통", "미흡"]
OverallGrade = Literal["최우수", "우수", "보통", "미흡", "불합격"]
ConnectionType = Literal["door", "window", "open"]

ShortText = Annotated[str, Field(max_length=200)]
Comment = Annotated[str, Field(max_length=600)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- topology graph


class ImageInfo(_Strict):
    file_name: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class ContainedObject(_Strict):
    object_id: str
    category_name: str
    bbox: list[float]


class ContainedStructure(_Strict):
    structure_id: str
    category_name: str
    bbox: list[float]
    subtype: str | None = None


class Structures(_Strict):
    doors: list[ContainedStructure] = Field(default_factory=list)
    windows: list[ContainedStructure] = Field(default_factory=list)
    walls: list[ContainedStructure] = Field(default_factory=list)


class Contains(_Strict):
    objects: list[ContainedObject] = Field(default_factory=list)
    ocr_labels: list[str] = Field(default_factory=list)
    structures: Structures = Field(default_factory=Structures)


class SpaceNode(_Strict):
    node_id: str
    node_type: Literal["space"] = "space"
    category_id: int
    category_name: str
    label: str
    space_type: str
    is_outside: bool
    bbox: list[float]
    segmentation: list[list[float]]
    area: float = Field(ge=0)
    area_ratio: float = Field(
        ge=0,
        description="% of the unit's inside area; 0 for outside spaces (the team's null reads as 0)",
    )
    centroid: list[float]
    contains: Contains = Field(default_factory=Contains)


class Edge(_Strict):
    edge_id: str
    source_node: str
    target_node: str
    connection_type: ConnectionType
    connection_id: str | None = None


class SpaceTypeCount(_Strict):
    공통공간: int = 0
    개인공간: int = 0
    습식공간: int = 0
    특화공간: int = 0
    기타공간: int = 0
    외부공간: int = 0
    미분류: int = 0


class TopologyStatistics(_Strict):
    total_image_area: float | None = Field(
        default=None, description="px²; None when the graph does not say (the frontend dialect)"
    )
    total_space_area: float
    total_inside_area: float
    space_count: int = Field(ge=0)
    inside_space_count: int = Field(ge=0)
    room_count: int = Field(ge=0)
    bathroom_count: int = Field(ge=0)
    balcony_count: int = Field(ge=0)
    bay_count: int = Field(ge=0)
    space_type_count: SpaceTypeCount
    structure_type: StructureType
    balcony_ratio: float = Field(ge=0)
    windowless_ratio: float = Field(ge=0, le=100)
    # Beyond DOMAIN.md's list: used by retrieval queries, the reference teacher and the metrics.
    # None means unknown (a graph that did not carry them and whose nodes cannot give them), never 0.
    ldk_ratio: float | None = Field(default=None, ge=0)
    storage_ratio: float | None = Field(default=None, ge=0)
    master_bedroom_has_window: bool | None = None


class TopologyGraph(_Strict):
    image_info: ImageInfo
    nodes: list[SpaceNode]
    edges: list[Edge]
    statistics: TopologyStatistics
    builder_version: str | None = None


# --------------------------------------------------------------------------- analysis answer


class SpaceAnalysis(_Strict):
    space_name: ShortText
    space_type: ShortText
    area_m2: float | None = Field(default=None, ge=0)
    area_ratio: float | None = Field(default=None, ge=0, le=100)
    has_window: bool
    features: list[ShortText] = Field(max_length=10)
    connected_spaces: list[ShortText] = Field(max_length=12)
    evaluation_comment: Comment


class DesignEvaluation(_Strict):
    """The four internal criteria; fixed keys instead of a dict so strict mode accepts it."""

    채광: Comment
    환기: Comment
    가족융화: Comment
    수납: Comment


class NonCompliantItem(_Strict):
    category: ShortText
    item: ShortText
    reason: Comment
    recommendation: Comment


class Compliance(_Strict):
    overall_grade: OverallGrade
    compliant_items: list[ShortText] = Field(max_length=20)
    non_compliant_items: list[NonCompliantItem] = Field(max_length=20)
    summary: Comment


class FloorPlanAnalysis(_Strict):
    image_name: ShortText
    structure_type: StructureType
    bay_count: int = Field(ge=0, le=20)
    total_spaces: int = Field(ge=0, le=100)
    room_count: int = Field(ge=0, le=20)
    bathroom_count: int = Field(ge=0, le=20)
    balcony_ratio: float = Field(ge=0, le=100)
    windowless_ratio: float = Field(ge=0, le=100)
    ventilation_quality: VentilationQuality
    summary: Annotated[str, Field(max_length=1000)]
    spaces: list[SpaceAnalysis] = Field(max_length=40)
    design_evaluation: DesignEvaluation | None = None
    recommendations: list[Comment] | None = Field(default=None, max_length=10)
    compliance: Compliance | None = None


def analysis_json_schema() -> dict:
    """The JSON schema of `FloorPlanAnalysis` as pydantic writes it."""
    return FloorPlanAnalysis.model_json_schema()


def schema_hash() -> str:
    """Short content hash of the answer schema: part of every cache key and provenance record."""
    text = json.dumps(analysis_json_schema(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(f"{SCHEMA_VERSION}\n{text}".encode()).hexdigest()[:16]


# Keywords OpenAI's strict structured outputs does not accept (string lengths); the bounds stay in
# the pydantic model, which validates every answer, and in the local constrained decoder.
_OPENAI_UNSUPPORTED = frozenset({"maxLength", "minLength"})


def _strip_keywords(node, banned: frozenset[str]):
    if isinstance(node, dict):
        return {k: _strip_keywords(v, banned) for k, v in node.items() if k not in banned}
    if isinstance(node, list):
        return [_strip_keywords(v, banned) for v in node]
    return node


def openai_strict_schema() -> dict:
    """`FloorPlanAnalysis` as OpenAI's strict mode wants it: every property required (optional ones
    nullable), `additionalProperties: false` everywhere, no unsupported keywords."""
    from openai.lib._pydantic import to_strict_json_schema

    return _strip_keywords(to_strict_json_schema(FloorPlanAnalysis), _OPENAI_UNSUPPORTED)


def openai_response_format() -> dict:
    """The `response_format` parameter for chat completions with the strict schema."""
    return {
        "type": "json_schema",
        "json_schema": {"name": "FloorPlanAnalysis", "strict": True, "schema": openai_strict_schema()},
    }

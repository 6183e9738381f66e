import json

import pytest
from pydantic import ValidationError

from floorplan_ft.schemas import (
    SCHEMA_VERSION,
    FloorPlanAnalysis,
    analysis_json_schema,
    openai_response_format,
    openai_strict_schema,
    schema_hash,
)

SAMPLE = {
    "image_name": "C01_0001.png",
    "structure_type": "판상형",
    "bay_count": 3,
    "total_spaces": 9,
    "room_count": 3,
    "bathroom_count": 2,
    "balcony_ratio": 8.5,
    "windowless_ratio": 22.2,
    "ventilation_quality": "우수",
    "summary": "3베이 판상형 평면으로 맞통풍이 가능합니다.",
    "spaces": [
        {
            "space_name": "거실",
            "space_type": "공통공간",
            "area_m2": None,
            "area_ratio": 24.1,
            "has_window": True,
            "features": ["남향 주창"],
            "connected_spaces": ["주방", "침실1"],
            "evaluation_comment": "채광이 좋습니다.",
        }
    ],
    "design_evaluation": {"채광": "3베이 우수", "환기": "판상형", "가족융화": "LDK 35%", "수납": "보통"},
    "recommendations": ["팬트리 추가"],
    "compliance": {
        "overall_grade": "우수",
        "compliant_items": ["채광"],
        "non_compliant_items": [
            {"category": "수납", "item": "수납 비율", "reason": "6%", "recommendation": "붙박이장"}
        ],
        "summary": "대체로 양호",
    },
}


def test_round_trip_json():
    model = FloorPlanAnalysis.model_validate(SAMPLE)
    again = FloorPlanAnalysis.model_validate_json(model.model_dump_json())
    assert again == model
    assert json.loads(model.model_dump_json())["design_evaluation"]["가족융화"] == "LDK 35%"


def test_optional_sections_may_be_absent():
    minimal = {k: v for k, v in SAMPLE.items() if k not in {"design_evaluation", "recommendations", "compliance"}}
    assert FloorPlanAnalysis.model_validate(minimal).compliance is None


@pytest.mark.parametrize(
    "patch",
    [
        {"structure_type": "아파트형"},
        {"bay_count": -1},
        {"ventilation_quality": "excellent"},
        {"extra_field": 1},
        {"compliance": {**SAMPLE["compliance"], "overall_grade": "A"}},
        {"design_evaluation": {"채광": "x", "환기": "x", "가족융화": "x"}},
    ],
)
def test_invalid_answers_are_rejected(patch):
    with pytest.raises(ValidationError):
        FloorPlanAnalysis.model_validate({**SAMPLE, **patch})


def _walk(node, seen):
    if isinstance(node, dict):
        seen.append(node)
        for v in node.values():
            _walk(v, seen)
    elif isinstance(node, list):
        for v in node:
            _walk(v, seen)
    return seen


def test_openai_strict_schema():
    schema = openai_strict_schema()
    objects = [n for n in _walk(schema, []) if n.get("type") == "object"]
    assert len(objects) == 5  # answer, space, design evaluation, compliance, non-compliant item
    for obj in objects:
        assert obj["additionalProperties"] is False
        assert set(obj["required"]) == set(obj["properties"])  # strict: every key required
    assert not [n for n in _walk(schema, []) if "maxLength" in n]
    assert "patternProperties" not in json.dumps(schema)
    fmt = openai_response_format()
    assert fmt["json_schema"]["strict"] is True and fmt["json_schema"]["name"] == "FloorPlanAnalysis"


def test_openai_sdk_accepts_the_model_for_parse():
    # The SDK's own helper used by client.chat.completions.parse(response_format=Model).
    from openai.lib._parsing._completions import type_to_response_format_param

    param = type_to_response_format_param(FloorPlanAnalysis)
    assert param["json_schema"]["strict"] is True


def test_no_free_form_dicts_for_gemini():
    schema = analysis_json_schema()
    for node in _walk(schema, []):
        if node.get("type") == "object":
            assert node.get("additionalProperties") is False
            assert node.get("properties"), node


def test_schema_hash_is_stable_and_versioned():
    assert schema_hash() == schema_hash()
    assert len(schema_hash()) == 16 and SCHEMA_VERSION

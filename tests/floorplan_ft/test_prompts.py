import json
import re

from floorplan_ft import prompts
from floorplan_ft.prompts import PROMPT_VERSION, build_messages, slim_topology
from floorplan_ft.retrieval.corpus import corpus_hash, load_corpus


def _topology():
    node = {
        "node_id": "space_0",
        "node_type": "space",
        "category_id": 1,
        "category_name": "공간_거실",
        "label": "거실",
        "space_type": "공통공간",
        "is_outside": False,
        "bbox": [10, 20, 300, 200],
        "segmentation": [[10, 20, 310, 20, 310, 220, 10, 220]],
        "area": 60000.0,
        "area_ratio": 40.0,
        "centroid": [160.0, 120.0],
        "contains": {
            "objects": [{"object_id": "o1", "category_name": "객체_싱크대", "bbox": [1, 2, 3, 4]}],
            "ocr_labels": ["거실"],
            "structures": {
                "doors": [],
                "walls": [],
                "windows": [{"structure_id": "w1", "category_name": "구조_창호", "bbox": [50, 215, 120, 10]}],
            },
        },
    }
    return {
        "image_info": {"file_name": "C01_0001.png", "width": 800, "height": 600},
        "nodes": [node],
        "edges": [
            {
                "edge_id": "edge_0",
                "source_node": "space_0",
                "target_node": "space_0",
                "connection_type": "open",
                "connection_id": None,
            }
        ],
        "statistics": {
            "total_image_area": 480000.0,
            "total_inside_area": 150000.0,
            "room_count": 0,
            "bay_count": 1,
            "structure_type": "혼합형",
        },
    }


def test_prompt_carries_no_pixel_geometry():
    messages = build_messages("C01_0001.png", _topology(), [{"content": "기준", "source": "s"}])
    text = json.dumps(messages, ensure_ascii=False)
    for key in ("bbox", "segmentation", "centroid", "total_image_area"):
        assert key not in text
    # The numbers that were only in the geometry are gone too.
    assert "480000" not in text and "310" not in text
    slim = slim_topology(_topology())
    assert slim["nodes"][0]["window_count"] == 1 and slim["nodes"][0]["objects"] == ["객체_싱크대"]


def test_messages_are_korean_and_carry_the_criteria():
    criteria = load_corpus()[:2]
    system, user = build_messages("C01_0001.png", _topology(), criteria)
    assert system["role"] == "system" and user["role"] == "user"
    hangul = re.compile(r"[가-힣]")
    assert len(hangul.findall(system["content"])) > 50
    assert criteria[0].content in user["content"] and "C01_0001.png" in user["content"]


def test_no_criteria_is_said_explicitly():
    user = build_messages("x.png", _topology(), [])[1]["content"]
    assert prompts.NO_CRITERIA in user


def test_prompt_version_follows_the_text():
    parts = (prompts.PROMPT_FORMAT, prompts.SYSTEM_PROMPT, prompts.ANALYSIS_TEMPLATE, prompts.NO_CRITERIA)
    assert PROMPT_VERSION == prompts._version(*parts)
    assert prompts._version(parts[0], parts[1] + " ", *parts[2:]) != PROMPT_VERSION
    assert prompts._version("1", *parts[1:]) != PROMPT_VERSION


def test_shipped_corpus():
    chunks = load_corpus()
    assert 12 <= len(chunks) <= 20
    text = " ".join(c.content for c in chunks)
    for word in ("채광", "환기", "가족융화", "수납", "불합격", "판상형", "30%"):
        assert word in text
    assert len(corpus_hash(chunks)) == 16

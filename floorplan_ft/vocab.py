"""Detection categories, space classes and label synonyms (DOMAIN.md).

Shared by the synthetic generator, the topology builder, the reference teacher and the metrics,
so every phase speaks the same vocabulary.
"""

from __future__ import annotations

import re

SPACE_PREFIX = "공간_"
STRUCTURE_PREFIX = "구조_"
OBJECT_PREFIX = "객체_"
OCR_CATEGORY = "OCR_텍스트"

SPACE_CATEGORIES: tuple[str, ...] = (
    "공간_거실",
    "공간_침실",
    "공간_주방및식당",
    "공간_주방",
    "공간_화장실",
    "공간_발코니",
    "공간_현관",
    "공간_드레스룸",
    "공간_실외기실",
    "공간_다목적공간",
    "공간_엘리베이터홀",
    "공간_계단실",
    "공간_기타",
)
DOOR = "구조_출입문"
WINDOW = "구조_창호"
WALL = "구조_벽체"
STRUCTURE_CATEGORIES: tuple[str, ...] = (DOOR, WINDOW, WALL)
OBJECT_CATEGORIES: tuple[str, ...] = (
    "객체_변기",
    "객체_세면대",
    "객체_싱크대",
    "객체_욕조",
    "객체_가스레인지",
)
ALL_CATEGORIES: tuple[str, ...] = (
    SPACE_CATEGORIES + STRUCTURE_CATEGORIES + OBJECT_CATEGORIES + (OCR_CATEGORY,)
)
# Stable COCO category ids: 1-based position in ALL_CATEGORIES.
CATEGORY_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(ALL_CATEGORIES)}

# space_type classes.
COMMON = "공통공간"
PRIVATE = "개인공간"
WET = "습식공간"
SPECIAL = "특화공간"
OTHER = "기타공간"
OUTSIDE = "외부공간"
UNCLASSIFIED = "미분류"
SPACE_TYPES: tuple[str, ...] = (COMMON, PRIVATE, WET, SPECIAL, OTHER, OUTSIDE, UNCLASSIFIED)

SPACE_CLASS: dict[str, str] = {
    "거실": COMMON,
    "침실": PRIVATE,
    "파우더룸": PRIVATE,
    "주방": WET,
    "화장실": WET,
    "세탁실": WET,
    "팬트리": SPECIAL,
    "드레스룸": SPECIAL,
    "알파룸": SPECIAL,
    "서재": SPECIAL,
    "대피공간": OTHER,
    "실외기실": OTHER,
    "현관": OTHER,
    "발코니": OTHER,
    "엘리베이터홀": OUTSIDE,
    "계단실": OUTSIDE,
}

# Synonyms fold onto one canonical name (OCR text and category suffixes alike).
SYNONYMS: dict[str, str] = {
    "안방": "침실",
    "마스터": "침실",
    "마스터룸": "침실",
    "방": "침실",
    "룸": "침실",
    "욕실": "화장실",
    "부부욕실": "화장실",
    "안방욕실": "화장실",
    "공용욕실": "화장실",
    "베란다": "발코니",
    "서비스발코니": "발코니",
    "키친": "주방",
    "식당": "주방",
    "주방및식당": "주방",
    "옷방": "드레스룸",
    "워크인클로짓": "드레스룸",
    "실외기룸": "실외기실",
    "에어컨실": "실외기실",
    "엘베홀": "엘리베이터홀",
    "EV홀": "엘리베이터홀",
    "ev홀": "엘리베이터홀",
    "승강기홀": "엘리베이터홀",
    "다용도실": "세탁실",
}

# Spaces that count as storage for the 수납 criterion.
STORAGE_NAMES: frozenset[str] = frozenset({"드레스룸", "팬트리", "다용도실", "세탁실"})
LDK_NAMES: frozenset[str] = frozenset({"거실", "주방"})

_TRAILING_DIGITS = re.compile(r"[\s\d\-_.]+$")


def canonical_name(text: str) -> str:
    """Fold a label ("침실1", "안방", "공간_주방및식당", "EV홀") onto its canonical space name.

    Returns the folded text unchanged when it is not a known name, so callers can tell
    "unknown" apart by checking ``SPACE_CLASS``.
    """
    name = text.strip()
    name = name.removeprefix(SPACE_PREFIX)
    name = _TRAILING_DIGITS.sub("", name).replace(" ", "")
    return SYNONYMS.get(name, SYNONYMS.get(name.lower(), name))


def space_class(name: str) -> str:
    """The space_type of a canonical name; ``미분류`` for anything unknown."""
    return SPACE_CLASS.get(canonical_name(name), UNCLASSIFIED)

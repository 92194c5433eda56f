"""Deployments on Prefect workers: the work pools `cpu` and `gpu` (process type; `gpu` limited to one flow run
per GPU) and the deployments of prefect.yaml (`prefect deploy --all`), against the Prefect server that
PREFECT_API_URL names. Plain Prefect CLI calls, so what `nnlab deploy` does is what the README's commands do.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

POOLS = ("cpu", "gpu")


class DeployError(RuntimeError):
    """No server to deploy to, or a Prefect command that failed: the message says which and why."""


def prefect(*args: str, cwd: str | Path = ".") -> str:
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", *args]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if out.returncode != 0:
        raise DeployError(f"`prefect {' '.join(args)}` failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError("no Prefect server: deployments and workers need one. Start it with "
                          "`prefect server start` (another terminal) and set "
                          "PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ensure_pools(gpus: int) -> dict[str, int | None]:
    """Create (or keep) the process pools; the gpu pool runs at most `gpus` flow runs at once (at least 1, so a
    machine whose GPU count is unknown here can still take work)."""
    limits = {"cpu": None, "gpu": max(gpus, 1)}
    for pool in POOLS:
        try:
            prefect("work-pool", "inspect", pool)
        except DeployError:  # not there yet
            prefect("work-pool", "create", pool, "--type", "process")
        if limits[pool] is not None:
            prefect("work-pool", "set-concurrency-limit", pool, str(limits[pool]))
    return limits


def deploy(project: str | Path = ".", gpus: int | None = None) -> dict:
    project = Path(project).resolve()
    if not (project / "prefect.yaml").is_file():
        raise DeployError(f"{project / 'prefect.yaml'} not found: run `nnlab deploy` in the nnlab checkout")
    url = api_url()
    limits = ensure_pools(gpu_count() if gpus is None else gpus)
    out = prefect("deploy", "--all", cwd=project)
    return {"api_url": url, "pools": limits, "project": str(project), "output": out}

"""The one Typer app of the `nnlab` command and what its command modules share. flows/cli.py (the run commands),
flows/serve.py (the serving commands) and flows/admin.py (the store, the examples, the catalogue, deployment)
register their commands on it; flows/cli.py imports the other two, so every command is on `nnlab --help`.
Standard library and Typer only: `nnlab --help` stays fast."""
from __future__ import annotations

import os
from typing import NoReturn

import typer

# MLflow's "Downloading artifacts" bars (a run reading its own files back, a served model loading): local and
# instant, not the user's progress; every command, a user's own setting wins
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproducible, tracked deep-learning experiments: Prefect flows, DVC data, MLflow runs.")


def fail(msg: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code)


def quiet_prefect() -> None:
    """Offline-friendly Prefect defaults; a user's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")  # the temporary local server needs no UI

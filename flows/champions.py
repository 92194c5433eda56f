"""`nnlab models history NAME` and `nnlab models rollback NAME --to V`: a registered model's champion over time,
rebuilt from the registry alone, and the supported way back (tasks/champions.py). Registered under `nnlab models`
(flows/admin.py's group; flows/cli.py imports this module)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Annotated

import typer

from flows.admin import models_app
from flows.app import fail


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _score(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


@models_app.command("history")
def history_cmd(name: Annotated[str, typer.Argument(help="registered model name, e.g. nnlab-classifier-digits")],
                as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False):
    """Every move of a registered model's aliases, oldest first: registrations (champion or challenger, the score
    against the champion's, the decision) and rollbacks (who, why); the current champion marked."""
    from rich.console import Console
    from rich.table import Table

    from tasks.champions import RegistryError, champion_now, history

    try:
        moves, now = history(name), champion_now(name)
    except RegistryError as e:
        fail(str(e))
    if as_json:
        for m in moves:
            typer.echo(json.dumps(asdict(m)))
        return
    table = Table(title=f"{name}: champion history (now: v{now})" if now else f"{name}: no champion")
    for col in ("when", "event", "version", "alias", "score", "champion's score", "run", "why"):
        table.add_column(col, no_wrap=col in ("when", "run"))
    made = max((i for i, m in enumerate(moves) if m.alias == "champion" and m.version == now), default=None)
    for i, m in enumerate(moves):  # ★: the move that made today's champion
        table.add_row(_when(m.time_ms), m.event, f"v{m.version}" + (" ★" if i == made else ""), m.alias,
                      _score(m.score), _score(m.previous_champion_score), (m.run_id or "—")[:12], m.reason)
    (Console() if sys.stdout.isatty() else Console(width=200)).print(table)


@models_app.command("rollback")
def rollback_cmd(name: Annotated[str, typer.Argument(help="registered model name")],
                 to: Annotated[int, typer.Option("--to", help="the version to make champion again")],
                 reason: Annotated[str, typer.Option("--reason", "-m", help="why (kept in the history)")] = "none given"):
    """Move `champion` back to version V; the move (who, why, the version it replaced) is kept in the registry, and
    predict / translate / transcribe / sample on `models:/NAME@champion` then use V."""
    from tasks.champions import RegistryError, rollback

    try:
        move = rollback(name, to, reason)
    except RegistryError as e:
        fail(str(e))
    typer.echo(f"{name}: champion is v{move.version} again (was v{move.previous_champion}); {move.reason}")

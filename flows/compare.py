"""`nnlab diff A B`: what differs between two runs, registered versions or sweep cells (tasks/diff.py), as tables
or, with --json, one JSON object (its schema: tasks/diff.py SCHEMA). Registered on the one app (flows/app.py;
flows/cli.py imports this module)."""
from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from flows.app import app, fail

SideArg = Annotated[str, typer.Argument(help="a run id, models:/<name>@<alias>, models:/<name>/<version>, or a sweep "
                                             "cell <parent run id>/<levels> (its seeds)")]


def _num(x: float | None, half: float | None = None) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}" + (f" ± {half:.2g}" if half is not None else "")


@app.command("diff")
def diff_cmd(a: SideArg, b: SideArg, as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False):
    """Only what differs between A and B: their params, their metrics (B - A; over a sweep cell's seeds, the mean
    ± 95% CI), and the data, code and commit they ran on."""
    from rich.console import Console
    from rich.table import Table

    from tasks.diff import DiffError, diff

    try:
        out = diff(a, b)
    except DiffError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(out))
        return
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(f"A: {a} ({len(out['a']['runs'])} run(s))   B: {b} ({len(out['b']['runs'])} run(s))")
    for title, rows in (("params that differ", out["params"]), ("what ran", out["identity"])):
        table = Table(title=title)
        for col in ("key", "A", "B"):
            table.add_column(col)
        for k, (va, vb) in rows.items():
            table.add_row(k, str(va), str(vb))
        console.print(table if rows else f"{title}: none")
    table = Table(title="metrics (B - A)")
    for col in ("metric", "A", "B", "B - A"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for k, m in out["metrics"].items():
        table.add_row(k, _num(m["a"], m.get("a_ci95")), _num(m["b"], m.get("b_ci95")),
                      "—" if m["delta"] is None else f"{m['delta']:+.4g}")
    console.print(table)

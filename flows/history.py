"""`nnlab history`: this project's recent flow runs (`nnlab run`, `nnlab sweep`), read through Prefect's own client.

The temporary server of `nnlab run` keeps them in the project's .nnlab/prefect/prefect.db (flows/prefect_server.py);
this command boots the same server on that database for as long as it reads, or asks the user's own API
(PREFECT_API_URL) for the project's flows. The MLflow runs a flow run trained are found by their tag
nnlab.prefect_flow_run_id (flows/experiment.py). Heavy libraries are imported inside the command.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

import typer

from flows.app import app, fail, quiet_prefect

FLOWS = "nnlab"  # the project's flows: nnlab-experiment, nnlab-sweep, nnlab-sweep-file


@app.command()
def history(limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="flow runs shown, newest first")] = 10):
    """This project's recent flow runs: name, state, start, duration and the MLflow runs they trained."""
    from contextlib import nullcontext

    from flows.prefect_server import PrefectServerError, TemporaryServer, project_database, user_api_url

    quiet_prefect()
    api = user_api_url()
    db = None if api else project_database()
    if db is not None and not db.is_file():
        typer.echo(f"no flow runs yet: {db} is made by the first `nnlab run` (or `nnlab sweep`)")
        raise typer.Exit(0)
    import httpx

    try:
        with nullcontext() if api else TemporaryServer.launch():  # on the database `nnlab run`'s server uses
            runs, names = read_runs(limit)
    except PrefectServerError as e:
        fail(str(e), code=1)
    except (httpx.HTTPError, OSError) as e:  # the user's server is down or refuses
        fail(f"cannot read flow runs from {api or 'the temporary Prefect server'}: {type(e).__name__}: {e}", code=1)
    where = db or api or "Prefect's database (PREFECT_HOME or PREFECT_SERVER_DATABASE_CONNECTION_URL)"
    typer.echo(f"flow runs in {where}, newest first")
    print_runs(runs, names, mlflow_runs([str(r.id) for r in runs]))


def read_runs(limit: int):
    """(the newest `limit` top-level flow runs of the project's flows, {flow id: flow name})."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterId, FlowFilterName, FlowRunFilter,
                                                FlowRunFilterParentTaskRunId)
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(like_=FLOWS)),
            flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)),
            sort=FlowRunSort.START_TIME_DESC, limit=limit)
        ids = list({r.flow_id for r in runs})
        flows = client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=ids))) if ids else []
        return runs, {f.id: f.name for f in flows}


def mlflow_runs(flow_run_ids: list[str]) -> dict[str, list[str]] | None:
    """{Prefect flow run id: the MLflow run ids tagged with it}; None when the MLflow store cannot be read (an
    SQLite store not made yet is not created here)."""
    from pathlib import Path

    from tasks.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return {}
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        return {i: [r.info.run_id for r in client.search_runs(
                    experiments, f"tags.`nnlab.prefect_flow_run_id` = '{i}'", order_by=["attributes.start_time ASC"])]
                for i in flow_run_ids} if experiments else {}
    except Exception as e:  # the history stands without them
        typer.secho(f"MLflow runs not shown: {uri} could not be read ({type(e).__name__})", fg="yellow", err=True)
        return None


def print_runs(runs: list, names: dict, mlflow: dict[str, list[str]] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = ("flow run", "flow", "state", "started", "duration", "MLflow runs")
    rows = [[r.name, names.get(r.flow_id, "?"), r.state_name or "?", started(r.start_time),
             duration(r.start_time, r.end_time), "?" if mlflow is None else " ".join(mlflow.get(str(r.id), [])) or "-"]
            for r in runs]
    console = Console()
    if not console.is_terminal:  # piped (grep, a log): one tab-separated line a run, nothing folded or cut
        for row in (columns, *rows):
            typer.echo("\t".join(row))
    else:
        table = Table(show_lines=False)
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if not runs:
        typer.echo("(no flow runs recorded)")


def started(at: datetime | None) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def duration(start: datetime | None, end: datetime | None) -> str:
    """`1h02m`, `3m07s`, `41.2s`; a running flow's so far."""
    if start is None:
        return "-"
    s = ((end or datetime.now(timezone.utc)) - start).total_seconds()
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(round(s), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"

"""The store, the examples, the catalogue and deployment: `nnlab tracking-server`, `example-csv`, `example-pairs`,
`models`, `ui` and `deploy`, registered on the one app (flows/app.py; flows/cli.py imports this module). Heavy
libraries are imported inside the commands, so `nnlab --help` stays fast."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.app import app, fail, quiet_prefect


@app.command("tracking-server", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def tracking_server(
        ctx: typer.Context,
        backend_store_uri: Annotated[str, typer.Option(
            help="PostgreSQL database for runs and the registry (created if missing); with a password, set it "
                 "in MLFLOW_BACKEND_STORE_URI or ~/.pgpass instead: a command line is visible to every user",
            envvar="MLFLOW_BACKEND_STORE_URI", show_envvar=False)]
        = "postgresql://postgres@127.0.0.1:5432/mlflow",
        artifacts_destination: Annotated[str, typer.Option(
            help="folder (or s3://... URI) where the server keeps artifacts; clients go through the server")]
        = "mlruns/server-artifacts",
        host: Annotated[str, typer.Option(help="interface to bind; 0.0.0.0: every one (then add authentication)")]
        = "127.0.0.1",
        port: int = 5000,
        workers: Annotated[Optional[int], typer.Option(help="server processes (default: MLflow's, 4)")] = None):
    """A shared MLflow tracking server: runs and models in PostgreSQL, artifacts served through it.
    Further `mlflow server` options go after `--`, e.g. `-- --app-name basic-auth`."""
    from flows.tracking_server import StoreUnreachable, ensure_database, server_client_uri, server_command, server_env

    try:
        if ensure_database(backend_store_uri):
            typer.echo(f"created database {backend_store_uri.rsplit('/', 1)[-1].split('?')[0]}")
    except StoreUnreachable as e:
        fail(str(e))
    cmd = server_command(artifacts_destination, host, port, workers, ctx.args)
    uri = server_client_uri(host, port)
    typer.echo(f"MLflow tracking server on {uri}, artifacts in {cmd[cmd.index('--artifacts-destination') + 1]}"
               " (Ctrl-C to stop)")
    typer.echo(f"clients: export MLFLOW_TRACKING_URI={uri}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"bound to {host}: whoever reaches this port can read and write every run and model; put it "
                    "behind authentication (README: a shared tracking server)", fg="yellow", err=True)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, {**os.environ, **server_env(backend_store_uri)})


@app.command("example-csv")
def example_csv(out: Annotated[Path, typer.Argument(help="CSV file to write")] = Path("docstrings.csv")):
    """Write a real text CSV to try `text_csv` offline: standard-library docstrings (text) labelled by module (label)."""
    from tasks.data.text import DOC_MODULES, docstrings_csv

    n = docstrings_csv(out)
    typer.echo(f"{out}: {n} docstrings of {', '.join(DOC_MODULES)} (columns text, label)")


@app.command("example-pairs")
def example_pairs_cmd(out: Annotated[Path, typer.Argument(help="TSV file to write")] = Path("en-de-dates.tsv")):
    """Write a small English -> German parallel corpus (Tatoeba's layout) to try `pairs` offline."""
    from tasks.data.pairs import example_pairs

    n = example_pairs(out)
    typer.echo(f"{out}: {n} English -> German date phrases, made from CLDR locale data (source<TAB>target<TAB>note)")


@app.command("models")
def models_cmd(input_shape: Annotated[str, typer.Option(help="C,H,W of the input")] = "1,28,28",
               classes: Annotated[int, typer.Option(help="number of classes")] = 10):
    """List the registered architectures: family, parameters, MACs and receptive field for this input."""
    from rich.console import Console
    from rich.table import Table

    shape = tuple(int(s) for s in input_shape.split(","))
    table = Table(title=f"registered architectures (input {shape}, {classes} classes)")
    for col in ("name", "family", "parameters", "MACs", "receptive field", "description"):
        table.add_column(col, no_wrap=col in ("name", "parameters", "MACs"),
                         min_width=16 if col == "description" else None)  # 80 columns: headers wrap
    for row in model_rows(shape, classes):
        table.add_row(*row)
    (Console() if sys.stdout.isatty() else Console(width=160)).print(table)


def model_rows(shape: tuple[int, ...], classes: int) -> list[list[str]]:
    """`nnlab models`' rows: every architecture built for `shape`, its parameters, MACs and receptive field.
    Building and probing them all takes seconds (the image-to-image generators' fields most), so the rows are
    kept in .nnlab/cache under the shape, the classes and the hash of the code that computes them."""
    import hashlib

    from tasks.files import code_hash, write_json

    key = hashlib.sha256(f"{shape}|{classes}|{code_hash()}".encode()).hexdigest()[:16]
    cache = Path(".nnlab/cache") / f"models-{key}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    from models.analysis import count_macs, format_count, receptive_field_bound
    from models.registry import count_parameters, create_model, get_spec, list_models

    probe = max(64, 4 * max(shape[1:], default=1))  # fields wider than 4x the input are shown as a lower bound
    rows = []
    for name in list_models():
        spec = get_spec(name)
        try:
            model = create_model(name, input_shape=shape, num_classes=classes)
        except Exception as e:  # any family may reject a shape (an MLP never does, an RNN might)
            rows.append([name, spec.family, "n/a", "-", "-", f"{spec.description} (not for this input: {e})"])
            continue
        try:
            macs = format_count(count_macs(model, shape))  # MACs per example
            rf, more = receptive_field_bound(model, shape, probe)
        except Exception as e:  # e.g. a model that does not take float images
            macs, rf, more = f"n/a ({type(e).__name__})", None, False
        rows.append([name, spec.family, f"{count_parameters(model):,}", macs,
                     "-" if rf is None else f"{'≥' if more else ''}{rf}x{rf}", spec.description])
    try:
        write_json(cache, rows)
    except OSError:  # a read-only working folder: no cache, same table
        pass
    return rows


@app.command()
def ui(port: int = 5000, host: str = "127.0.0.1"):
    """Open the MLflow UI on the project's store (127.0.0.1 unless told otherwise)."""
    from tasks.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        typer.echo(f"MLflow UI: {uri} (the tracking server in MLFLOW_TRACKING_URI serves it)")
        raise typer.Exit(0)
    typer.echo(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl-C to stop)")
    from flows.tracking_server import server_env

    for k, v in server_env(uri).items():  # as `nnlab tracking-server`: no GenAI job consumers, no telemetry
        os.environ.setdefault(k, v)
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", host, "--port", str(port)])


@app.command("deploy")
def deploy_cmd(gpus: Annotated[Optional[int], typer.Option(help="flow runs the gpu pool runs at once "
                                                                 "(default: the GPUs torch sees, at least 1)")] = None):
    """Create the `cpu` and `gpu` work pools and deploy prefect.yaml's flows to the Prefect server at
    PREFECT_API_URL (then start a worker: `prefect worker start --pool cpu`)."""
    quiet_prefect()
    from flows.deploy import DeployError, deploy

    try:
        out = deploy(".", gpus)
    except DeployError as e:
        fail(str(e))
    typer.echo(last_lines(out["output"], 60))
    limits = ", ".join(f"{p} ({'no limit' if n is None else f'{n} at once'})" for p, n in out["pools"].items())
    typer.echo(f"\nwork pools on {out['api_url']}: {limits}\n"
               "next: prefect worker start --pool cpu      (and --pool gpu on a GPU machine)\n"
               "      prefect deployment run nnlab-experiment/nightly   (or wait for 02:00 UTC)")


def last_lines(text: str, n: int) -> str:
    """The last `n` whole lines of `text`, saying how many came before (never a cut mid-word)."""
    lines = text.strip().splitlines()
    return "\n".join(([f"... ({len(lines) - n} lines above)"] if len(lines) > n else []) + lines[-n:])

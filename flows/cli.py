"""The `nnlab` command: its run commands (run, sweep, report, stage) here, on the one app of flows/app.py, with
what they share around their flows in flows/launch.py; the serving commands are flows/serve.py's, the store,
example, catalogue and deployment commands flows/admin.py's (imported below, after `stage`: `nnlab --help` lists
them in that order). Heavy libraries (torch, Prefect, MLflow) are imported inside commands so `nnlab --help` stays
fast."""
from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.app import app, fail, quiet_prefect
from flows.console import interruption, take_sigterm, terminated  # standard library only
from flows.launch import (boot_prefect_server, check_writable_places, explained_failures, local_flow_settings,
                          prefect_api, ready_to_run, warm_up)
from tasks.phases import mark

atexit.register(mark, "exit handlers done")  # registered first, so it runs last of them

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (the one source of settings)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override: dotted.key=value (repeatable)")]


def load(params: Path, sets: list[str] | None, models: str | None = None, runs: bool = False):
    """Validated config; with `models` (a,b) only those runs, with `runs` else params.yaml's `run`."""
    from tasks.config import ConfigError, load_config, select_models

    names = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
    if names == []:
        fail(f"--models: {models!r} names no run; give one or more entries of params.yaml's `models`, comma-separated "
             "(e.g. --models mlp,simple_cnn), or leave --models out to train params.yaml's `run`")
    try:
        cfg = load_config(params, sets or [], names)
        if runs and not names:
            cfg = select_models(cfg, cfg.runs())
        return cfg, names
    except ConfigError as e:
        fail(str(e))


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
        models: Annotated[Optional[str], typer.Option("--models", "-m", help="comma-separated runs to train")] = None,
        nproc: Annotated[Optional[int], typer.Option(help="processes training each run, data-parallel (torchrun); "
                                                     "train.batch_size is then per process")] = None,
        nnodes: Annotated[Optional[int], typer.Option(help="machines, each running this same command")] = None,
        rdzv_endpoint: Annotated[Optional[str], typer.Option(help="HOST:PORT where the machines meet")] = None):
    """Run the experiment flow: prepare data, train each model, evaluate, register the best."""
    set_ = [*(set_ or []), *(f"train.distributed.{k}={v}" for k, v in (
        ("nproc_per_node", nproc), ("nnodes", nnodes), ("rdzv_endpoint", rdzv_endpoint)) if v is not None)]
    cfg, names = load(params, set_, models, runs=True)  # validate before anything runs: no MLflow run, no data
    ready_to_run([cfg])
    mark("config validated")
    quiet_prefect()
    server = boot_prefect_server()
    from flows.console import hide_explained_failures
    from flows.experiment import ExperimentFailed, experiment

    warm_up(cfg)
    hide_explained_failures()
    with explained_failures(), prefect_api(server):
        try:
            with local_flow_settings():
                summary = experiment.with_options(on_running=[take_sigterm])(str(params), set_ or [], names)
            code = 0
        except ExperimentFailed as e:
            summary, code = e.summary, 1
    mark("flow done")
    print_summary(summary, cfg)
    if summary.get("nnlab.data_source") == "dvc":
        lock_hint()
    mark("summary printed")
    raise typer.Exit(code)


def lock_hint() -> None:
    """The run reproduced DVC's data stages (and recorded its models as the train/evaluate stages' outputs): when
    that changed dvc.lock (or it was never committed), say so. Committed beside params.yaml, `git checkout` +
    `dvc checkout` bring that data and those models back."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return
    if out.returncode == 0 and out.stdout.strip():
        what = "is new" if out.stdout.startswith("??") else "changed"
        typer.echo(f"dvc.lock {what} (the data, and with params.yaml as it is the models, of this run): commit it "
                   "with params.yaml, git add dvc.lock params.yaml && git commit")


def print_summary(summary: dict, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    from tasks.kinds import experiment_kind, main_metric
    from tasks.references import beside
    from tasks.tracking import tracking_uri

    metric, more = main_metric(cfg), experiment_kind(cfg).summary_columns  # e.g. a forecast's naive RMSE beside it
    console = Console() if sys.stdout.isatty() else Console(width=140)
    table = Table(title=f"nnlab experiment on {cfg.data.source}", pad_edge=False)
    width = max([len("architecture"), *(len(r["name"]) for r in summary["results"] + summary["failed"])])
    table.add_column("architecture", no_wrap=True, min_width=width)  # 80 columns: the number headers wrap
    for col in (metric, *more, "epochs", "seconds"):
        table.add_column(col.replace("_", " "), min_width=max(len(w) for w in col.split("_")))
    table.add_column("MLflow run id", no_wrap=True, min_width=32)
    for r in summary["results"]:
        values = [f"{r[k]:.4f}" if isinstance(r.get(k), (int, float)) else "-" for k in (metric, *more)]
        table.add_row(r["name"], *values, str(r["epochs"]), f"{r['seconds']:.1f}", r["run_id"])
    for f in summary["failed"]:
        table.add_row(f["name"], "[red]FAILED[/red]", *["-"] * len(more), "-", "-", f["error"][:60])
    console.print(table)
    reg = summary.get("registered")
    if reg and reg.get("registered") is False:
        console.print(f"[yellow]not registered[/yellow] in {reg['name']}: {reg['reason']}")
    elif reg:
        console.print(f"registered {reg['name']} v{reg['version']} ({reg['model']}, {metric} "
                      f"{reg[metric]:.4f}) as [bold]{reg['alias']}[/bold]"
                      + (f" ({reg['decision']})" if reg.get("decision", "").startswith("health") else ""))
    for r in summary["results"]:
        if r.get("reference"):  # data nnlab knows as a public benchmark: the published figure beside the run's
            console.print(f"[cyan]published[/cyan] {r['name']}: {beside(r['reference'], r)}")
        for h in r.get("health", []):
            curves = "the run's health/grad_norm and layers/grad_norm.* curves"
            what = {"vanishing": f"vanishing gradients (see {curves})", "exploding": f"exploding gradients (see {curves})",
                    "dead_units": "dead ReLU units (see the run's health/dead_units curve)",
                    "mode_collapse": "mode collapse (see the run's samples/ and plots/samples.png)"}.get(h, h)
            console.print(f"[yellow]health[/yellow] {r['name']}: {what}; tag nnlab.health.{h}")
    for f in summary["failed"]:
        console.print(f"[red]failed[/red] {f['name']}: {f['error']}")
    uri = tracking_uri()
    console.print(f"MLflow UI: {uri}" if uri.startswith(("http://", "https://")) else
                  f"MLflow UI: nnlab ui   (or: mlflow ui --backend-store-uri {uri})")


@app.command("sweep")
def sweep_cmd(file: Annotated[Optional[Path], typer.Argument(help="sweep file; default: params.yaml's `sweep`")] = None,
              params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
              resume: Annotated[Optional[str], typer.Option("--resume", help="parent run id to finish")] = None,
              rerun_failed: Annotated[Optional[str], typer.Option(
                  "--rerun-failed", help="parent run id: run again exactly its failed cells (or trials)")] = None,
              fail_fast: Annotated[bool, typer.Option("--fail-fast", help="after the first failed cell, launch no "
                                                                          "more")] = False,
              workers: Annotated[Optional[int], typer.Option(help="parallel cells (default: cores)")] = None,
              engine: Annotated[Optional[str], typer.Option(help="local | dask (default: sweep.engine)")] = None,
              address: Annotated[Optional[str], typer.Option(help="Dask scheduler tcp://host:port "
                                                                  "(default: sweep.address)")] = None,
              gpus: Annotated[Optional[str], typer.Option(help="local workers' GPUs, e.g. 0,1 (one each)")] = None,
              per_gpu: Annotated[Optional[int], typer.Option(help="cells at once on one GPU")] = None):
    """Run a grid (or a search) of training choices in parallel, one child MLflow run per cell, then the report."""
    from tasks.sweep import default_workers, gpu_refusal, size

    if rerun_failed and (resume or file):
        fail("--rerun-failed PARENT takes neither --resume nor a sweep file: it reruns that sweep's failed cells")
    flags = {k: v for k, v in {"workers": workers, "engine": engine, "address": address, "fail_fast": fail_fast,
                               "gpus": gpus and [g.strip() for g in gpus.split(",")], "per_gpu": per_gpu}.items() if v}
    resume = resume or rerun_failed
    spec_, raw, sets, cells = sweep_cells(file, params, set_, resume, flags)
    if spec_.gpus or spec_.per_gpu:
        import torch

        if why := gpu_refusal(spec_, torch.cuda.device_count()):
            fail(why)
    if spec_.engine == "dask":  # fail now, not after Dask's 30 s connect timeout with a parent run open
        check_scheduler(spec_.address)
    n = default_workers(spec_, len(cells))
    where = f"the Dask cluster at {spec_.address}" if spec_.engine == "dask" else f"{n} worker(s)"
    ready_to_run([c.cfg for c in cells])
    mark("config validated")
    typer.echo(f"sweep {spec_.name}: {size(spec_, cells)}, {where}")
    quiet_prefect()
    server = boot_prefect_server()
    out = run_sweep(spec_, raw, sets, cells, n, resume, server, only_failed=bool(rerun_failed))
    mark("flow done")
    print_sweep(out)
    mark("summary printed")
    raise typer.Exit(1 if out["failed"] else 0)


def sweep_cells(file: Path | None, params: Path, set_: list[str] | None, resume: str | None, flags: dict):
    """(the sweep's settings, the params it applies to, its --set overrides, its cells): its file's (or with
    `resume` the parent run's record), the command line's flags over them; the overrides folded into the
    settings, so none are left; every cell validated before anything runs. A ConfigError is exit 2."""
    from pydantic import ValidationError

    from tasks.config import ConfigError, SweepConfig, read_yaml
    from tasks.explain import format_errors
    from tasks.search import expand  # a grid's cells, or a search's (one per seed)
    from tasks.sweep import fold_sets, load_spec

    try:
        if resume:
            spec, raw, sets = _sweep_definition(resume)
            sets = [*sets, *resume_sets(set_ or [])]
        else:
            raw = read_yaml(params)
            spec = load_spec(file, raw).model_dump()
            sets = set_ or []
        spec, sets = fold_sets(spec, sets), []  # what runs is what the parent records: the sweep itself changes
        try:
            spec_ = SweepConfig.model_validate({**spec, **flags})
        except ValidationError as e:
            raise ConfigError(format_errors(e, SweepConfig, prefix="sweep")) from None
        return spec_, raw, sets, expand(spec_, raw, sets)
    except ConfigError as e:
        fail(str(e))


RESUME_SETS = ("sweep.stop.", "sweep.retries=", "sweep.fail_fast=", "sweep.workers=")


def resume_sets(sets: list[str]) -> list[str]:
    """What --set may change when a sweep is finished (--resume, --rerun-failed): how it runs, never its cells."""
    from tasks.config import ConfigError

    for item in sets:
        if not item.replace(" ", "").startswith(RESUME_SETS):
            raise ConfigError(f"--set {item!r}: a resumed sweep runs the cells it recorded; --set there takes only "
                              "sweep.stop.<key>, sweep.retries, sweep.fail_fast and sweep.workers")
    return sets


def check_scheduler(address: str) -> None:
    """A Dask scheduler answers at `address` (tcp://host:port), else exit 2."""
    import socket

    host, port = address[len("tcp://"):].rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        fail(f"sweep.address {address}: no Dask scheduler answers there ({e.strerror or e}); start one "
             f"with `dask scheduler`, or run with --engine local")


def run_sweep(spec_, raw: dict, sets: list[str], cells: list, n: int, resume: str | None, server,
              only_failed: bool = False) -> dict:
    """The sweep flow on `n` workers (or the Dask cluster) against the temporary server: its summary. Ctrl-C is
    exit 130 and SIGTERM 143 (the pool's workers stopped first, the runs marked KILLED), a crashed sweep exit 1."""
    from flows.console import hide_explained_failures
    from flows.pool import WarmPool, stop_after_interrupt
    from flows.sweep import SweepCrashed, sweep, task_runner

    from flows.warm import preload

    pool = task_runner(spec_, n, cells)
    try:
        if isinstance(pool, WarmPool):  # its workers start and preload while the server boots
            from tasks.tracking import prepare_store

            prepare_store(cells[0].cfg.tracking.experiment)  # a new store migrated before any worker opens it
            pool.warm()
        preload(())  # this process opens the parent run and writes the report: the store, Prefect's engines
        mark("imported")
        hide_explained_failures()
        with explained_failures(), prefect_api(server), local_flow_settings():
            try:
                flow = sweep.with_options(task_runner=pool, on_running=[take_sigterm])
                return flow(spec_.model_dump(), raw, sets, resume, only_failed)
            except KeyboardInterrupt:  # before the server stops: the pool's workers first, the runs marked KILLED
                typer.secho(stop_after_interrupt(), fg="yellow", err=True)
                raise typer.Exit(interruption()[1]) from None
            except SweepCrashed as e:
                fail(str(e), code=1)
    finally:
        if isinstance(pool, WarmPool):
            pool.close()  # stopped however the command ends (a flow that ran has stopped it already)


def _sweep_definition(parent_run_id: str):
    from tasks.config import ConfigError
    from tasks.tracking import load_artifact_json, tracking_uri

    try:
        d = load_artifact_json(parent_run_id, "sweep/sweep.json")
    except Exception as e:
        raise ConfigError(f"--resume {parent_run_id}: not a sweep parent run in {tracking_uri()} "
                          f"({type(e).__name__})")
    return d["spec"], d["params"], d["sets"]


def print_sweep(out: dict) -> None:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=140)
    console.print(f"sweep parent run {out['parent_run_id']}: {out['cells']} cells, ran {out['ran']} now, "
                  f"{len(out['failed'])} not finished{out.get('note', '')}")
    console.print(f"report: {out['report']['html']}  (and {out['report']['md']})")
    reg = out.get("registered")
    if reg and reg.get("registered") is False:
        console.print(f"[yellow]not registered[/yellow] in {reg['name']} ({reg['cell']}): {reg['reason']}")
    elif reg:
        console.print(f"registered {reg['name']} v{reg['version']} ({reg['cell']}, mean {reg['mean']:.4f}"
                      f" ± {reg['ci95']:.4f}) as [bold]{reg['alias']}[/bold]: {reg['decision']}")
    if out.get("registration_off"):
        console.print(f"[yellow]not registered[/yellow]: {out['registration_off']}")
    for r in out["failed"]:
        console.print(f"[red]not finished[/red] {r['cell']}: {r.get('error') or r['status']}")
    if out["failed"]:
        console.print(f"finish them with: nnlab sweep --resume {out['parent_run_id']}")


@app.command("report")
def report_cmd(parent_run_id: Annotated[str, typer.Argument(help="the sweep's parent MLflow run id")],
               out: Annotated[Optional[Path], typer.Option(help="folder (default reports/<sweep>-<id>)")] = None):
    """(Re)write the comparison report of a sweep."""
    from tasks.config import ConfigError, SweepConfig
    from tasks.search import expand
    from tasks.search_report import report  # a grid's report, or a search's

    try:
        spec, raw, sets = _sweep_definition(parent_run_id)
        spec_ = SweepConfig.model_validate(spec)
        cells = expand(spec_, raw, sets)
    except ConfigError as e:
        fail(str(e))
    paths, rows = report(parent_run_id, spec_, cells, out or Path("reports") / f"{spec_.name}-{parent_run_id[:8]}")
    typer.echo(f"report: {paths['html']}  (and {paths['md']})")


@app.command()
def stage(name: Annotated[str, typer.Argument(help="prepare | augment | train | evaluate | register")],
          model: Annotated[Optional[str], typer.Option("--model", help="run name (train, evaluate)")] = None,
          params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None):
    """Run one pipeline stage (what dvc.yaml calls)."""
    stages = ("prepare", "augment", "train", "evaluate", "register")
    if name not in stages:
        fail(f"unknown stage {name!r}; allowed: {', '.join(stages)}")
    cfg, _ = load(params, set_)
    if name in ("train", "evaluate") and (not model or model not in cfg.models):
        fail(f"stage {name} needs --model, one of: {', '.join(cfg.models)}")
    if name in ("train", "evaluate", "register"):
        check_writable_places()
    from tasks import stages as st
    from tasks.files import Busy

    try:
        with explained_failures():
            _run_stage(st, name, cfg, model)
    except (st.TrainingFailed, Busy) as e:
        fail(str(e), code=1)


def _run_stage(st, name: str, cfg, model: str | None) -> None:
    if name == "prepare":
        st.prepare_stage(cfg)
    elif name == "augment":
        st.augment_stage(cfg)
    elif name == "train":
        st.train_stage(cfg, model, st.training_data(cfg))
    elif name == "evaluate":
        st.evaluate_stage(cfg, model)
    else:
        import json

        results = [json.loads(Path(f"data/evaluate/{n}.json").read_text()) for n in cfg.runs()]
        st.register_stage(cfg, results)


# the serving commands (predict, translate, transcribe, sample), then the store, examples, catalogue and deployment
# (tracking-server, example-csv, example-pairs, models, ui, deploy): on the same app, listed after `stage`
import flows.serve  # noqa: E402,F401
import flows.admin  # noqa: E402,F401
import flows.champions  # noqa: E402,F401
import flows.compare  # noqa: E402,F401
import flows.history  # noqa: E402,F401


def main() -> None:
    """The `nnlab` console entry point: the command, then a quick way out. After the command has said its last
    word, the interpreter's own shutdown would spend seconds (more on a busy machine) tearing down torch, Prefect
    and MLflow object by object; nothing of that is needed. So: exit handlers (the temporary server stopped,
    Prefect's queues drained, logging flushed), stdout and stderr flushed, then os._exit. An unexpected error
    propagates as usual: its traceback is the report."""
    try:
        app()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    if code is not None and not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    code = interruption()[1] if terminated() else code  # SIGTERM before or after the flow too: 143
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (| head)
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()

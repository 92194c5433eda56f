"""The sweep flow: data prepared once per distinct data config, one Prefect task per cell in a process pool
or on a Dask cluster (every cell a child MLflow run of one parent), then the report and registration by the
mean over seeds.

`resume=PARENT_RUN_ID` runs only the cells that are missing or did not finish, into the same parent.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.experiment import link_mlflow_run, prefect_ids, prepare_data
from flows.pool import OPENED, interruptible, runner
from flows.waiting import Completion, Pauses, failed
from tasks.config import Config, SweepConfig, flatten
from tasks.kinds import main_metric, ranking
from tasks.phases import mark
from tasks.pruning import (Paused, RungWatch, flag_of, group_cells, open_grid_watch, parse_prune, pruning_note,
                           settle)
from tasks.stages import evaluate_stage, train_stage
from tasks.search import expand  # a grid's cells (tasks/sweep.py), or a search's: one per seed
from tasks.sweep import (default_workers, fold_sets, placement, register_by_mean, registration_off, report,
                         show_best_on_parent, todo)

SWEEPS = Path(".nnlab/sweeps")
REPORTS = Path("reports")
JUDGE_EVERY = 0.5  # seconds between two looks at the cells training, when the sweep prunes


def task_runner(spec: SweepConfig, workers: int, cells: list | None = None):
    """Where the cells run: `workers` local processes (a WarmPool: call `.warm()` to start them early), or the
    existing Dask cluster at `sweep.address` (its workers set the parallelism; `dask worker`'s nanny starts each
    worker process with OMP_NUM_THREADS=1, so torch uses one thread per cell there too)."""
    if spec.engine == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=spec.address)
    runs = sorted({(c.cfg.model_options(next(iter(c.cfg.models)))[0], c.cfg.data.source) for c in cells or []})
    return runner(workers, tuple(runs), tuple(spec.gpus), spec.per_gpu or 1)



def origin() -> dict:
    """What a cell needs to run as if started here: this checkout and this MLflow store."""
    from tasks.tracking import tracking_uri

    return {"cwd": os.getcwd(), "tracking_uri": tracking_uri()}


def enter_origin(where: dict) -> None:
    """Run this cell in the client's checkout when this worker sees it (same machine, or a shared filesystem
    at the same path; otherwise the worker's own working directory, which must then be a checkout with the
    data), and log to the client's MLflow store, whatever the worker's own environment says. Not undone
    afterwards: every cell of a sweep sets the same values (one checkout per Dask cluster at a time)."""
    if os.path.isdir(where["cwd"]):
        os.chdir(where["cwd"])
    elif os.getcwd() != where["cwd"]:
        print(f"{where['cwd']} is not on this worker: the cell runs in {os.getcwd()}", flush=True)
    os.environ["MLFLOW_TRACKING_URI"] = where["tracking_uri"]


def worker_name() -> str:
    """The Dask worker's address when this runs under Dask, else host:pid (a local pool process)."""
    if "distributed" in sys.modules:
        from distributed import get_worker

        try:
            return get_worker().address
        except ValueError:  # not inside a Dask worker
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


@task(name="cell", cache_policy=NO_CACHE, task_run_name="cell-{cell_id}")
def run_cell(cfg: Config, cell_id: str, data_dir: str, parent_run_id: str, tags: dict, where: dict) -> dict:
    from tasks.tracking import Run, child_runs

    started = time.perf_counter()
    enter_origin(where)
    mine = [r for r in child_runs(parent_run_id) if r["cell"] == cell_id]
    done = [r for r in mine if r["status"] == "FINISHED" and main_metric(cfg) in r["metrics"]]
    if done:  # Dask recomputes a finished cell whose result died with its worker: never train a cell twice
        return {"cell": cell_id, "run_id": done[0]["run_id"], "health": []}
    name = next(iter(cfg.models))
    out = SWEEPS / parent_run_id / cell_id.replace("/", "_")
    worker = {"nnlab.worker": worker_name()}
    pruned = flag_of(SWEEPS, parent_run_id, cell_id)  # set by the sweep's RungWatch when its group is cut
    tags = {**tags, "nnlab.sweep_cell": cell_id, **worker, **prefect_ids()}
    try:
        with interruptible():
            trained = train_stage(cfg, name, data_dir, out / "train", parent_run_id=parent_run_id, extra_tags=tags,
                                  halt=pruned)
    except Paused as e:  # at a rung its group has not been judged at yet (ASHA): the sweep runs it again
        return {"cell": cell_id, "paused": e.epoch}
    except Exception as e:
        _record_crash(cfg, name, cell_id, parent_run_id, tags, {r["run_id"] for r in mine}, e)
        raise
    link_mlflow_run(trained.run_id, f"{name} ({cell_id})")
    summary = evaluate_stage(cfg, name, data_dir, out / "train", out / "metrics.json", out / "plots")
    run = Run(summary["run_id"])
    run.set_tags(worker)  # a cell resumed from its checkpoint: the worker that finished it
    run.log_metrics({"cell_seconds": time.perf_counter() - started})  # training + evaluation + recording: the report
    return {**summary, "cell": cell_id, "health": trained.health}


def _record_crash(cfg: Config, name: str, cell_id: str, parent_run_id: str, tags: dict, before: set[str],
                  e: Exception) -> None:
    """A cell that failed before its training opened a run (a device that is not there, a model that cannot be
    built) still leaves a FAILED child run with its reason: the runs list shows it, --rerun-failed finds it."""
    from tasks.tracking import Run, child_runs

    if any(r["cell"] == cell_id and r["run_id"] not in before for r in child_runs(parent_run_id)):
        return  # the training's own run says what happened
    run = Run.start(cfg.tracking.experiment, f"{name} · {cell_id}", {**tags, "nnlab.run": name}, {}, parent_run_id)
    run.finish("FAILED", f"{type(e).__name__}: {e}")


def _flow_run_name() -> str:
    """`sweep optimizers` (or `sweep optimizers · resume <parent>`) in Prefect's UI."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    resume = p.get("resume")
    return f"sweep {(p.get('spec') or {}).get('name', '?')}" + (f" · resume {resume[:8]}" if resume else "")


@flow(name="nnlab-sweep", log_prints=False, flow_run_name=_flow_run_name)
def sweep(spec: dict, params: dict, sets: list[str] | None = None, resume: str | None = None,
          only_failed: bool = False) -> dict:
    """`spec` is a sweep file's content, `params` the params.yaml content it applies to; `resume` a parent run to
    finish (with `only_failed`: only its failed cells, or a search's failed trials, run again)."""
    from tasks.tracking import Run, prepare_store

    mark("flow started")
    spec = fold_sets(spec, sets)  # --set overrides become the sweep's own grid and fixed values
    spec_ = SweepConfig.model_validate(spec)
    cells = expand(spec_, params)
    experiment = cells[0].cfg.tracking.experiment
    prepare_store(experiment)  # created and migrated once, before any cell writes to it
    if resume:
        parent = Run.reopen(resume)
    else:
        parent = Run.start(experiment, f"sweep-{spec_.name}", {"nnlab.sweep": spec_.name, "nnlab.kind": "sweep"},
                           flatten({"sweep": spec_.model_dump(exclude={"presets"})}))
        parent.log_dict({"spec": spec, "params": params, "sets": sets or [],
                         "cells": [{"id": c.id, "levels": c.levels, "sets": c.sets} for c in cells]},
                        "sweep/sweep.json")
    OPENED["parent"] = parent.run_id
    try:
        if spec_.search is not None:  # trials asked of an Optuna study, their cells run as a grid's (flows/search.py)
            from flows.search import search_and_report
            task_ = run_cell.with_options(retries=spec_.retries) if spec_.retries else run_cell
            return search_and_report(parent, spec_, params, cells, task_, origin(),
                                     REPORTS / f"{spec_.name}-{parent.run_id[:8]}", only_failed)
        return _cells_and_report(parent, spec_, cells, only_failed)
    except Exception as e:  # anything unforeseen: the parent says so and how to finish (Ctrl-C: the CLI marks it)
        crash = SweepCrashed(parent.run_id, f"{type(e).__name__}: {e}")
        parent.finish("FAILED", str(crash))
        raise crash from e


class SweepCrashed(Exception):
    """A sweep that stopped on an error of its own (not a cell's): its parent run is FAILED, the cells done are
    kept, and `nnlab sweep --resume <parent>` finishes it."""

    def __init__(self, parent_run_id: str, reason: str):
        self.parent_run_id = parent_run_id
        super().__init__(f"sweep parent run {parent_run_id} is marked FAILED ({reason[:400]}); the cells that "
                         f"finished are kept; finish it with: nnlab sweep --resume {parent_run_id}")


def _cells_and_report(parent, spec_: SweepConfig, cells: list, only_failed: bool = False) -> dict:
    from tasks.tracking import Run, child_runs

    rank = ranking(cells[0].cfg)  # worked out once for the sweep; each cell's evaluation records the same
    parent.set_tags({"nnlab.ranking_metric": rank["metric"], "nnlab.lower_is_better": str(rank["lower_is_better"]).lower()})
    pending = todo(parent.run_id, cells, rank["metric"], only_failed)

    data = {}
    for cell in pending:  # one prepare per distinct data config (the seed changes the split)
        key = cell.cfg.data.model_dump_json() + str(cell.cfg.seed)
        if key not in data:
            data[key] = prepare_data(cell.cfg)
    watch = _grid_watch(parent.run_id, spec_, cells, rank)
    if watch:  # a grid cell's seeds one after the other: each group reaches its rungs as early as it can
        pending = [c for members in group_cells(pending).values() for c in members]
    stopped, ran = _run_cells(pending, data, parent.run_id, spec_, watch)
    mark("cells done")
    for r in child_runs(parent.run_id):  # every cell is over: a run still RUNNING lost its process mid-cell
        if r["status"] == "RUNNING":  # (Dask ran the cell again elsewhere, from its checkpoint if it had one)
            Run(r["run_id"]).finish("FAILED", f"its worker ({r['tags'].get('nnlab.worker', '?')}) died mid-cell; "
                                              f"a newer run of the cell or `nnlab sweep --resume` finishes it")

    if watch:
        watch.poll()  # the rungs the last cells reached after the last look
        settle(watch, rank["metric"])
    paths, rows = report(parent.run_id, spec_, cells, REPORTS / f"{spec_.name}-{parent.run_id[:8]}", rank)
    mark("report written")
    failed = [r for r in rows if r["status"] != "FINISHED"]
    show_best_on_parent(parent.run_id, rows, rank)
    off = registration_off(spec_, cells)  # sweep.register, or register.enabled in the cells (fixed, --set)
    registered = register_by_mean(rows, spec_, cells[0].cfg, parent.run_id, rank) if not off else None
    parent.set_tags({"nnlab.sweep_failed_cells": str(len(failed))})
    note = (pruning_note(parent, rows) if watch else "") + (f"; {stopped}" if stopped else "")
    parent.finish("FINISHED" if not failed else "FAILED",
                  f"{len(failed)} cell(s) did not finish; `nnlab sweep --resume {parent.run_id}`" if failed else None)
    return {"parent_run_id": parent.run_id, "cells": len(cells), "ran": ran, "failed": failed,
            "report": paths, "registered": registered, "registration_off": off, "rows": rows, "note": note}


def _run_cells(pending: list, data: dict, parent_id: str, spec_: SweepConfig,
               watch: RungWatch | None) -> tuple[str | None, int]:
    """Run the cells (a failing one is recorded, FAILED with its reason, and the others go on; each is retried
    `sweep.retries` times first); with fail_fast no more are launched after the first failure; under ASHA a
    cell paused at a rung is run again once its group is promoted or cut. (Why it stopped launching early or
    None, the cells launched.)"""
    task_ = run_cell.with_options(retries=spec_.retries) if spec_.retries else run_cell
    limit = default_workers(spec_, len(pending)) if spec_.fail_fast else len(pending)  # in flight at once
    waiting, where, queue, stopped, launched = Completion(), origin(), list(pending), None, set()
    pauses, cells = (Pauses(watch) if watch and watch.pausing else None), {}
    if pauses:
        watch.clear([c.id for c in pending])  # each to its first rung (a resumed sweep's cells keep their word)

    def fill() -> None:
        while queue and len(waiting.pending) < limit:
            c = queue.pop(0)
            data_dir, facts = data[c.cfg.data.model_dump_json() + str(c.cfg.seed)]
            with placement(spec_):
                f = task_.submit(c.cfg, c.id, data_dir, parent_id, facts, where)
            waiting.add(f)
            cells[f] = c
            launched.add(c.id)

    fill()
    mark("cells submitted")
    while waiting.pending or (pauses and pauses.cells):
        f = waiting.next(*((JUDGE_EVERY, watch.poll) if watch else ())) if waiting.pending else None
        paused = f is not None and pauses is not None and pauses.note(f, cells[f])
        if f is not None and not paused and spec_.fail_fast and queue and failed(f):
            stopped = f"fail-fast: a cell failed, {len(queue)} not launched (nnlab sweep --resume runs them)"
            queue.clear()
        queue[:0] = pauses.due(stuck=not waiting.pending and not queue) if pauses else []
        fill()
    return stopped, len(launched)


def _grid_watch(parent_run_id: str, spec_: SweepConfig, cells: list, rank: dict) -> RungWatch | None:
    """A pruned grid's judge (tasks/pruning.py), or None."""
    from tasks.studies import study_storage
    from tasks.tracking import tracking_uri

    prune = parse_prune(spec_.prune, cells[0].cfg)
    if prune is None:
        return None
    return open_grid_watch(parent_run_id, cells, prune, not rank["lower_is_better"], study_storage(tracking_uri()),
                           SWEEPS)


@flow(name="nnlab-sweep-file", log_prints=False)
def sweep_file(file: str = "sweeps/optimizers.yaml", params: str = "params.yaml", workers: int | None = None) -> dict:
    """A sweep file run the way `nnlab sweep FILE` runs it (the deployment's entry point)."""
    from tasks.config import read_yaml
    from tasks.sweep import load_spec

    raw = read_yaml(params)
    spec = load_spec(file, raw)
    if workers:
        spec = spec.model_copy(update={"workers": workers})
    n = default_workers(spec, len(expand(spec, raw)))
    out = sweep.with_options(task_runner=task_runner(spec, n))(spec.model_dump(), raw, [], None)
    return {k: v for k, v in out.items() if k != "rows"}

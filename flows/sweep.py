"""The sweep flow: data prepared once per distinct data config, one Prefect task per cell in a process pool
(every cell a child MLflow run of one parent), then the report and registration by the mean over seeds.

`resume=PARENT_RUN_ID` runs only the cells that are missing or did not finish, into the same parent.
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner

from tasks.config import Config, SweepConfig, flatten, main_metric
from tasks.dvc import ensure_data
from tasks.stages import evaluate_stage, train_stage
from tasks.sweep import expand, register_by_mean, report, todo

SWEEPS = Path(".nnlab/sweeps")
REPORTS = Path("reports")


def limit_threads(threads: int) -> None:
    """Runs once in each worker process: workers x threads never exceeds the cores (oversubscribed torch
    threads have been seen to slow training by an order of magnitude)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def runner(workers: int) -> ProcessPoolTaskRunner:
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolTaskRunner(max_workers=workers, initializer=limit_threads, initargs=(threads,))


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(cfg: Config) -> tuple[str, dict]:
    path, facts = ensure_data(cfg)
    return str(path), facts


@task(name="cell", cache_policy=NO_CACHE, task_run_name="cell-{cell_id}")
def run_cell(cfg: Config, cell_id: str, data_dir: str, parent_run_id: str, tags: dict) -> dict:
    name = next(iter(cfg.models))
    out = SWEEPS / parent_run_id / cell_id.replace("/", "_")
    trained = train_stage(cfg, name, data_dir, out / "train", parent_run_id=parent_run_id,
                          extra_tags={**tags, "nnlab.sweep_cell": cell_id})
    summary = evaluate_stage(cfg, name, data_dir, out / "train", out / "metrics.json", out / "plots")
    return {**summary, "cell": cell_id, "health": trained.health}


@flow(name="nnlab-sweep", log_prints=False)
def sweep(spec: dict, params: dict, sets: list[str] | None = None, resume: str | None = None) -> dict:
    """`spec` is a sweep file's content, `params` the params.yaml content it applies to."""
    from tasks.tracking import Run, prepare_store

    spec_ = SweepConfig.model_validate(spec)
    cells = expand(spec_, params, sets)
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
    metric = main_metric(cells[0].cfg)
    pending = todo(parent.run_id, cells, metric)

    data = {}
    for cell in pending:  # one prepare per distinct data config (the seed changes the split)
        key = cell.cfg.data.model_dump_json() + str(cell.cfg.seed)
        if key not in data:
            data[key] = prepare_data(cell.cfg)
    futures = []
    for c in pending:
        data_dir, facts = data[c.cfg.data.model_dump_json() + str(c.cfg.seed)]
        futures.append(run_cell.submit(c.cfg, c.id, data_dir, parent.run_id, facts))
    for f in futures:  # a failing cell is recorded (child run FAILED with its reason); the others go on
        f.wait()

    paths, rows = report(parent.run_id, spec_, cells, REPORTS / f"{spec_.name}-{parent.run_id[:8]}")
    failed = [r for r in rows if r["status"] != "FINISHED"]
    registered = register_by_mean(rows, spec_, cells[0].cfg, parent.run_id) if spec_.register else None
    parent.set_tags({"nnlab.sweep_failed_cells": str(len(failed))})
    parent.finish("FINISHED" if not failed else "FAILED",
                  f"{len(failed)} cell(s) did not finish; `nnlab sweep --resume {parent.run_id}`" if failed else None)
    return {"parent_run_id": parent.run_id, "cells": len(cells), "ran": len(pending), "failed": failed,
            "report": paths, "registered": registered, "rows": rows}

"""The sweep flow: data prepared once per distinct data config, one Prefect task per cell in a process pool
or on a Dask cluster (every cell a child MLflow run of one parent), then the report and registration by the
mean over seeds.

`resume=PARENT_RUN_ID` runs only the cells that are missing or did not finish, into the same parent.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner

from flows.experiment import link_mlflow_run, prefect_ids, prepare_data
from tasks.config import Config, SweepConfig, flatten
from tasks.kinds import main_metric, ranking
from tasks.phases import mark
from tasks.stages import evaluate_stage, train_stage
from tasks.search import expand  # a grid's cells (tasks/sweep.py), or a search's: one per seed
from tasks.sweep import fold_sets, register_by_mean, registration_off, report, show_best_on_parent, todo

SWEEPS = Path(".nnlab/sweeps")
REPORTS = Path("reports")


def prepare_worker(threads: int, runs: tuple[tuple[str, str], ...] = ()) -> None:
    """Runs once in each worker process, as it starts: workers x threads never exceeds the cores (oversubscribed
    torch threads have been seen to slow training by an order of magnitude), and everything a cell needs is
    loaded before the first cell arrives: the training stack, the families and kinds of `runs` ((arch, source)
    pairs), the MLflow store (opened once; every cell of this worker reuses it), Prefect's task engine."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from flows.console import hide_explained_failures
    from flows.warm import preload

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, _ignore)  # an idle worker leaves Ctrl-C to the sweep (run_cell takes it)
    signal.signal(signal.SIGTERM, _stop_worker)  # the fork server's SIG_IGN undone: SIGTERM stops an idle worker
    hide_explained_failures()
    preload(runs)


# imported once by the fork server the pool's workers are forked from (imports only: no thread, store or device
# is opened before the fork)
FORK_SERVER_PRELOAD = ["flows.sweep", "tasks.kinds.supervised", "mlflow", "prefect.task_engine", "torch._dynamo"]


def _start_fork_server() -> None:
    """The fork server, started now with SIGTERM and Ctrl-C ignored, which it keeps: a SIGTERM sent to
    the whole process group (Slurm, systemd) leaves it up, so the sweep can still tell its workers apart and stop
    them; it is stopped with the pool (_stop_fork_server), or when this process is gone. Main thread only."""
    import multiprocessing.forkserver as fs

    if threading.current_thread() is not threading.main_thread():
        return
    # Ctrl-C too: the fork server only ignores it once its preloading (torch: seconds) is done; a Ctrl-C meanwhile
    # (a pool restarted after a failed cell) would print its KeyboardInterrupt traceback
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        fs.ensure_running()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _stop_fork_server() -> None:
    """Once the pool is shut, the fork server has nothing left to fork; left to exit by itself it would hold the
    terminal's stdout while it tears torch down (seconds): killed and reaped instead (Python 3.11's forkserver)."""
    import multiprocessing.forkserver as fs

    server = fs._forkserver
    if getattr(server, "_forkserver_pid", None):
        try:
            os.kill(server._forkserver_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server._stop()  # closes its pipe, reaps it, removes its socket


def _worker_pid() -> int:
    return os.getpid()


class WarmPool(ProcessPoolTaskRunner):
    """Prefect's process pool, started before the flow: `warm()` spawns the worker processes at once and each
    preloads what a cell needs (prepare_worker) while the Prefect server boots and the parent run opens. The
    flow run takes this very pool (`duplicate` returns it once started), so the same warm workers train every
    cell. Anywhere else (a cell's rebuilt context in a worker) it duplicates as Prefect's pool does: idle."""

    def warm(self) -> "WarmPool":
        """Start the workers in the background and return at once: each start waits for the fork server to have
        imported its preload (~10 s of a core), which the caller spends booting the server and preloading too."""
        if not self._started:
            self.__enter__()
            executor, n = self._executor, self._max_workers

            def start() -> None:
                try:
                    for _ in range(n):  # a forkserver pool starts one process per submit that finds none idle
                        executor.submit(_worker_pid)
                except (RuntimeError, EOFError, OSError):  # the pool was closed before its workers all started
                    pass

            self._warming = threading.Thread(target=start, name="nnlab-pool-warm", daemon=True)
            self._warming.start()
        return self

    def duplicate(self) -> "WarmPool":
        return self if self._started else super().duplicate()

    def __enter__(self) -> "WarmPool":
        if self._started:
            return self
        super().__enter__()
        # Prefect spawns every worker, which then imports torch, Prefect and MLflow anew (~8 s of a core each,
        # 6 workers on 2 cores: ~25 s). Forked from a fork server that imported them once, a worker starts in a
        # fraction of that. Prefect's executor has started no process yet: replaced, with its own initializer.
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        from prefect.task_runners import _initialize_process_pool_worker

        self._executor.shutdown(wait=False)
        ctx = get_context("forkserver")
        ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
        _start_fork_server()
        self._executor = ProcessPoolExecutor(
            max_workers=self._max_workers, mp_context=ctx, initializer=_initialize_process_pool_worker,
            initargs=(self._subprocess_message_queue, self._initializer, self._initargs))
        return self

    def __exit__(self, exc_type=None, *rest) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):  # Ctrl-C, SIGTERM: the flow is leaving
            stop_cells()  # Prefect's shutdown would otherwise wait for a worker that was idle at the signal
        super().__exit__(exc_type, *rest)
        _stop_fork_server()

    def __getstate__(self) -> dict:
        """Cells carry their flow (and so this runner) in their pickled context: its settings, never the pool."""
        live = ("_executor", "_resolver_executor", "_subprocess_message_queue", "_message_forwarding_thread",
                "_warming")
        return {**self.__dict__, **dict.fromkeys(live), "_started": False}

    def close(self) -> None:
        """Stop the workers; for a pool the flow never took (the flow's own exit stops it otherwise)."""
        if self._started:
            self.__exit__(None, None, None)


def _interrupt(signum, frame):
    """A cell's first Ctrl-C or SIGTERM: KeyboardInterrupt (the training marks its run KILLED); then Ctrl-C is ignored
    and SIGTERM stops the worker (the sweep's stop_cells sends it after its grace)."""
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _stop_worker)
    raise KeyboardInterrupt


# A worker's handlers are Python functions, never SIG_IGN / SIG_DFL: a signal already caught by Python's C handler
# (SIGTERM to the whole group and the sweep's SIGINT arrive together) then meets a function when its turn comes,
# not "OSError: Signal 15 ignored due to race condition" and a traceback.
def _ignore(signum, frame) -> None:
    pass


def _stop_worker(signum, frame) -> None:
    os._exit(128 + signum)  # as SIGTERM's default would end it: no cleanup, the sweep marks what was left


class interruptible:
    """Ctrl-C or SIGTERM raises KeyboardInterrupt in this block (the training marks its run KILLED), even in a pool
    worker that otherwise ignores Ctrl-C (and stops at SIGTERM). Off the main thread (a Dask worker's) a no-op."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)


_OPENED: dict[str, str] = {}  # the sweep parent run this process opened: Ctrl-C marks it KILLED


def _running_cells(parent: str | None) -> list[str]:
    from tasks.tracking import child_runs

    try:
        return [r["run_id"] for r in child_runs(parent) if r["status"] == "RUNNING"] if parent else []
    except Exception:
        return []


def stop_cells(grace: float = 3.0) -> None:
    """After Ctrl-C or SIGTERM: the cells being trained got it too (one process group) and mark their runs KILLED;
    after at most `grace` seconds every pool worker is stopped. A worker between two cells ignores the signal
    and would start the next one, so none is left to finish on its own. (Forked from the fork server, the
    workers are still this process's multiprocessing children.)"""
    import multiprocessing

    from flows.console import terminated

    if not multiprocessing.active_children():  # stopped already (the pool's exit on the same interrupt)
        return
    if terminated():  # a SIGTERM reaches this process alone (`kill PID`): the cells are told as Ctrl-C tells them
        for p in multiprocessing.active_children():
            try:
                os.kill(p.pid, signal.SIGINT)  # a cell marks its run KILLED; an idle worker ignores it
            except ProcessLookupError:
                pass
    parent = _OPENED.get("parent")
    deadline = time.monotonic() + grace
    while _running_cells(parent) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = multiprocessing.active_children()
    for p in workers:
        p.terminate()
    for p in workers:
        p.join(3)
        if p.is_alive():
            p.kill()
            p.join()


def stop_after_interrupt(grace: float = 3.0) -> str:
    """Ctrl-C (or SIGTERM) during a sweep: the workers are stopped (stop_cells; a signal sent to this process alone
    reaches them here), every run still RUNNING and the parent are marked KILLED, and the line to print is
    returned: the exact command that finishes the sweep."""
    from flows.console import interruption
    from tasks.tracking import Run

    parent, what = _OPENED.get("parent"), interruption()[0]  # interrupted (Ctrl-C) | terminated (SIGTERM)
    stop_cells(grace)
    if not parent:
        return f"{what} before the sweep's parent run was opened: nothing recorded"
    for run_id in _running_cells(parent):
        Run(run_id).mark_interrupted(f"{what} with its sweep; `nnlab sweep --resume` resumes it")
    Run(parent).mark_interrupted(f"{what}; `nnlab sweep --resume` finishes it")
    return f"{what}: sweep parent run {parent} is marked KILLED; finish it with: nnlab sweep --resume {parent}"


def runner(workers: int, runs: tuple[tuple[str, str], ...] = ()) -> WarmPool:
    threads = max(1, (os.cpu_count() or 1) // workers)
    return WarmPool(max_workers=workers, initializer=prepare_worker, initargs=(threads, tuple(runs)))


def task_runner(spec: SweepConfig, workers: int, cells: list | None = None):
    """Where the cells run: `workers` local processes (a WarmPool: call `.warm()` to start them early), or the
    existing Dask cluster at `sweep.address` (its workers set the parallelism; `dask worker`'s nanny starts each
    worker process with OMP_NUM_THREADS=1, so torch uses one thread per cell there too)."""
    if spec.engine == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=spec.address)
    runs = sorted({(c.cfg.model_options(next(iter(c.cfg.models)))[0], c.cfg.data.source) for c in cells or []})
    return runner(workers, tuple(runs))


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
    done = [r for r in child_runs(parent_run_id) if r["cell"] == cell_id and r["status"] == "FINISHED"
            and main_metric(cfg) in r["metrics"]]
    if done:  # Dask recomputes a finished cell whose result died with its worker: never train a cell twice
        return {"cell": cell_id, "run_id": done[0]["run_id"], "health": []}
    name = next(iter(cfg.models))
    out = SWEEPS / parent_run_id / cell_id.replace("/", "_")
    worker = {"nnlab.worker": worker_name()}
    with interruptible():
        trained = train_stage(cfg, name, data_dir, out / "train", parent_run_id=parent_run_id,
                              extra_tags={**tags, "nnlab.sweep_cell": cell_id, **worker, **prefect_ids()})
    link_mlflow_run(trained.run_id, f"{name} ({cell_id})")
    summary = evaluate_stage(cfg, name, data_dir, out / "train", out / "metrics.json", out / "plots")
    run = Run(summary["run_id"])
    run.set_tags(worker)  # a cell resumed from its checkpoint: the worker that finished it
    run.log_metrics({"cell_seconds": time.perf_counter() - started})  # training + evaluation + recording: the report
    return {**summary, "cell": cell_id, "health": trained.health}


def _flow_run_name() -> str:
    """`sweep optimizers` (or `sweep optimizers · resume <parent>`) in Prefect's UI."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    resume = p.get("resume")
    return f"sweep {(p.get('spec') or {}).get('name', '?')}" + (f" · resume {resume[:8]}" if resume else "")


@flow(name="nnlab-sweep", log_prints=False, flow_run_name=_flow_run_name)
def sweep(spec: dict, params: dict, sets: list[str] | None = None, resume: str | None = None) -> dict:
    """`spec` is a sweep file's content, `params` the params.yaml content it applies to."""
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
    _OPENED["parent"] = parent.run_id
    try:
        if spec_.search is not None:  # trials asked of an Optuna study, their cells run as a grid's (flows/search.py)
            from flows.search import search_and_report
            return search_and_report(parent, spec_, params, cells, run_cell, origin(),
                                     REPORTS / f"{spec_.name}-{parent.run_id[:8]}")
        return _cells_and_report(parent, spec_, cells)
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


def _cells_and_report(parent, spec_: SweepConfig, cells: list) -> dict:
    from tasks.tracking import Run, child_runs

    rank = ranking(cells[0].cfg)  # worked out once for the sweep; each cell's evaluation records the same
    parent.set_tags({"nnlab.ranking_metric": rank["metric"], "nnlab.lower_is_better": str(rank["lower_is_better"]).lower()})
    pending = todo(parent.run_id, cells, rank["metric"])

    data = {}
    for cell in pending:  # one prepare per distinct data config (the seed changes the split)
        key = cell.cfg.data.model_dump_json() + str(cell.cfg.seed)
        if key not in data:
            data[key] = prepare_data(cell.cfg)
    futures, where = [], origin()
    for c in pending:
        data_dir, facts = data[c.cfg.data.model_dump_json() + str(c.cfg.seed)]
        futures.append(run_cell.submit(c.cfg, c.id, data_dir, parent.run_id, facts, where))
    mark("cells submitted")
    for f in futures:  # a failing cell is recorded (child run FAILED with its reason); the others go on
        f.wait()
    mark("cells done")
    for r in child_runs(parent.run_id):  # every cell is over: a run still RUNNING lost its process mid-cell
        if r["status"] == "RUNNING":  # (Dask ran the cell again elsewhere, from its checkpoint if it had one)
            Run(r["run_id"]).finish("FAILED", f"its worker ({r['tags'].get('nnlab.worker', '?')}) died mid-cell; "
                                              f"a newer run of the cell or `nnlab sweep --resume` finishes it")

    paths, rows = report(parent.run_id, spec_, cells, REPORTS / f"{spec_.name}-{parent.run_id[:8]}", rank)
    mark("report written")
    failed = [r for r in rows if r["status"] != "FINISHED"]
    show_best_on_parent(parent.run_id, rows, rank)
    off = registration_off(spec_, cells)  # sweep.register, or register.enabled in the cells (fixed, --set)
    registered = register_by_mean(rows, spec_, cells[0].cfg, parent.run_id, rank) if not off else None
    parent.set_tags({"nnlab.sweep_failed_cells": str(len(failed))})
    parent.finish("FINISHED" if not failed else "FAILED",
                  f"{len(failed)} cell(s) did not finish; `nnlab sweep --resume {parent.run_id}`" if failed else None)
    return {"parent_run_id": parent.run_id, "cells": len(cells), "ran": len(pending), "failed": failed,
            "report": paths, "registered": registered, "registration_off": off, "rows": rows}


@flow(name="nnlab-sweep-file", log_prints=False)
def sweep_file(file: str = "sweeps/optimizers.yaml", params: str = "params.yaml", workers: int | None = None) -> dict:
    """A sweep file run the way `nnlab sweep FILE` runs it (the deployment's entry point)."""
    from tasks.config import read_yaml
    from tasks.sweep import default_workers, load_spec

    raw = read_yaml(params)
    spec = load_spec(file, raw)
    if workers:
        spec = spec.model_copy(update={"workers": workers})
    n = default_workers(spec, len(expand(spec, raw)))
    out = sweep.with_options(task_runner=task_runner(spec, n))(spec.model_dump(), raw, [], None)
    return {k: v for k, v in out.items() if k != "rows"}

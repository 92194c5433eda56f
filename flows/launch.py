"""What every run command (`run`, `sweep`, `stage`) does around its flow: the input and the places it writes
checked before anything boots, the temporary Prefect server started early and stopped however the command ends,
and the failures it can explain ended in one line of its own with their exit code (flows/console.py)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

from flows.app import fail
from flows.console import interruption, take_sigterm
from tasks.phases import mark


def boot_prefect_server():
    """Start the temporary local Prefect server now (unless the user set PREFECT_API_URL), so its boot overlaps
    the torch/MLflow imports. `with prefect_api(server):` around the flow waits for it and stops it however
    the block is left (flows/prefect_server.py; atexit and SIGTERM stop it too)."""
    from flows.prefect_server import PrefectServerError, start

    try:
        return start()
    except PrefectServerError as e:
        fail(str(e), code=1)


@contextmanager
def prefect_api(server):
    """Wait for the server boot_prefect_server() started and make it the flow's API; stop it on the way out."""
    from flows.prefect_server import PrefectServerError

    try:
        with server:
            mark("server ready")
            yield
    except PrefectServerError as e:
        fail(str(e), code=1)


def local_flow_settings():
    """Settings for a flow run started from this terminal. Heartbeats exist to spot crashed runs on
    workers; here the thread's shutdown join costs ~1 s per flow, so they are off unless the user set them."""
    from contextlib import nullcontext

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ or "PREFECT_RUNNER_HEARTBEAT_FREQUENCY" in os.environ:
        return nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def warm_up(cfg) -> None:
    """flows/warm.py's preload for this config's runs, while the temporary server boots."""
    from flows.warm import preload

    preload({(cfg.model_options(name)[0], cfg.data.source) for name in cfg.models})
    mark("imported")


def ready_to_run(cfgs: list) -> None:
    """Before the server boots or the store opens: data.path's files looked over (tasks/sources.py; a file its
    source cannot read is exit 2, named with its problem), the store and the working folder writable; from then
    on SIGTERM ends the command the way Ctrl-C does, exit 143 (flows/console.py)."""
    from tasks.distributed import refusal
    from tasks.sources import unreadable

    for data in {c.data.model_dump_json(): c.data for c in cfgs}.values():
        if why := unreadable(data):
            fail(why)
    for cfg in cfgs:
        if why := refusal(cfg):
            fail(why)
    check_writable_places()
    take_sigterm()
    from tasks.quick import banner

    if line := banner():
        print(line, file=sys.stderr, flush=True)


def check_writable_places() -> None:
    """The tracking store and the working folder (data, checkpoints) take writes, before any work starts."""
    from tasks.files import StoreWriteError, check_writable
    from tasks.tracking import check_store

    try:
        check_store()
        check_writable(Path(".nnlab"), "working folder")
    except StoreWriteError as e:
        fail(str(e))


@contextmanager
def explained_failures():
    """End the command with one line of its own for what it can explain: bad data (exit 2), a full or read-only
    disk, DVC's lock held past the timeout (exit 1), Ctrl-C or SIGTERM (exit 130 or 143, the interrupted run named)."""
    from tasks.data import DataError
    from tasks.dvc import DvcLockTimeout
    from tasks.files import StoreWriteError

    try:
        yield
    except DataError as e:
        fail(str(e))
    except (StoreWriteError, DvcLockTimeout) as e:
        fail(str(e), code=1)
    except KeyboardInterrupt as e:
        (what, code), run_id = interruption(), getattr(e, "run_id", None)  # Ctrl-C: 130, SIGTERM: 143
        state = "is marked KILLED" if getattr(e, "marked", True) else "stays RUNNING in the store"
        typer.secho(f"{what}: {e.name}'s MLflow run {run_id} {state}; the same command resumes it from its last "
                    "finished epoch" if run_id else what, fg="yellow", err=True)
        raise typer.Exit(code) from None

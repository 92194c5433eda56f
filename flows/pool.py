"""The sweep's local process pool: warm workers forked from a fork server that has imported the training stack
once, and what happens to them on Ctrl-C, SIGTERM, or when the sweep process is gone without a word (kill -9):
each cell being trained marks its MLflow run KILLED, and no worker is left behind."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

from prefect.task_runners import ProcessPoolTaskRunner


def prepare_worker(threads: int, runs: tuple[tuple[str, str], ...] = (), gpus: tuple[int, ...] = (),
                   per_gpu: int = 1, slots: str = "") -> None:
    """Runs once in each worker process, as it starts: workers x threads never exceeds the cores (oversubscribed
    torch threads have been seen to slow training by an order of magnitude), and everything a cell needs is
    loaded before the first cell arrives: the training stack, the families and kinds of `runs` ((arch, source)
    pairs), the MLflow store (opened once; every cell of this worker reuses it), Prefect's task engine. With
    `gpus`, the worker's own GPU first (claim_gpu): every cell it trains sees that one device."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if gpus:
        claim_gpu(Path(slots), gpus, per_gpu)
    import torch

    from flows.console import hide_explained_failures
    from flows.warm import preload

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, _ignore)  # an idle worker leaves Ctrl-C to the sweep (run_cell takes it)
    signal.signal(signal.SIGTERM, _stop_worker)  # the fork server's SIG_IGN undone: SIGTERM stops an idle worker
    hide_explained_failures()
    sweep = multiprocessing.parent_process()  # the sweep's process (this worker's parent is the fork server)
    if sweep is not None:
        threading.Thread(target=_watch_sweep, args=(sweep.pid,), daemon=True, name="nnlab-sweep-watch").start()
    preload(runs)


_CLAIMED: list = []  # the open slot file of this worker's GPU, locked for the worker's life


def claim_gpu(slots: Path, gpus: tuple[int, ...], per_gpu: int) -> int:
    """A free one of the sweep's len(gpus) x per_gpu worker slots (a lock file each, held while the worker lives,
    freed by the kernel when it ends: a replacement worker takes that slot), and its GPU made the only one this
    process sees (CUDA_VISIBLE_DEVICES, before CUDA starts). Returns the GPU's id."""
    import fcntl

    slots.mkdir(parents=True, exist_ok=True)
    for k in range(len(gpus) * per_gpu):
        f = open(slots / f"slot-{k}", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        _CLAIMED.append(f)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[k // per_gpu])
        return gpus[k // per_gpu]
    raise RuntimeError(f"no free GPU slot of {len(gpus)} x {per_gpu} in {slots}")


def _watch_sweep(sweep: int) -> None:
    """A worker whose sweep is gone without stopping it (kill -9, a crash) stops as SIGTERM stops it: a cell being
    trained marks its run KILLED, then the worker exits; one that has not within 15 s is ended. Otherwise it would
    wait for a next cell forever, and keep the fork server and resource tracker up (each waits for the last copy
    of the sweep's pipe, which every worker holds, to close)."""
    while not _gone(sweep):
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # training: KeyboardInterrupt, the run marked KILLED; idle: _stop_worker
    time.sleep(10)
    os.kill(os.getpid(), signal.SIGTERM)  # the cell has ended: the idle handler
    time.sleep(5)
    os._exit(128 + signal.SIGTERM)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # killed but not yet reaped by its parent: gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


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


def _end_children() -> None:
    """Every live child process of this one: SIGTERM, 3 s to end, then SIGKILL."""
    workers = multiprocessing.active_children()
    for w in workers:
        w.terminate()
    for w in workers:
        w.join(3)
        if w.is_alive():
            w.kill()
            w.join()


def _stop_fork_server() -> None:
    """Once the pool is shut, the fork server has nothing left to fork; left to exit by itself it would hold the
    terminal's stdout while it tears torch down (seconds): killed and reaped instead (Python 3.11's forkserver)."""
    import multiprocessing.forkserver as fs

    server = fs._forkserver
    if getattr(server, "_forkserver_pid", None):
        # a worker still up (the pool left on an interrupt) is stopped first: once the fork server is gone its
        # workers look dead to multiprocessing (their sentinel is the server's pipe) and nothing would stop them
        _end_children()
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
        try:
            if exc_type is not None and not issubclass(exc_type, Exception):  # Ctrl-C, SIGTERM: the flow is leaving
                stop_cells()  # Prefect's shutdown would otherwise wait for a worker that was idle at the signal
            super().__exit__(exc_type, *rest)
        finally:  # also when the shutdown itself fails (a worker gone at the signal): the server ignores SIGTERM
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


OPENED: dict[str, str] = {}  # the sweep parent run this process opened: Ctrl-C marks it KILLED


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
    parent = OPENED.get("parent")
    deadline = time.monotonic() + grace
    while _running_cells(parent) and time.monotonic() < deadline:
        time.sleep(0.2)
    _end_children()


def stop_after_interrupt(grace: float = 3.0) -> str:
    """Ctrl-C (or SIGTERM) during a sweep: the workers are stopped (stop_cells; a signal sent to this process alone
    reaches them here), every run still RUNNING and the parent are marked KILLED, and the line to print is
    returned: the exact command that finishes the sweep."""
    from flows.console import interruption
    from tasks.tracking import Run

    parent, what = OPENED.get("parent"), interruption()[0]  # interrupted (Ctrl-C) | terminated (SIGTERM)
    stop_cells(grace)
    if not parent:
        return f"{what} before the sweep's parent run was opened: nothing recorded"
    for run_id in _running_cells(parent):
        Run(run_id).mark_interrupted(f"{what} with its sweep; `nnlab sweep --resume` resumes it")
    Run(parent).mark_interrupted(f"{what}; `nnlab sweep --resume` finishes it")
    return f"{what}: sweep parent run {parent} is marked KILLED; finish it with: nnlab sweep --resume {parent}"


def runner(workers: int, runs: tuple[tuple[str, str], ...] = (), gpus: tuple[int, ...] = (),
           per_gpu: int = 1) -> WarmPool:
    threads = max(1, (os.cpu_count() or 1) // workers)
    slots = str(Path(".nnlab/sweeps/gpu-slots") / str(os.getpid())) if gpus else ""
    return WarmPool(max_workers=workers, initializer=prepare_worker,
                    initargs=(threads, tuple(runs), tuple(gpus), per_gpu, slots))

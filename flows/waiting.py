"""Waiting for a sweep's cells while judging them: the futures of the cells in flight (a local pool's or Dask's)
report their end through Prefect's done callbacks, and between two ends the sweep looks at the cells still
training (tasks/pruning.py's RungWatch) every few seconds."""
from __future__ import annotations

import threading
from typing import Callable


class Completion:
    """Futures as they finish, in the order they finish; `add` more while waiting."""

    def __init__(self, futures=()):
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._finished: list = []
        self.pending: set = set()
        for f in futures:
            self.add(f)

    def add(self, future) -> None:
        self.pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future) -> None:
        with self._lock:
            self._finished.append(future)
            self._event.set()

    def next(self, every: float | None = None, meanwhile: Callable[[], object] | None = None):
        """The next future to finish (one at a time; never one twice); `meanwhile()` is called every `every`
        seconds until then."""
        while True:
            with self._lock:
                if self._finished:
                    f = self._finished.pop(0)
                    if not self._finished:
                        self._event.clear()
                    if f in self.pending:
                        self.pending.discard(f)
                        return f
                    continue
            self._event.wait(every)
            if meanwhile is not None:
                meanwhile()


def failed(future) -> bool:
    """Whether a future's task failed (waiting for it to end)."""
    future.wait()
    return future.state.is_failed()


def outcome(future):
    """A finished future's result, or None when its task failed."""
    future.wait()
    return future.result() if future.state.is_completed() else None


class Pauses:
    """The cells an ASHA sweep has paused at a rung (tasks/pruning.py): kept with what runs them again (`payload`)
    until their group is judged there, then handed back to be run again (they resume from their checkpoint)."""

    def __init__(self, watch):
        self.watch = watch
        self.cells: dict[str, tuple[object, int]] = {}  # cell id -> (payload, the epoch it paused at)

    def note(self, future, payload) -> bool:
        """True when `future`'s cell ended paused (kept here)."""
        res = outcome(future)
        if isinstance(res, dict) and "paused" in res:
            self.cells[res["cell"]] = (payload, res["paused"])
            return True
        return False

    def due(self, stuck: bool) -> list:
        """The payloads to run again now. `stuck`: nothing else is running, so no seed will reach a rung any
        more: after one more look, a group still waiting (one of its seeds failed) is cleared to the end."""
        if not self.cells:
            return []
        ids = self.watch.ready({c: e for c, (_, e) in self.cells.items()})
        if not ids and stuck:
            self.watch.poll()
            ids = self.watch.ready({c: e for c, (_, e) in self.cells.items()})
            if not ids:
                self.watch.clear(list(self.cells), self.watch.prune.max_epochs)
                ids = list(self.cells)
        return [self.cells.pop(c)[0] for c in ids]

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

    def all(self, every: float | None = None, meanwhile: Callable[[], object] | None = None) -> None:
        while self.pending:
            self.next(every, meanwhile)

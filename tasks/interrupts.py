"""Ctrl-C and SIGTERM held back for the length of a tracking-store write.

Python raises KeyboardInterrupt between any two bytecodes, so a Ctrl-C that lands inside an MLflow write to the
SQLite store leaves that write's transaction open: the store stays locked until the process ends, and the line
that should mark the interrupted run KILLED finds it locked. Held here, the signal waits for the write to end
(milliseconds, at most SQLite's busy timeout) and is then delivered to the handler it would have met."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

HELD = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []  # signals that arrived while held, first first
_holding: list[bool] = []  # one entry while a block holds them (blocks nest; the outermost holds)


def _note(signum, frame) -> None:
    _pending.append(signum)


@contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait for this block to end, then reach the handler in place before it (the first of them;
    a second that came meanwhile was part of the same stop). Main thread only (elsewhere Python delivers no signal);
    a handler that is SIG_IGN or SIG_DFL is left as it is: restoring one of those could race a signal Python's C
    handler has already taken ("Signal ignored due to race condition")."""
    if _holding or threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: h for s in HELD if callable(h := signal.getsignal(s))}
    for s in saved:
        signal.signal(s, _note)
    _holding.append(True)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        _holding.clear()
        if _pending:
            signum = _pending[0]
            _pending.clear()
            saved[signum](signum, None)

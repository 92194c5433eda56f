"""Time marks of a command's phases, read by benchmarks/phases.py. Standard library only: marks are taken
before anything heavy is imported.

With NNLAB_PHASES=<file> set, `mark(name)` appends one line `<unix time>\t<pid>\t<name>` to that file (an
O_APPEND write: the CLI, its Prefect task threads and sweep worker processes can all mark the same file).
Unset, it does nothing. Training is marked by the loop itself (`fit start` / `fit end` around every fit), so
the benchmark can tell time spent training from everything around it.
"""
from __future__ import annotations

import os
import time

ENV = "NNLAB_PHASES"


def mark(name: str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = f"{time.time():.6f}\t{os.getpid()}\t{name}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:  # a benchmark's bookkeeping never fails a run
        pass

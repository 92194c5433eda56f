"""Crash-safe writes: write beside the target under a temp name, then rename (atomic on POSIX)."""
from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temp path in the target's folder; renamed onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_torch(path: str | Path, obj) -> None:
    """Save `obj` as tensors and plain data only (numpy values become tensors and Python numbers), so that
    `load_torch` reads it back without unpickling anything that could run code."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(_plain(obj), tmp)


class Busy(RuntimeError):
    """Another process holds what this one needs (a run being trained)."""


@contextmanager
def exclusive(path: str | Path, what: str):
    """Hold the lock file `path` while the body runs; a second process asking for it gets Busy at once, naming
    the holder's PID. flock: the kernel drops the lock when its holder ends, however it ends (kill -9
    included), so a crashed run never leaves a stale lock. The file itself stays (removing it would let two
    processes lock two different files)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise Busy(f"{what} is being trained right now by another nnlab process (pid {holder}); wait for it to "
                   "finish or stop it (a stopped run resumes from its checkpoint)") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


class UnsafeCheckpoint(ValueError):
    """A checkpoint holding more than tensors and plain data: refused, never unpickled."""


def load_torch(path: str | Path, map_location="cpu"):
    """A checkpoint `save_torch` wrote (tensors, dicts, lists, numbers, strings), read with torch's weights-only
    unpickler: a file that asks to build any other object (a planted pickle that would run code) is refused
    with UnsafeCheckpoint, nothing of it runs."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpoint(f"{path}: refused to load: it holds more than weights and plain data, and loading it "
                               f"could run code ({first[:200]}); nnlab writes only tensors and plain data, so this "
                               "file was not written by it or was tampered with") from None


def _plain(obj):
    import numpy as np
    import torch

    if isinstance(obj, OrderedDict):  # a state_dict: keep its type and the version metadata modules read back
        out = OrderedDict((k, _plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_plain(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


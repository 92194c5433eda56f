"""Crash-safe writes: write beside the target under a temp name, then rename (atomic on POSIX)."""
from __future__ import annotations

import errno
import functools
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


class StoreWriteError(RuntimeError):
    """A write the run needs failed because the disk is full or the place is read-only; the message is one line
    that names the place ("disk full / read-only: <path>")."""


# errno -> what the user is told; EFBIG: a file-size limit (ulimit -f) hit, a full disk by another name
_WRITE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached",
                 errno.EROFS: "read-only", errno.EACCES: "not writable", errno.EPERM: "not writable"}
# what SQLite (through SQLAlchemy and MLflow) says for the same conditions
_SQLITE_WRITE = {"readonly database": "read-only", "database or disk is full": "disk full",
                 "unable to open database file": "cannot open", "disk i/o error": "disk I/O error"}


def write_failure(exc: BaseException, store: str | None = None) -> str | None:
    """"<what>: <path>" when `exc` (or an exception it was raised from) is a failed write of a full or read-only
    disk, else None. `store`: the path to name for SQLite's own errors, which carry none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            return f"{_WRITE_ERRNOS[exc.errno]}: {exc.filename or store or '?'}"
        text = str(exc).lower()
        for needle, what in _SQLITE_WRITE.items():
            if needle in text:
                return f"{what}: {store or '?'}"
        exc = exc.__cause__ or exc.__context__
    return None


def check_writable(folder: str | Path, what: str, need_bytes: int = 16 << 20) -> None:
    """Fail now, before any work, when `folder` cannot take new files: a component of it is a regular file,
    the file system is read-only or not ours to write, or under `need_bytes` are free. Creates the folder."""
    import shutil

    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise StoreWriteError(f"{what}: {parent} is a file, not a folder; {folder} cannot be created there")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".nnlab-write-check-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise StoreWriteError(f"{what}: {_WRITE_ERRNOS.get(e.errno) or e.strerror}: {folder}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise StoreWriteError(f"{what}: disk full: {folder} has {free / 2**20:.0f} MiB free, a run needs about "
                              f"{need_bytes / 2**20:.0f} MiB")


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


@functools.cache
def code_hash() -> str:
    """sha256 (16 hex digits) of the project's code (tasks/, models/, flows/ .py files): with the params and
    data hashes, what makes two results the same result (a git commit misses uncommitted changes)."""
    import hashlib

    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for pkg in ("tasks", "models", "flows"):
        for p in sorted((root / pkg).glob("*.py")):
            h.update(f"{pkg}/{p.name}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]

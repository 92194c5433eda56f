"""The flows' door to DVC: data is rebuilt only when DVC (by content hashes) says it changed.

When a run's data params differ from params.yaml (a `--set data.…` override or another params file),
`dvc repro` would build the wrong data, so the data is built under data/variants/<hash of its params>/
instead, exactly once, as `dvc exp run -S` would keep it apart.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.config import Config, ConfigError, load_config, params_hash
from tasks.data import AUGMENTED, PROCESSED, content_hash, prepare

VARIANTS = Path("data/variants")


def is_dvc_repo(root: Path = Path(".")) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


DVC_LOCK = Path(".dvc/tmp/lock")
LOCK_TIMEOUT_ENV = "NNLAB_DVC_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 600.0


class DvcLockTimeout(RuntimeError):
    """Another DVC command held the workspace's lock for longer than this run would wait."""


def lock_timeout() -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_LOCK_TIMEOUT
        if value < 0:
            raise ValueError
    except ValueError:
        raise DvcLockTimeout(f"{LOCK_TIMEOUT_ENV}={raw!r}: not a number of seconds (0 or more)") from None
    return value


def dvc_lock_holder(lock: Path = DVC_LOCK) -> str | None:
    """"pid N (its command line)" of the process holding DVC's workspace lock, or None when it is free. DVC locks
    the file with zc.lockfile (flock, PID written inside); asking for the same lock is the one sure test."""
    import zc.lockfile

    if not lock.exists():
        return None
    try:
        zc.lockfile.LockFile(str(lock), content_template="{pid}").close()
        return None
    except zc.lockfile.LockError:
        pid = lock.read_text(errors="replace").strip() or "?"
        try:
            cmd = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split())  # one line
        except OSError:
            cmd = ""
        return f"pid {pid}" + (f" ({cmd[:100]})" if cmd else "")


def lock_timed_out(how: str, timeout: float, lock: Path = DVC_LOCK) -> DvcLockTimeout:
    return DvcLockTimeout(f"DVC's lock {lock} {how} for over {timeout:g} s; let it finish (or stop it), or wait "
                          f"longer: {LOCK_TIMEOUT_ENV}=<seconds>")


def wait_for_lock(deadline: float, timeout: float, lock: Path = DVC_LOCK) -> None:
    """Return once DVC's lock is free; say once on stderr who holds it; DvcLockTimeout past `deadline`."""
    import time

    said = False
    while (holder := dvc_lock_holder(lock)) is not None:
        if time.monotonic() >= deadline:
            raise lock_timed_out(f"is held by {holder}", timeout, lock)
        if not said:
            print(f"waiting for DVC's lock {lock}, held by {holder} (up to {timeout:g} s, {LOCK_TIMEOUT_ENV})",
                  file=sys.stderr, flush=True)
            said = True
        time.sleep(0.5)


def repro(*targets: str) -> None:
    """`dvc repro TARGETS` in a child process, waiting for DVC's workspace lock (see `run_dvc`)."""
    run_dvc("repro", *targets)


def commit(*stages: str) -> None:
    """`dvc commit -f STAGES`: record the outputs now in the workspace, and the deps and params they were made
    from, in dvc.lock (and the cache), as if `dvc repro` had just run those stages; waits for the lock as repro."""
    if stages:
        run_dvc("commit", "--force", *stages)


def run_dvc(*args: str) -> None:
    """`dvc ARGS` in a child process. DVC holds one lock per workspace and gives up on it after 3 s; this waits for
    it (NNLAB_DVC_LOCK_TIMEOUT seconds, default 600), saying whose it is, then fails in one line."""
    import time

    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)  # so the stages' `nnlab` command is found
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    timeout = lock_timeout()
    deadline = time.monotonic() + timeout
    while True:
        wait_for_lock(deadline, timeout)
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        if "Unable to acquire lock" not in proc.stdout + proc.stderr:
            raise RuntimeError(f"`dvc {' '.join(args)}` failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        if time.monotonic() >= deadline:  # (DVC configured with hardlink_lock: a lock this check cannot see)
            raise lock_timed_out("stayed taken", timeout)
        time.sleep(0.5)  # another DVC command took the lock between our look and DVC's own: wait again


def dvc_md5(out: str) -> str | None:
    """The md5 dvc.lock records for output `out` (None when not locked)."""
    lock = Path("dvc.lock")
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for o in stage.get("outs", []):
            if o.get("path") == out:
                return o.get("md5")
    return None


def _data_key(cfg: Config) -> dict:
    # the augment settings shape the data only when they write an offline training set
    offline = {"augment": cfg.augment.model_dump()} if cfg.augment.offline_copies else {}
    return {"seed": cfg.seed, "data": cfg.data.model_dump(), **offline}


def matches_params_yaml(cfg: Config, params_file: str | Path = "params.yaml") -> bool:
    try:
        base = load_config(params_file)
    except ConfigError:
        return False
    return _data_key(base) == _data_key(cfg)


def ensure_data(cfg: Config) -> tuple[Path, dict]:
    """Path of the prepared data for `cfg`, and facts to record about it (hashes, how it was obtained)."""
    offline = cfg.augment.offline_copies > 0
    if is_dvc_repo() and matches_params_yaml(cfg):
        repro("prepare", "augment")  # augment: the preview plot, and the offline copies when asked for
        out = AUGMENTED if offline else PROCESSED
        return out, {"nnlab.data_source": "dvc", "nnlab.dvc_md5": dvc_md5(str(out)) or "",
                     "nnlab.data_hash": content_hash(out)}
    out = VARIANTS / params_hash(_data_key(cfg))
    if _hash_or_none(out) is None:
        prepare(cfg.data, cfg.seed, out)
    if offline:
        if _hash_or_none(out / "augmented") is None:
            from tasks.augment import expand_offline  # torchvision: only when there are copies to make

            expand_offline(cfg.augment, out, out / "augmented", cfg.seed)
        out = out / "augmented"
    return out, {"nnlab.data_source": "variant", "nnlab.data_hash": content_hash(out)}


def _hash_or_none(out: Path) -> str | None:
    try:
        return content_hash(out)
    except Exception:
        return None

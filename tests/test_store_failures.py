"""A store that cannot be written: found before any work, or, when the disk fills mid-run, the run FAILED with the
reason, its partial artifacts removed, one line. Real file systems: a read-only and a tiny tmpfs mounted in a
private mount namespace (`unshare --user --map-root-user --mount`), so nothing outside the test sees them."""
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent
UNSHARE = shutil.which("unshare")


def can_mount() -> bool:
    if not UNSHARE:
        return False
    probe = subprocess.run([UNSHARE, "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="no private mount namespaces here (unshare --user --mount)")


def nnlab(*args, cwd, uri, mount: str | None = None, after: str = "true", timeout=300):
    """`nnlab ARGS` with MLflow's store at `uri`; `mount`: a shell command run first in a private mount namespace,
    `after`: one run there afterwards (what is mounted there is gone when the namespace ends)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [str(BIN / "nnlab"), *args]
    if mount:
        script = f'{mount} || exit 97; "$@"; rc=$?; {after}; exit $rc'
        cmd = [UNSHARE, "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *cmd]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "w"
    d.mkdir()
    shutil.copy(ROOT / "params.yaml", d / "params.yaml")
    return d


def test_a_store_under_a_regular_file_fails_at_once(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    d = workdir(tmp_path)
    started = time.monotonic()
    out = nnlab("run", "--models", "mlp", cwd=d, uri=f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}")
    assert out.returncode == 2, out.stdout + out.stderr
    assert time.monotonic() - started < 30  # before the server boots and the data is prepared (was 117 s)
    assert out.stderr.strip() == f"error: MLflow store: {tmp_path / 'afile'} is a file, not a folder; " \
                                 f"{tmp_path / 'afile'} cannot be created there"
    assert sorted(p.name for p in d.iterdir()) == ["params.yaml"]  # nothing written


@needs_mount
def test_a_read_only_store_fails_before_any_work(tmp_path):
    store = tmp_path / "ro"
    store.mkdir()
    d = workdir(tmp_path)
    out = nnlab("run", "--models", "mlp", cwd=d, uri=f"sqlite:///{store / 'mlflow.db'}",
                mount=f"mount -t tmpfs -o ro,size=1m tmpfs {store}")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == f"error: MLflow store: read-only: {store}", out.stderr
    assert "temporary Prefect server" not in out.stderr and not (d / "data").exists()


@needs_mount
@pytest.mark.slow
def test_a_disk_that_fills_mid_run_fails_the_run_in_one_line_and_leaves_no_partial_artifact(tmp_path):
    """A 24 MiB store and a model of 17 MB: training runs, logging the model fills the disk."""
    store = tmp_path / "small"
    store.mkdir()
    d = workdir(tmp_path)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    big = ["--set", "models.mlp.hidden=[2048,2048]", "--set", "train.epochs=1", "--set", "data.max_train=200"]
    prep = nnlab("stage", "prepare", *big, cwd=d, uri=uri)
    assert prep.returncode == 0, prep.stderr
    # the store lives only in the namespace: keep what the run leaves there by copying it out at the end
    keep = tmp_path / "after"
    out = nnlab("stage", "train", "--model", "mlp", *big, cwd=d, uri=uri,
                mount=f"mount -t tmpfs -o size=24m tmpfs {store}", after=f"cp -a {store} {keep}")
    err = out.stderr
    assert out.returncode == 1, out.stdout + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: disk full: ") and "FAILED" in lines[0], err
    assert "Traceback" not in err, err
    with sqlite3.connect(keep / "mlflow.db") as db:
        (run_id, status), = db.execute("select run_uuid, status from runs").fetchall()
        error = db.execute("select value from tags where run_uuid = ? and key = 'nnlab.error'", (run_id,)).fetchone()
        models = db.execute("select count(*) from logged_models where source_run_id = ? and lifecycle_stage = 'active'",
                            (run_id,)).fetchone()[0]
    assert status == "FAILED" and error[0].startswith("disk full: ")
    assert models == 0  # no orphan logged-model row
    leftovers = [p.relative_to(keep).as_posix() for p in (keep / "artifacts").rglob("*") if p.is_file()]
    assert not [p for p in leftovers if "/models/" in p or "/model/" in p or "/checkpoint/" in p], leftovers
    assert list((d / ".nnlab" / "checkpoints").glob("mlp-*.pt"))  # the last epoch's checkpoint is kept: resumable

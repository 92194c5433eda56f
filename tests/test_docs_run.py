"""Every ```bash command of README.md and docs/ runs as written, in the order a newcomer meets them, on a fresh copy
of the checkout (its tracked files, committed to a new git repository), with NNLAB_QUICK=100 (tasks/quick.py: one
epoch on 100 training examples, a sweep's first seed, no quality gates): the fast setting the README documents
for checking commands. A documented command that fails, or a documented mistake that does not fail as shown,
fails this test with its output.

`nnlab` commands run in this process (the CLI's app called with the command's words, `SystemExit` its exit
code): the seconds of importing torch, Prefect and MLflow once instead of once a command. `make`, `dvc` and
everything else run as programs, with the checkout's .venv/bin first on PATH. `make test` (the suite) and
`make test-docs` (this test) are not run again from inside it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import docs_commands as dc

pytestmark = [pytest.mark.docs_run, pytest.mark.slow]  # `make test-docs` (CI runs it after `make test`)
BIN = Path(sys.executable).parent
THIS_SUITE = (["make", "test"], ["make", "test-docs"])


@pytest.fixture()
def clone(tmp_path):
    """The checkout's tracked files in a new git repository with one commit (dvc exp reads git), its .venv
    linked (the Makefile's install stamp is kept: nothing is installed again)."""
    work = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=dc.ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for f in filter(None, files):
        if (dc.ROOT / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dc.ROOT / f, work / f)
    (work / ".venv").symlink_to(BIN.parent)
    git = ["git", "-c", "user.name=nnlab", "-c", "user.email=nnlab@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clone"]):
        subprocess.run(git + cmd, cwd=work, check=True, capture_output=True)
    return work


def run_nnlab(argv: list[str], env: dict[str, str]) -> int:
    """`nnlab <argv>` in this process; its exit code."""
    from flows.cli import app

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        app(args=argv, prog_name="nnlab")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return 0


def run_program(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **env, "PATH": path}, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def dvc_has_nothing_to_do(clone: Path) -> None:
    """After `make run` (the README's first command): the flow's trained models, evaluations, metrics and
    registration are the DVC stages' outputs, recorded in dvc.lock, so `dvc status` is clean and `dvc repro`
    would run nothing."""
    code, status = run_program(["dvc", "status"], {}, clone)
    assert code == 0 and "Data and pipelines are up to date." in status, status
    code, dry = run_program(["dvc", "repro", "--dry"], {}, clone)
    assert code == 0 and "Running stage" not in dry, dry
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert {"prepare", "augment", "train@mlp", "evaluate@mlp", "train@simple_cnn", "register"} <= set(lock)
    flow = clone / ".nnlab/runs/mlp"  # the stages' outputs are the flow's, as `nnlab stage` writes them
    assert (clone / "data/train/mlp/model.pt").read_bytes() == (flow / "train/model.pt").read_bytes()
    summary = json.loads((clone / "data/evaluate/mlp.json").read_text())
    assert summary == json.loads((flow / "evaluation.json").read_text()) and summary["name"] == "mlp"
    assert (clone / "metrics/mlp.json").read_text() == (flow / "metrics.json").read_text()
    assert json.loads((clone / "data/register.json").read_text())["registered"] is True


AFTER = {"make run": dvc_has_nothing_to_do}


def test_every_documented_command_runs_as_written_in_order(clone, monkeypatch, capfd):
    monkeypatch.chdir(clone)
    monkeypatch.setenv("NNLAB_QUICK", "100")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{clone / 'mlruns' / 'mlflow.db'}")
    cmds = [c for c in dc.doc_commands() if c.argv not in THIS_SUITE]
    assert len(cmds) > 60 and any(c.error for c in cmds)
    assert set(AFTER) <= {" ".join(c.argv) for c in cmds}  # the checks after a command never silently drop out
    took, seen = [], set()
    for c in cmds:
        key = (tuple(c.argv), tuple(sorted(c.env.items())))
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        if c.argv[0] == "nnlab":
            code = run_nnlab(c.argv[1:], c.env)
            out = capfd.readouterr()
            output = out.out + out.err
        else:
            code, output = run_program(c.argv, c.env, clone)
        took.append((time.perf_counter() - start, str(c)))
        if c.error:
            assert code == 2 and c.error.split("...")[0] in output, f"{c}: the docs show it failing\n{output}"
        else:
            assert code == 0, f"{c} exited {code}\n{output[-6000:]}"
        if check := AFTER.get(" ".join(c.argv)):
            check(clone)
    print("\n".join(f"{s:6.1f} s  {c}" for s, c in took))
    print(f"{sum(s for s, _ in took):6.1f} s  all {len(took)} commands")

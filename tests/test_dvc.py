"""`dvc repro` reproduces the pipeline stage by stage; a second repro does nothing; the flow shares the data."""
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, write_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(*cmd, cwd, check=True):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert out.returncode == 0, f"{cmd}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh copy of the pipeline: git init, dvc init, tiny models and 3 epochs."""
    d = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, d / name)
    for folder in ("tasks", "models"):
        shutil.copytree(ROOT / folder, d / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(d / "params.yaml", train={"epochs": 3},
                 models={"mlp": {"hidden": [64]}, "simple_cnn": {"filters": [8, 16], "dense": 32}},
                 register={"name": f"dvc-{uuid.uuid4().hex[:8]}"})
    sh("git", "init", "-q", cwd=d)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=d)
    shutil.copy(ROOT / ".dvc/config", d / ".dvc/config")  # the shipped settings: default remote `local`
    return d


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file the stages write (data/, metrics/, plots/), by path relative to `root`."""
    import hashlib

    files = (p for top in ("data", "metrics", "plots") for p in sorted((root / top).rglob("*")) if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_repro_then_nothing_to_do(repo):
    first = sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    for stage in ("prepare", "augment", "train@mlp", "train@simple_cnn", "evaluate@mlp", "evaluate@simple_cnn", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (repo / "data/processed/manifest.json").exists() and (repo / "metrics/mlp.json").exists()
    assert (repo / "plots/simple_cnn/test.png").exists()
    second = sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    metrics = sh(sys.executable, "-m", "dvc", "metrics", "show", cwd=repo)
    assert "metrics/mlp.json" in metrics.stdout and "test_accuracy" in metrics.stdout
    assert "failed" not in metrics.stdout + metrics.stderr and "model_uri" not in metrics.stdout  # numbers only
    assert "champion" in (repo / "data/register.json").read_text()
    sh(sys.executable, "-m", "dvc", "plots", "show", "-o", "dvc_plots", cwd=repo)
    html = (repo / "dvc_plots/index.html").read_text()
    assert "preview.png" in html  # the augmentation preview grid is a DVC plot
    assert "history.png" in html  # the learning curves as an image: they render offline
    assert (repo / "data/augmented/augment.json").exists()


def test_push_then_a_clone_pulls_everything_and_has_nothing_to_reproduce(repo, tmp_path):
    dvc = (sys.executable, "-m", "dvc")
    git_commit = ("git", "-c", "user.name=nnlab-test", "-c", "user.email=nnlab-test@localhost", "commit", "-q")
    remote = Path(sh(*dvc, "remote", "list", cwd=repo).stdout.split()[1])
    assert remote == repo.parent / "nnlab-dvc-remote"  # the shipped default: a folder beside the checkout
    sh(*dvc, "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh(*git_commit, "-m", "pipeline and dvc.lock", cwd=repo)
    sh(*dvc, "push", cwd=repo)
    clone = tmp_path / "elsewhere" / "nnlab"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sh(*dvc, "remote", "modify", "--local", "local", "url", str(remote), cwd=clone)
    sh(*dvc, "pull", cwd=clone)
    assert hashes(clone) == hashes(repo)  # data, checkpoints, metrics and plots, byte for byte
    assert "Data and pipelines are up to date." in sh(*dvc, "status", cwd=clone).stdout
    assert "Running stage" not in sh(*dvc, "repro", cwd=clone).stdout
    assert sh("git", "status", "--porcelain", cwd=clone).stdout == ""  # pulled outputs and config.local: ignored


def test_changing_one_model_reruns_only_its_stages(repo):
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    params = (repo / "params.yaml").read_text().replace("- 64", "- 48")
    (repo / "params.yaml").write_text(params)
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=repo).stdout
    assert "Running stage 'train@mlp'" in out and "Running stage 'evaluate@mlp'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'train@simple_cnn'" not in out


def test_code_deps_are_folders_editing_a_kind_never_touches_prepare(repo):
    """dvc.yaml names tasks/kinds and tasks/data as folders: an edit to any kind (here one neither model runs)
    changes train and evaluate, never prepare; an edit to a kind of data changes prepare."""
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    for path, changed, unchanged in (("tasks/kinds/speech.py", ("train@mlp", "evaluate@simple_cnn"), ("prepare:",)),
                                     ("tasks/data/points.py", ("prepare:",), ())):
        original = (repo / path).read_text()
        (repo / path).write_text(original + "\n# an edit\n")
        try:
            status = sh(sys.executable, "-m", "dvc", "status", cwd=repo).stdout
        finally:
            (repo / path).write_text(original)
        assert all(s in status for s in changed) and not any(s in status for s in unchanged), status
    assert "up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=repo).stdout


HOLD_LOCK = """
import sys
from dvc.repo import Repo
with Repo(".").lock:
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_dvc_lock_held_elsewhere_times_out_in_one_line(repo, monkeypatch):
    from tasks.dvc import DvcLockTimeout, repro

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK], cwd=repo, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(repo)
        monkeypatch.setenv("NNLAB_DVC_LOCK_TIMEOUT", "1")
        with pytest.raises(DvcLockTimeout, match=rf"held by pid {holder.pid} \(.*python.*\) for over 1 s"):
            repro("prepare")
    finally:
        holder.communicate("\n", timeout=30)


def test_flow_trains_on_dvc_data_and_keeps_overrides_apart(repo):
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    # another DVC command holds the workspace's lock: the run says whose and waits, then goes on
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK], cwd=repo, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cli = subprocess.Popen([str(BIN / "nnlab"), "run", "--models", "mlp"], cwd=repo, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        waited = next((line for line in cli.stderr if "waiting for DVC's lock" in line or "error:" in line), "")
        assert f"held by pid {holder.pid}" in waited, waited
    finally:
        holder.communicate("\n", timeout=30)
        out, err = cli.communicate(timeout=600)
    assert cli.returncode == 0, out[-3000:] + err[-3000:]
    assert "mlp" in out
    # params.yaml as it is: the flow's numbers and curves are what `dvc metrics show` / `dvc plots show` show
    flow_metrics = (repo / ".nnlab/runs/mlp/metrics.json").read_text()
    assert (repo / "metrics/mlp.json").read_text() == flow_metrics and "model_uri" not in flow_metrics
    shown = sh(sys.executable, "-m", "dvc", "metrics", "show", cwd=repo)
    assert "test_accuracy" in shown.stdout and "failed" not in shown.stdout + shown.stderr
    status = sh(sys.executable, "-m", "dvc", "status", cwd=repo).stdout
    assert "prepare" not in status and "train@" not in status  # the flow reproduced `prepare` through DVC
    before = (repo / "data/processed/manifest.json").read_text()
    sh(str(BIN / "nnlab"), "run", "--models", "mlp", "--set", "data.max_train=300", cwd=repo)
    assert (repo / "data/processed/manifest.json").read_text() == before  # overrides never touch DVC's data
    assert (repo / "metrics/mlp.json").read_text() == flow_metrics  # ... nor its metrics
    variants = list((repo / "data/variants").glob("*/manifest.json"))
    assert len(variants) == 1 and '"max_train": 300' in variants[0].read_text()


def test_offline_augmented_copies_are_a_dvc_output_and_what_training_reads(repo):
    # last in the module: switching the copies back off leaves train@mlp to re-run, which no later repro pays for
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    params = (repo / "params.yaml").read_text().replace("offline_copies: 0", "offline_copies: 1")
    (repo / "params.yaml").write_text(params)
    out = sh(sys.executable, "-m", "dvc", "repro", "evaluate@mlp", cwd=repo).stdout  # upstream of it only
    assert "Running stage 'augment'" in out and "Running stage 'train@mlp'" in out
    assert "Running stage 'prepare'" not in out
    import json

    aug = json.loads((repo / "data/augmented/manifest.json").read_text())
    base = json.loads((repo / "data/processed/manifest.json").read_text())
    assert aug["sizes"]["train"] == 2 * base["sizes"]["train"]
    import torch

    trained = torch.load(repo / "data/train/mlp/model.pt", weights_only=False)
    assert trained["data_hash"] == aug["data_hash"] != base["data_hash"]  # training read the expanded set
    (repo / "params.yaml").write_text(params.replace("offline_copies: 1", "offline_copies: 0"))

"""`nnlab run` of params.yaml as it is, in a DVC repository, leaves DVC's view complete: the flow's trained models,
evaluations, metrics, plots and registration are the train@, evaluate@ and register stages' outputs, recorded in
dvc.lock, so `dvc status` is clean and `dvc repro` has nothing to run."""
import json
import shutil
import sys
import uuid

import pytest
import yaml

from conftest import ROOT, write_params
from test_dvc import BIN, sh

pytestmark = pytest.mark.slow
DVC = (sys.executable, "-m", "dvc")


@pytest.fixture
def repo(tmp_path):
    """The pipeline in a fresh git + DVC repository (as tests/test_dvc.py sets it up): one tiny run, 1 epoch."""
    d = tmp_path / "repo"
    d.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, d / name)
    for folder in ("tasks", "models"):
        shutil.copytree(ROOT / folder, d / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(d / "params.yaml", train={"epochs": 1}, models={"mlp": {"hidden": [16]}},
                 register={"name": f"dvcstate-{uuid.uuid4().hex[:8]}"})
    sh("git", "init", "-q", cwd=d)
    sh(*DVC, "init", "-q", cwd=d)
    shutil.copy(ROOT / ".dvc/config", d / ".dvc/config")
    return d


def test_run_of_params_yaml_leaves_dvc_nothing_to_do(repo):
    out = sh(str(BIN / "nnlab"), "run", cwd=repo)
    assert "mlp" in out.stdout
    status = sh(*DVC, "status", cwd=repo).stdout
    assert "Data and pipelines are up to date." in status, status
    dry = sh(*DVC, "repro", "--dry", cwd=repo).stdout
    assert "Running stage" not in dry, dry
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"prepare", "augment", "train@mlp", "evaluate@mlp", "register"} <= set(lock)
    # the stages' outputs are the flow's, as `nnlab stage` writes them
    flow = repo / ".nnlab/runs/mlp"
    assert (repo / "data/train/mlp/model.pt").read_bytes() == (flow / "train/model.pt").read_bytes()
    summary = json.loads((repo / "data/evaluate/mlp.json").read_text())
    assert summary == json.loads((flow / "evaluation.json").read_text()) and summary["name"] == "mlp"
    assert (repo / "metrics/mlp.json").read_text() == (flow / "metrics.json").read_text()
    registered = json.loads((repo / "data/register.json").read_text())
    assert registered["registered"] is True and registered["run_id"] == summary["run_id"]

"""The experiment flow end to end on digits, against a temp MLflow store and a temp Prefect server."""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_params

pytestmark = pytest.mark.slow
NNLAB = str(Path(sys.executable).parent / "nnlab")
SMALL = {"mlp": {"hidden": [64], "dropout": 0.0}, "simple_cnn": {"filters": [8, 16], "dense": 32}}


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_flow_trains_tracks_and_registers(project, prefect_harness):
    from flows.experiment import experiment

    name = f"clf-{uuid.uuid4().hex[:8]}"
    write_params(project / "params.yaml", train={"epochs": 6}, models=SMALL, register={"name": name})
    summary = experiment("params.yaml")
    assert {r["name"] for r in summary["results"]} == {"mlp", "simple_cnn"} and not summary["failed"]
    assert all(r["test_accuracy"] > 0.8 for r in summary["results"]), summary["results"]

    c = client()
    for r in summary["results"]:
        run = c.get_run(r["run_id"])
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["nnlab.model"] == r["name"] and tags["nnlab.dataset"] == "digits"
        assert run.info.run_name == f"{r['name']} · digits"  # params.yaml as it is: no overrides to show
        assert tags["nnlab.family"] == {"mlp": "mlp", "simple_cnn": "cnn"}[r["name"]]
        for t in ("nnlab.git_commit", "nnlab.data_hash", "nnlab.params_hash"):
            assert tags[t]
        assert tags["nnlab.data_hash"] == summary["nnlab.data_hash"]
        assert run.data.params["train.epochs"] == "6" and run.data.params["data.source"] == "digits"
        assert f"models.{r['name']}.arch" in run.data.params
        for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4, 5, 6]
        assert run.data.metrics["test_accuracy"] == pytest.approx(r["test_accuracy"])
        assert len(c.get_metric_history(run.info.run_id, "health/grad_norm")) >= 2  # diagnostics, every 25 steps
        assert tags["nnlab.health.vanishing"] == "false" and tags["nnlab.health.exploding"] == "false"
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/learning_curve.png", "plots/confusion_matrix.png"} <= arts
        assert c.list_artifacts(run.info.run_id, "data")[0].path == "data/manifest.json"
        assert run.data.params["model.arch"] == r["name"]  # the options under one prefix, for cross-model charts
        assert run.inputs.dataset_inputs[0].dataset.name == "digits"
        # the Prefect task run that trained it links back to this MLflow run (its Artifacts tab)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId

        with get_client(sync_client=True) as pc:
            links = pc.read_artifacts(artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(
                any_=[tags["nnlab.prefect_task_run_id"]])))
        assert len(links) == 1
        assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in str(links[0].data)

    # the better run is the champion, and it predicts on raw inputs
    best = max(summary["results"], key=lambda r: r["test_accuracy"])
    champ = c.get_model_version_by_alias(name, "champion")
    assert champ.run_id == best["run_id"] and summary["registered"]["alias"] == "champion"
    import mlflow.pyfunc
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = d.images[:200, None].astype(np.float32)  # raw 0..16 pixel values, as the dataset ships them
    probs = np.asarray(mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(raw))
    assert probs.shape == (200, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (probs.argmax(1) == d.target[:200]).mean() > 0.85

    # a worse run (1 epoch: better than the majority class, worse than the champion) becomes the challenger
    worse = experiment("params.yaml", ["train.epochs=1"], ["mlp"])
    assert worse["registered"]["alias"] == "challenger"
    assert c.get_model_version_by_alias(name, "champion").version == champ.version
    assert c.get_model_version_by_alias(name, "challenger").run_id == worse["results"][0]["run_id"]


def test_failing_architecture_does_not_lose_the_others(project, prefect_harness):
    from flows.experiment import ExperimentFailed, experiment

    name = f"clf-{uuid.uuid4().hex[:8]}"
    # `diverging` is an mlp with its own training settings: sgd at lr 10 goes NaN in its first epoch
    models = {"diverging": {"arch": "mlp", "activation": "leaky_relu", "train": {"optimizer": "sgd", "lr": 10.0}},
              **SMALL}
    write_params(project / "params.yaml", train={"epochs": 2}, models=models, register={"name": name})
    with pytest.raises(ExperimentFailed) as e:
        experiment("params.yaml")
    s = e.value.summary
    assert [f["name"] for f in s["failed"]] == ["diverging"] and "epoch 1, step" in s["failed"][0]["error"]
    assert {r["name"] for r in s["results"]} == {"mlp", "simple_cnn"}  # trained after the failure, not lost
    assert s["registered"]["alias"] == "champion"
    run_id = s["failed"][0]["error"].split("MLflow run ")[1].rstrip(")")
    run = client().get_run(run_id)
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["nnlab.error"]
    assert run.data.params["train.lr"] == "10.0" and run.data.params["models.diverging.train.lr"] == "10.0"


def test_cli_run_exits_nonzero_on_failure(project):
    """(A successful `nnlab run`'s summary: the uninterrupted run of test_killed_run_resumes_into_the_same_mlflow_run.)"""
    write_params(project / "params.yaml", train={"epochs": 1}, models={"mlp": {"hidden": [32]}},
                 register={"name": f"clf-{uuid.uuid4().hex[:8]}"})
    bad = subprocess.run([NNLAB, "run", "--set", "train.optimizer=sgd", "--set", "train.lr=10",
                          "--set", "models.mlp.hidden=[256, 128]", "--set", "models.mlp.activation=leaky_relu"],
                         cwd=project,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "failed" in bad.stdout and "non-finite" in bad.stdout


def _checkpoint_epoch(folder: Path) -> int:
    for p in folder.glob("*.pt"):
        try:
            return torch.load(p, weights_only=False)["trainer"]["epoch"]
        except Exception:  # being replaced right now
            return 0
    return 0


def test_killed_run_resumes_into_the_same_mlflow_run(tmp_path):
    sets = ["--set", "train.epochs=4", "--set", "train.batch_size=2", "--set", "register.enabled=false",
            "--set", "models.simple_cnn.dropout=0.3", "--set", "data.max_train=400"]  # ~200 steps an epoch
    runs = {}
    for label in ("killed", "straight"):
        d = tmp_path / label
        d.mkdir()
        write_params(d / "params.yaml", models={"simple_cnn": SMALL["simple_cnn"]})
        runs[label] = d

    # 1. start, wait for the epoch-2 checkpoint, kill -9
    p = subprocess.Popen([NNLAB, "run", *sets], cwd=runs["killed"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    deadline = time.time() + 240
    while _checkpoint_epoch(runs["killed"] / ".nnlab" / "checkpoints") < 2:
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    ckpt = next((runs["killed"] / ".nnlab" / "checkpoints").glob("*.pt"))
    run_id = torch.load(ckpt, weights_only=False)["run_id"]
    assert client().get_run(run_id).info.status == "RUNNING"  # killed: nobody marked it

    # 2. the same command resumes it
    resumed = subprocess.run([NNLAB, "run", *sets], cwd=runs["killed"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming MLflow run {run_id}" in resumed.stdout
    assert run_id in resumed.stdout and not list((runs["killed"] / ".nnlab" / "checkpoints").glob("*.pt"))

    # 3. an uninterrupted run of the same params ends with the same metrics
    straight = subprocess.run([NNLAB, "run", *sets], cwd=runs["straight"], capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # the summary a user reads: the architecture, its test metric, where to look; no traceback anywhere
    assert "simple_cnn" in straight.stdout and "test accuracy" in straight.stdout and "nnlab ui" in straight.stdout
    assert "Traceback" not in straight.stdout + straight.stderr
    c = client()
    other = [r for r in c.search_runs([c.get_run(run_id).info.experiment_id], "tags.`nnlab.model` = 'simple_cnn'",
                                      order_by=["attributes.start_time DESC"], max_results=1)][0]
    assert other.info.run_id != run_id
    a, b = c.get_run(run_id), other
    assert a.info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_accuracy"):
        ha = [(m.step, m.value) for m in c.get_metric_history(run_id, key)]
        hb = [(m.step, m.value) for m in c.get_metric_history(b.info.run_id, key)]
        assert sorted(ha) == sorted(hb) and [s for s, _ in sorted(ha)] == [1, 2, 3, 4]
    assert a.data.metrics["test_accuracy"] == b.data.metrics["test_accuracy"]

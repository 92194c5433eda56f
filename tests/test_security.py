"""Whoever can write to a shared store must not run code where nnlab loads a model: planted pickles in the
logged model, the run's checkpoint or a resume checkpoint are never unpickled."""
import os
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import validate
from tasks.data import prepare
from tasks.files import UnsafeCheckpoint, load_torch, save_torch


class Planted:
    """Unpickling this runs a shell command: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    torch.save({"model": Planted(marker), "arch": "mlp"}, path)


def test_checkpoints_round_trip_as_plain_data_and_refuse_planted_pickles(tmp_path):
    import numpy as np

    state = {"w": torch.ones(2), "rng": ("MT19937", np.arange(4, dtype=np.uint32), 3, 0, 0.0),
             "score": np.float64(0.5), "history": [{"loss": np.float32(1.5)}]}
    save_torch(tmp_path / "ok.pt", state)
    back = load_torch(tmp_path / "ok.pt")
    assert back["score"] == 0.5 and back["history"][0]["loss"] == 1.5 and back["rng"][1].tolist() == [0, 1, 2, 3]
    marker = tmp_path / "pwned"
    plant(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match="refused to load"):
        load_torch(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A text classifier trained briefly (enough to beat the majority class), logged (MLflow's pickle format: token
    ids) and registered."""
    from tasks.stages import evaluate_stage, register_stage, train_stage

    from test_text import write_reviews

    work = tmp_path_factory.mktemp("sec")
    old = Path.cwd()
    os.chdir(work)
    try:
        path = write_reviews(work / "r.csv", n=200)
        name = f"sec-{uuid.uuid4().hex[:6]}"
        cfg = validate({"data": {"source": "text_csv", "path": str(path), "text_column": "review",
                                 "label_column": "sentiment", "max_length": 20},
                        "train": {"epochs": 4, "lr": 0.01, "device": "cpu", "diagnostics": {"enabled": False}},
                        "register": {"name": name}, "models": {"lstm": {"hidden": 16, "embedding_dim": 16}}})
        prepare(cfg.data, 0, work / "d")
        trained = train_stage(cfg, "lstm", work / "d", work / "out")
        r = evaluate_stage(cfg, "lstm", work / "d", work / "out", work / "m.json", work / "p")
        assert register_stage(cfg, [r], None)["alias"] == "champion", r
    finally:
        os.chdir(old)
    return work, name, trained


def _artifact_dir(run_id: str) -> Path:
    from tasks.tracking import client

    return Path(client().get_run(run_id).info.artifact_uri.removeprefix("file://"))


def test_a_pickle_planted_in_the_logged_model_never_runs(registered, tmp_path):
    work, name, trained = registered
    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent
    weights = [p for p in store.rglob("*") if p.is_file() and p.name in ("model.pth", "model.pt2")
               and trained.model_uri.split("/")[-1] in str(p)]
    assert weights, "the logged model's weights file was not found in the store"
    marker = tmp_path / "pwned"
    for p in weights:  # what the probe did: the registered model's data replaced by a pickle that runs code
        plant(p, marker)
    out = CliRunner().invoke(app, ["predict", f"models:/{name}@champion", "-t", "a superb film"])
    assert out.exit_code == 0, out.output  # served from the run's weights-only checkpoint instead
    assert not marker.exists()
    assert [line.split()[0] for line in out.output.splitlines() if "\t" in line][0] in ("neg", "pos")


def test_a_pickle_planted_as_the_runs_checkpoint_is_refused(registered, tmp_path):
    work, name, trained = registered
    ckpt = _artifact_dir(trained.run_id) / "checkpoint" / "model.pt"
    assert ckpt.is_file()
    original = ckpt.read_bytes()
    marker = tmp_path / "pwned"
    try:
        plant(ckpt, marker)
        out = CliRunner().invoke(app, ["predict", f"models:/{name}@champion", "-t", "a superb film"])
        assert out.exit_code == 2 and "refused to load" in out.output, out.output
        from tasks.registration import load_checkpoint  # transfer bases and GAN judges load the same way

        with pytest.raises(UnsafeCheckpoint):
            load_checkpoint(f"models:/{name}@champion")
        assert not marker.exists()
    finally:
        ckpt.write_bytes(original)

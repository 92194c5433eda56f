"""GANs through the pipeline: ring8 data, the train and evaluate stages (MLflow run, sample grids, coverage and
Frechet distance, the mode-collapse tag), registration as `nnlab-generator`, resume, `nnlab sample`."""
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config import validate
from tasks.kinds import main_metric, register_name
from tasks.data import load_prepared, prepare

NNLAB = str(Path(sys.executable).parent / "nnlab")


def test_ring8_prepare_and_the_gan_metric_choice(tmp_path):
    cfg = validate({"data": {"source": "ring8", "ring8_size": 800}, "models": {"gan_mlp": {}}})
    m = prepare(cfg.data, 0, tmp_path)
    d = load_prepared(tmp_path)
    assert d.x_train.shape[1:] == (2,) and d.x_train.dtype == np.float32 and m["task"] == "generation"
    radius = np.linalg.norm(d.x_train, axis=1)
    assert abs(radius.mean() - 2.0) < 0.01 and len(m["ring8"]["centers"]) == 8
    assert main_metric(cfg) == "mode_overlap" and register_name(cfg) == "nnlab-generator-ring8"
    images = validate({"data": {"source": "digits"}, "models": {"dcgan": {}, "g2": {"arch": "wgan_gp"}}})
    assert main_metric(images) == "classifier_fid"
    mixed = validate({"models": {"dcgan": {}, "mlp": {}}})  # a GAN beside a classifier: the classifier's rules
    assert main_metric(mixed) == "test_accuracy" and register_name(mixed) == "nnlab-classifier-digits"


@pytest.mark.slow
def test_dcgan_on_digits_covers_the_classes_and_registers_a_generator(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tasks.stages import evaluate_stage, register_stage, train_stage
    from tasks.tracking import client

    name = f"gen-{uuid.uuid4().hex[:6]}"
    cfg = validate({"data": {"source": "digits"}, "train": {"epochs": 6, "lr": 0.0002, "device": "cpu"},
                    "register": {"name": name}, "models": {"dcgan": {"channels": 32}}})
    prepare(cfg.data, 0, "d")
    trained = train_stage(cfg, "dcgan", "d", "out")
    r = evaluate_stage(cfg, "dcgan", "d", "out", "m.json", "p")
    assert r["class_coverage"] >= 8, r  # the classifier sees at least 8 of the 10 digits among the samples
    assert 0 < r["classifier_fid"] and r["label_entropy"] > 0.8 * np.log(10) and not r["mode_collapse"]

    run = client().get_run(trained.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["nnlab.family"] == "gan"
    assert run.data.tags["nnlab.health.mode_collapse"] == "false" and "simple_cnn" in run.data.tags["nnlab.gan.judge"]
    for key in ("d_loss", "g_loss", "d_real", "d_fake"):
        assert len(client().get_metric_history(trained.run_id, key)) == 6
    arts = {a.path for a in client().list_artifacts(trained.run_id, "samples")}
    assert len(arts) == 6  # a grid per epoch (up to 8 over a run)
    plots = {a.path for a in client().list_artifacts(trained.run_id, "plots")}
    assert {"plots/samples_evolution.png", "plots/samples.png", "plots/learning_curve.png"} <= plots

    out = register_stage(cfg, [r], None)
    assert out["name"] == name and out["alias"] == "champion"
    worse = register_stage(cfg, [{**r, "classifier_fid": r["classifier_fid"] + 10}], None)
    assert worse["alias"] == "challenger"  # a larger distance never takes the champion's place
    png = tmp_path / "grid.png"
    done = subprocess.run([NNLAB, "sample", "--model", f"models:/{name}@champion", "-n", "16", "-o", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert png.stat().st_size > 1000
    bad = subprocess.run([NNLAB, "sample", "--model", f"models:/{name}-nope@champion"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "no registered model" in bad.stderr


def test_an_interrupted_gan_run_resumes_into_the_same_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tasks import train
    from tasks.stages import train_stage
    from tasks.tracking import client

    cfg = validate({"data": {"source": "ring8", "ring8_size": 600}, "train": {"epochs": 4, "device": "cpu",
                                                                              "batch_size": 128},
                    "models": {"gan_mlp": {"hidden": [32, 32], "latent_dim": 4}}})
    prepare(cfg.data, 0, "d")
    real_epoch = train.Trainer.train_one_epoch

    def crash_in_epoch_3(self, data, progress=None):
        if self.epoch == 2:
            raise KeyboardInterrupt  # as a kill would, after two checkpoints
        return real_epoch(self, data, progress)

    monkeypatch.setattr(train.Trainer, "train_one_epoch", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, "gan_mlp", "d", "out")
    monkeypatch.setattr(train.Trainer, "train_one_epoch", real_epoch)
    trained = train_stage(cfg, "gan_mlp", "d", "out")
    assert trained.resumed and trained.epochs == 4
    steps = sorted(m.step for m in client().get_metric_history(trained.run_id, "d_loss"))
    assert steps == [1, 2, 3, 4]  # one MLflow run, every epoch once
    final = torch.load(tmp_path / "out" / "model.pt", weights_only=False)
    assert len(final["history"]) == 4 and final["run_id"] == trained.run_id

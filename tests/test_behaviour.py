"""The one loop and one run lifecycle reproduce, number for number, what the separate supervised and GAN
trainers and stages measured before they were merged. tests/reference_metrics.json was written by that older
code (commit 1ee3ba0) with the same params, data and seed; the runs here are the same four."""
import json
from pathlib import Path

import pytest
import torch

from tasks.config import validate
from tasks.data import prepare

REFERENCE = json.loads((Path(__file__).parent / "reference_metrics.json").read_text())
CASES = {  # run -> (data, train, models): small, so each trains in about a second
    "mlp": ({"source": "digits"}, {"epochs": 2}, {"mlp": {"hidden": [64], "dropout": 0.1}}),
    "simple_cnn": ({"source": "digits"}, {"epochs": 1}, {"simple_cnn": {"filters": [8, 16], "dense": 16}}),
    "lstm": ({"source": "sunspots"}, {"epochs": 2}, {"lstm": {"hidden": 16}}),
    "gan_mlp": ({"source": "ring8", "ring8_size": 600}, {"epochs": 2, "batch_size": 128},
                {"gan_mlp": {"hidden": [32, 32], "latent_dim": 4}}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_metrics_as_before_the_merge(name, tmp_path, monkeypatch):
    from tasks.stages import evaluate_stage, train_stage

    monkeypatch.chdir(tmp_path)
    data, train, models = CASES[name]
    cfg = validate({"data": data, "train": {"device": "cpu", **train}, "models": models})
    prepare(cfg.data, cfg.seed, "d")
    train_stage(cfg, name, "d", "t")
    got = evaluate_stage(cfg, name, "d", "t", "m.json", "p")
    history = torch.load("t/model.pt", weights_only=False)["history"]
    want = REFERENCE[name]
    # bit-identical on the machine that recorded them; the tolerance only absorbs another CPU's kernels
    close = lambda v: pytest.approx(v, rel=1e-5, abs=1e-7)  # noqa: E731
    assert len(history) == len(want["history"])
    for epoch, (h, w) in enumerate(zip(history, want["history"]), 1):
        assert {k: h[k] for k in w} == {k: close(v) for k, v in w.items()}, f"epoch {epoch}"
    assert {k: got[k] for k in want["metrics"]} == {k: close(v) for k, v in want["metrics"].items()}

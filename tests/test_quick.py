"""NNLAB_QUICK (tasks/quick.py): one epoch on a few training examples whatever the settings say, a sweep's first
seed, registration without its quality gates, a store apart; a value that is not allowed is exit 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config, read_yaml
from tasks.quick import banner
from tasks.registration import champion_blockers
from tasks.sweep import fold_sets, load_spec
from tasks.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[1]
NNLAB = str(Path(sys.executable).parent / "nnlab")


def test_every_run_trains_one_epoch_on_few_examples_whatever_the_settings_say(monkeypatch):
    monkeypatch.setenv("NNLAB_QUICK", "1")
    cfg = load_config(ROOT / "params.yaml", ["train.epochs=50"])
    assert len(cfg.models) > 20 and {n: cfg.train_for(n).epochs for n in cfg.models} == {n: 1 for n in cfg.models}
    own = load_config(ROOT / "params.yaml", ["data.source=dates", "models.seq2seq.train.epochs=30"], ["seq2seq"])
    assert own.train_for("seq2seq").epochs == 1
    assert (cfg.data.max_train, cfg.data.utterances, cfg.data.ring8_size) == (200, 300, 1000)
    small = load_config(ROOT / "params.yaml", ["data.max_train=50", "data.utterances=60"], ["mlp"])
    assert (small.data.max_train, small.data.utterances) == (50, 60)  # what is already smaller stays
    monkeypatch.setenv("NNLAB_QUICK", "40")
    assert load_config(ROOT / "params.yaml", [], ["mlp"]).data.max_train == 40
    monkeypatch.setenv("NNLAB_QUICK", "0")
    off = load_config(ROOT / "params.yaml", ["data.source=dates"], ["seq2seq"])
    assert off.train_for("seq2seq").epochs > 1 and off.data.max_train is None and banner() is None


@pytest.mark.parametrize("value", ["yes", "5", "-1"])
def test_a_quick_value_that_is_not_allowed_is_refused_before_anything_runs(value, tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_QUICK", value)
    with pytest.raises(ConfigError, match=f"NNLAB_QUICK='{value}': expected 1"):
        load_config(ROOT / "params.yaml")
    if value == "yes":  # the command line: exit 2, one line, nothing written
        out = subprocess.run([NNLAB, "run", "--params", str(ROOT / "params.yaml")], cwd=tmp_path,
                             capture_output=True, text=True, env={**os.environ, "NNLAB_QUICK": value})
        assert out.returncode == 2 and "NNLAB_QUICK='yes'" in out.stderr and "Traceback" not in out.stderr
        assert list(tmp_path.iterdir()) == []


def test_a_quick_sweep_keeps_every_cell_of_its_first_seed_and_a_search_two_trials(monkeypatch):
    monkeypatch.setenv("NNLAB_QUICK", "1")
    raw = read_yaml(ROOT / "params.yaml")
    grid = fold_sets(load_spec(ROOT / "sweeps/optimizers.yaml", raw).model_dump(), [])
    assert grid["grid"]["seed"] == [0] and len(grid["grid"]["optimizer"]) == 5
    search = fold_sets(load_spec(ROOT / "sweeps/search_mlp.yaml", raw).model_dump(), [])
    assert search["seeds"] == [0] and search["stop"]["trials"] == 2 == search["search"]["trials"]
    assert search["prune"] is None


def test_quick_runs_keep_a_store_apart_and_register_without_the_gates(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    collapsed = {"health": ["mode_collapse"]}
    assert tracking_uri().endswith("/mlruns/mlflow.db") and champion_blockers(collapsed) == ["mode_collapse"]
    monkeypatch.setenv("NNLAB_QUICK", "1")
    assert tracking_uri().endswith("/mlruns/quick/mlflow.db") and champion_blockers(collapsed) == []
    assert "mlruns/quick/" in banner()

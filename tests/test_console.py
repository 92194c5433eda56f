"""What a run prints: its own progress off a terminal (a line per epoch, and within a long epoch), and none of
Prefect's or MLflow's chatter that is not about the user's run."""
from __future__ import annotations

import logging

from flows import console
from tasks import progress


def test_off_a_terminal_a_long_epoch_prints_how_far_it_got(capsys, monkeypatch):
    monkeypatch.setattr(progress, "QUIET_LINE_SECONDS", 0.0)  # every step is "long enough" since the last line
    p = progress.EpochProgress("mlp", epochs=3, start_epoch=1, live=False)
    for i in range(1, 5):
        p.step(i, 4)
    p.epoch_end(2, {"train_loss": 0.5, "epoch_seconds": 1.0})
    p.step(1, 4)
    p.step(2, 4)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [l for l in lines if "step" in l][:2]
    assert lines[0].startswith("mlp epoch 2/3  step 2/4") and lines[1].startswith("mlp epoch 2/3  step 3/4")
    assert lines[2].startswith("mlp epoch 2/3  train_loss=0.5000")
    assert lines[3].startswith("mlp epoch 3/3  step 2/4") and len(lines) == 4  # the last step: the epoch's line


def test_off_a_terminal_short_epochs_print_one_line_each(capsys):
    p = progress.EpochProgress("cnn", epochs=2, live=False)
    for epoch in (1, 2):
        for i in range(1, 50):
            p.step(i, 49)
        p.epoch_end(epoch, {"val_loss": 0.25})
    assert [l.split("  ")[0] for l in capsys.readouterr().out.splitlines()] == ["cnn epoch 1/2", "cnn epoch 2/2"]


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_prefect_info_lines_stay_off_the_terminal_unless_asked(monkeypatch):
    f = console.HideExplained()
    monkeypatch.delenv("NNLAB_SHOW_PREFECT_LINKS", raising=False)
    monkeypatch.setattr(console, "TEMPORARY_API", ["http://127.0.0.1:4321/api"])
    begun = _record("prefect.flow_runs", logging.INFO, "Beginning flow run 'nnlab run · mlp' for flow 'x'")
    assert not f.filter(begun)
    assert not f.filter(_record("prefect.flow_runs", logging.INFO, "View at http://127.0.0.1:4321/runs/flow-run/1"))
    assert f.filter(_record("prefect.flow_runs", logging.WARNING, "Retrying"))  # warnings stay
    assert f.filter(_record("tasks.anything", logging.INFO, "ours"))
    monkeypatch.setattr(console, "TEMPORARY_API", [])  # the user's own server: its UI link is worth a line
    assert f.filter(_record("prefect.flow_runs", logging.INFO, "View at http://prefect.lab:4200/runs/flow-run/1"))
    monkeypatch.setenv("NNLAB_SHOW_PREFECT_LINKS", "1")
    assert f.filter(begun)


def test_mlflow_chatter_is_filtered_and_the_rest_kept():
    f = console.HideLibraryChatter()
    assert not f.filter(_record("mlflow.pytorch", logging.WARNING, "Saving pytorch model by Pickle or CloudPickle "
                                                                  "format requires exercising caution"))
    assert not f.filter(_record("mlflow.store.db.utils", logging.INFO, "Creating initial MLflow database tables..."))
    assert f.filter(_record("mlflow.tracking", logging.WARNING, "Failed to log the model signature"))
    assert f.filter(_record("mlflow.pytorch", logging.ERROR, "Saving pytorch model by Pickle failed"))

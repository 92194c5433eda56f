"""A registered model's champion history and rollback (tasks/champions.py, `nnlab models history|rollback`): three
registrations and one rollback give four moves in order with their reasons, rebuilt by a fresh process from the
store alone; `translate` on @champion then answers with the rolled-back version; bad names and versions exit 2."""
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from tasks.config import validate
from tasks.data import prepare

NNLAB = str(Path(sys.executable).parent / "nnlab")


def test_three_registrations_and_a_rollback_make_four_moves_and_predict_follows(tmp_path, monkeypatch):
    from tasks.registration import register_version
    from tasks.stages import evaluate_stage, train_stage

    monkeypatch.chdir(tmp_path)
    cfg = validate({"data": {"source": "dates", "max_train": 300}, "train": {"epochs": 1, "device": "cpu"},
                    "models": {"seq2seq": {"hidden": 16, "embedding_dim": 8, "attention_dim": 8}}})
    prepare(cfg.data, 0, "d")
    train_stage(cfg, "seq2seq", "d", "out")
    summary = evaluate_stage(cfg, "seq2seq", "d", "out", "m.json", "p")
    name = f"champ-{uuid.uuid4().hex[:8]}"
    outcomes = [register_version(name, summary["model_uri"], score, 0.0, {"nnlab.metric": "test_bleu"})
                for score in (0.70, 0.80, 0.75)]  # champion, champion, challenger
    assert [o["alias"] for o in outcomes] == ["champion", "champion", "challenger"]

    cli = CliRunner()
    res = cli.invoke(app, ["models", "rollback", name, "--to", "1", "-m", "v2 misreads sevens"])
    assert res.exit_code == 0 and f"{name}: champion is v1 again (was v2)" in res.stdout, res.output

    fresh = subprocess.run([NNLAB, "models", "history", name, "--json"], capture_output=True, text=True,
                           timeout=120, env=os.environ.copy())  # rebuilt from the store alone
    assert fresh.returncode == 0, fresh.stderr
    moves = [json.loads(line) for line in fresh.stdout.splitlines()]
    assert [(m["event"], m["version"], m["alias"]) for m in moves] == [
        ("registered", 1, "champion"), ("registered", 2, "champion"), ("registered", 3, "challenger"),
        ("rollback", 1, "champion")]
    assert moves[0]["reason"] == "first version: champion" and "vs champion v1 0.7000" in moves[1]["reason"]
    assert moves[2]["score"] == 0.75 and moves[2]["previous_champion_score"] == 0.80
    assert moves[3]["reason"].endswith(": v2 misreads sevens") and moves[3]["previous_champion"] == 2
    assert [m["time_ms"] for m in moves] == sorted(m["time_ms"] for m in moves)

    table = cli.invoke(app, ["models", "history", name])
    assert table.exit_code == 0 and "rollback" in table.stdout and "v1 ★" in table.stdout, table.output

    res = cli.invoke(app, ["translate", f"models:/{name}@champion", "-t", "7. März 2021"])
    assert res.exit_code == 0, res.output
    assert f"answered by {name} v1 (champion), run {summary['run_id']}" in res.stderr

    # the store is a local SQLite one: the version's files were read as files, without MLflow
    # (tasks/store_reader.py); through MLflow's client the same model, vocabulary, metadata and origin
    import torch

    from tasks import store_reader
    from tasks.serving import load_serving

    ref = f"models:/{name}@champion"
    assert store_reader.local_model(ref).uri == f"models:/{name}/1"
    fast = load_serving(ref)
    monkeypatch.setattr(store_reader, "local_model", lambda ref: None)
    slow = load_serving(ref)
    assert (fast.uri, fast.vocab, fast.meta, fast.origin) == (slow.uri, slow.vocab, slow.meta, slow.origin)
    assert all(torch.equal(a, b) for a, b in zip(fast.module.state_dict().values(), slow.module.state_dict().values()))
    assert fast(["7. März 2021"]) == slow(["7. März 2021"])


def test_history_and_rollback_name_what_is_not_there():
    cli = CliRunner()
    res = cli.invoke(app, ["models", "history", "no-such-model-x"])
    assert res.exit_code == 2 and "no-such-model-x: no such registered model" in res.stderr, res.output
    res = cli.invoke(app, ["models", "rollback", "no-such-model-x", "--to", "3"])
    assert res.exit_code == 2 and "no such registered model" in res.stderr

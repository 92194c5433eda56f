"""`nnlab diff A B` (tasks/diff.py) on runs written to a real MLflow store: two sweep cells over their seeds show
exactly the params that differ (never the seed) and the metric deltas with their intervals, two single runs their
identity where it differs, --json validates against the schema; bad references and mixed kinds exit 2."""
import json
import uuid

import jsonschema
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.diff import SCHEMA, diff

OPT = {"sgd": {"train.optimizer": "sgd", "train.lr": "0.05"}, "adam": {"train.optimizer": "adam", "train.lr": "0.001"}}


def _child(parent: str | None, cell: str | None, params: dict, metrics: dict, tags: dict) -> str:
    from tasks.tracking import Run

    run = Run.start("diff-test", cell or "run", {**tags, **({"nnlab.sweep_cell": cell} if cell else {})},
                    params, parent_run_id=parent)
    run.log_metrics(metrics)
    run.finish()
    return run.run_id


@pytest.fixture(scope="module")
def sweep():
    """A sweep parent with cells optimizer=sgd|adam x seed=0|1: same everything else."""
    from tasks.tracking import Run, prepare_store

    prepare_store("diff-test")
    parent = Run.start("diff-test", f"sweep-{uuid.uuid4().hex[:6]}", {"nnlab.kind": "sweep"}, {}).run_id
    acc = {("sgd", 0): 0.90, ("sgd", 1): 0.92, ("adam", 0): 0.95, ("adam", 1): 0.96}
    ids = {}
    for (opt, seed), a in acc.items():
        ids[opt, seed] = _child(parent, f"optimizer={opt},seed={seed}",
                                {**OPT[opt], "seed": str(seed), "train.epochs": "12", "models.mlp.hidden": "[256, 128]"},
                                {"test_accuracy": a, "test_loss": 1 - a}, {"nnlab.kind": "classifier",
                                                                          "nnlab.data_hash": "d1"})
    return parent, ids


def test_two_sweep_cells_differ_in_their_optimizer_params_only(sweep):
    parent, _ = sweep
    out = diff(f"{parent}/optimizer=sgd", f"{parent}/optimizer=adam")
    jsonschema.validate(out, SCHEMA)
    assert out["params"] == {"train.lr": ["0.05", "0.001"], "train.optimizer": ["sgd", "adam"]}
    acc = out["metrics"]["test_accuracy"]
    assert acc["a"] == pytest.approx(0.91) and acc["b"] == pytest.approx(0.955) and acc["delta"] == pytest.approx(0.045)
    assert acc["a_ci95"] > 0 and acc["b_ci95"] > 0  # two seeds each: an interval
    assert out["identity"] == {} and len(out["a"]["runs"]) == 2


def test_two_runs_show_their_seed_and_identity_and_the_cli_prints_json(sweep):
    parent, ids = sweep
    other = _child(None, None, {**OPT["sgd"], "seed": "0", "train.epochs": "12", "models.mlp.hidden": "[256, 128]"},
                   {"test_accuracy": 0.9, "test_loss": 0.1}, {"nnlab.kind": "classifier", "nnlab.data_hash": "d2"})
    res = CliRunner().invoke(app, ["diff", ids["sgd", 0], other, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    jsonschema.validate(out, SCHEMA)
    assert out["params"] == {} and out["identity"] == {"nnlab.data_hash": ["d1", "d2"]}
    assert out["metrics"]["test_accuracy"]["delta"] == pytest.approx(0.0)
    table = CliRunner().invoke(app, ["diff", ids["sgd", 0], ids["adam", 1]])
    assert table.exit_code == 0 and "train.optimizer" in table.stdout and "seed" in table.stdout, table.output


def test_bad_references_and_mixed_kinds_exit_2(sweep):
    parent, ids = sweep
    lm = _child(None, None, {"train.lr": "0.1"}, {"test_ppl": 50.0}, {"nnlab.kind": "language_model"})
    cli = CliRunner()
    for args, needle in (([ids["sgd", 0], "0" * 32], "no run 00000000"),
                         ([ids["sgd", 0], "models:/no-such-model-q@champion"], "no registered model"),
                         ([f"{parent}/optimizer=rmsprop", ids["sgd", 0]], "no finished cell 'optimizer=rmsprop'"),
                         ([ids["sgd", 0], lm], "is a classifier run and")):
        res = cli.invoke(app, ["diff", *args])
        assert res.exit_code == 2 and needle in res.stderr, (args, res.output)
        assert len(res.stderr.strip().splitlines()) == 1


def test_the_direct_sqlite_reader_answers_as_mlflows_client_does(sweep):
    """diff reads a local SQLite store directly (no MLflow import: tasks/store_reader.py); every kind of
    reference, and every refusal, reads the same through MLflow's client."""
    from mlflow.tracking import MlflowClient

    from tasks.diff import DiffError
    from tasks.store_reader import MlflowStore, SqliteStore, open_store
    from tasks.tracking import store_path, tracking_uri

    parent, ids = sweep
    assert isinstance(open_store(), SqliteStore)
    prefix = f"nnlab-difftest-{uuid.uuid4().hex[:6]}"
    c, name = MlflowClient(tracking_uri()), f"{prefix}-digits"
    c.create_registered_model(name)
    for run in (ids["sgd", 0], ids["adam", 1]):
        c.create_model_version(name, f"runs:/{run}/model", run_id=run)
    c.set_registered_model_alias(name, "champion", "2")
    sql, ml = SqliteStore(store_path()), MlflowStore()
    for a, b in ((f"{parent}/optimizer=sgd", f"{parent}/optimizer=adam"),
                 (ids["sgd", 0], f"runs:/{ids['adam', 0]}/model"), (f"models:/{name}/1", f"models:/{prefix}@champion")):
        assert diff(a, b, sql) == diff(a, b, ml), (a, b)
    assert diff(f"models:/{prefix}@champion", ids["sgd", 0], sql)["a"]["runs"] == [ids["adam", 1]]
    for bad in ("0" * 32, f"models:/{name}@nope", f"models:/{name}/9", "models:/x@"):
        said = []
        for store in (sql, ml):
            with pytest.raises(DiffError) as e:
                diff(bad, ids["sgd", 0], store)
            said.append(str(e.value))
        assert said[0] == said[1], said

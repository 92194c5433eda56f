"""What runs say about themselves in MLflow: names that show the command line's overrides, a headline (the kind's
main metric, also as the common metric `headline`), descriptions of runs, versions and registered models with the
registry's decision, advice when nothing is registered; and a brand-new store opened by several processes at once."""
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, write_params

NNLAB = str(Path(sys.executable).parent / "nnlab")
NOTE = "mlflow.note.content"


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_run_names_show_the_overrides_compactly():
    from tasks.descriptions import run_title

    assert run_title("mlp", "digits") == "mlp · digits"
    assert run_title("mlp", "digits", ["train.epochs=2"]) != run_title("mlp", "digits", ["train.epochs=5"])
    sets = ["train.epochs=2", "register.enabled=false", "models.mlp.hidden=[64, 32]", "models.cnn.filters=[4]",
            "data.source=cifar10", "tracking.experiment=x", "train.lr=0.01", "models.mlp.train.lr=0.1"]
    assert run_title("mlp", "digits", sets) == "mlp · digits · epochs=2 · hidden=[64,32] · train.lr=0.01 · " \
                                                "mlp.train.lr=0.1"
    long = run_title("mlp", "digits", ["data.classes=[0,1,2,3,4,5,6,7,8]", *[f"train.k{i}={'v' * 12}" for i in range(9)]])
    assert long.startswith("mlp · digits · classes=[0,1,2,3,4,5,6,… · k0=") and long.endswith(" more"), long
    assert len(long) < 130
    assert run_title("mlp", "digits", sets, "lr=0.1,seed=0") == "mlp · lr=0.1 · seed=0"  # a sweep cell: its levels


def test_descriptions_of_runs_versions_and_the_registered_model(project):
    """Two real 1-epoch digits runs through the stages: each run's headline and description; the better one's
    version and registered model described; the other's description says why it was not registered."""
    from tasks.config import load_config
    from tasks.descriptions import overrides_tag
    from tasks.stages import evaluate_stage, prepare_stage, register_stage, train_stage

    name = f"hl-{uuid.uuid4().hex[:8]}"
    write_params(project / "params.yaml", models={"mlp": {"hidden": [32], "dropout": 0.0},
                                                  "wide": {"arch": "mlp", "hidden": [64], "dropout": 0.0}})
    sets = ["train.epochs=1", "train.device=cpu", f"register.name={name}"]
    cfg = load_config("params.yaml", sets)
    prepare_stage(cfg, "d")
    results = []
    for run in ("mlp", "wide"):
        train_stage(cfg, run, "d", f"out/{run}", extra_tags=overrides_tag(sets))
        results.append(evaluate_stage(cfg, run, "d", f"out/{run}", f"m/{run}.json", f"p/{run}", f"e/{run}.json"))
    c = client()
    for r in results:
        got = c.get_run(r["run_id"])
        assert got.info.run_name == f"{r['name']} · digits · epochs=1 · device=cpu"
        assert got.data.metrics["headline"] == pytest.approx(r["test_accuracy"])
        assert got.data.tags["nnlab.headline_metric"] == "test_accuracy" and got.data.tags["nnlab.kind"] == "classification"
        assert got.data.tags[NOTE].startswith(f"**test_accuracy {r['test_accuracy']:.4f}** · trivial baseline "
                                              "(majority_test_accuracy)")
        assert got.data.tags[NOTE].endswith(": beaten")
    out = register_stage(cfg, results, None)
    assert out["registered"] and out["alias"] == "champion" and out["version"] == 1
    best = next(r for r in results if r["run_id"] == out["run_id"])
    other = next(r for r in results if r["run_id"] != out["run_id"])
    note = c.get_run(best["run_id"]).data.tags[NOTE]
    assert note.startswith("**test_accuracy") and f"registered as **champion v1** of {name}" in note, note
    note = c.get_run(other["run_id"]).data.tags[NOTE]
    assert f"not registered in {name}: {best['name']} ranked first (test_accuracy {best['test_accuracy']:.4f})" \
           in note, note
    version = c.get_model_version(name, "1")
    assert version.description.startswith(f"test_accuracy {best['test_accuracy']:.4f}; first version: champion. Run {best['name']},")
    assert best["run_id"] in version.description
    assert c.get_registered_model(name).description.startswith("nnlab classification runs trained on digits, "
                                                              "ranked by test_accuracy (higher wins)")


@pytest.mark.slow
def test_a_short_run_that_registers_nothing_says_so_and_what_to_do(project):
    """`nnlab run` end to end: 1 epoch of an MLP loses to the naive forecast on sunspots (tests/test_series.py
    measures 2): the console says nothing was registered and how to train longer; the run says so too."""
    name = f"hl-fc-{uuid.uuid4().hex[:8]}"
    sets = ["data.source=sunspots", "train.epochs=1", "models.mlp.hidden=[16]", "models.mlp.dropout=0.0",
            f"register.name={name}"]
    start = time.monotonic()
    out = subprocess.run([NNLAB, "run", "--models", "mlp", *[a for s in sets for a in ("--set", s)]],
                         cwd=project, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    console = " ".join(out.stdout.split())  # rich wraps long lines
    assert f"not registered in {name}: no run beats its trivial baseline (mlp: test_rmse" in console, console
    assert "train longer (ran 1 epoch): e.g. --set train.epochs=10" in console, console
    run = client().search_runs([client().get_experiment_by_name("nnlab").experiment_id],
                               f"tags.`nnlab.run` = 'mlp' and tags.`nnlab.overrides` LIKE '%{name}%'")[0]
    assert run.info.run_name == "mlp · sunspots · epochs=1 · hidden=[16] · dropout=0.0"
    assert run.data.metrics["headline"] == pytest.approx(run.data.metrics["test_rmse"])
    note = run.data.tags[NOTE]
    assert note.startswith("**test_rmse ") and "trivial baseline (naive_test_rmse)" in note and "NOT beaten" in note
    assert f"not registered in {name}: no run beats its trivial baseline" in note and "train longer" in note
    print(f"nnlab run: {time.monotonic() - start:.1f} s")


OPEN = """
import sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store, mlflow.tracking  # imported: the processes then open it together
from tasks.tracking import experiment_id
Path(sys.argv[1] + ".ready").touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
print(experiment_id("nnlab"))
"""


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """Three processes create and migrate the same brand-new SQLite store at the same moment (imports done, then
    released together). Without the lock one of them dies in alembic (`... 0 found`, `duplicate column name`)."""
    store = tmp_path / "fresh" / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "PYTHONPATH": str(ROOT)}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN, str(tmp_path / f"p{i}"), str(go)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"p{i}.ready").exists() for i in range(3)) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert len({o.strip() for o, _ in outs}) == 1  # one experiment, the same id in each


UNSHARE = shutil.which("unshare")


def without_privileges() -> bool:
    """Whether `unshare --user` runs a command without privileges (as nobody: permission bits bind even root)."""
    return bool(UNSHARE) and subprocess.run([UNSHARE, "--user", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not without_privileges(), reason="no unprivileged user namespaces here (unshare --user)")
def test_a_store_made_read_only_mid_run_ends_in_one_line_that_tells_the_runs_true_state(tmp_path):
    """The store's folder made read-only after the first epoch: the run cannot be marked FAILED there, so the one
    line says it stays RUNNING and the same command resumes it; and it does, once the store is writable again."""
    store, work = tmp_path / "store", tmp_path / "w"
    store.mkdir()
    work.mkdir()
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    sets = ["--set", "train.epochs=30", "--set", "models.mlp.hidden=[32]"]
    assert subprocess.run([NNLAB, "stage", "prepare", *sets], cwd=work, env=env, capture_output=True).returncode == 0
    train = [UNSHARE, "--user", NNLAB, "stage", "train", "--model", "mlp", *sets]
    proc = subprocess.Popen(train, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((work / ".nnlab" / "checkpoints").glob("mlp-*.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in [store, *store.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)  # read-only, as `chmod -R a-w`
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        for p in [store, *store.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "stays RUNNING in the store" in lines[0] and "run the same command to resume" in \
        lines[0], err
    with sqlite3.connect(store / "mlflow.db") as db:
        (run_id, status), = db.execute("select run_uuid, status from runs").fetchall()
    assert status == "RUNNING" and run_id in lines[0]
    again = subprocess.run(train, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"resuming MLflow run {run_id}" in again.stdout + again.stderr, again.stderr
    assert client_for(store).get_run(run_id).info.status == "FINISHED"


def client_for(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")

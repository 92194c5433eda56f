"""Search sweeps (tasks/search.py, flows/search.py): bad input refused before anything runs, a tiny real random
search into one parent run and an Optuna study beside the store, resume after an interruption, a failing trial."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, write_params
from tasks.config import ConfigError, SweepConfig, read_yaml
from tasks.search import expand
from tasks.studies import study_storage

NNLAB = str(Path(sys.executable).parent / "nnlab")
TINY = {"train.epochs": 1, "models.mlp.hidden": [16], "models.mlp.dropout": 0.0}
SPACE = {"train.lr": "loguniform(1e-3, 1e-1)", "models.mlp.dropout": "uniform(0, 0.5)"}


def search_spec(search=None, **kw) -> dict:
    return {"name": "srch", "model": "mlp", "fixed": dict(TINY), "seeds": [0, 1],
            "search": {"method": "random", "trials": 3, "space": dict(SPACE), **(search or {})}, **kw}


@pytest.mark.parametrize("change, needle", [
    ({"search": {"method": "annealing"}}, "sweep.search.method: unknown method 'annealing'"),
    ({"search": {"space": {"train.lr": "gauss(0, 1)"}}}, "sweep.search.space.train.lr: unknown distribution gauss"),
    ({"search": {"space": {"train.lr": "loguniform(1e-1, 1e-3)"}}}, "sweep.search.space.train.lr: empty range"),
    ({"search": {"space": {"train.batch_size": "int(64, 64)"}}}, "sweep.search.space.train.batch_size: empty range"),
    ({"search": {"space": {"train.optimizer": "choice()"}}}, "sweep.search.space.train.optimizer: choice() is empty"),
    ({"search": {"space": {"models.mlp.dropuot": "uniform(0, 0.5)"}}}, "sweep.search.space.models.mlp.dropuot: no such"),
    ({"search": {"space": {"train.nesterov_lr": "uniform(0, 1)"}}}, "sweep.search.space.train.nesterov_lr: no such"),
    ({"search": {"space": {"train.optimizer": "choice(adam, nadam)"}}}, "train.optimizer: 'nadam' is not a valid"),
    ({"search": {"space": {"train.lr": "uniform(0, 0.1)"}}}, "sweep.search.space.train.lr: 0.0 is not a valid"),
    ({"search": {"method": "grid"}}, "sweep.search.space.train.lr: method grid takes choice"),
    ({"search": {"trials": 0}}, "sweep.search.trials"),
    ({"search": {"sampler": "tpe"}}, "sweep.search.sampler: unknown key"),
    ({"grid": {"train.lr": [0.1]}}, "either `grid` or `search`"),
    ({"seeds": [0, 0]}, "sweep.seeds"),
    ({"stop": {"time": "soon"}}, "sweep.stop.time"),
    ({"stop": {"trails": 2}}, "sweep.stop.trails: unknown key"),
    ({"prune": {"method": "sha"}}, "sweep.prune.method: sha (synchronous successive halving) waits for every group"),
])
def test_bad_search_is_a_config_error_naming_the_key(change, needle):
    spec = search_spec()
    for k, v in change.items():
        spec[k] = {**spec[k], **v} if k == "search" else v
    with pytest.raises(ConfigError) as e:
        expand(SweepConfig.model_validate(spec), read_yaml(ROOT / "params.yaml"))
    assert needle in str(e.value)


def test_the_study_is_kept_in_the_stores_own_database(tmp_path):
    assert study_storage(f"sqlite:///{tmp_path}/m/mlflow.db") == f"sqlite:///{tmp_path}/m/optuna.db"
    assert study_storage("postgres://u:pw@db/mlflow") == "postgresql://u:pw@db/mlflow?options=-csearch_path%3Dnnlab_optuna"
    with pytest.raises(ConfigError, match="a http:// store has none here"):
        study_storage("http://tracking:5000")


def test_a_study_on_postgresql_lives_in_its_own_schema_beside_mlflows_tables():
    """The same PostgreSQL database as the MLflow store: MLflow's tables (and its alembic_version) in `public`,
    Optuna's in `nnlab_optuna`, each migrated by its own library; the study works and is found again."""
    import optuna
    import psycopg

    from tasks.search import Search, open_study
    from tasks.studies import shown_storage

    pg = dict(host="127.0.0.1", port=5432, user="postgres", connect_timeout=5, autocommit=True)
    name = f"nnlab_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(**pg, dbname="postgres") as con:
            con.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({str(e).strip()}); .ci/run starts it")
    try:
        uri = f"postgresql://postgres@127.0.0.1:5432/{name}"
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).search_experiments()  # MLflow's tables, as a run would create them
        storage = study_storage(uri)
        search = Search("random", 2, {"x": optuna.distributions.FloatDistribution(0, 1)}, 0, [0], {})
        study = open_study("p1", search, False, storage)
        t = study.ask(search.space)
        study.tell(t, 0.5)
        assert optuna.load_study(study_name="nnlab-sweep-p1", storage=storage).best_value == 0.5
        assert shown_storage("postgresql://u:secret@h/d") == "postgresql://u:***@h/d"
        with psycopg.connect(**pg, dbname=name) as con:
            tables = set(con.execute("select table_schema || '.' || table_name from information_schema.tables "
                                     "where table_schema in ('public', 'nnlab_optuna')").fetchall())
        tables = {t for (t,) in tables}
        assert {"public.runs", "public.alembic_version", "nnlab_optuna.studies", "nnlab_optuna.trials",
                "nnlab_optuna.alembic_version"} <= tables
        assert "public.studies" not in tables and "nnlab_optuna.runs" not in tables
    finally:
        with psycopg.connect(**pg, dbname="postgres") as con:
            con.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            con.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_cli_refuses_a_bad_search_with_exit_2_before_any_run(tmp_path):
    write_params(tmp_path / "params.yaml")
    spec = search_spec({"space": {**SPACE, "models.mlp.widht": "int(8, 64)"}})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    out = subprocess.run([NNLAB, "sweep", "bad.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert out.returncode == 2 and "sweep.search.space.models.mlp.widht: no such parameter" in out.stderr, out.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "data").exists()


def run(cwd, uri, *args):
    return subprocess.run([NNLAB, "sweep", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})


def children(uri, parent):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    return c, c.search_runs([c.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")


def study_of(tmp_path, parent):
    import optuna

    return optuna.load_study(study_name=f"nnlab-sweep-{parent}", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_random_search_then_resume_after_an_interruption(tmp_path):
    """2 trials x 2 seeds (stop.trials: 2 of search.trials: 3), then a trial left RUNNING as a killed sweep leaves
    it, then --resume: exactly one new trial, at the next number: the interrupted one asked again once (same
    values); 3 trials x 2 seeds = 6 child runs, nothing trained twice, each trial's value the mean of its seeds'."""
    from optuna.trial import TrialState

    write_params(tmp_path / "params.yaml", register={"name": f"srch-{uuid.uuid4().hex[:8]}"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = search_spec({"trials": 3}, stop={"trials": 2}, workers=2)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run(tmp_path, uri, "s.yaml")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "random search, 3 trials x 2 seed(s)" in out.stdout and "stopped: stop.trials=2 reached" in out.stdout
    parent = out.stdout.split("sweep parent run ")[1].split(":")[0]
    c, runs = children(uri, parent)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    study = study_of(tmp_path, parent)  # optuna.db beside mlflow.db
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:
        accs = [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["nnlab.trial"] == str(t.number)]
        assert len(accs) == 2 and t.value == pytest.approx(sum(accs) / 2)
        assert {r.info.run_name.split(" · ")[1] for r in runs if r.data.tags["nnlab.trial"] == str(t.number)} == \
            {f"trial={t.number}"}  # named by the trial and its values: mlp · trial=0 · lr=… · dropout=… · seed=0
    top = c.get_run(parent)
    assert top.data.tags["nnlab.study"] == study.study_name and top.data.tags["nnlab.study_storage"].endswith("optuna.db")
    best = max(t.value for t in study.trials)
    assert top.data.metrics["test_accuracy"] == pytest.approx(best)
    report = next((tmp_path / "reports").glob("srch-*"))
    assert "## Trials, best first" in (report / "report.md").read_text()
    assert (report / "optimization_history.png").stat().st_size > 5000

    killed = study.ask(study.trials[0].distributions)  # what a kill -9 mid-trial leaves: a RUNNING trial (#2)
    out = run(tmp_path, uri, "--resume", parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all 3 trials of search.trials asked" in out.stdout and "[2] were interrupted" in out.stdout
    assert "ran 2 now" in out.stdout  # one trial, two seeds
    study = study_of(tmp_path, parent)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.COMPLETE]
    rerun = study.trials[3]
    assert rerun.params == killed.params and rerun.user_attrs["nnlab.replaces"] == 2
    assert rerun.value == pytest.approx(sum(rerun.user_attrs["nnlab.seed_values"]) / 2)
    c, runs = children(uri, parent)
    assert len(runs) == 6 and len({r.data.tags["nnlab.sweep_cell"] for r in runs}) == 6  # nothing trained twice
    assert sorted(r.data.tags["nnlab.study_trial"] for r in runs) == ["0", "0", "1", "1", "3", "3"]
    done = [tuple(sorted(t.params.items())) for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(set(done)) == len(done) == 3
    md = (report / "report.md").read_text()
    assert "#3 (rerun of #2)" in md and md.count("| complete |") == 3


def test_a_failing_trial_leaves_the_others_to_finish(tmp_path):
    """A grid search over a device that fails at build time (cuda:7) and one that works: the first trial fails with
    its reason, the other finishes, the sweep too (exit 0), the report lists the failure."""
    from optuna.trial import TrialState

    write_params(tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = search_spec({"method": "grid", "trials": 5, "space": {"train.device": "choice(cuda:7, cpu)"}},
                       seeds=[0], workers=2, fixed={**TINY, "register.enabled": False})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run(tmp_path, uri, "s.yaml")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "every point of the grid tried" in out.stdout and "1 complete, 1 failed" in out.stdout
    parent = out.stdout.split("sweep parent run ")[1].split(":")[0]
    study = study_of(tmp_path, parent)
    states = {t.params["train.device"]: t.state for t in study.trials}
    assert states == {"cuda:7": TrialState.FAIL, "cpu": TrialState.COMPLETE}
    failed = next(t for t in study.trials if t.state == TrialState.FAIL)
    assert "cuda:7" in failed.user_attrs["nnlab.error"]
    md = (next((tmp_path / "reports").glob("srch-*")) / "report.md").read_text()
    assert "## Failed runs" in md and "cuda:7" in md


def test_the_budget_and_the_requeue_on_an_in_memory_study():
    """stop_reason's every reason, and a RUNNING trial asked again once, on a study of made-up trials."""
    import optuna
    from optuna.trial import TrialState

    from tasks.search import counted, parse, parse_stop, requeue_interrupted, sampler, stop_reason

    assert parse_stop({"time": "30m", "trials": 4, "target": 0.98}) == {"time": 1800.0, "trials": 4, "target": 0.98}
    assert parse_stop({"time": 90})["time"] == 90.0 and parse_stop({"time": "2h"})["time"] == 7200.0
    s = parse(SweepConfig.model_validate(search_spec({"trials": 4}, stop={"trials": 2, "time": "1m",
                                                                           "target": 0.9})))
    study = optuna.create_study(direction="maximize", sampler=sampler(s))
    assert stop_reason(study, s, 0, 0.0, lower=False) is None
    assert "stop.time=60s reached" in stop_reason(study, s, 0, 61.0, lower=False)
    assert "stop.trials=2 reached" in stop_reason(study, s, 2, 0.0, lower=False)
    for v in (0.5, 0.7):
        t = study.ask(s.space)
        study.tell(t, v)
    running = study.ask(s.space)  # left RUNNING, as by kill -9
    assert stop_reason(study, s, 0, 0.0, lower=False) is None and len(counted(study)) == 3
    assert requeue_interrupted(study) == [2]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.WAITING]
    assert len(counted(study)) == 2  # the interrupted one does not use up the budget; its rerun will
    rerun = study.ask(s.space)
    assert rerun.number == 3 and rerun.params == running.params and rerun.user_attrs["nnlab.cells_of"] == 2
    study.tell(rerun, 0.95)
    assert "target reached: trial 3's mean 0.9500" in stop_reason(study, s, 0, 0.0, lower=False)
    assert "trial 0's mean 0.5000" in stop_reason(study, s, 0, 0.0, lower=True)  # lower wins: the lowest, <= 0.9
    t = study.ask(s.space)
    study.tell(t, 0.1)
    s.stop = {}
    assert stop_reason(study, s, 0, 0.0, lower=False) == "all 4 trials of search.trials asked"
    g = parse(SweepConfig.model_validate(search_spec({"method": "grid", "trials": 9,
                                                      "space": {"train.optimizer": "choice(adam, sgd)"}})))
    grid = optuna.create_study(sampler=sampler(g))
    for _ in range(2):
        t = grid.ask(g.space)
        grid.tell(t, state=TrialState.FAIL)  # a failed point is tried, too: never asked again
    assert stop_reason(grid, g, 0, 0.0, lower=False) == "every point of the grid tried"
    assert sorted(t.params["train.optimizer"] for t in grid.trials) == ["adam", "sgd"]

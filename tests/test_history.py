"""`nnlab history` (flows/history.py): the project's own flow runs, kept in .nnlab/prefect/prefect.db by the temporary
server (flows/prefect_server.py), listed through Prefect's client with the MLflow runs each one trained."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT
from flows import prefect_server as ps

NNLAB = str(Path(sys.executable).parent / "nnlab")
DATABASE_VARS = ("PREFECT_HOME", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL",
                 "PREFECT_API_URL", "PREFECT_PROFILE")


def own_env(tmp_path: Path, **extra) -> dict:
    """A CLI environment with no Prefect API, home or database of the user's: HOME (so ~/.prefect) is a temp
    folder; its own MLflow store."""
    env = {k: v for k, v in os.environ.items() if k not in DATABASE_VARS and not k.startswith("NNLAB_PREFECT_")}
    env.update(HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    return {**env, **{k: str(v) for k, v in extra.items()}}


def nnlab(*args, cwd, env=None, timeout=300):
    out = subprocess.run([NNLAB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_the_project_database_unless_the_user_chose_prefects_home_or_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k in DATABASE_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))  # none yet
    assert ps.project_database() == tmp_path / ".nnlab/prefect/prefect.db"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "mine"))
    assert ps.project_database() is None  # Prefect's own: PREFECT_HOME/prefect.db
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://u@h/prefect")
    assert ps.project_database() is None
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL")
    (tmp_path / "profiles.toml").write_text('active = "lab"\n[profiles.lab]\n'
                                            'PREFECT_API_DATABASE_CONNECTION_URL = "sqlite+aiosqlite:////x/p.db"\n')
    assert ps.project_database() is None  # `prefect config set` in the active profile counts too


def test_no_history_yet_is_said_without_booting_anything(tmp_path):
    (tmp_path / "home").mkdir()
    out = nnlab("history", cwd=tmp_path, env=own_env(tmp_path), timeout=120)
    assert "no flow runs yet" in out and str(tmp_path / ".nnlab/prefect/prefect.db") in out
    assert not (tmp_path / ".nnlab").exists() and not (tmp_path / "home/.prefect/prefect.db").exists()


def test_history_on_the_users_api_lists_the_projects_flows_with_their_mlflow_runs(tmp_path, monkeypatch,
                                                                                   prefect_server):
    """conftest's server stands for the user's PREFECT_API_URL: two runs of a project flow, one of another's."""
    import mlflow
    from prefect import flow

    from flows.experiment import link_mlflow_run, nnlab_ui_address, prefect_ids

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)  # whatever an earlier test of this worker left
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow_client.create_experiment(f"history-{uuid.uuid4().hex[:8]}")
    tag = uuid.uuid4().hex[:8]

    @flow(name="nnlab-history-probe", flow_run_name="probe-{n}-" + tag)
    def probe(n: int) -> str:
        run = mlflow_client.create_run(experiment, tags=prefect_ids())
        mlflow_client.set_terminated(run.info.run_id)
        link_mlflow_run(run.info.run_id, f"probe {n}")
        return run.info.run_id

    @flow(name="another-project", flow_run_name="other-" + tag)
    def other() -> None:
        pass

    from prefect.settings import PREFECT_API_URL, temporary_settings

    # this process's Prefect settings may still name a server an earlier test of this worker started: the probes
    # go where `nnlab history` will read
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        first, second = probe(1), probe(2)
        other()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the suite's other workers run nnlab flows on the same server meanwhile: room for theirs in the list
    both = nnlab("history", "--limit", "30", cwd=tmp_path, env=env)
    assert f"probe-2-{tag}" in both and f"probe-1-{tag}" in both and "other-" not in both
    assert both.index(f"probe-2-{tag}") < both.index(f"probe-1-{tag}")  # newest first
    assert "Completed" in both and "nnlab-history-probe" in both
    assert first in both and second in both  # the MLflow run each one made, by its nnlab.prefect_flow_run_id
    newest = nnlab("history", "-n", "1", cwd=tmp_path, env=env)  # the newest nnlab flow: probe 2 or a later one
    rows = newest.strip().splitlines()[2:]  # piped: a title line, the columns, then one line a flow run
    assert len(rows) == 1 and rows[0].split("\t")[1].startswith("nnlab"), newest
    assert f"probe-1-{tag}" not in newest and first not in newest
    # the Prefect -> MLflow link points where `nnlab ui` serves the store
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = mlflow_client.get_run(second).data.tags["nnlab.prefect_flow_run_id"]
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as c:
        [link] = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert f"({nnlab_ui_address()}/#/experiments/{experiment}/runs/{second})" in str(link.data)
    help_text = nnlab("ui", "--help", cwd=tmp_path, env=env, timeout=60)
    assert "127.0.0.1" in help_text and "5000" in help_text and nnlab_ui_address() == "http://127.0.0.1:5000"


@pytest.mark.slow
def test_nnlab_run_keeps_its_flow_runs_in_the_project(tmp_path):
    """No Prefect settings of the user's: `nnlab run`'s temporary server records into .nnlab/prefect/prefect.db,
    never ~/.prefect, and `nnlab history` reads it back with the MLflow run the flow trained."""
    import mlflow

    (tmp_path / "home").mkdir()
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = own_env(tmp_path)
    nnlab("run", "--models", "mlp", "--set", "train.epochs=1", "--set", "register.enabled=false", cwd=tmp_path,
          env=env, timeout=600)
    assert (tmp_path / ".nnlab/prefect/prefect.db").is_file()
    assert not (tmp_path / "home/.prefect/prefect.db").exists()
    [run] = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()])
    out = nnlab("history", cwd=tmp_path, env=env)
    assert str(tmp_path / ".nnlab/prefect/prefect.db") in out
    assert "nnlab run · mlp · train.epochs=1" in out and "nnlab-experiment" in out and "Completed" in out
    assert run.info.run_id in out and run.data.tags["nnlab.prefect_flow_run_id"]

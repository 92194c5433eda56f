"""`nnlab tracking-server`: MLflow on PostgreSQL with artifacts served through it; 8 parallel sweep cells log
into it over HTTP and lose nothing. Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres): .ci/run
starts it; without it the slow test fails, it never skips."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import write_params
from flows.tracking_server import server_command, server_env, server_store_uri
from test_sweep import TINY, children, dump, parent_id, run_sweep, spec

NNLAB = str(Path(sys.executable).parent / "nnlab")
PG = dict(host="127.0.0.1", port=5432, user="postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin(statements: list[str]) -> list:
    import psycopg

    with psycopg.connect(**PG, dbname="postgres", connect_timeout=5, autocommit=True) as con:
        out = []
        for st in statements:
            cur = con.execute(st)
            out.append(cur.fetchall() if cur.description else None)
        return out


@pytest.fixture
def database():
    """A unique database name on the local PostgreSQL; the server creates it, teardown drops it."""
    import psycopg

    try:
        admin(["SELECT 1"])
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432 as user postgres ({str(e).strip()}); start it "
                    "with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` (.ci/run does)")
    name = f"nnlab_test_{uuid.uuid4().hex[:12]}"
    yield name
    admin([f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
           f'DROP DATABASE IF EXISTS "{name}"'])
    assert admin([f"SELECT 1 FROM pg_database WHERE datname = '{name}'"])[0] == []


def processes_mentioning(needle: str) -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not a process
            continue
        if needle in cmd and p.name != str(os.getpid()):
            found.append(f"{p.name}: {cmd[:200]}")
    return found


def stop(server: subprocess.Popen) -> bool:
    """SIGTERM to the server's process group (mlflow CLI, uvicorn, its workers); True when all of it is gone
    within 20 s, else SIGKILL and False."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + 20
    while time.time() < deadline:
        server.poll()  # reap the direct child; init reaps the rest
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    return False


def test_server_command_and_store_uri(monkeypatch):
    cmd = server_command("rel/art", "127.0.0.1", 5001, 2, ["--app-name", "basic-auth"])
    assert cmd[1:4] == ["-m", "mlflow", "server"] and "--serve-artifacts" in cmd
    assert "--backend-store-uri" not in cmd  # a password there is in every user's `ps`: the environment has it
    env = server_env("postgresql://postgres:pw@127.0.0.1:5432/mlflow")
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the project ships: the URI goes unchanged
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://postgres:pw@127.0.0.1:5432/mlflow"
    assert server_store_uri("postgres://a@h/d") == "postgresql://a@h/d"  # libpq's alias, which SQLAlchemy refuses
    assert Path(cmd[cmd.index("--artifacts-destination") + 1]).is_absolute()
    assert cmd[-6:] == ["--port", "5001", "--workers", "2", "--app-name", "basic-auth"]
    assert server_command("s3://b/p", "0.0.0.0", 5000)[-5:] == ["s3://b/p", "--host", "0.0.0.0", "--port", "5000"]
    assert server_store_uri("postgresql+psycopg://a@h/d") == "postgresql+psycopg://a@h/d"
    # no GenAI job runner (7 processes, ~1 GB) unless asked for; the user's own setting wins
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    assert server_env("sqlite:///x.db")["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION" not in server_env("sqlite:///x.db")


def test_bare_postgresql_uri_is_psycopg_3_and_mlflow_logs_through_it(database):
    """MLflow's documented `postgresql://` form, as it is: SQLAlchemy 2.1 resolves it to psycopg (3), which the
    project installs; a client creates an experiment and logs a run into a database nnlab created."""
    from sqlalchemy.engine import make_url

    from flows.tracking_server import ensure_database
    import mlflow

    uri = f"postgresql://postgres@127.0.0.1:5432/{database}"
    assert make_url(uri).get_dialect().driver == "psycopg"
    assert server_store_uri(uri) == uri
    assert ensure_database(uri) is True and ensure_database(uri) is False  # created once
    c = mlflow.MlflowClient(tracking_uri=uri)
    run = c.create_run(c.create_experiment(f"bare-{uuid.uuid4().hex[:8]}"))
    c.log_metric(run.info.run_id, "loss", 0.5)
    c.set_terminated(run.info.run_id)
    got = mlflow.MlflowClient(tracking_uri=uri).get_run(run.info.run_id)
    assert got.data.metrics == {"loss": 0.5} and got.info.status == "FINISHED"
    assert admin([f"SELECT 1 FROM pg_database WHERE datname = '{database}'"])[0] == [(1,)]


def test_unreachable_postgres_is_a_clear_exit_2(tmp_path):
    uri = f"postgresql://postgres@127.0.0.1:{free_port()}/mlflow"  # nothing listens there
    out = subprocess.run([NNLAB, "tracking-server", "--backend-store-uri", uri], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert uri in out.stderr and "pg_ctlcluster" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_sweep_of_parallel_cells_through_the_server(tmp_path, database):
    """4 cells at once, each its own process, all writing over HTTP to one server on PostgreSQL: every child
    run FINISHED with every per-epoch point, artifacts in the server's folder and downloadable, alias set.
    (6 processes at once are tested against SQLite in test_sweep.py, where contention is the risk.)"""
    port, artifacts = free_port(), tmp_path / "server-artifacts"
    log = (tmp_path / "server.log").open("w")
    secret = f"pw-{uuid.uuid4().hex}"  # trust authentication ignores it; no process may show it
    server = subprocess.Popen(
        [NNLAB, "tracking-server", "--artifacts-destination", str(artifacts), "--port", str(port), "--workers", "2"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_BACKEND_STORE_URI": f"postgresql://postgres:{secret}@127.0.0.1:5432/{database}"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "no /health after 90 s: " + (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        assert f"MLFLOW_TRACKING_URI={uri}" in (tmp_path / "server.log").read_text()
        assert processes_mentioning(secret) == []  # the server and its workers got the password by environment
        assert admin([f"SELECT 1 FROM pg_database WHERE datname = '{database}'"])[0] == [(1,)]  # created by it

        name = f"srv-{uuid.uuid4().hex[:8]}"
        write_params(tmp_path / "params.yaml", register={"name": name})
        lrs = (0.003, 0.03)
        (tmp_path / "s.yaml").write_text(dump(spec(fixed={**TINY, "train.epochs": 2},
                                                   grid={"train.lr": list(lrs), "seed": [0, 1]}, workers=4)))
        out = run_sweep(tmp_path, uri, "s.yaml")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

        c, runs = children(uri, parent_id(out.stdout))
        assert len(runs) == 4
        assert {r.data.tags["nnlab.sweep_cell"] for r in runs} == {f"lr={lr},seed={s}" for lr in lrs for s in (0, 1)}
        for r in runs:
            assert r.info.status == "FINISHED"
            for key in ("train_loss", "val_loss", "val_accuracy"):
                assert sorted(m.step for m in c.get_metric_history(r.info.run_id, key)) == [1, 2], key
            assert "test_accuracy" in r.data.metrics
            assert r.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied, not a path on the server
            local = c.download_artifacts(r.info.run_id, "checkpoint/model.pt", str(tmp_path / "dl" / r.info.run_id))
            assert Path(local).stat().st_size > 1000
        assert any(artifacts.rglob("model.pt"))  # and it is the server's folder that holds them

        champ = c.get_model_version_by_alias(name, "champion")
        assert champ.run_id in {r.info.run_id for r in runs}
        import mlflow.artifacts

        model = mlflow.artifacts.download_artifacts(c.get_model_version_download_uri(name, champ.version),
                                                    dst_path=str(tmp_path / "champ"), tracking_uri=uri)
        assert (Path(model) / "MLmodel").is_file()
    finally:
        stopped = stop(server)
        log.close()
    assert stopped, "the server's process group outlived SIGTERM by 20 s"
    assert processes_mentioning(database) == [] and processes_mentioning(f"--port {port}") == []

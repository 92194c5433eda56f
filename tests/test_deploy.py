"""Scheduling on Prefect workers, for real on 127.0.0.1: a Prefect server with a temp PREFECT_HOME, `nnlab deploy`
(work pools + prefect.yaml's deployments, the nightly cron among them), a process worker, a triggered run that
trains and registers into a temp MLflow store; then everything started is stopped."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, group_alive, write_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, cwd, env, log: Path) -> subprocess.Popen:
    # own process group: stopping it stops whatever it spawned (uvicorn, flow-run subprocesses)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def run(*cmd, cwd, env, timeout=300):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp_path, env,
                 tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield {**env, "PREFECT_API_URL": url}, proc
    stop(proc)


def test_deploy_schedule_worker_and_a_triggered_run(tmp_path, server):
    env, server_proc = server
    project = tmp_path / "project"
    project.mkdir()
    for folder in ("flows", "tasks", "models"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", project / "prefect.yaml")
    name = f"deployed-{uuid.uuid4().hex[:8]}"
    write_params(project / "params.yaml", train={"epochs": 1}, models={"mlp": {"hidden": [16]}},
                 register={"name": name})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**env, "MLFLOW_TRACKING_URI": uri}

    out = run(str(BIN / "nnlab"), "deploy", "--gpus", "2", cwd=project, env=env)
    assert "nnlab-experiment/nightly" in out.stdout and "gpu (2 at once)" in out.stdout

    from prefect.client.orchestration import get_client
    import asyncio

    async def facts():
        async with get_client() as c:
            nightly = await c.read_deployment_by_name("nnlab-experiment/nightly")
            gpu = await c.read_work_pool("gpu")
            return nightly, gpu, await c.read_deployment_by_name("nnlab-sweep-file/sweep")

    shared = os.environ.get("PREFECT_API_URL")  # conftest's server, which the worker's later tests use
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]  # the client in this process talks to the same server
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            nightly, gpu_pool, sweep = asyncio.run(facts())
    finally:
        if shared is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = shared
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"] and nightly.work_pool_name == "cpu"
    assert gpu_pool.type == "process" and gpu_pool.concurrency_limit == 2  # one flow run per GPU
    assert sweep.work_pool_name == "cpu"

    # it polls for scheduled work every second, not every 10 s (Prefect's default): the triggered run starts
    # at once instead of up to 10 s later
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--limit", "1"], project,
                   {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, tmp_path / "worker.log")
    try:
        t0 = time.monotonic()
        done = run(str(BIN / "prefect"), "deployment", "run", "nnlab-experiment/nightly", "--watch",
                   "--watch-timeout", "240", cwd=project, env=env, timeout=300)
        seconds = time.monotonic() - t0
        assert "Completed" in done.stdout, done.stdout[-3000:]
    finally:
        stop(worker)
    print(f"trigger -> finished run through the worker: {seconds:.1f} s")

    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("nnlab").experiment_id])
    assert [r.data.tags["nnlab.model"] for r in runs] == ["mlp"] and runs[0].info.status == "FINISHED"
    assert c.get_model_version_by_alias(name, "champion").run_id == runs[0].info.run_id
    assert not group_alive(worker.pid)  # the worker and any flow-run process it started are gone
    stop(server_proc)
    assert not group_alive(server_proc.pid)


def test_deploy_without_a_server_says_how_to_start_one(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    shutil.copy(ROOT / "prefect.yaml", tmp_path / "prefect.yaml")
    out = subprocess.run([str(BIN / "nnlab"), "deploy"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "prefect server start" in out.stderr

"""Sweeps on a Dask cluster (sweep.engine: dask): a real scheduler and two workers, each its own process group
on 127.0.0.1, started outside the sweep's folder and with another MLFLOW_TRACKING_URI than the sweep's."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import write_params
from tasks.config import ConfigError
from tasks.sweep import load_spec

BIN = Path(sys.executable).parent
SPEC = {"name": "d", "model": "mlp", "register": False,
        "fixed": {"train.epochs": 2, "models.mlp.hidden": [16], "models.mlp.dropout": 0.0},
        "grid": {"train.lr": [0.001, 0.003, 0.01, 0.03]}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pgids: set[int]) -> list[str]:
    """Processes (zombies aside) still in these process groups."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except OSError:
            continue
        if int(fields[2]) in pgids and fields[0] != "Z":
            left.append(stat.parent.name)
    return left


class Cluster:
    def __init__(self, root: Path):
        self.address = ""  # the scheduler picks its port and writes it to scheduler.json (no race for a port)
        self.root, self.procs, self.logs_open, self.workers = root, [], [], {}
        # the workers' own environment points elsewhere: the cells must still log to the sweep's store
        self.wrong_store = root / "worker-own" / "mlflow.db"
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{self.wrong_store}",
                    "PREFECT_HOME": str(root / "prefect"), "DASK_TEMPORARY_DIRECTORY": str(root)}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        self.logs_open.append(log)
        p = subprocess.Popen([str(BIN / "dask"), *args], cwd=self.root, env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)  # own process group
        self.procs.append(p)
        return p

    def up(self):
        info = self.root / "scheduler.json"
        self.start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", str(info),
                   "--no-dashboard", "--no-show", "--idle-timeout", "600")
        procs = {}
        for i in (1, 2):  # started at once: they wait for the scheduler; preload = torch imported while idle
            procs[f"w{i}"] = self.start(
                f"worker{i}", "worker", "--scheduler-file", str(info), "--name", f"w{i}", "--nworkers", "1",
                "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", "--preload", "flows.sweep",
                "--death-timeout", "60")
        deadline = time.time() + 60
        while not info.exists():
            assert time.time() < deadline, self.logs()
            time.sleep(0.1)
        import json

        from distributed import Client

        self.address = json.loads(info.read_text())["address"]
        with Client(self.address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
            # each worker's address (what the cells record) -> the process group to kill
            self.workers = {addr: procs[w["name"]] for addr, w in c.scheduler_info()["workers"].items()}

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def down(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
        for log in self.logs_open:
            log.close()
        pgids, deadline = {p.pid for p in self.procs}, time.time() + 10
        while alive(pgids) and time.time() < deadline:  # the nannies' children, reparented, die a moment later
            time.sleep(0.1)
        assert not alive(pgids), f"left behind: {alive(pgids)}"


def _cluster(root: Path):
    c = Cluster(root)  # the workers' own folder, not the sweep's
    c.root.mkdir()
    try:
        c.up()
        yield c
    finally:
        c.down()


@pytest.fixture
def cluster(tmp_path):
    yield from _cluster(tmp_path / "cluster")


def sweep_folder(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    write_params(work / "params.yaml")
    (work / "d.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    return work


def children(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    return [r for r in c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=100)
            if "mlflow.parentRunId" in r.data.tags]


def test_engine_and_address_are_validated():
    with pytest.raises(ConfigError, match=r"sweep.address = None: required when sweep.engine is dask"):
        load_spec(None, {"sweep": {**SPEC, "engine": "dask"}})
    with pytest.raises(ConfigError, match=r"sweep.address = '127.0.0.1:8786': must look like tcp://host:port"):
        load_spec(None, {"sweep": {**SPEC, "engine": "dask", "address": "127.0.0.1:8786"}})
    with pytest.raises(ConfigError, match=r"sweep.engine = 'daks' is not allowed. did you mean 'dask'"):
        load_spec(None, {"sweep": {**SPEC, "engine": "daks"}})
    assert load_spec(None, {"sweep": {**SPEC, "engine": "dask", "address": "tcp://[::1]:8786"}}).engine == "dask"


def test_cli_rejects_missing_or_unreachable_address_with_exit_2(tmp_path):
    work = sweep_folder(tmp_path)
    for args, needle in ((["--engine", "dask"], "sweep.address = None: required"),
                         (["--engine", "dask", "--address", f"tcp://127.0.0.1:{free_port()}"], "no Dask scheduler")):
        out = subprocess.run([str(BIN / "nnlab"), "sweep", "d.yaml", *args], cwd=work, capture_output=True, text=True)
        assert out.returncode == 2 and needle in out.stderr, out.stderr
    assert not (work / "mlruns").exists() and not (work / "data").exists()


@pytest.mark.slow
def test_sweep_on_two_dask_workers_one_killed_mid_cell(tmp_path, cluster):
    """4 cells on 2 workers; once a worker has finished a cell and started the next, it is killed (its whole
    process group: nanny and worker). Dask runs the lost cell again on the other worker, which resumes it from
    its checkpoint into the same MLflow run, or, killed before the first checkpoint, in a new run (the lost one
    then ends FAILED with the reason). One test, not two: each sweep costs ~15 s of start-up on 2 cores."""
    work = sweep_folder(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    children(uri)  # create and migrate the store now: this test reads it while the sweep writes
    log = open(tmp_path / "sweep.log", "w")
    p = subprocess.Popen([str(BIN / "nnlab"), "sweep", "d.yaml", "--engine", "dask", "--address", cluster.address],
                         cwd=work, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        victim, deadline = None, time.time() + 240
        while victim is None and time.time() < deadline:
            assert p.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:] + cluster.logs()
            runs = children(uri)
            done = {r.data.tags["nnlab.worker"] for r in runs if r.info.status == "FINISHED"}
            victim = next((r for r in runs if r.info.status == "RUNNING" and r.data.tags["nnlab.worker"] in done),
                          None)
            if victim:
                os.killpg(cluster.workers[victim.data.tags["nnlab.worker"]].pid, signal.SIGKILL)
            time.sleep(0.05)
        assert victim is not None, "no worker ever finished a cell and started another"
        p.wait(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()
    out = (tmp_path / "sweep.log").read_text()
    assert p.returncode == 0, out[-3000:] + cluster.logs()

    killed = victim.data.tags["nnlab.worker"]
    survivor = next(a for a in cluster.workers if a != killed)
    runs = children(uri)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["nnlab.sweep_cell"] for r in finished) == [f"lr={lr}" for lr in SPEC["grid"]["train.lr"]]
    assert all("test_accuracy" in r.data.metrics for r in finished)
    assert {r.data.tags["nnlab.worker"] for r in finished} == {killed, survivor}  # both workers ran cells
    lost = next(r for r in runs if r.info.run_id == victim.info.run_id)
    if lost.info.status == "FINISHED":  # resumed from its checkpoint on the survivor, into the same run
        assert lost.data.tags["nnlab.worker"] == survivor and len(runs) == 4
    else:  # killed before its first checkpoint: the cell ran again in a new run; this one says why it ended
        assert lost.info.status == "FAILED" and "died mid-cell" in lost.data.tags["nnlab.error"] and len(runs) == 5
    assert not cluster.wrong_store.exists()  # the workers' own MLFLOW_TRACKING_URI was not used
    assert len(list((work / ".nnlab" / "sweeps").glob("*/*/metrics.json"))) == 4  # cells ran in the client's folder


@pytest.mark.slow
def test_a_search_on_two_dask_workers_accounts_for_every_trial(tmp_path, cluster):
    """A random search (4 trials x 2 seeds) asked and told by the client, its cells run on the cluster's two
    workers: every trial complete and told its seeds' mean, each cell trained once, none lost or doubled."""
    import optuna
    from optuna.trial import TrialState

    work = sweep_folder(tmp_path)
    spec = {k: v for k, v in SPEC.items() if k != "grid"}
    spec.update(search={"method": "random", "trials": 4, "space": {"train.lr": "loguniform(1e-3, 1e-1)"}},
                seeds=[0, 1])
    (work / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    out = subprocess.run([str(BIN / "nnlab"), "sweep", "s.yaml", "--engine", "dask", "--address", cluster.address],
                         cwd=work, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + cluster.logs()
    parent = out.stdout.split("sweep parent run ")[1].split(":")[0]
    storage = f"sqlite:///{tmp_path / 'store' / 'optuna.db'}"
    study = optuna.load_study(study_name=f"nnlab-sweep-{parent}", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    runs = children(uri)
    assert sorted(r.data.tags["nnlab.study_trial"] for r in runs) == ["0", "0", "1", "1", "2", "2", "3", "3"]
    assert len({r.data.tags["nnlab.sweep_cell"] for r in runs}) == 8 and all(r.info.status == "FINISHED" for r in runs)
    for t in study.trials:
        accs = [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["nnlab.study_trial"] == str(t.number)]
        assert t.value == pytest.approx(sum(accs) / 2)
    assert {r.data.tags["nnlab.worker"] for r in runs} == set(cluster.workers)  # both workers trained cells


def test_a_cell_submitted_with_per_gpu_asks_the_scheduler_for_its_share_of_a_gpu():
    """--per-gpu 2 on Dask: what the sweep submits inside `placement` reaches the scheduler restricted to workers
    with a `GPU` resource, asking half of one (an in-process cluster whose one worker declares GPU=1: a label to
    Dask, no device needed). The same context wraps the sweep's and the search's submissions (flows/sweep.py,
    flows/search.py); Prefect's DaskTaskRunner submits through this client call, and a sweep run that way on a
    cluster where one worker of two declared a GPU put every cell on it (checked once, by hand)."""
    from distributed import Client, LocalCluster

    from tasks.sweep import placement

    spec = load_spec(None, {"sweep": {**SPEC, "engine": "dask", "address": "tcp://127.0.0.1:8786", "per_gpu": 2}})
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as lc, Client(lc) as c:
        with placement(spec):
            f = c.submit(sum, [1, 2], key="cell")
        assert f.result(timeout=30) == 3
        assert c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.tasks["cell"].resource_restrictions) \
            == {"GPU": 0.5}
        local = load_spec(None, {"sweep": {**SPEC, "gpus": [0], "per_gpu": 2}})
        with placement(local):  # a local sweep's cells ask nothing of a scheduler
            g = c.submit(sum, [3, 4], key="plain")
        assert g.result(timeout=30) == 7
        assert not c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.tasks["plain"].resource_restrictions)


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
            gpu = ["--resources", "GPU=1"] if i == 1 else []  # a label to Dask: w1 is "the GPU worker"
            procs[f"w{i}"] = self.start(
                f"worker{i}", "worker", "--scheduler-file", str(info), "--name", f"w{i}", "--nworkers", "1",
                "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", "--preload", "flows.sweep",
                "--death-timeout", "60", *gpu)
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
            self.names = {w["name"]: addr for addr, w in c.scheduler_info()["workers"].items()}

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
    """A cluster of its own: for a test that kills one of its workers."""
    yield from _cluster(tmp_path / "cluster")


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """One cluster for the tests that leave it whole (its start-up is ~10 s on 2 cores)."""
    yield from _cluster(tmp_path_factory.mktemp("shared") / "cluster")


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
def test_a_search_on_two_dask_workers_accounts_for_every_trial(tmp_path, shared_cluster):
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
    out = subprocess.run([str(BIN / "nnlab"), "sweep", "s.yaml", "--engine", "dask", "--address", shared_cluster.address],
                         cwd=work, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + shared_cluster.logs()
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
    assert {r.data.tags["nnlab.worker"] for r in runs} == set(shared_cluster.workers)  # both workers trained cells


@pytest.mark.slow
def test_cells_asking_for_a_gpu_run_only_on_the_worker_that_declares_one(tmp_path, shared_cluster):
    """--per-gpu 2: each cell asks the scheduler for half of a worker's GPU resource; only w1 declares one
    (`--resources GPU=1`), so every cell runs there, two at most at once, and w2 (no GPU) gets none."""
    work = sweep_folder(tmp_path)
    spec = {**SPEC, "grid": {"train.lr": SPEC["grid"]["train.lr"][:3]}}
    (work / "d.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    out = subprocess.run([str(BIN / "nnlab"), "sweep", "d.yaml", "--engine", "dask", "--address", shared_cluster.address,
                          "--per-gpu", "2"], cwd=work, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + shared_cluster.logs()
    runs = children(uri)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["nnlab.worker"] for r in runs} == {shared_cluster.names["w1"]}


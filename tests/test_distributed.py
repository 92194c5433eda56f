"""Data-parallel training of one run (tasks/distributed.py, tasks/rank.py): torchrun, gloo on the CPU.

Two processes at batch 32 follow one process at batch 64 (the same seed: the same loss curves); a rank killed
with SIGKILL fails the run naming it, leaves no process, and the same command resumes it into the same MLflow
run; two torchrun agents on 127.0.0.1 ("two machines", c10d rendezvous) train one run; what cannot be
data-parallel is refused before anything starts."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import group_left, write_params
from tasks.config import validate
from tasks.data import prepare
from tasks.tracking import client, metric_history

NNLAB = str(Path(sys.executable).parent / "nnlab")


def _curves(run_id: str) -> dict[str, list[float]]:
    return {k: [v for _, v in metric_history(run_id, k)] for k in ("train_loss", "val_loss", "val_accuracy")}


@pytest.mark.parametrize("arch, options", [("mlp", {"hidden": [32], "dropout": 0.0}),
                                           ("simple_cnn", {"filters": [8, 8], "dense": 16})])
def test_two_processes_at_half_the_batch_follow_one_process(project, arch, options):
    from tasks.stages import train_stage

    def trained(nproc: int, batch: int):
        cfg = validate({"data": {"source": "digits", "max_train": 600},
                        "train": {"epochs": 2, "batch_size": batch, "device": "cpu", "diagnostics": {"enabled": False},
                                  "distributed": {"nproc_per_node": nproc}},
                        "models": {arch: options}, "tracking": {"system_metrics": False}})
        prepare(cfg.data, 0, "d")
        return train_stage(cfg, arch, "d", f"out{nproc}")

    one, two = trained(1, 64), trained(2, 32)
    assert one.run_id != two.run_id and two.epochs == 2
    a, b = _curves(one.run_id), _curves(two.run_id)
    for k in a:
        assert len(a[k]) == len(b[k]) == 2
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
    tags = client().get_run(two.run_id).data.tags
    assert tags["nnlab.world_size"] == "2" and tags["nnlab.backend"] == "gloo"
    assert tags["nnlab.devices"] == "cpu x 2 processes"
    assert not list(Path(".nnlab/distributed").glob("*")), "a finished launch leaves nothing behind"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nnlab(cwd: Path, uri: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([NNLAB, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, **popen)


def _project(tmp_path: Path, epochs: int, **distributed) -> str:
    write_params(tmp_path / "params.yaml", data={"source": "digits"},
                 models={"mlp": {"hidden": [256, 256], "dropout": 0.0}},
                 train={"epochs": epochs, "device": "cpu", "batch_size": 32, "distributed": distributed},
                 tracking={"system_metrics": False})
    from tasks.config import load_config
    from tasks.data import PROCESSED

    cfg = load_config(tmp_path / "params.yaml", [])
    prepare(cfg.data, cfg.seed, tmp_path / PROCESSED)  # what `nnlab stage prepare` writes, without its start-up
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (found := pred()):
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


def _started(tmp_path: Path, proc: subprocess.Popen) -> tuple[Path, list[int]]:
    """The launch folder of `proc`'s ranks once rank 0 has its run open, and the ranks' pids."""
    def ready():
        jobs = [j for j in (tmp_path / ".nnlab" / "distributed").glob(f"mlp-*") if (j / "run_id").exists()
                and len(list(j.glob("rank-*.started"))) == 2 and not (j / "seen").exists()]
        return jobs[0] if jobs else None

    job = _wait_for(ready, 120, "a launch with both ranks and an open run")
    (job / "seen").touch()
    return job, [int((job / f"rank-{r}.started").read_text()) for r in (0, 1)]


def _gone(pids: list[int], wait: float) -> list[int]:
    import psutil

    end = time.monotonic() + wait
    while (alive := [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < end:
        time.sleep(0.2)
    return alive


@pytest.mark.slow
def test_ctrl_c_a_dead_rank_or_a_dead_launcher_stop_every_rank_and_the_same_command_resumes(tmp_path):
    uri = _project(tmp_path, 40, nproc_per_node=2)
    train = ("stage", "train", "--model", "mlp")
    status = lambda run_id: MlflowClient(uri).get_run(run_id).info.status  # noqa: E731
    ctrl_c = {"start_new_session": True, "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}

    proc = _nnlab(tmp_path, uri, *train, **ctrl_c)  # 1. Ctrl-C (to the command's process group, as a terminal does)
    job, ranks = _started(tmp_path, proc)
    run_id = (job / "run_id").read_text()
    _wait_for(lambda: list((tmp_path / ".nnlab" / "checkpoints").glob("mlp-*.pt")), 60, "a first checkpoint")
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 130, out[-3000:]
    assert f"mlp's MLflow run {run_id} is marked KILLED" in out and "Traceback" not in out, out[-3000:]
    assert _gone(ranks, 5) == [] and group_left(proc.pid, 5) == [] and status(run_id) == "KILLED"

    proc = _nnlab(tmp_path, uri, *train, start_new_session=True)  # 2. one rank killed -9
    job, ranks = _started(tmp_path, proc)
    assert (job / "run_id").read_text() == run_id  # resumed
    os.kill(ranks[1], signal.SIGKILL)
    out = proc.communicate(timeout=90)[0]
    assert proc.returncode == 1 and "rank 1 died without a word" in out, out[-3000:]
    assert _gone(ranks, 5) == [] and group_left(proc.pid, 5) == []
    assert status(run_id) == "FAILED", out[-3000:]
    assert "rank 1 died" in MlflowClient(uri).get_run(run_id).data.tags["nnlab.error"]

    proc = _nnlab(tmp_path, uri, *train, start_new_session=True)  # 3. the launcher and torchrun's agent killed -9
    job, ranks = _started(tmp_path, proc)
    assert (job / "run_id").read_text() == run_id
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert _gone(ranks, 25) == [], "ranks outlived their agent"  # they run in sessions of their own
    assert status(run_id) == "KILLED"

    proc = _nnlab(tmp_path, uri, *train)  # 4. the same command once more: the same run, finished
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming MLflow run {run_id} after epoch" in out, out[-3000:]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["epochs_run"] == 40
    assert sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "train_loss")) == list(range(1, 41))


@pytest.mark.slow
def test_two_machines_meeting_on_localhost_train_one_run(tmp_path):
    port = _free_port()
    uri = _project(tmp_path, 2, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", timeout=60)
    train = ("stage", "train", "--model", "mlp")
    lonely = _free_port()  # beside them, a machine whose partner never comes (its own address)
    alone = _nnlab(tmp_path, uri, *train, "--set", "train.distributed.timeout=5",
                   "--set", f"train.distributed.rdzv_endpoint=127.0.0.1:{lonely}")
    nodes = [_nnlab(tmp_path, uri, *train) for _ in range(2)]
    out = alone.communicate(timeout=90)[0]
    assert alone.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert f"the 2 machines did not all meet at 127.0.0.1:{lonely} within train.distributed.timeout (5 s)" in out, out
    outs = [p.communicate(timeout=180)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    assert sum("the machine that had rank 0 recorded the run" in o for o in outs) == 1, outs
    runs = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["nnlab.world_size"] == "2"


def test_what_cannot_be_data_parallel_is_refused_before_anything_starts(tmp_path):
    write_params(tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    for args, why in ((["--models", "dcgan", "--nproc", "2"], "dcgan cannot train data-parallel"),
                      (["--models", "mlp", "--nproc", "0"], "train.distributed.nproc_per_node = 0")):
        out = subprocess.run([NNLAB, "run", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert out.returncode == 2 and why in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    assert not (tmp_path / "store").exists() and not (tmp_path / "data").exists()  # nothing written


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL on two GPUs: a host with two or more")
def test_two_gpus_with_nccl_follow_one_gpu(project):
    from tasks.stages import train_stage

    runs = []
    for nproc, batch in ((1, 64), (2, 32)):
        cfg = validate({"data": {"source": "digits"}, "train": {"epochs": 2, "batch_size": batch, "device": "cuda",
                                                                 "precision": "fp32",
                                                                 "distributed": {"nproc_per_node": nproc}},
                        "models": {"mlp": {"hidden": [32], "dropout": 0.0}}})
        prepare(cfg.data, 0, "d")
        runs.append(train_stage(cfg, "mlp", "d", f"out{nproc}"))
    a, b = (_curves(r.run_id) for r in runs)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
    tags = client().get_run(runs[1].run_id).data.tags
    assert tags["nnlab.backend"] == "nccl" and tags["nnlab.devices"] == "cuda:0, cuda:1"

"""What auditing costs (issue 33): MLflow's system-metrics monitor beside the training loop, and `nnlab diff`
on a store that holds many runs.

    .venv/bin/python benchmarks/audit_costs.py monitor [--rounds 6] [--epochs 4] [--interval 10,1]
    .venv/bin/python benchmarks/audit_costs.py monitor-cpu [--seconds 60] [--interval 10,1]
    .venv/bin/python benchmarks/audit_costs.py diff [--runs 1000]

monitor: epochs of simple_cnn on mnist5k with the monitor running (as a run has it: one sample every
`interval` seconds, each logged to the run) against the same epochs without it, alternated in one process
(A, B, A, B, ...) so drift and other load hit both alike; the overhead is the median of the per-round ratios.
Make rounds long enough for several samples at the interval measured (--epochs), and the machine quiet.
monitor-cpu: the monitor's own CPU time (getrusage) while the process sleeps, per sample and as a share of the
machine: what it takes from training whatever else runs.

diff: a temporary SQLite store filled with `--runs` finished runs in one experiment (20 params, 10 metrics,
the tags a training run has), two of them an optimizers-sweep pair; then `nnlab diff A B` timed as a user runs
it (a fresh process, wall clock) and the in-process `diff()` alone. Everything goes to a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def monitor(args) -> None:
    import mlflow
    import torch

    from models.registry import create_model
    from tasks.config import DataConfig, TrainConfig
    from tasks.data import load_prepared, prepare
    from tasks.kinds.supervised import SupervisedStep
    from tasks.machine import start_monitor
    from tasks.train import Trainer, seed_everything, to_device

    work = Path(tempfile.mkdtemp(prefix="nnlab-audit-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    prepare(DataConfig(source="mnist5k"), 0, work / "data")
    data = load_prepared(work / "data")
    norm, cpu = data.manifest["normalization"], torch.device("cpu")
    train = to_device(data.x_train, data.y_train, norm["mean"], norm["std"], cpu, True)
    seed_everything(0)
    model = create_model("simple_cnn", input_shape=data.manifest["input_shape"], num_classes=10)
    cfg = TrainConfig(epochs=10_000, device="cpu")
    trainer = Trainer(model.to(memory_format=torch.channels_last), cfg, 0, cpu, SupervisedStep(model, cfg, cpu))
    trainer.train_one_epoch(train)  # warm-up
    run_id = mlflow.MlflowClient().create_run("0").info.run_id

    def timed(interval: float | None) -> float:
        mon = start_monitor(run_id, interval, cpu) if interval else None
        t = time.perf_counter()
        for _ in range(args.epochs):
            trainer.train_one_epoch(train)
        seconds = time.perf_counter() - t
        if mon is not None:
            mon.finish()
        return seconds

    for interval in [float(v) for v in args.interval.split(",")]:
        ratios, on, off = [], [], []
        for r in range(args.rounds):
            first_on = r % 2 == 0  # alternate which goes first
            a = timed(interval if first_on else None)
            b = timed(None if first_on else interval)
            t_on, t_off = (a, b) if first_on else (b, a)
            on.append(t_on)
            off.append(t_off)
            ratios.append(t_on / t_off)
        samples = int(statistics.median(on) // interval)
        print(f"interval {interval:g} s: with the monitor {statistics.median(on):.2f} s, without "
              f"{statistics.median(off):.2f} s per round of {args.epochs} epochs (~{samples} samples a round); "
              f"overhead {100 * (statistics.median(ratios) - 1):+.2f}% (median of {args.rounds} round ratios, "
              f"range {100 * (min(ratios) - 1):+.2f}% .. {100 * (max(ratios) - 1):+.2f}%)", flush=True)


def monitor_cpu(args) -> None:
    """The monitor's own CPU time, read with getrusage while the process otherwise sleeps: insensitive to other
    load on the machine (which makes wall-clock ratios of short epochs noisy), and what it takes from training."""
    import resource

    import mlflow
    import torch

    from tasks.machine import start_monitor

    work = Path(tempfile.mkdtemp(prefix="nnlab-audit-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    run_id = mlflow.MlflowClient().create_run("0").info.run_id

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    for interval in [float(v) for v in args.interval.split(",")]:
        c0 = cpu()
        time.sleep(args.seconds)
        idle = cpu() - c0
        mon = start_monitor(run_id, interval, torch.device("cpu"))
        c0 = cpu()
        time.sleep(args.seconds)
        used = cpu() - c0 - idle
        mon.finish()
        samples = args.seconds / interval
        print(f"interval {interval:g} s: the monitor used {1000 * used:.0f} ms of CPU in {args.seconds:g} s "
              f"({1000 * used / samples:.1f} ms a sample, {100 * used / args.seconds:.3f}% of one core; "
              f"{100 * used / args.seconds / (os.cpu_count() or 1):.3f}% of this {os.cpu_count()}-core machine)",
              flush=True)


def diff(args) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    work = Path(tempfile.mkdtemp(prefix="nnlab-audit-"))
    uri = f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    c = MlflowClient(uri)
    exp = c.create_experiment("many")
    t0 = time.perf_counter()
    ids = []
    now = int(time.time() * 1000)
    for i in range(args.runs):
        opt = ("adam", "sgd", "adagrad", "rmsprop", "momentum")[i % 5]
        run = c.create_run(exp, run_name=f"mlp · mnist5k · {opt} · {i}",
                           tags={"nnlab.kind": "classifier", "nnlab.data_hash": "d" * 16, "nnlab.code_hash": "c" * 12})
        params = [Param(f"train.p{k}", str(k)) for k in range(17)]
        params += [Param("train.optimizer", opt), Param("train.lr", str(0.001 * (1 + i % 5))),
                   Param("seed", str(i % 3))]
        metrics = [Metric(f"m{k}", (i * 7 + k) % 100 / 100, now, 0) for k in range(9)]
        metrics.append(Metric("test_accuracy", 0.9 + (i % 50) / 1000, now, 0))
        c.log_batch(run.info.run_id, metrics=metrics, params=params, tags=[RunTag("nnlab.arch", "mlp")])
        c.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    print(f"store: {args.runs} runs written in {time.perf_counter() - t0:.1f} s ({uri})", flush=True)
    a, b = ids[0], ids[len(ids) // 2 + 1]  # adam vs sgd, different seeds
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        out = subprocess.run([str(Path(sys.executable).parent / "nnlab"), "diff", a, b], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        walls.append(time.perf_counter() - t)
        if out.returncode:
            raise SystemExit(f"nnlab diff failed: {out.stderr}")
    print(out.stdout.rstrip())
    from tasks.diff import diff as run_diff

    t = time.perf_counter()
    run_diff(a, b)
    inner = time.perf_counter() - t
    print(f"nnlab diff on a {args.runs}-run store: wall {statistics.median(walls):.2f} s (median of 3 fresh "
          f"processes: {', '.join(f'{w:.2f}' for w in walls)}); the diff itself {inner:.3f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("monitor")
    m.add_argument("--rounds", type=int, default=6)
    m.add_argument("--epochs", type=int, default=4)
    m.add_argument("--interval", default="10,1", help="sampling intervals in seconds, comma-separated")
    c = sub.add_parser("monitor-cpu")
    c.add_argument("--seconds", type=float, default=60.0)
    c.add_argument("--interval", default="10,1")
    d = sub.add_parser("diff")
    d.add_argument("--runs", type=int, default=1000)
    args = ap.parse_args()
    {"monitor": monitor, "monitor-cpu": monitor_cpu, "diff": diff}[args.what](args)


if __name__ == "__main__":
    main()

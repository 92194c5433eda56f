"""Data-parallel scaling of one run (issue 34): training samples per second with 1 and N processes.

    .venv/bin/python benchmarks/data_parallel.py [--procs 1,2] [--model simple_cnn] [--epochs 3] [--device cpu|cuda]

Each setting trains the same run through the training stage (tasks/stages.py: torchrun, DDP, rank 0 recording) on
mnist5k, at the same whole batch (params.yaml's batch size x 2, split over the processes), in a temporary folder
with its own MLflow store; the rate is the run's own `train_samples_per_second` (training epochs only, not start-up).
Scaling efficiency = rate(N) / (N x rate(1)). On a CPU, N processes share the machine's cores (torch threads:
cores / N each), so the ideal there is the same rate, not N times it; on GPUs each process has its own device.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--model", default="simple_cnn")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nnlab-ddp-"))
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    from tasks.config import load_config
    from tasks.data import prepare
    from tasks.tracking import client

    procs = [int(p) for p in args.procs.split(",")]
    whole = None
    rows = []
    for n in procs:
        cfg = load_config(ROOT / "params.yaml", ["data.source=mnist5k"], [args.model])
        whole = whole or cfg.train_for(args.model).batch_size * max(procs)
        sets = ["data.source=mnist5k", f"train.epochs={args.epochs}", f"train.device={args.device}",
                f"train.batch_size={whole // n}", f"train.distributed.nproc_per_node={n}", "register.enabled=false"]
        cfg = load_config(ROOT / "params.yaml", sets, [args.model])
        prepare(cfg.data, cfg.seed, work / "data")
        from tasks.stages import train_stage

        t = time.perf_counter()
        trained = train_stage(cfg, args.model, work / "data", work / f"out{n}")
        wall = time.perf_counter() - t
        m = client().get_run(trained.run_id).data.metrics
        rows.append((n, m["train_samples_per_second"], wall, m["val_accuracy"]))
    base = rows[0][1]
    print(f"{args.model} on mnist5k, {args.epochs} epochs, whole batch {whole}, {args.device}, "
          f"{os.cpu_count()} cores")
    for n, rate, wall, acc in rows:
        print(f"  {n} process(es): {rate:8.0f} samples/s  (x{rate / base:.2f}; efficiency {rate / (n * base):.0%})  "
              f"wall {wall:5.1f} s  val_accuracy {acc:.4f}")


if __name__ == "__main__":
    main()

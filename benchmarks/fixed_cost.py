"""nnlab's fixed cost against the same training written by hand (benchmarks/handwritten_cnn.py).

    .venv/bin/python benchmarks/fixed_cost.py [--epochs 5] [--pairs 3]
    .venv/bin/python benchmarks/fixed_cost.py --sweep [--pairs 3]

In a temporary folder (params.yaml copied, its own MLflow store, Prefect's temporary server as a user gets it):
one `nnlab run` first prepares mnist5k and creates the store (not timed); then, alternating in one sitting,
`nnlab run --models simple_cnn --set data.source=mnist5k --set models.simple_cnn.train.epochs=E
--set register.enabled=false` (tracked in MLflow, orchestrated by Prefect, its data checked by DVC's rules) and
`python benchmarks/handwritten_cnn.py DATA E` on the split that run prepared (data/variants/<hash>/). Wall clock of each
command from start to exit; the ratio of the medians is the figure.

--sweep: `nnlab sweep sweeps/optimizers.yaml --set sweep.register=false` (15 cells, 2 local workers, parent and
child runs, report) against benchmarks/handwritten_sweep.py: the same 15 trainings back to back in one script.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nnlab-fixed-"))
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # a user's first run: the temporary server
    run = [str(BIN / "nnlab"), "run", "--models", "simple_cnn", "--set", "data.source=mnist5k",
           "--set", f"models.simple_cnn.train.epochs={args.epochs}", "--set", "register.enabled=false"]
    if args.sweep:
        shutil.copytree(ROOT / "sweeps", work / "sweeps")
        run = [str(BIN / "nnlab"), "sweep", "sweeps/optimizers.yaml", "--set", "sweep.register=false"]
    timed(run, work, env)  # prepares the data and creates the store
    import json

    data = next(m.parent for m in (work / "data").glob("**/manifest.json")  # where that run prepared mnist5k
                if json.loads(m.read_text()).get("source") == "mnist5k")
    script = ([sys.executable, str(ROOT / "benchmarks" / "handwritten_sweep.py"), str(data)] if args.sweep else
              [sys.executable, str(ROOT / "benchmarks" / "handwritten_cnn.py"), str(data), str(args.epochs)])
    ours, theirs = [], []
    for i in range(args.pairs):
        for cmd, into in ((run, ours), (script, theirs)) if i % 2 == 0 else ((script, theirs), (run, ours)):
            into.append(timed(cmd, work, env))
        print(f"pair {i + 1}: nnlab {ours[-1]:.1f} s, by hand {theirs[-1]:.1f} s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    what = "sweeps/optimizers.yaml (15 cells)" if args.sweep else f"{args.epochs} epochs of simple_cnn on mnist5k"
    print(f"{what}, {args.pairs} pairs alternating, {os.cpu_count()} cores: "
          f"nnlab {a:.1f} s (median; {', '.join(f'{v:.1f}' for v in ours)}), hand-written {b:.1f} s "
          f"({', '.join(f'{v:.1f}' for v in theirs)}): {a / b:.2f}x, fixed cost {a - b:.1f} s", flush=True)


if __name__ == "__main__":
    main()

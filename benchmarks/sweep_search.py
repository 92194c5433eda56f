"""Sweeps that learn, measured (issue 32): pruning on seed means against the full grid, and TPE against random
search and an equal-budget grid. Every sweep runs as a user runs it (`nnlab sweep FILE`), from the repository
root, into a temporary MLflow store (and the Optuna study beside it).

    .venv/bin/python benchmarks/sweep_search.py pruning [--eta 3] [--min-epochs 1[,3...]] [--method asha|sha|...]
                                                        [--monitor M]
    .venv/bin/python benchmarks/sweep_search.py search [--search-seeds 0,1,2,3,4] [--trials 20]

pruning: sweeps/optimizers.yaml (5 optimizers x 3 seeds, 12 epochs, mlp 256-128 on mnist5k) once in full and
once with `prune` for each --min-epochs given (ASHA by default, judged on the mean over seeds of val_loss);
printed: the best cell by seed mean of each, the epochs trained by each, and their ratio. Goal: the same best
cell, epochs <= 50%.

search: sweeps/search_mlp.yaml (lr x weight decay x dropout, 3 seeds per trial) with TPE and with random search,
one study per search seed, and a grid of the same budget (20 configurations x 3 seeds = 60 cells: lr 5 levels x
weight decay 2 x dropout 2); printed: each study's best trial mean. Goal: TPE >= random in at least 4 of 5 search
seeds, and TPE within 0.5 points of the grid's best.

Run it alone on a 2-core machine (each sweep uses every core); --out FILE writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NNLAB = str(Path(sys.executable).parent / "nnlab")
GRID_60 = {"train.lr": [0.0003, 0.001, 0.003, 0.01, 0.03], "train.weight_decay": [1e-05, 0.001],
           "models.mlp.dropout": [0.1, 0.3]}


def sweep(spec: dict, store: Path, label: str) -> dict:
    """`nnlab sweep` on `spec` into `store`; the parent run's figures."""
    from mlflow.tracking import MlflowClient

    file = store / f"{label}.yaml"
    file.write_text(yaml.safe_dump({**spec, "name": label, "register": False}, sort_keys=False))
    uri = f"sqlite:///{store / 'mlflow.db'}"
    t0 = time.monotonic()
    out = subprocess.run([NNLAB, "sweep", str(file)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    seconds = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"{label}: nnlab sweep exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    parent_id = out.stdout.split("sweep parent run ")[1].split(":")[0]
    c = MlflowClient(uri)
    parent = c.get_run(parent_id)
    runs = c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                         max_results=1000)
    epochs = sum(len(c.get_metric_history(r.info.run_id, "val_loss")) for r in runs)
    res = {"label": label, "parent": parent_id, "seconds": round(seconds, 1), "cells": len(runs), "epochs": epochs,
           "best_cell": parent.data.tags.get("nnlab.best_cell"),
           "best_mean": parent.data.metrics.get("test_accuracy"),
           "pruned_cells": int(parent.data.tags.get("nnlab.pruned_cells", 0))}
    print(json.dumps(res), flush=True)
    return res


def pruning(args, store: Path) -> dict:
    spec = yaml.safe_load((ROOT / "sweeps/optimizers.yaml").read_text())
    full = sweep(spec, store, "optimizers-full")
    print(f"full: best {full['best_cell']} {full['best_mean']:.4f}, {full['epochs']} epochs, {full['seconds']} s")
    results = []
    for min_epochs in (int(m) for m in str(args.min_epochs).split(",")):
        prune = {"method": args.method, "min_epochs": min_epochs, "eta": args.eta, "monitor": args.monitor}
        pruned = sweep({**spec, "prune": prune}, store, f"optimizers-{args.method}-{min_epochs}")
        ratio = pruned["epochs"] / full["epochs"]
        print(f"{args.method} from epoch {min_epochs}: best {pruned['best_cell']} {pruned['best_mean']:.4f}, "
              f"{pruned['epochs']} epochs ({ratio:.0%} of full), {pruned['pruned_cells']} cells cut, "
              f"{pruned['seconds']} s", flush=True)
        results.append({"pruned": pruned, "prune": prune, "same_best_cell": full["best_cell"] == pruned["best_cell"],
                        "epochs_ratio": round(ratio, 3)})
    return {"full": full, "settings": results, "goal": "same best cell, epochs ratio <= 0.5"}


def search(args, store: Path) -> dict:
    spec = yaml.safe_load((ROOT / "sweeps/search_mlp.yaml").read_text())
    spec["search"]["trials"] = args.trials
    spec.pop("stop", None)
    out: dict = {"tpe": [], "random": []}
    grid = {k: v for k, v in spec.items() if k not in ("search", "seeds")}
    if args.grid_only:  # the equal-budget grid alone
        return {"grid": sweep({**grid, "grid": {**GRID_60, "seed": spec["seeds"]}}, store, "grid-60")}
    for s in [int(x) for x in args.search_seeds.split(",")]:
        for method in ("tpe", "random"):
            out[method].append(sweep({**spec, "search": {**spec["search"], "method": method, "seed": s}},
                                     store, f"search-{method}-{s}"))
    out["grid"] = sweep({**grid, "grid": {**GRID_60, "seed": spec["seeds"]}}, store, "grid-60")
    wins = sum(t["best_mean"] >= r["best_mean"] for t, r in zip(out["tpe"], out["random"]))
    best_tpe = max(t["best_mean"] for t in out["tpe"])
    gap = [round(100 * (out["grid"]["best_mean"] - t["best_mean"]), 2) for t in out["tpe"]]
    for t, r, g in zip(out["tpe"], out["random"], gap):
        print(f"{t['label']}: {t['best_mean']:.4f}   {r['label']}: {r['best_mean']:.4f}   grid - tpe: {g:+.2f} points")
    print(f"grid-60: {out['grid']['best_mean']:.4f} ({out['grid']['best_cell']})")
    print(f"TPE >= random in {wins} of {len(out['tpe'])} search seeds; TPE's best {best_tpe:.4f}")
    return {**out, "tpe_wins": wins, "grid_minus_tpe_points": gap,
            "goal": "TPE >= random in >= 4 of 5 seeds; TPE within 0.5 points of the grid's best"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("pruning", "search"))
    ap.add_argument("--method", default="asha", choices=("asha", "sha", "hyperband", "median"))
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--min-epochs", default="1", help="the first rung; several (1,3): one pruned sweep each")
    ap.add_argument("--monitor", default="val_loss", help="the epoch metric pruning judges")
    ap.add_argument("--search-seeds", default="0,1,2,3,4")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--grid-only", action="store_true", help="search: only the equal-budget grid")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nnlab-bench-") as tmp:
        result = (pruning if args.what == "pruning" else search)(args, Path(tmp))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Where the wall time of an nnlab command goes: the phase table of issue 19, for any command.

    python benchmarks/phases.py -- nnlab run --models simple_cnn --set data.source=mnist5k --set train.epochs=5
    python benchmarks/phases.py --repeat 2 -- nnlab sweep sweeps/optimizers.yaml --workers 2

The command runs with NNLAB_PHASES set to a temporary file; nnlab appends a time mark there at each phase
boundary (tasks/phases.py): config validated, imported, server ready, flow started, model built, MLflow run
opened, fit start / fit end (the training loop itself), model logged, run finished, flow done, summary printed,
exit handlers done. This script adds the two ends it sees itself: the process started and the process exited
(stdout closed and the process reaped). Each row is the time from the previous mark of the command's own process
to this one; marks of other processes (sweep workers) are counted in the training share, not in the rows.
Training is the union of fit intervals across all processes; its share of the wall time is the figure to watch.
Nothing here is asserted: it prints what it measured.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(cmd: list[str], quiet: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="nnlab-phases-") as tmp:
        path = Path(tmp) / "marks.tsv"
        env = {**os.environ, "NNLAB_PHASES": str(path)}
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = []
        for line in proc.stdout:  # a reader of the pipe: exit counts only when no child still holds it
            out.append(line)
            if not quiet:
                sys.stdout.write(line)
        code = proc.wait()
        t_end = time.time()
        marks = [(float(t), int(pid), name) for t, pid, name in
                 (line.split("\t", 2) for line in path.read_text().splitlines())] if path.exists() else []
    main = proc.pid
    rows, prev = [], ("process started", t0)
    for t, pid, name in sorted(marks):
        if pid == main and not name.startswith("fit "):
            rows.append((f"{prev[0]} -> {name}", t - prev[1]))
            prev = (name, t)
    rows.append((f"{prev[0]} -> process exited", t_end - prev[1]))
    return {"rows": rows, "wall": t_end - t0, "training": _training(marks), "code": code,
            "fits": sum(1 for *_, n in marks if n == "fit start"), "tail": "".join(out[-5:])}


def _training(marks: list[tuple[float, int, str]]) -> float:
    """The union over time of every process's fit intervals (parallel sweep cells count once)."""
    spans, open_ = [], {}
    for t, pid, name in sorted(marks):
        if name == "fit start":
            open_[pid] = t
        elif name == "fit end" and pid in open_:
            spans.append((open_.pop(pid), t))
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs of the command (columns)")
    ap.add_argument("--quiet", action="store_true", help="hide the command's own output")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --, e.g. -- nnlab run --set train.epochs=5")
    results = [run_once(cmd, args.quiet) for _ in range(args.repeat)]
    for i, r in enumerate(results):
        if r["code"] != 0:
            print(f"run {i + 1} exited with code {r['code']}:\n{r['tail']}", file=sys.stderr)
    print(f"\n$ {shlex.join(cmd)}")
    names = [name for name, _ in results[0]["rows"]]
    width = max(len(n) for n in names + ["phase"])
    print(f"{'phase':<{width}}  " + "  ".join(f"run {i + 1:>3}" for i in range(len(results))))
    for j, name in enumerate(names):
        cells = [f"{r['rows'][j][1]:7.2f}" if j < len(r["rows"]) and r["rows"][j][0] == name else "      -"
                 for r in results]
        print(f"{name:<{width}}  " + "  ".join(cells))
    print(f"{'wall':<{width}}  " + "  ".join(f"{r['wall']:7.2f}" for r in results))
    print(f"{'training (fit start..fit end, union)':<{width}}  " + "  ".join(f"{r['training']:7.2f}" for r in results))
    print(f"{'training share of wall':<{width}}  " + "  ".join(f"{r['training'] / r['wall']:7.2f}" for r in results))
    print(f"{'fits':<{width}}  " + "  ".join(f"{r['fits']:7d}" for r in results))
    return max(r["code"] for r in results)


if __name__ == "__main__":
    sys.exit(main())

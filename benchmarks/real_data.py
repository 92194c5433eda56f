"""The table "On public real data" in docs/models.md, written by the benchmarks that measure it, never typed.

A benchmark on public data (translation_multi30k.py, speech_fsdd.py) ends with `record(key, rows)`: its rows go to
benchmarks/real_data.json under `key` (a later run of the same benchmark and setting replaces them, others stay)
and the table between the markers in docs/models.md is written again from that file. Each row: the family, the
data and split, nnlab's figure, the published one, the command that produced it, the training time and the
machine it ran on.

    .venv/bin/python benchmarks/real_data.py      # rewrite the table from benchmarks/real_data.json
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "benchmarks" / "real_data.json"
DOC = ROOT / "docs" / "models.md"
BEGIN, END = "<!-- real-data: written by benchmarks/real_data.py -->", "<!-- real-data: end -->"
COLUMNS = ("family", "data", "nnlab", "published", "training", "command")


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    threads, load = torch.get_num_threads(), os.getloadavg()[1]  # the last 5 minutes: was the machine shared?
    return gpu or (f"{os.cpu_count()} CPU cores ({cpu}), {threads} torch thread{'s' * (threads > 1)}, "
                   f"load {load:.1f} at the end")


def record(key: str, rows: list[dict]) -> None:
    """Keep `rows` (each with COLUMNS) as this benchmark's and rewrite the docs table."""
    stamp = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    store = json.loads(STORE.read_text()) if STORE.exists() else {}
    store[key] = [{**stamp, **r} for r in rows]
    STORE.write_text(json.dumps(store, indent=2, ensure_ascii=False) + "\n")
    write_table(store)


def write_table(store: dict) -> None:
    rows = [r for key in sorted(store) for r in store[key]]
    lines = ["| " + " | ".join(COLUMNS) + " | measured on |", "|" + "---|" * (len(COLUMNS) + 1)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in COLUMNS) + f" | {r['date']}, {r['machine']} |"
              for r in rows]
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    write_table(json.loads(STORE.read_text()) if STORE.exists() else {})

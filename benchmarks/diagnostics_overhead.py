"""Cost of the training diagnostics: epochs with diagnostics at the default interval vs switched off,
same model, data and seed, alternated in one process.   python benchmarks/diagnostics_overhead.py"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.registry import create_model
from tasks.config import TrainConfig
from tasks.data import load_prepared, prepare
from tasks.config import DataConfig
from tasks.train import Trainer, seed_everything, to_device
from tasks.kinds.supervised import SupervisedStep


def epoch_seconds(arch: str, data, diagnostics: bool, every: int) -> Trainer:
    seed_everything(0)
    m = data.manifest
    model = create_model(arch, input_shape=m["input_shape"], num_classes=m["num_classes"])
    model = model.to(memory_format=torch.channels_last)
    cfg = TrainConfig(epochs=1, device="cpu", diagnostics={"enabled": diagnostics, "every": every})
    return Trainer(model, cfg, 0, torch.device("cpu"), SupervisedStep(model, cfg, torch.device("cpu")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="mlp,simple_cnn")
    ap.add_argument("--out", default="/tmp/nnlab-bench-data")
    args = ap.parse_args()
    prepare(DataConfig(source="mnist5k"), 0, args.out)
    data = load_prepared(args.out)
    m = data.manifest
    norm = m["normalization"]
    train = to_device(data.x_train, data.y_train, norm["mean"], norm["std"], torch.device("cpu"), True)
    val = to_device(data.x_val, data.y_val, norm["mean"], norm["std"], torch.device("cpu"), True)
    every = TrainConfig().diagnostics.every
    print(f"mnist5k train {len(train.y)} images, batch 64, diagnostics every {every} steps, "
          f"{torch.get_num_threads()} threads, {args.rounds} alternated rounds")
    for arch in args.models.split(","):
        times = {True: [], False: []}
        for r in range(args.rounds + 1):  # round 0 is warm-up
            for on in (False, True):
                t = epoch_seconds(arch, data, on, every)
                t0 = time.perf_counter()
                t.fit(train, val)
                if r:
                    times[on].append(time.perf_counter() - t0)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"{arch:12s} epoch off {off:.3f}s  on {on:.3f}s  overhead {100 * (on / off - 1):+.1f}%")


if __name__ == "__main__":
    main()

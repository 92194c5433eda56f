"""sweeps/optimizers.yaml written by hand: its 15 trainings back to back in one script, with no pipeline.

    python benchmarks/handwritten_sweep.py DATA_DIR

DATA_DIR is a folder the pipeline prepared from mnist5k (train/val/test .npz, manifest.json). Each training is the
sweep's cell: an MLP 784-256-128-10 (ReLU, dropout 0.1), 12 epochs, batch 64, the optimizer at the sweep file's
learning rate, validation each epoch, the test split at the end; seeds 0, 1, 2. Imports torch and numpy (and the
standard library's json and sys) and nothing else. benchmarks/fixed_cost.py --sweep times it against the sweep.
"""
import json
import sys

import numpy as np
import torch
from torch import nn

OPTIMIZERS = {  # sweeps/optimizers.yaml's presets
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.001),
    "adam": lambda p: torch.optim.Adam(p, lr=0.001),
}


def load(data_dir: str, split: str, mean, std):
    with np.load(f"{data_dir}/{split}.npz") as z:
        x = torch.from_numpy(z["x"].astype(np.float32)).flatten(1)
        y = torch.from_numpy(z["y"].astype(np.int64))
    return (x - mean[0]) / std[0], y


def train(name: str, seed: int, x, y, xv, yv, xt, yt, classes: int) -> float:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 128), nn.ReLU(),
                          nn.Dropout(0.1), nn.Linear(128, classes))
    opt = OPTIMIZERS[name](model.parameters())
    for _ in range(12):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            nn.functional.cross_entropy(model(xv), yv)
    with torch.no_grad():
        return float((model(xt).argmax(1) == yt).float().mean())


def main(data_dir: str) -> None:
    manifest = json.load(open(f"{data_dir}/manifest.json"))
    norm = manifest["normalization"]
    splits = [t for s in ("train", "val", "test") for t in load(data_dir, s, norm["mean"], norm["std"])]
    for name in OPTIMIZERS:
        accs = [train(name, seed, *splits, manifest["num_classes"]) for seed in (0, 1, 2)]
        print(f"{name}: test_accuracy {np.mean(accs):.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

"""The floor nnlab's fixed cost is measured against: the same simple_cnn training written by hand, with no pipeline.

    python benchmarks/handwritten_cnn.py DATA_DIR EPOCHS

DATA_DIR is a folder the pipeline prepared (train/val/test .npz of raw uint8 images, manifest.json with the
normalisation). The network is params.yaml's simple_cnn (3x3 convs of 32, 64, 64 with max pooling between, a dense
layer of 64, ReLU), trained with Adam at 1e-3, batch 64, validation each epoch, the test split at the end. It
imports torch and numpy (and the standard library's json and sys) and nothing else.
"""
import json
import sys

import numpy as np
import torch
from torch import nn


def load(data_dir: str, split: str, mean, std):
    with np.load(f"{data_dir}/{split}.npz") as z:
        x = torch.from_numpy(z["x"].astype(np.float32))
        y = torch.from_numpy(z["y"].astype(np.int64))
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s, y


def accuracy(model, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
        return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def main(data_dir: str, epochs: int) -> None:
    torch.manual_seed(0)
    manifest = json.load(open(f"{data_dir}/manifest.json"))
    norm = manifest["normalization"]
    x, y = load(data_dir, "train", norm["mean"], norm["std"])
    xv, yv = load(data_dir, "val", norm["mean"], norm["std"])
    xt, yt = load(data_dir, "test", norm["mean"], norm["std"])
    c, h, w = x.shape[1:]
    model = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 64), nn.ReLU(), nn.Linear(64, manifest["num_classes"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_loss, val_acc = accuracy(model, xv, yv)
        print(f"epoch {epoch}: val_loss {val_loss:.4f} val_accuracy {val_acc:.4f}", flush=True)
    print(f"test_accuracy {accuracy(model, xt, yt)[1]:.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

"""Each architecture trained the same way on the same data: test accuracy, parameters, MACs, seconds per epoch.

    .venv/bin/python benchmarks/architectures.py [--models simple_cnn,vgg,resnet,inception,mobilenet]
        [--dataset mnist5k] [--epochs 10] [--device cpu|cuda] [--out FILE]

The training loop is the project's Trainer with the run defaults (Adam 1e-3, batch 64, precision auto: bf16
on CUDA, channels_last, diagnostics on); no MLflow, so it runs wherever torch does. Seconds per epoch is the
median over the epochs after the first (the first carries one-time kernel selection and warm-up).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="simple_cnn,vgg,resnet,inception,mobilenet")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from models.analysis import count_macs
    from models.registry import count_parameters, create_model
    from tasks.config import DataConfig, TrainConfig
    from tasks.data import load_prepared, prepare
    from tasks.kinds.supervised import classification_metrics, predict
    from tasks.train import Trainer, seed_everything, to_device
    from tasks.kinds.supervised import SupervisedStep

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(DataConfig(source=args.dataset), 0, tmp)
        d = load_prepared(tmp)
    m, n = d.manifest, d.manifest["normalization"]
    train, val = (to_device(x, y, n["mean"], n["std"], device, True) for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val)))
    test = to_device(d.x_test, d.y_test, n["mean"], n["std"], device, False)
    cfg = TrainConfig(epochs=args.epochs, device=args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"{args.dataset}: {len(train.y)} train / {len(test.y)} test, {args.epochs} epochs, {device}"
          f"{' (' + gpu + ')' if gpu else ''}, precision {'bf16' if device.type == 'cuda' else 'fp32'}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    rows = []
    for arch in args.models.split(","):
        seed_everything(0)
        model = create_model(arch, input_shape=m["input_shape"], num_classes=m["num_classes"])
        params, macs = count_parameters(model), count_macs(model, tuple(m["input_shape"]))
        model = model.to(device, memory_format=torch.channels_last)
        res = Trainer(model, cfg, 0, device, SupervisedStep(model, cfg, device)).fit(train, val)
        model = model.float().to(memory_format=torch.contiguous_format)
        acc = classification_metrics(predict(model, test.x), test.y, m["num_classes"])[0]["test_accuracy"]
        epoch_s = [h["epoch_seconds"] for h in res.history]
        row = {"arch": arch, "test_accuracy": round(acc, 4), "parameters": params, "macs": macs,
               "seconds_per_epoch": round(statistics.median(epoch_s[1:] or epoch_s), 3),
               "first_epoch_seconds": round(epoch_s[0], 3), "epochs": res.epochs, "device": str(device), "gpu": gpu}
        rows.append(row)
        print(f"{arch:12s} test acc {acc:.4f}  params {params:>9,}  MACs {macs / 1e6:8.2f}M  "
              f"{row['seconds_per_epoch']:.3f} s/epoch (first {row['first_epoch_seconds']:.2f} s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

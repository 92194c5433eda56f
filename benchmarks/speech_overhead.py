"""What the shared loop costs speech recognition: ctc_asr (and conformer) trained by `Trainer` with the CTC step
against a hand-written loop of the same updates (forward on the batch's frames, CTC loss, Adam), same model,
same data.

    .venv/bin/python benchmarks/speech_overhead.py [--rounds 5] [--n 512] [--models ctc_asr,conformer]

Both loops run in one process in turns (ours, hand-written, ours, ...) after a warm-up, so load on the machine
hits both alike; the ratio printed is the median of the per-round ratios hand-written / ours (1.0: no cost;
below 1: ours is slower). Gradient diagnostics are off (benchmarks/diagnostics_overhead.py measures them); the
step's blank-share trace stays on, as in every run. Random log-mel frames of synth_speech's shape (up to 230
frames of 40 bands, 2-5 digit words' worth of characters) stand in for data: only the time is measured.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.rounds import compare  # noqa: E402
from models.registry import create_model  # noqa: E402
from tasks.config import TrainConfig  # noqa: E402
from tasks.kinds.speech import CTCStep  # noqa: E402
from tasks.train import Split, Trainer, seed_everything  # noqa: E402

CPU = torch.device("cpu")
FRAMES, MELS, CLASSES = 230, 40, 17


def ours(arch: str, data: Split, bs: int) -> float:
    seed_everything(0)
    model = create_model(arch, input_shape=(FRAMES, MELS), num_classes=CLASSES)
    cfg = TrainConfig(epochs=1, batch_size=bs, lr=2e-3, device="cpu", diagnostics={"enabled": False})
    trainer = Trainer(model, cfg, 0, CPU, CTCStep(model, cfg, CPU))
    t0 = time.perf_counter()
    trainer.fit(data, None)
    return time.perf_counter() - t0


def by_hand(arch: str, data: Split, bs: int) -> float:
    seed_everything(0)
    model = create_model(arch, input_shape=(FRAMES, MELS), num_classes=CLASSES)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(len(data.x))
    for i in range(0, len(perm), bs):
        idx = perm[i:i + bs]
        x, y = data.x[idx], data.y[idx]
        frames, targets = y[:, 0], y[:, 1:]
        lp = model(x[:, :int(frames.max())], frames)
        steps = model.output_lengths(frames).clamp(1, lp.shape[1])
        lengths = (targets != 0).sum(1)
        loss = (F.ctc_loss(lp.transpose(0, 1), targets, steps, lengths, zero_infinity=True, reduction="none")
                / lengths).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=512, help="recordings per epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--models", default="ctc_asr,conformer")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, FRAMES, MELS, generator=g)
    y = torch.zeros(args.n, 30, dtype=torch.long)
    y[:, 0] = torch.randint(60, FRAMES + 1, (args.n,), generator=g)  # frames of each recording
    for row, k in enumerate(torch.randint(8, 30, (args.n,), generator=g).tolist()):
        y[row, 1:k] = torch.randint(1, CLASSES, (k - 1,), generator=g)
    data = Split(x, y)
    print(f"torch threads {torch.get_num_threads()}, {args.n} recordings per epoch, batch {args.batch_size}")
    for arch in args.models.split(","):
        compare(arch, lambda: ours(arch, data, args.batch_size), lambda: by_hand(arch, data, args.batch_size),
                args.rounds)

if __name__ == "__main__":
    main()

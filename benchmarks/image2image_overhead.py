"""What the shared loop costs the image-to-image GANs: pix2pix and cyclegan trained by `Trainer` with their step
against a hand-written loop of the same updates (pytorch-CycleGAN-and-pix2pix's order), same model, same data.

    .venv/bin/python benchmarks/image2image_overhead.py [--rounds 5] [--n 512] [--models pix2pix,cyclegan]

Both loops run in one process in turns (ours, hand-written, ours, ...) after a warm-up, so load on the machine
hits both alike; the ratio printed is the median of the per-round ratios hand-written / ours (1.0: no cost;
below 1: ours is slower). Random images stand in for data: only the time is measured.
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
from tasks.kinds import get_kind  # noqa: E402
from tasks.train import Split, Trainer, seed_everything  # noqa: E402

CPU = torch.device("cpu")
OPTIONS = {"pix2pix": {"channels": 16, "d_channels": 16}, "cyclegan": {"channels": 8, "d_channels": 8, "blocks": 2}}


def ours(arch: str, data: Split, bs: int) -> float:
    seed_everything(0)
    model = create_model(arch, input_shape=(1, 32, 32), num_classes=10, **OPTIONS[arch])
    cfg = TrainConfig(epochs=1, batch_size=bs, lr=2e-4, device="cpu")
    trainer = Trainer(model, cfg, 0, CPU, get_kind("image_translation").step(model, cfg, 0, CPU))
    t0 = time.perf_counter()
    trainer.fit(data, None)
    return time.perf_counter() - t0


def by_hand(arch: str, data: Split, bs: int) -> float:
    seed_everything(0)
    m = create_model(arch, input_shape=(1, 32, 32), num_classes=10, **OPTIONS[arch])
    gs = torch.nn.ModuleList(m.generators())
    ds = torch.nn.ModuleList(m.discriminators())
    opt_g = torch.optim.Adam(gs.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(ds.parameters(), 2e-4, betas=(0.5, 0.999))
    m.train()
    t0 = time.perf_counter()
    perm = torch.randperm(len(data.x))
    for i in range(0, len(perm), bs):
        a, b = data.x[perm[i:i + bs]], data.y[perm[i:i + bs]]
        if arch == "pix2pix":
            fake = m.generator(a)
            real_out, fake_out = m.discriminator(torch.cat([a, b], 1)), m.discriminator(torch.cat([a, fake.detach()], 1))
            loss_d = 0.5 * (F.binary_cross_entropy_with_logits(real_out, torch.ones_like(real_out))
                            + F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out)))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            ds.requires_grad_(False)
            out = m.discriminator(torch.cat([a, fake], 1))
            loss_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out)) + 100 * (fake - b).abs().mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            ds.requires_grad_(True)
        else:  # no image pool: the hand-written loop is the lower bound
            ds.requires_grad_(False)
            fake_b, fake_a = m.g_ab(a), m.g_ba(b)
            ob, oa = m.d_b(fake_b), m.d_a(fake_a)
            loss_g = (F.mse_loss(ob, torch.ones_like(ob)) + F.mse_loss(oa, torch.ones_like(oa))
                      + 10 * ((m.g_ba(fake_b) - a).abs().mean() + (m.g_ab(fake_a) - b).abs().mean())
                      + 5 * ((m.g_ab(b) - b).abs().mean() + (m.g_ba(a) - a).abs().mean()))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            ds.requires_grad_(True)
            loss_d = 0
            for D, real, fake in ((m.d_a, a, fake_a), (m.d_b, b, fake_b)):
                r, f = D(real), D(fake.detach())
                loss_d = loss_d + 0.5 * (F.mse_loss(r, torch.ones_like(r)) + F.mse_loss(f, torch.zeros_like(f)))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=512, help="images per epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--models", default="pix2pix,cyclegan")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    data = Split(torch.rand(args.n, 1, 32, 32, generator=g) * 2 - 1, torch.rand(args.n, 1, 32, 32, generator=g) * 2 - 1)
    print(f"torch threads {torch.get_num_threads()}, {args.n} images per epoch, batch {args.batch_size}")
    for arch in args.models.split(","):
        compare(arch, lambda: ours(arch, data, args.batch_size), lambda: by_hand(arch, data, args.batch_size),
                args.rounds)

if __name__ == "__main__":
    main()

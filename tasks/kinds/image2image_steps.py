"""The training steps of the image-to-image kind (tasks/kinds/image2image.py), one batch each, written out as
in the papers' code: Pix2PixStep (conditional D on (input, output), then G on adversarial + lambda L1) and
CycleStep (both generators on least-squares adversarial + cycle + identity [+ CyCADA's semantic loss], then both
discriminators on real vs pooled past fakes [each told the image's class when `conditional`])."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.image2image import ImagePool, SourceClassifier
from tasks.train import NonFiniteLoss, Step, autocast, build_optimizer, build_scheduler, penalty, use_bf16


class TwoNetworkStep(Step):
    """What both image GANs share: Adam for the generator(s) and for the discriminator(s), train.schedule,
    l1/l2 penalties and grad_clip per side, losses kept on the device and checked once per epoch."""

    names: tuple[str, ...]  # the per-step values recorded, in order

    def __init__(self, model: nn.Module, cfg, seed: int, device: torch.device):
        o = self.options = model.options
        self.model, self.cfg, self.device = model, cfg, device
        self.g = nn.ModuleList(model.generators())
        self.d = nn.ModuleList(model.discriminators())
        self.opt_g = build_optimizer(self.g.parameters(), cfg, o.lr_g or cfg.lr, o.betas)
        self.opt_d = build_optimizer(self.d.parameters(), cfg, o.lr_d or cfg.lr, o.betas) if len(self.d) else None
        opts = [opt for opt in (self.opt_g, self.opt_d) if opt is not None]
        self.scheds = [s for s in (build_scheduler(opt, cfg) for opt in opts) if s]
        self.bf16 = use_bf16(cfg.precision, device)

    def finish(self, loss: torch.Tensor, nets: nn.Module, opt: torch.optim.Optimizer) -> None:
        if self.cfg.l1 or self.cfg.l2:
            loss = loss + penalty(nets, self.cfg.l1, self.cfg.l2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(nets.parameters(), self.cfg.grad_clip)
        opt.step()

    def begin_epoch(self, batches: int) -> None:
        self.values = torch.zeros(batches, len(self.names), device=self.device)
        self.weights = torch.zeros(batches, device=self.device)

    def record(self, i: int, b: int, *values: torch.Tensor | float) -> None:
        self.values[i] = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).detach()
                                      for v in values])
        self.weights[i] = b

    def end_epoch(self, epoch: int) -> dict:
        values, w = self.values.cpu(), self.weights.cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i, j = (int(v) for v in bad[0])
            raise NonFiniteLoss(epoch, f"{i + 1} ({self.names[j]})", float(values[i, j]))
        means = (values * w[:, None]).sum(0) / w.sum()
        return dict(zip(self.names, means.tolist()))

    def lrs(self) -> dict:
        out = {"lr_g": self.opt_g.param_groups[0]["lr"]}
        if self.opt_d is not None:
            out["lr_d"] = self.opt_d.param_groups[0]["lr"]
        return out

    def schedule(self) -> None:
        for s in self.scheds:
            s.step()

    def state_dict(self) -> dict:
        return {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict() if self.opt_d else None,
                "schedulers": [s.state_dict() for s in self.scheds]}

    def load_state_dict(self, s: dict) -> None:
        self.opt_g.load_state_dict(s["opt_g"])
        if self.opt_d is not None:
            self.opt_d.load_state_dict(s["opt_d"])
        for sched, state in zip(self.scheds, s["schedulers"]):
            sched.load_state_dict(state)

    @torch.no_grad()
    def _batched(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x[i:i + 256]).float() for i in range(0, len(x), 256)])


def _requires_grad(nets: nn.Module, flag: bool) -> None:
    for p in nets.parameters():
        p.requires_grad_(flag)


class Pix2PixStep(TwoNetworkStep):
    """One batch of pix2pix (Isola et al. 2017): D on (a, b) real vs (a, G(a).detach()) fake, its loss halved
    as in the paper; then G on fooling D plus lambda_l1 |G(a) - b|. adversarial: false is the L1-only U-Net."""

    names = ("d_loss", "g_adversarial", "train_l1")

    def __call__(self, i: int, step: int, a: torch.Tensor, b: torch.Tensor) -> None:
        G, D, o = self.model.generator, self.model.discriminator, self.options
        with autocast(self.bf16, self.device):
            fake = G(a)  # (B, C, H, W) in [-1, 1]
        loss_d = torch.zeros((), device=self.device)
        if o.adversarial:
            with autocast(self.bf16, self.device):
                real_out = D(torch.cat([a, b], 1)).float()  # (B, 1, h, w) patch logits
                fake_out = D(torch.cat([a, fake.detach()], 1)).float()
            loss_d = 0.5 * (F.binary_cross_entropy_with_logits(real_out, torch.ones_like(real_out))
                            + F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out)))
            self.finish(loss_d, self.d, self.opt_d)
        l1 = (fake.float() - b).abs().mean()
        adv = torch.zeros((), device=self.device)
        if o.adversarial:
            _requires_grad(self.d, False)  # G's step needs D's gradient w.r.t. its input only
            with autocast(self.bf16, self.device):
                out = D(torch.cat([a, fake], 1)).float()
            adv = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
        self.finish(adv + o.lambda_l1 * l1, self.g, self.opt_g)
        _requires_grad(self.d, True)
        self.record(i, len(a), loss_d, adv, l1 / 2)  # L1 in [0, 1] pixel units

    def evaluate(self, data, prefix: str = "val") -> dict:
        G = self.model.generator
        G.eval()
        fake = self._batched(G, data.x)
        G.train()
        err = (fake - data.y) / 2  # [0, 1] units
        mse = err.pow(2).flatten(1).mean(1).clamp_min(1e-10)
        return {f"{prefix}_l1": float(err.abs().mean()), f"{prefix}_psnr": float((-10 * mse.log10()).mean())}


class CycleStep(TwoNetworkStep):
    """One batch of CycleGAN (Zhu et al. 2017): both generators on least-squares adversarial losses,
    lambda_cycle (|F(G(a)) - a| + |G(F(b)) - b|) and the identity loss; then each discriminator on its real
    images vs a fake from the pool of past ones, its loss halved (the paper's)."""

    names = ("d_loss", "g_adversarial", "cycle_l1", "identity_l1")

    def __init__(self, model, cfg, seed: int, device):
        super().__init__(model, cfg, seed, device)
        self.pools = [ImagePool(self.options.pool_size, seed + 11), ImagePool(self.options.pool_size, seed + 12)]
        self.semantic: SourceClassifier | None = None  # set by the kind before training when lambda_semantic > 0
        self.classes: tuple[torch.Tensor, torch.Tensor] | None = None  # (A's, B's) training labels: conditional
        if self.options.lambda_semantic:
            self.names = (*self.names, "semantic_ce")

    def semantic_loss(self, a, b, fake_b, fake_a) -> torch.Tensor:
        """CyCADA's L_sem: cross-entropy of the source classifier on each translation against what it reads in
        the image translated (its own reading: no labels of either domain during training)."""
        f = self.semantic
        with torch.no_grad():
            read_a = f(a).argmax(1)
        loss = F.cross_entropy(f(fake_b.float()), read_a)
        if self.options.semantic_sides == "both":
            with torch.no_grad():
                read_b = f(b).argmax(1)
            loss = loss + F.cross_entropy(f(fake_a.float()), read_b)
        return loss

    def batch_classes(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.options.conditional:
            return None, None
        if self.classes is None:
            raise RuntimeError("cyclegan: conditional needs the domains' labels (the kind's before_fit)")
        return self.classes[0][self.rows], self.classes[1][self.rows]

    def __call__(self, i: int, step: int, a: torch.Tensor, b: torch.Tensor) -> None:
        m, o = self.model, self.options
        lam_c, lam_i = o.lambda_cycle, o.lambda_cycle * o.lambda_identity
        ya, yb = self.batch_classes()
        judge = (lambda D, x, y: D(x)) if ya is None else (lambda D, x, y: D(x, y))  # noqa: E731
        _requires_grad(self.d, False)
        with autocast(self.bf16, self.device):
            fake_b, fake_a = m.g_ab(a), m.g_ba(b)
            rec_a, rec_b = m.g_ba(fake_b), m.g_ab(fake_a)
            out_b, out_a = judge(m.d_b, fake_b, ya).float(), judge(m.d_a, fake_a, yb).float()
        adv = F.mse_loss(out_b, torch.ones_like(out_b)) + F.mse_loss(out_a, torch.ones_like(out_a))
        cycle = (rec_a.float() - a).abs().mean() + (rec_b.float() - b).abs().mean()
        identity = torch.zeros((), device=self.device)
        if lam_i:
            with autocast(self.bf16, self.device):  # each generator should leave its own target domain alone
                identity = (m.g_ab(b).float() - b).abs().mean() + (m.g_ba(a).float() - a).abs().mean()
        loss = adv + lam_c * cycle + lam_i * identity
        semantic = None
        if o.lambda_semantic:
            if self.semantic is None:
                raise RuntimeError("cyclegan: lambda_semantic needs the source classifier (the kind's before_fit)")
            semantic = self.semantic_loss(a, b, fake_b, fake_a)
            loss = loss + o.lambda_semantic * semantic
        self.finish(loss, self.g, self.opt_g)
        _requires_grad(self.d, True)

        loss_d = torch.zeros((), device=self.device)
        sides = ((m.d_a, a, ya, fake_a, yb, self.pools[0]), (m.d_b, b, yb, fake_b, ya, self.pools[1]))
        for D, real, y_real, fake, y_fake, pool in sides:
            pooled = pool.query(fake, y_fake)
            fake, y_fake = pooled if y_fake is not None else (pooled, None)
            with autocast(self.bf16, self.device):
                real_out, fake_out = judge(D, real, y_real).float(), judge(D, fake, y_fake).float()
            loss_d = loss_d + 0.5 * (F.mse_loss(real_out, torch.ones_like(real_out))
                                     + F.mse_loss(fake_out, torch.zeros_like(fake_out)))
        self.finish(loss_d, self.d, self.opt_d)
        per_direction = (loss_d / 2, adv / 2, cycle / 4, identity / 4)  # L1 in [0, 1] units
        self.record(i, len(a), *per_direction, *(() if semantic is None else (semantic / 2,)))

    def evaluate(self, data, prefix: str = "val") -> dict:
        m = self.model
        rec_a = self._batched(m.g_ba, self._batched(m.g_ab, data.x))
        rec_b = self._batched(m.g_ab, self._batched(m.g_ba, data.y))
        return {f"{prefix}_cycle_l1_a": float((rec_a - data.x).abs().mean() / 2),
                f"{prefix}_cycle_l1_b": float((rec_b - data.y).abs().mean() / 2)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pools": [p.state_dict() for p in self.pools]}

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict(s)
        for pool, state in zip(self.pools, s["pools"]):
            pool.load_state_dict(state, self.device)

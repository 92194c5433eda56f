"""The GAN's step on the shared loop, and the measurements that tell a GAN worked.

`GanStep` is what one batch does (tasks.train.Trainer runs the epochs), written out as in pytorch/examples'
dcgan: the discriminator (critic) update on real and `fake.detach()`, then the generator update through the
just-updated discriminator.

Measurements (plain numpy/scipy): mode coverage of the ring of 8 Gaussians (tasks/data/points.py), class
coverage and label entropy of a classifier's verdict on generated images, the Frechet distance between feature
sets and the mode-collapse rule. Their figures (sample grids, point clouds, evolution over epochs) are in
tasks/figures.py. No MLflow, no Prefect.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from tasks.config import TrainConfig
from tasks.data.points import centers
from tasks.train import NonFiniteLoss, Step, autocast, build_optimizer, build_scheduler, penalty, use_bf16

FIXED_NOISE = 64  # vectors in the fixed noise batch: the same z every epoch shows how samples evolve


# ---------------------------------------------------------------- training


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # E[(||grad D(x^)||_2 - 1)^2] on x^ = eps x + (1 - eps) G(z), eps ~ U[0, 1] per example (Gulrajani et al. eq. 3):
    # the 1-Lipschitz constraint enforced softly, along lines between real and generated samples.
    eps = torch.rand(len(real), *[1] * (real.dim() - 1), device=real.device)  # (B, 1, 1, 1) or (B, 1)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(mixed).float().sum(), mixed, create_graph=True)  # keep graph: it is a loss
    return ((grad.float().flatten(1).norm(dim=1) - 1) ** 2).mean()


def r1_penalty(critic: nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (D(x), E[||grad_x D(x)||^2]) on real data only (Mescheder et al. 2018; StyleGAN's regulariser): D is pushed
    # flat around the data, which keeps the non-saturating game from oscillating.
    real = real.detach().requires_grad_(True)
    out = critic(real)
    grad, = torch.autograd.grad(out.float().sum(), real, create_graph=True)  # keep graph: it is a loss
    return out, grad.float().pow(2).flatten(1).sum(1).mean()


class GanStep(Step):
    """One batch of GAN training: the discriminator (critic) on real and `fake.detach()`, then, every
    n_critic-th step, the generator through the just-updated discriminator. train.optimizer drives both
    networks (with the options' betas for Adam and AdamW, and per-network lrs), train.schedule moves both lrs,
    l1/l2 penalise each network's weights in its own loss, grad_clip clips each. A model may hand over its
    generator's param groups (StyleGAN: the mapping network at a lower lr) and ask for R1 (options.r1_gamma)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, seed: int, device: torch.device):
        o = self.options = model.options
        self.model, self.cfg, self.device = model, cfg, device  # model: models.gan.GAN
        groups = getattr(model, "generator_param_groups", None)
        lr_g = o.lr_g or cfg.lr
        self.opt_g = build_optimizer(groups(lr_g) if groups else model.generator.parameters(), cfg, lr_g, o.betas)
        self.opt_d = build_optimizer(model.discriminator.parameters(), cfg, o.lr_d or cfg.lr, o.betas)
        # train.schedule (step | cosine) moves both lrs together; a decaying lr settles the oscillation at the end
        self.scheds = [s for s in (build_scheduler(self.opt_g, cfg), build_scheduler(self.opt_d, cfg)) if s]
        self.fixed_noise = model.noise(FIXED_NOISE, torch.Generator().manual_seed(seed + 1))
        self.snapshots: dict[int, np.ndarray] = {}  # epoch -> samples of the fixed noise (the kind fills it)
        # bf16 autocast for images only: its 8-bit mantissa would quantise a point near 2.0 in steps of 0.016,
        # the size of ring8's std, and dense nets on 2-D points gain nothing from it
        self.bf16 = use_bf16(cfg.precision, device) and len(model.generator.out_shape) == 3
        self.wasserstein = model.kind == "wasserstein"
        self.r1_gamma = getattr(o, "r1_gamma", 0.0)  # > 0: gamma / 2 E[|grad D(x)|^2] in D's loss (BCE only)
        self.r1_every = getattr(o, "r1_every", 1)  # lazy regularisation: the penalty every k-th step, x k
        self.regularised = bool(cfg.l1 or cfg.l2)

    def finish(self, loss: torch.Tensor, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        if self.regularised:
            loss = loss + penalty(net, self.cfg.l1, self.cfg.l2)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # G's loss also fills D's grads: cleared by the next D step's zero_grad
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
        opt.step()

    def begin_epoch(self, batches: int) -> None:
        # per-step values kept on the device, read once at the end of the epoch (no host sync per step)
        self.d_losses = torch.zeros(batches, device=self.device)
        self.g_losses = torch.zeros(batches, device=self.device)
        self.stats = torch.zeros(3, device=self.device)  # sums over examples of D(x), D(G(z)), and the penalty
        self.g_steps: list[int] = []
        self.seen = self.r1_seen = 0

    def __call__(self, i: int, step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        G, D, o = self.model.generator, self.model.discriminator, self.options
        b = len(xb)  # xb (B, *shape) real samples; labels are not used
        with autocast(self.bf16, self.device):
            fake = G(self.model.noise(b))  # (B, *shape); G's graph kept for its own step below

            # -- discriminator / critic: real up, fake down; fake.detach() keeps G out of this update
            lazy_r1 = self.r1_gamma and step % self.r1_every == 0
            if lazy_r1:  # D(x) with the graph to x kept, for the gradient penalty on reals
                real_out, r1 = r1_penalty(D, xb)
                real_out = real_out.float()
            else:
                real_out = D(xb).float()
            fake_out = D(fake.detach()).float()  # (B, 1) logits or critic scores
            if self.wasserstein:  # critic maximises E[D(x)] - E[D(G(z))], kept 1-Lipschitz by the penalty
                gp = gradient_penalty(D, xb, fake.detach())
                loss_d = fake_out.mean() - real_out.mean() + o.gp_weight * gp
            else:  # BCE; one-sided label smoothing: real target 1 - s, fake target stays 0
                real_target = torch.full_like(real_out, 1 - o.label_smoothing)
                loss_d = (F.binary_cross_entropy_with_logits(real_out, real_target)
                          + F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out)))
                if lazy_r1:
                    loss_d = loss_d + self.r1_gamma / 2 * self.r1_every * r1
        self.finish(loss_d, D, self.opt_d)
        self.d_losses[i] = loss_d.detach()
        self.seen += b
        if self.wasserstein:  # raw critic scores
            self.stats += torch.stack([real_out.detach().sum(), fake_out.detach().sum(), gp.detach() * b])
        else:  # probabilities
            self.stats[:2] += torch.sigmoid(torch.stack([real_out.detach(), fake_out.detach()])).sum((1, 2))
            if lazy_r1:
                self.stats[2] += r1.detach() * b
                self.r1_seen += b

        # -- generator: every n_critic-th discriminator step, through the updated discriminator
        if step % o.n_critic == 0:
            self.generator_step(i, step, xb, fake)

    def generator_step(self, i: int, step: int, xb: torch.Tensor, fake: torch.Tensor) -> None:
        G, D, o = self.model.generator, self.model.discriminator, self.options
        with autocast(self.bf16, self.device):
            if o.feature_matching:  # match D's mean penultimate features of real data (Salimans et al. 2016)
                with torch.no_grad():
                    target = D.features(xb).float().mean(0)  # (F,)
                loss_g = (D.features(fake).float().mean(0) - target).pow(2).sum()
            elif self.wasserstein:
                loss_g = -D(fake).float().mean()
            else:  # non-saturating: maximise log D(G(z)) (target 1) instead of minimising log(1 - D(G(z)))
                out = D(fake).float()
                loss_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
        self.finish(loss_g, G, self.opt_g)
        if getattr(self.model, "generator_ema", None) is not None:  # StyleGAN's sampling average
            self.model.update_ema(step * self.cfg.batch_size, len(xb))
        self.g_losses[i] = loss_g.detach()
        self.g_steps.append(i)

    def end_epoch(self, epoch: int) -> dict:
        steps, n = len(self.d_losses), self.seen
        d_losses, g_losses, stats = self.d_losses.cpu(), self.g_losses[self.g_steps].cpu(), self.stats.cpu()
        for name, losses, at in (("discriminator", d_losses, range(steps)), ("generator", g_losses, self.g_steps)):
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                raise NonFiniteLoss(epoch, f"{at[int(bad[0])] + 1} ({name})", float(losses[int(bad[0])]))
        metrics = {
            "d_loss": float(d_losses.mean()),
            "g_loss": float(g_losses.mean()) if self.g_steps else float("nan"),  # an epoch shorter than n_critic
            "d_real": float(stats[0]) / n,  # mean D(x): probability for BCE, critic score for Wasserstein
            "d_fake": float(stats[1]) / n,  # mean D(G(z))
        }
        if self.wasserstein:
            metrics["critic_gap"] = metrics["d_real"] - metrics["d_fake"]  # the Wasserstein-1 estimate
            metrics["gradient_penalty"] = float(stats[2]) / n
        elif self.r1_seen:  # an epoch with a lazy R1 step
            metrics["r1_penalty"] = float(stats[2]) / max(self.r1_seen, 1)  # E[|grad D(x)|^2] on reals, before gamma / 2
        return metrics

    def lrs(self) -> dict:
        lrs = {"lr_g": self.opt_g.param_groups[0]["lr"], "lr_d": self.opt_d.param_groups[0]["lr"]}
        if len(self.opt_g.param_groups) > 1:  # StyleGAN's mapping network
            lrs["lr_mapping"] = self.opt_g.param_groups[1]["lr"]
        return lrs

    def schedule(self) -> None:
        for s in self.scheds:
            s.step()

    @torch.no_grad()
    def fixed_samples(self) -> torch.Tensor:
        G = self.model.sampling_generator
        was_training = G.training
        G.eval()  # batch norm's running statistics: a sample does not depend on the rest of the batch
        x = G(self.fixed_noise)
        G.train(was_training)
        return x  # (FIXED_NOISE, *shape); images in [-1, 1]

    def state_dict(self) -> dict:
        return {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "schedulers": [s.state_dict() for s in self.scheds], "fixed_noise": self.fixed_noise,
                "snapshots": self.snapshots}

    def load_state_dict(self, s: dict) -> None:
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_d.load_state_dict(s["opt_d"])
        for sched, state in zip(self.scheds, s["schedulers"]):
            sched.load_state_dict(state)
        self.fixed_noise = s["fixed_noise"].to(self.device)
        self.snapshots = dict(s["snapshots"])


# ---------------------------------------------------------------- the ring of Gaussians (tasks/data/points.py)


RING8_CENTERS = centers()


def mode_coverage(samples: np.ndarray, centers: np.ndarray, std: float, min_share: float = 0.01) -> dict:
    # A sample is high quality when within 3 std of some mode's centre; a mode is covered when at least
    # `min_share` of all samples are high-quality samples of it (the rule of Srivastava et al. 2017, VEEGAN).
    # Euclidean distance: in 2-D a perfect generator scores 1 - exp(-4.5) = 0.989, not 0.997.
    samples = np.asarray(samples, dtype=np.float64)
    d = np.linalg.norm(samples[:, None, :] - np.asarray(centers)[None], axis=2)  # (N, K)
    close = d.min(1) <= 3 * std
    counts = np.bincount(d.argmin(1)[close], minlength=len(centers))  # high-quality samples per mode
    # mode_overlap: 1 - total variation between the generated and the true distribution over the modes (samples
    # far from every mode form one more bin, where the truth has nothing). 1: every mode gets its 1/K and every
    # sample is high quality; a perfect collapse onto one mode scores 1/K. One number that falls with missing
    # modes and with off-mode samples alike, so it ranks ring8 generators (a Frechet distance between 2-D
    # Gaussian fits does not: a ring and a blob around it can share mean and covariance).
    share = counts / len(samples)
    overlap = float(np.minimum(share, 1.0 / len(centers)).sum())
    return {"modes_covered": int((counts >= min_share * len(samples)).sum()),
            "high_quality_fraction": float(close.mean()), "mode_overlap": overlap}


# ---------------------------------------------------------------- generated images, judged by a classifier


def class_coverage(probs: np.ndarray, min_share: float = 0.02) -> int:
    # classes that receive at least `min_share` of the argmax assignments of a classifier trained on real data
    counts = np.bincount(np.asarray(probs).argmax(1), minlength=np.asarray(probs).shape[1])
    return int((counts >= min_share * len(probs)).sum())


def label_entropy(probs: np.ndarray) -> float:
    # entropy (nats) of the histogram of predicted labels: ln(classes) when every class is drawn equally, 0 when
    # the generator makes one class only
    counts = np.bincount(np.asarray(probs).argmax(1), minlength=np.asarray(probs).shape[1])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    # ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two (N, F) feature sets
    # (FID's formula, Heusel et al. 2017). eps on both diagonals keeps a singular covariance (N < F, dead
    # features) square-rootable; sqrtm's tiny imaginary parts from rounding are dropped.
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = eps * np.eye(a.shape[1])
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)) + eye, np.atleast_2d(np.cov(b, rowvar=False)) + eye
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def mode_collapse(covered: int, total: int) -> bool:
    # The rule: a GAN has collapsed when it covers fewer than half of the modes. On ring8: modes_covered < 4
    # of 8 Gaussians (mode_coverage). On images: class_coverage < half the classes (5 of 10 digits).
    return covered < total / 2

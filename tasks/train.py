"""The one training loop. Every architecture goes through `fit`; nothing here branches on the model type.

Plain PyTorch: no MLflow, no Prefect. The caller passes `on_epoch` to log and checkpoint.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.config import EarlyStoppingConfig, TrainConfig
from tasks.diagnostics import Diagnostics


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, step: int | str, value: float):
        super().__init__(f"non-finite loss ({value}) at epoch {epoch}, step {step}")
        self.epoch, self.step, self.value = epoch, step, value

    def __reduce__(self):  # picklable across process pools
        return type(self), (self.epoch, self.step, self.value)


# ---------------------------------------------------------------- set-up

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    # auto: bf16 autocast on CUDA only; on CPU it is opt-in (see README for the measured trade-off)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def init_weights(model: nn.Module, scheme: str) -> None:
    """Re-initialise weight matrices and kernels of Linear/Conv/RNN/attention layers; biases to zero."""
    if scheme == "default":
        return
    fill = {
        "he_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),  # std = sqrt(2 / fan_in)
        "he_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
        "xavier_normal": nn.init.xavier_normal_,  # std = sqrt(2 / (fan_in + fan_out))
        "xavier_uniform": nn.init.xavier_uniform_,
        "orthogonal": nn.init.orthogonal_,
    }[scheme]
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            fill(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.RNNBase):
            # RNN/LSTM/GRU: each gate's block of a stacked matrix on its own, so fans are the gate's (H, in) and
            # not (gates * H, in). Input-to-hidden: the scheme; hidden-to-hidden: orthogonal whatever the
            # scheme (its singular values 1 keep the state's norm over many steps: Saxe et al. 2014); biases
            # zero, except the LSTM forget gate's at 1 so the cell remembers from the start (Jozefowicz
            # et al. 2015; Keras's unit_forget_bias). PyTorch adds bias_ih and bias_hh: the 1 goes in bias_ih.
            gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if name.startswith("weight_ih"):
                        for block in p.chunk(gates):
                            fill(block)
                    elif name.startswith("weight_hh"):
                        for block in p.chunk(gates):
                            nn.init.orthogonal_(block)
                    elif name.startswith("weight_hr"):  # LSTM projection (proj_size > 0)
                        fill(p)
                    elif name.startswith("bias"):
                        nn.init.zeros_(p)
                        if m.mode == "LSTM" and name.startswith("bias_ih"):
                            p.chunk(4)[1].fill_(1.0)  # gate order: input, forget, cell, output
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            # Transformer attention: the packed query/key/value projection, one (E, E) block each (the output
            # projection is an nn.Linear, handled above).
            with torch.no_grad():
                for block in m.in_proj_weight.chunk(3):
                    fill(block)
            if m.in_proj_bias is not None:
                nn.init.zeros_(m.in_proj_bias)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # A model may split its parameters into groups with their own learning rates (transfer learning's
    # fine-tuned base); every other model is one group at `lr`.
    groups = getattr(model, "param_groups", None)
    p, lr, wd = (groups(cfg.lr) if groups else model.parameters()), cfg.lr, cfg.weight_decay
    return {
        "sgd": lambda: torch.optim.SGD(p, lr=lr, weight_decay=wd),
        "momentum": lambda: torch.optim.SGD(p, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd),
        "adagrad": lambda: torch.optim.Adagrad(p, lr=lr, weight_decay=wd),
        "rmsprop": lambda: torch.optim.RMSprop(p, lr=lr, weight_decay=wd),
        "adam": lambda: torch.optim.Adam(p, lr=lr, weight_decay=wd),
        "adamw": lambda: torch.optim.AdamW(p, lr=lr, weight_decay=wd),
    }[cfg.optimizer]()


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return None


def penalty(model: nn.Module, l1: float, l2: float) -> torch.Tensor:
    # Only weight matrices and kernels (dim > 1): penalising biases and norm scales is not the textbook L1/L2.
    ws = [p for p in model.parameters() if p.dim() > 1]
    total = torch.zeros((), device=ws[0].device)
    if l1:
        total = total + l1 * sum(w.abs().sum() for w in ws)
    if l2:
        total = total + l2 * sum(w.pow(2).sum() for w in ws)
    return total


# ---------------------------------------------------------------- early stopping

@dataclass
class EarlyStopping:
    cfg: EarlyStoppingConfig
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict | None = None

    def update(self, epoch: int, metrics: dict, model: nn.Module) -> bool:
        """Record `epoch`; True when training should stop."""
        sign = -1.0 if self.cfg.monitor.endswith("accuracy") else 1.0  # always minimise sign * value
        value = sign * metrics[self.cfg.monitor]
        if value < self.best - self.cfg.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            if self.cfg.enabled and self.cfg.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.cfg.enabled and self.bad_epochs >= self.cfg.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "best_state": self.best_state}

    def load_state_dict(self, s: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs, self.best_state = s["best"], s["best_epoch"], s["bad_epochs"], s["best_state"]


# ---------------------------------------------------------------- the loop

@dataclass
class Split:
    x: torch.Tensor  # (N, ...) float32 on the device, normalised
    y: torch.Tensor  # (N,) int64 on the device


@dataclass
class FitResult:
    history: list[dict]  # one dict of metrics per epoch
    epochs: int  # epochs actually run (early stopping may end sooner)
    best_epoch: int
    stopped_early: bool
    seconds: float


@dataclass
class Trainer:
    """Holds what a checkpoint must capture; `fit` drives it epoch by epoch."""

    model: nn.Module
    cfg: TrainConfig
    seed: int
    device: torch.device
    opt: torch.optim.Optimizer = field(init=False)
    sched: object = field(init=False)
    stopper: EarlyStopping = field(init=False)
    shuffle: torch.Generator = field(init=False)
    epoch: int = 0
    step: int = 0  # optimizer steps so far, over all epochs
    history: list = field(default_factory=list)
    seconds: float = 0.0
    diagnostics: Diagnostics | None = None
    task: str = "classification"  # "regression" (forecasting), "language_model": the loss and metrics, never the model
    augment: Callable | None = None  # (B, C, H, W) batch -> augmented batch, applied to training batches only

    def __post_init__(self):
        self.opt = build_optimizer(self.model, self.cfg)
        self.sched = build_scheduler(self.opt, self.cfg)
        self.stopper = EarlyStopping(self.cfg.early_stopping)
        self.shuffle = torch.Generator().manual_seed(self.seed)  # batch order; separate from dropout's RNG
        self.bf16 = use_bf16(self.cfg.precision, self.device)
        self.regularised = bool(self.cfg.l1 or self.cfg.l2)
        self.classify = self.task in ("classification", "language_model")
        self.perplexity = self.task == "language_model"  # exp(cross-entropy per predicted token)
        self.loss_fn = F.cross_entropy if self.classify else F.mse_loss  # mse on standardised targets
        if self.cfg.diagnostics.enabled:
            self.diagnostics = Diagnostics(self.model, self.cfg.diagnostics.every)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def train_one_epoch(self, data: Split, progress: Callable | None = None) -> dict:
        model, bs, n = self.model, self.cfg.batch_size, len(data.y)
        model.train()
        perm = torch.randperm(n, generator=self.shuffle).to(self.device)
        steps = math.ceil(n / bs)
        losses = torch.zeros(steps, device=self.device)  # filled without a host sync per step
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            xb, yb = data.x[idx], data.y[idx]
            if self.augment is not None:
                xb = self.augment(xb)
            with self.autocast():
                out = model(xb)
                loss = self.loss_fn(out.float() if not self.classify else out, yb)
            total = loss + penalty(model, self.cfg.l1, self.cfg.l2) if self.regularised else loss
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            self.step += 1
            diag = self.diagnostics is not None and self.diagnostics.due(self.step)
            if diag:
                self.diagnostics.before_step(self.step)  # gradient norms before clipping
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            self.opt.step()
            if diag:
                self.diagnostics.after_step(self.step)
            losses[i] = loss.detach() * len(yb)
            if self.classify:
                correct += (out.argmax(1) == yb).sum()
            if progress is not None:
                progress(i + 1, steps)
        losses = losses.cpu()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            step = int(bad[0])
            if self.diagnostics is not None:
                self.diagnostics.non_finite = True
            raise NonFiniteLoss(self.epoch + 1, step + 1, float(losses[step]))
        out = {"train_loss": float(losses.sum()) / n}
        if self.perplexity:
            out["train_perplexity"] = math.exp(min(out["train_loss"], 50.0))
        return out | {"train_accuracy": int(correct) / n} if self.classify else out

    @torch.no_grad()
    def evaluate(self, data: Split, prefix: str = "val", batch_size: int = 1024) -> dict:
        self.model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(data.y), batch_size):
            xb, yb = data.x[i:i + batch_size], data.y[i:i + batch_size]
            with self.autocast():
                out = self.model(xb)
            loss += float(self.loss_fn(out.float(), yb, reduction="sum")) / (yb[0].numel() if not self.classify else 1)
            if self.classify:
                correct += int((out.argmax(1) == yb).sum())
        n = len(data.y)
        out = {f"{prefix}_loss": loss / n} | ({f"{prefix}_accuracy": correct / n} if self.classify else {})
        if self.perplexity:
            out[f"{prefix}_perplexity"] = math.exp(min(loss / n, 50.0))
        return out

    def fit(self, train: Split, val: Split, on_epoch: Callable | None = None,
            progress: Callable | None = None) -> FitResult:
        if self.diagnostics is not None and self.diagnostics.probe is None:
            self.diagnostics.probe = val.x[:self.cfg.diagnostics.probe_size]  # fixed: same examples every time
        stopped = False
        while self.epoch < self.cfg.epochs and not stopped:
            t0 = time.perf_counter()
            self.epoch_start()
            metrics = self.train_one_epoch(train, progress)
            metrics |= self.evaluate(val)
            if not math.isfinite(metrics["val_loss"]):  # weights blew up without a NaN in training yet
                if self.diagnostics is not None:
                    self.diagnostics.non_finite = True
                raise NonFiniteLoss(self.epoch + 1, "validation", metrics["val_loss"])
            metrics["lr"] = self.opt.param_groups[0]["lr"]
            if self.sched is not None:
                self.sched.step()
            self.epoch += 1
            stopped = self.stopper.update(self.epoch, metrics, self.model)
            self.seconds += time.perf_counter() - t0
            metrics["epoch_seconds"] = time.perf_counter() - t0
            self.history.append(metrics)
            if on_epoch is not None:
                on_epoch(self.epoch, metrics, self)
        if self.stopper.best_state is not None:
            self.model.load_state_dict(self.stopper.best_state)
        return FitResult(self.history, self.epoch, self.stopper.best_epoch, stopped, self.seconds)

    def epoch_start(self) -> None:
        # Models whose trainable parts change over time (transfer learning's fine-tune phase) set them from
        # the epoch number alone, so a resumed run is in the same phase.
        hook = getattr(self.model, "on_epoch_start", None)
        if hook is not None:
            hook(self.epoch)

    # -- checkpoint support: everything needed to continue bit-for-bit
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "diagnostics": self.diagnostics.state_dict() if self.diagnostics is not None else None,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else None,
            "early_stopping": self.stopper.state_dict(),
            "history": self.history,
            "seconds": self.seconds,
            "rng": {**rng_state(self.shuffle),
                    "augment": self.augment.generator.get_state() if self.augment is not None else None},
        }

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.step, self.history, self.seconds = s["epoch"], s["step"], s["history"], s["seconds"]
        if self.diagnostics is not None and s["diagnostics"] is not None:
            self.diagnostics.load_state_dict(s["diagnostics"])
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        if self.sched is not None and s["scheduler"] is not None:
            self.sched.load_state_dict(s["scheduler"])
        self.stopper.load_state_dict(s["early_stopping"])
        set_rng_state(s["rng"], self.shuffle)
        if self.augment is not None and s["rng"].get("augment") is not None:
            self.augment.generator.set_state(s["rng"]["augment"])


def rng_state(shuffle: torch.Generator) -> dict:
    """Every random stream a resumed run must continue: torch (CPU, CUDA), numpy, python, the batch order."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "shuffle": shuffle.get_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(rng: dict, shuffle: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    shuffle.set_state(rng["shuffle"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def to_device(x: np.ndarray, y: np.ndarray, mean, std, device: torch.device, channels_last: bool) -> Split:
    """Raw arrays -> normalised float32 tensors on `device` (whole split preloaded); token ids (N, T) integers
    stay int64 ids."""
    if np.issubdtype(np.asarray(x).dtype, np.integer) and np.ndim(x) == 2:  # token ids: indices, never scaled
        return Split(torch.as_tensor(x, dtype=torch.long).to(device), torch.as_tensor(y, dtype=torch.long).to(device))
    xt = torch.as_tensor(x, dtype=torch.float32)
    if xt.dim() == 4:  # (N, C, H, W): per-channel statistics
        shape = (1, -1, 1, 1)
        xt = (xt - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
        if channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
    else:
        xt = (xt - torch.tensor(mean)) / torch.tensor(std)
    if np.issubdtype(np.asarray(y).dtype, np.floating):  # forecasting targets: the same units as the inputs
        yt = (torch.as_tensor(y, dtype=torch.float32) - mean[0]) / std[0]
    else:
        yt = torch.as_tensor(y, dtype=torch.long)
    return Split(xt.to(device), yt.to(device))

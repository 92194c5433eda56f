"""The one training loop. Every architecture goes through `fit`; nothing here branches on the model type.

Plain PyTorch: no MLflow, no Prefect. The caller passes `on_epoch` to log and checkpoint.
"""
from __future__ import annotations

import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from tasks.config import EarlyStoppingConfig, TrainConfig
from tasks.diagnostics import Diagnostics
from tasks.phases import mark


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


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, Arm's BF16 extension


def cpu_bf16_native(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bfloat16 natively (one of BF16_CPU_FLAGS in /proc/cpuinfo's flags/Features),
    or None where that cannot be read (not Linux). Without it, bf16 autocast on the CPU is emulated: simple_cnn
    trained at 0.08x the speed of fp32 (channels_last, both) on an AVX2-only EPYC, against 1.79x faster on an
    EPYC with avx512_bf16 (docs/diagnostics.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo").read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & set(BF16_CPU_FLAGS)) if flags else None


_BF16_WARNED = []


def use_bf16(precision: str, device: torch.device) -> bool:
    """auto: bf16 autocast on CUDA only; on a CPU bf16 is opt-in, and asking for it on a CPU without native bf16
    prints a warning once (it still does what it is told)."""
    if precision == "bf16" and device.type == "cpu" and cpu_bf16_native() is False and not _BF16_WARNED:
        _BF16_WARNED.append(True)
        print("warning: train.precision: bf16 on a CPU without native bfloat16 (none of "
              f"{', '.join(BF16_CPU_FLAGS)} in /proc/cpuinfo): autocast emulates it, measured ~12x slower than "
              "fp32 on such a CPU; use train.precision: fp32 (or auto)", file=sys.stderr, flush=True)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def build_optimizer(params, cfg: TrainConfig, lr: float | None = None,
                    betas: tuple[float, float] | None = None) -> torch.optim.Optimizer:
    """train.optimizer over `params` (tensors or param groups) at `lr` (default train.lr); `betas` are Adam's
    and AdamW's (a GAN's own), unused by the others."""
    lr, wd = lr or cfg.lr, cfg.weight_decay
    adam = {"betas": betas} if betas else {}
    return {
        "sgd": lambda: torch.optim.SGD(params, lr=lr, weight_decay=wd),
        "momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                            weight_decay=wd),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=lr, weight_decay=wd),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr, weight_decay=wd),
        "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=wd, **adam),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd, **adam),
    }[cfg.optimizer]()


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """`step` and `cosine` are stepped once per epoch (Step.schedule), `warmup` after each optimizer step."""
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return Warmup(opt, cfg.warmup_steps) if cfg.schedule == "warmup" else None


class Warmup:
    """Linear warm-up to each group's lr over `warmup` optimizer steps, then inverse-square-root decay (Vaswani
    et al. 2017; fairseq's inverse_sqrt): lr * min(s / warmup, sqrt(warmup / s)) at step s, set by a hook after
    each optimizer step (any Step gets it per step; its per-epoch `step` does nothing). No horizon to know."""

    def __init__(self, opt: torch.optim.Optimizer, warmup: int):
        self.opt, self.warmup, self.steps, self.base = opt, warmup, 0, [g["lr"] for g in opt.param_groups]
        self.set_lr()
        opt.register_step_post_hook(lambda *_: self.set_lr(1))

    def set_lr(self, advance: int = 0) -> None:
        self.steps += advance
        s = self.steps + 1  # the coming optimizer step
        for g, lr in zip(self.opt.param_groups, self.base):
            g["lr"] = lr * min(s / self.warmup, math.sqrt(self.warmup / s))

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, s: dict) -> None:
        self.steps = s["steps"]
        self.set_lr()


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
    higher_wins = ("accuracy", "bleu", "chrf", "exact_match")  # monitored metrics (by their ending) maximised
    cfg: EarlyStoppingConfig
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict | None = None

    def update(self, epoch: int, metrics: dict, model: nn.Module) -> bool:
        """Judge `epoch` on its metrics (the kind's included, e.g. translation's val_bleu); True when training
        should stop. A step without held-out metrics (a GAN's) is never stopped (validation refuses it there)."""
        if self.cfg.monitor not in metrics:
            held_out = sorted(k for k in metrics if k.startswith("val_"))
            if self.cfg.enabled and held_out:
                raise ValueError(f"train.early_stopping.monitor: this run does not measure {self.cfg.monitor}; "
                                 f"it measures {', '.join(held_out)}")
            return False
        sign = -1.0 if self.cfg.monitor.endswith(self.higher_wins) else 1.0  # always minimise sign * value
        value = sign * metrics[self.cfg.monitor]
        if value < self.best - self.cfg.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            if self.cfg.enabled and self.cfg.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.done

    @property
    def done(self) -> bool:
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


def autocast(bf16: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class Step:
    """What one training batch does. The Trainer calls, per epoch: begin_epoch, the step once per batch,
    end_epoch (read what was kept on the device, once), evaluate, lrs, schedule. A step owns its
    optimizers and schedulers; `state_dict` is what a checkpoint must hold of them."""

    model: nn.Module
    diagnostics: Diagnostics | None = None
    rows: torch.Tensor | None = None  # the training rows of the batch being stepped, for per-row side data

    def begin_fit(self, train: Split, val: Split | None) -> None:
        pass

    def begin_epoch(self, batches: int) -> None:
        pass

    def __call__(self, i: int, step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        raise NotImplementedError  # batch `i` of the epoch, optimizer step `step` of the run (from 1)

    def end_epoch(self, epoch: int) -> dict:
        raise NotImplementedError

    def lengths(self, data: Split) -> torch.Tensor | None:
        """Each example's length when batches of like length pad less (sequences), else None."""
        return None

    def evaluate(self, data: Split, prefix: str = "val") -> dict:
        return {}  # no held-out loss (a GAN's says nothing of its samples)

    def lrs(self) -> dict:
        raise NotImplementedError

    def schedule(self) -> None:
        pass

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, s: dict) -> None:
        raise NotImplementedError


CHECKPOINT_FORMAT = 2  # 2: the step's state under "step" (1, before: the supervised and GAN trainers' own keys)


@dataclass
class Trainer:
    """The one loop over epochs and batches: batch order, augmentation, early stopping, progress, the
    per-epoch callback and everything a checkpoint must capture. What a batch does is `step`'s (a supervised
    classifier's: tasks/kinds/supervised.py SupervisedStep)."""

    model: nn.Module
    cfg: TrainConfig
    seed: int
    device: torch.device
    step: Step
    augment: Callable | None = None  # (B, C, H, W) batch -> augmented batch, applied to training batches only
    stopper: EarlyStopping = field(init=False)
    shuffle: torch.Generator = field(init=False)
    epoch: int = 0
    steps: int = 0  # optimizer steps (batches) so far, over all epochs
    history: list = field(default_factory=list)
    seconds: float = 0.0
    halt: Callable[[int], bool] | None = None  # asked after each epoch: True ends training there (a sweep's pruning)
    world: Any = None  # data-parallel (tasks/distributed.py World): this process trains its share of each batch

    def __post_init__(self):
        self.stopper = EarlyStopping(self.cfg.early_stopping)
        self.shuffle = torch.Generator().manual_seed(self.seed)  # batch order; separate from dropout's RNG

    @property
    def diagnostics(self) -> Diagnostics | None:
        return self.step.diagnostics

    def evaluate(self, data: Split, prefix: str = "val") -> dict:
        return self.step.evaluate(data, prefix)

    def train_one_epoch(self, data: Split, progress: Callable | None = None) -> dict:
        bs, n = self.cfg.batch_size * (self.world.size if self.world else 1), len(data.x)  # the whole batch
        self.model.train()
        perm = torch.randperm(n, generator=self.shuffle)
        lengths = self.step.lengths(data) if self.cfg.length_pool > 1 else None
        order = (like_lengths(perm, lengths.cpu(), bs, self.cfg.length_pool, self.shuffle) if lengths is not None
                 else list(perm.split(bs)))
        batches = len(order)
        self.step.begin_epoch(batches)
        for i, idx in enumerate(order):
            if self.world is not None:  # every process draws the same batches and takes its own rows of each
                idx, self.step.share = self.world.shard(idx)
            idx = idx.to(self.device)
            xb, yb = data.x[idx], data.y[idx]
            if self.augment is not None:
                xb = self.augment(xb)
            self.steps += 1
            self.step.rows = idx
            self.step(i, self.steps, xb, yb)
            if progress is not None:
                progress(i + 1, batches)
        metrics = self.step.end_epoch(self.epoch + 1)
        return self.world.mean(metrics, int(getattr(self.step, "seen", n))) if self.world is not None else metrics

    def fit(self, train: Split, val: Split | None, on_epoch: Callable | None = None,
            progress: Callable | None = None) -> FitResult:
        self.step.begin_fit(train, val)
        mark("fit start")
        stopped = self.stopper.done  # a run resumed after its stopping epoch ends here
        # a resumed run asks `halt` first: a pruned cell trains no further epoch, a paused one pauses again
        stopped = stopped or (self.halt is not None and 0 < self.epoch < self.cfg.epochs and self.halt(self.epoch))
        while self.epoch < self.cfg.epochs and not stopped:
            t0 = time.perf_counter()
            self.epoch_start()
            metrics = self.train_one_epoch(train, progress)
            metrics |= self.step.evaluate(val) if val is not None else {}
            if not math.isfinite(metrics.get("val_loss", 0.0)):  # weights blew up without a NaN in training yet
                if self.diagnostics is not None:
                    self.diagnostics.non_finite = True
                raise NonFiniteLoss(self.epoch + 1, "validation", metrics["val_loss"])
            metrics |= self.step.lrs()
            self.step.schedule()
            self.epoch += 1
            self.seconds += time.perf_counter() - t0
            metrics["epoch_seconds"] = time.perf_counter() - t0
            self.history.append(metrics)
            if on_epoch is not None:  # the kind's measurements (into `metrics`), logging, the checkpoint
                on_epoch(self.epoch, metrics, self)
            stopped = self.stopper.update(self.epoch, metrics, self.model)  # judged on all of them
            stopped = stopped or (self.halt is not None and self.epoch < self.cfg.epochs and self.halt(self.epoch))
            if self.world is not None:  # the first process decides for all (its measurements may be its own)
                stopped = self.world.same(stopped)
        mark("fit end")
        if self.stopper.best_state is not None:
            self.model.load_state_dict(self.stopper.best_state)
        return FitResult(self.history, self.epoch, self.stopper.best_epoch or self.epoch, stopped, self.seconds)

    def epoch_start(self) -> None:
        # Models whose trainable parts change over time (transfer learning's fine-tune phase) set them from
        # the epoch number alone, so a resumed run is in the same phase.
        hook = getattr(self.model, "on_epoch_start", None)
        if hook is not None:
            hook(self.epoch)

    # -- checkpoint support: everything needed to continue bit-for-bit
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "steps": self.steps,
            "model": self.model.state_dict(),
            "step": self.step.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "history": self.history,
            "seconds": self.seconds,
            "rng": {**rng_state(self.shuffle),
                    "augment": self.augment.generator.get_state() if self.augment is not None else None},
        }

    def load_state_dict(self, s: dict) -> None:
        if s.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointFormatError(f"a training checkpoint of format {s.get('format', 1)}; this nnlab "
                                        f"reads format {CHECKPOINT_FORMAT}")
        self.epoch, self.steps, self.history, self.seconds = s["epoch"], s["steps"], s["history"], s["seconds"]
        self.model.load_state_dict(s["model"])
        self.step.load_state_dict(s["step"])
        self.stopper.load_state_dict(s["early_stopping"])
        # checkpointed before its last epoch was judged (each judged epoch is the best or one more bad one)?
        if self.history and self.stopper.best_epoch + self.stopper.bad_epochs < self.epoch:
            self.stopper.update(self.epoch, self.history[-1], self.model)
        set_rng_state(s["rng"], self.shuffle)
        if self.augment is not None and s["rng"].get("augment") is not None:
            self.augment.generator.set_state(s["rng"]["augment"])


def like_lengths(perm: torch.Tensor, lengths: torch.Tensor, batch_size: int, pool: int,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """Batches of a shuffled order whose members have like lengths (the bucketing of fairseq and torchtext):
    each run of `pool` batches of `perm` sorted by length and cut into batches, all batches then in a random
    order. As many batches as plain shuffling gives; one random stream, so a resumed run continues it."""
    batches = []
    for chunk in perm.split(batch_size * pool):
        batches += chunk[torch.argsort(lengths[chunk], stable=True)].split(batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class CheckpointFormatError(ValueError):
    """A checkpoint written by an older nnlab, whose layout this one does not read."""


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
    name, keys, *rest = rng["numpy"]  # saved by tasks.files.save_torch with its key array as a tensor
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
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
    if np.ndim(y) == 4:  # target images (image-to-image): the same per-channel scaling as the inputs
        yt = (torch.as_tensor(y, dtype=torch.float32) - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
    elif np.issubdtype(np.asarray(y).dtype, np.floating):  # forecasting targets: the same units as the inputs
        yt = (torch.as_tensor(y, dtype=torch.float32) - mean[0]) / std[0]
    else:
        yt = torch.as_tensor(y, dtype=torch.long)
    return Split(xt.to(device), yt.to(device))

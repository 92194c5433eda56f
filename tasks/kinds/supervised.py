"""Supervised runs: the step that trains them, the shared Supervised kind and classification.

Forecasting (tasks/kinds/forecasting.py), the language models (tasks/kinds/language.py), translation and speech
build on them: they share the step and what gets served (raw inputs -> probabilities, or forecasts in the
series' units) and differ in the loss and what is measured: here accuracy and a confusion matrix.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.config import TrainConfig
from tasks.diagnostics import Diagnostics
from tasks.kinds import Evaluation, Job, Kind, Served, register_kind
from tasks.train import NonFiniteLoss, Split, Step, autocast, build_optimizer, build_scheduler, penalty, to_device, use_bf16


class SupervisedStep(Step):
    """Forward, loss (+ L1/L2 penalty), backward, clip, optimizer step. Cross-entropy for classifiers and
    language models (`classify`), mean squared error on standardised targets for forecasters."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, classify: bool = True,
                 perplexity: bool = False):
        self.model, self.cfg, self.device = model, cfg, device
        self.net = model  # what the forward pass calls: the model, or DistributedDataParallel around it
        self.share = 1.0  # this process's share of the batch x processes (data-parallel: tasks/distributed.py)
        # A model may split its parameters into groups with their own learning rates (transfer learning's
        # fine-tuned base); every other model is one group at `lr`.
        groups = getattr(model, "param_groups", None)
        self.opt = build_optimizer(groups(cfg.lr) if groups else model.parameters(), cfg)
        self.sched = build_scheduler(self.opt, cfg)
        self.bf16 = use_bf16(cfg.precision, device)
        self.regularised = bool(cfg.l1 or cfg.l2)
        self.classify = classify
        self.perplexity = perplexity  # exp(cross-entropy per predicted token)
        self.loss_fn = F.cross_entropy if classify else F.mse_loss  # mse on standardised targets
        if cfg.diagnostics.enabled:
            self.diagnostics = Diagnostics(model, cfg.diagnostics.every)

    def begin_fit(self, train: Split, val: Split | None) -> None:
        if self.diagnostics is not None and self.diagnostics.probe is None and val is not None:
            self.diagnostics.probe = val.x[:self.cfg.diagnostics.probe_size]  # fixed: same examples every time

    def begin_epoch(self, batches: int) -> None:
        self.losses = torch.zeros(batches, device=self.device)  # filled without a host sync per step
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0

    def outputs(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictions and their targets, one row per prediction: a model that predicts at every position
        (a word language model: (B, T, V) against (B, T)) is flattened to (B * T, V) against (B * T,)."""
        out = self.net(xb)
        if self.classify and out.dim() == 3:
            return out.flatten(0, 1), yb.flatten()
        return out, yb

    def loss(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return self.loss_fn(out if self.classify else out.float(), y, reduction=reduction)

    def count(self, y: torch.Tensor) -> int | torch.Tensor:
        """Predictions in a batch (the loss is their mean)."""
        return len(y)

    def hits(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out.argmax(1) == y).sum()

    def __call__(self, i: int, step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        model = self.model
        with autocast(self.bf16, self.device):
            out, y = self.outputs(xb, yb)
            loss = self.loss(out, y)
        total = loss + penalty(model, self.cfg.l1, self.cfg.l2) if self.regularised else loss
        self.opt.zero_grad(set_to_none=True)
        (total * self.share if self.share != 1.0 else total).backward()  # processes' gradients are averaged
        diag = self.diagnostics is not None and self.diagnostics.due(step)
        if diag:
            self.diagnostics.before_step(step)  # gradient norms before clipping
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if diag:
            self.diagnostics.after_step(step)
        n = self.count(y)
        self.losses[i] = loss.detach() * n
        self.seen += n
        if self.classify:
            self.correct += self.hits(out, y)

    def end_epoch(self, epoch: int) -> dict:
        losses, n = self.losses.cpu(), int(self.seen)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            step = int(bad[0])
            if self.diagnostics is not None:
                self.diagnostics.non_finite = True
            raise NonFiniteLoss(epoch, step + 1, float(losses[step]))
        out = {"train_loss": float(losses.sum()) / n}
        if self.perplexity:
            out["train_perplexity"] = math.exp(min(out["train_loss"], 50.0))
        return out | {"train_accuracy": int(self.correct) / n} if self.classify else out

    @torch.no_grad()
    def evaluate(self, data: Split, prefix: str = "val", batch_size: int = 1024) -> dict:
        self.model.eval()
        loss, correct, n = 0.0, 0, 0
        for i in range(0, len(data.y), batch_size):
            with autocast(self.bf16, self.device):
                out, y = self.outputs(data.x[i:i + batch_size], data.y[i:i + batch_size])
            loss += float(self.loss(out.float(), y, reduction="sum")) / (y[0].numel() if not self.classify else 1)
            n += int(self.count(y))
            if self.classify:
                correct += int(self.hits(out, y))
        out = {f"{prefix}_loss": loss / n} | ({f"{prefix}_accuracy": correct / n} if self.classify else {})
        if self.perplexity:
            out[f"{prefix}_perplexity"] = math.exp(min(loss / n, 50.0))
        return out

    def lrs(self) -> dict:
        return {"lr": self.opt.param_groups[0]["lr"]}

    def schedule(self) -> None:
        if self.sched is not None:
            self.sched.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "diagnostics": self.diagnostics.state_dict() if self.diagnostics is not None else None}

    def load_state_dict(self, s: dict) -> None:
        self.opt.load_state_dict(s["optimizer"])
        if self.sched is not None and s["scheduler"] is not None:
            self.sched.load_state_dict(s["scheduler"])
        if self.diagnostics is not None and s["diagnostics"] is not None:
            self.diagnostics.load_state_dict(s["diagnostics"])


# ---------------------------------------------------------------- served

class ServedClassifier(Served):
    """A model trained on text (a classifier, or a language model: its classes are the next token): texts, encoded
    with its own vocabulary (extra_files/vocab.json) -> per text its `top` likeliest classes and probabilities."""

    takes, gives, command = "text", "classes", "predict"

    def __call__(self, texts: list[str], top: int = 3) -> list[list[tuple[str | int, float]]]:
        from tasks.data.text import Vocab

        classes = self.meta.get("classes") or []
        with torch.no_grad():
            probs = self.module(torch.as_tensor(Vocab.from_dict(self.vocab).encode(texts)))
        out = []
        for p in probs:
            best = torch.topk(p, min(top, len(p)))
            out.append([(classes[i] if i < len(classes) else i, float(q))
                        for q, i in zip(best.values, best.indices.tolist())])
        return out


class ServedArrays(Served):
    """An image, feature or series model: it takes raw arrays (images (N, C, H, W) in pixel units, feature rows,
    windows (N, L, 1)) and gives class probabilities; `mlflow models serve` serves it, no nnlab command."""

    takes, gives = "arrays", "classes"


class ServedForecasts(ServedArrays):
    gives = "forecasts"  # the next values of the series, in its units


# ---------------------------------------------------------------- the kinds

class Supervised(Kind):
    classify = True  # cross-entropy and accuracy; False: mean squared error on standardised targets
    perplexity = False

    def step(self, model, cfg, seed, device) -> Step:
        return SupervisedStep(model, cfg, device, self.classify, self.perplexity)

    def after_fit(self, job: Job, result) -> None:
        from tasks.figures import learning_curve_figure

        m = job.data.manifest
        job.run.log_figure(learning_curve_figure(result.history, f"{job.name} on {m['source']}"),
                           "plots/learning_curve.png")
        if len(m["input_shape"]) == 3 and isinstance(getattr(job.model, "features", None), nn.Sequential):
            _log_what_it_learned(job)
        if hasattr(job.model, "attention_weights"):  # attention models: where they looked, for a few test examples
            _log_attention(job)

    def served(self, job: Job):
        from tasks.data.text import VOCAB

        m, x_test = job.data.manifest, job.data.x_test
        deployed = self.wrap(copy.deepcopy(job.model).float().cpu(), m, job.mean, job.std)
        tokens = m.get("vocab_size") is not None
        example = x_test[:4] if tokens else x_test[:4].astype(np.float32)
        vocab = Path(job.data_dir) / VOCAB
        if tokens:
            job.run.log_file(vocab, "data")
        # the registered model encodes new text with its own vocabulary
        return deployed, example, {"classes": m["classes"]}, [vocab] if tokens else None

    def wrap(self, net, manifest, mean, std):
        from models.registry import Deployed

        net = net.to(memory_format=torch.contiguous_format)
        return Deployed(net, mean, std, regression=not self.classify, input_dims=len(manifest["input_shape"]))

    def serving(self, module, vocab, meta, uri) -> Served:
        # text models (their vocabulary logged beside them) read text; the others take raw arrays
        kind = ServedClassifier if vocab is not None else ServedArrays if self.classify else ServedForecasts
        return kind(module, vocab, meta, uri)

    def test_split(self, final: dict, data, device) -> Split:
        norm = final["normalization"]
        return to_device(data.x_test, data.y_test, norm["mean"], norm["std"], device, channels_last=False)


@register_kind
class Classification(Supervised):
    name, metric, registry = "classification", "test_accuracy", "nnlab-classifier"
    baselines = {"test_accuracy": "majority_test_accuracy"}

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        from tasks.kinds.supervised import classification_metrics, predict
        from tasks.figures import confusion_figure

        test = self.test_split(final, data, device)
        metrics, cm = classification_metrics(predict(model, test.x), test.y, final["num_classes"])
        majority = np.bincount(np.asarray(data.y_train), minlength=final["num_classes"]).argmax()
        metrics["majority_test_accuracy"] = float(np.mean(np.asarray(data.y_test) == majority))
        fig = confusion_figure(cm, final["classes"], f"{name}: test accuracy {metrics['test_accuracy']:.4f}")
        return Evaluation(metrics, fig, "plots/confusion_matrix.png")


# ---------------------------------------------------------------- what a trained network shows

def _log_what_it_learned(job: Job) -> None:
    """CNNs: the first-layer kernels, and the feature maps of one test image after an early and a late block."""
    from tasks.figures import feature_maps_figure, kernels_figure

    model, name, x_raw = job.model, job.name, job.data.x_test[:1]
    first = getattr(model, "first_conv", None) or next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    job.run.log_figure(kernels_figure(first.weight, f"{name}: first-layer kernels"), "plots/kernels.png")
    x = to_device(x_raw, np.zeros(1), job.mean, job.std, next(model.parameters()).device, channels_last=False).x
    maps = feature_maps(model, x)
    job.run.log_figure(feature_maps_figure(x_raw[0], maps, f"{name}: feature maps of one test image"),
                       "plots/feature_maps.png")


def _log_attention(job: Job, n: int = 6) -> None:
    from tasks.figures import attention_figure

    model, data = job.model, job.data
    x = to_device(data.x_test[:n], data.y_test[:n], job.mean, job.std, next(model.parameters()).device,
                  channels_last=False).x
    model.eval()
    with torch.no_grad():
        w = model.attention_weights(x).float().cpu().numpy()
    classes = data.manifest.get("classes") or []
    labels = [f"#{i}" + (f" ({classes[int(y)]})" if classes else "") for i, y in enumerate(data.y_test[:n])]
    step = "image row" if len(data.manifest["input_shape"]) == 3 else "time step"
    job.run.log_figure(attention_figure(w, labels, f"{job.name}: attention over {step}s", step), "plots/attention.png")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, classes) for normalised inputs already on the model's device."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def confusion_counts(true, read, num_classes: int) -> np.ndarray:
    """(K, K) counts: rows the true class, columns the class read (predicted)."""
    true, read = np.asarray(true, np.int64), np.asarray(read, np.int64)
    return np.bincount(true * num_classes + read, minlength=num_classes * num_classes).reshape(num_classes, -1)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[dict, np.ndarray]:
    pred = logits.argmax(1)
    cm = confusion_counts(y.cpu(), pred.cpu(), num_classes)
    recall = np.diag(cm) / np.maximum(cm.sum(1), 1)
    precision = np.diag(cm) / np.maximum(cm.sum(0), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    metrics = {
        "test_accuracy": float((pred == y).float().mean()),
        "test_loss": float(F.cross_entropy(logits, y)),
        "test_macro_f1": float(f1.mean()),
    }
    return metrics, cm


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs (C, H, W) of the first and the last of `model.features`' blocks for one input (1, C, H, W)."""
    blocks = list(model.features.children())
    wanted = {"early (block 1)": blocks[0], f"late (block {len(blocks)})": blocks[-1]}
    out: dict[str, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: out.__setitem__(k, o[0].float().cpu()))
             for k, b in wanted.items()]
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return out

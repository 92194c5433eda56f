"""Test metrics and the plots people look at: learning curves and the confusion matrix."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, classes) for normalised inputs already on the model's device."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[dict, np.ndarray]:
    pred = logits.argmax(1)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((y.cpu(), pred.cpu()), torch.ones(len(y), dtype=torch.long), accumulate=True)
    cm = cm.numpy()  # rows: true class, columns: predicted
    recall = np.diag(cm) / np.maximum(cm.sum(1), 1)
    precision = np.diag(cm) / np.maximum(cm.sum(0), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    metrics = {
        "test_accuracy": float((pred == y).float().mean()),
        "test_loss": float(F.cross_entropy(logits, y)),
        "test_macro_f1": float(f1.mean()),
    }
    return metrics, cm


def confusion_figure(cm: np.ndarray, classes: list[str], title: str):
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.55 * n), dpi=110)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 2 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def learning_curve_figure(history: list[dict], title: str):
    epochs = range(1, len(history) + 1)
    has_acc = "val_accuracy" in history[0]
    fig, axes = plt.subplots(1, 1 + has_acc, figsize=(5 * (1 + has_acc), 3.6), dpi=110, squeeze=False)
    for split in ("train", "val"):
        axes[0, 0].plot(epochs, [h[f"{split}_loss"] for h in history], marker=".", label=split)
        if has_acc:
            axes[0, 1].plot(epochs, [h[f"{split}_accuracy"] for h in history], marker=".", label=split)
    axes[0, 0].set_ylabel("loss")
    if has_acc:
        axes[0, 1].set_ylabel("accuracy")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig

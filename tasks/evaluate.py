"""Test metrics and the plots people look at: learning curves, the confusion matrix, what a CNN learned."""
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


def perplexity_figure(history: list[dict], title: str):
    """Language models: train and validation perplexity per epoch (log axis: it falls by orders at first)."""
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    epochs = range(1, len(history) + 1)
    for split in ("train", "val"):
        ax.plot(epochs, [h[f"{split}_perplexity"] for h in history], marker=".", label=split)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- what a CNN learned

def kernels_figure(weight: torch.Tensor, title: str, max_kernels: int = 64):
    """First-layer kernels (out, in, kh, kw): one tile each, RGB when the input is RGB, else the mean over inputs."""
    w = weight.detach().float().cpu()[:max_kernels]
    tiles = w.permute(0, 2, 3, 1) if w.shape[1] == 3 else w.mean(1, keepdim=True).permute(0, 2, 3, 1)
    lo, hi = tiles.amin((1, 2, 3), keepdim=True), tiles.amax((1, 2, 3), keepdim=True)
    tiles = ((tiles - lo) / (hi - lo).clamp_min(1e-8)).numpy()  # each kernel stretched to [0, 1]
    cols = min(8, len(tiles))
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols, 1.0 * rows + 0.4), dpi=110, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(tiles):
            t = tiles[i]
            ax.imshow(t[..., 0] if t.shape[-1] == 1 else t, cmap="gray", interpolation="nearest")
    fig.suptitle(f"{title} ({tuple(weight.shape[-2:])}, {weight.shape[0]} filters)", fontsize=9)
    fig.tight_layout()
    return fig


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


def feature_maps_figure(image: np.ndarray, maps: dict[str, torch.Tensor], title: str, per_row: int = 8):
    """The input image, then up to `per_row` channels of each feature map (those with the most activation)."""
    rows = len(maps)
    fig, axes = plt.subplots(rows, per_row + 1, figsize=(1.1 * (per_row + 1), 1.25 * rows + 0.4), dpi=110,
                             squeeze=False)
    img = image.astype(np.float32)
    for r, (name, fm) in enumerate(maps.items()):
        axes[r, 0].imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0) / img.max(), cmap="gray")
        axes[r, 0].set_title("input", fontsize=7)
        top = fm.abs().mean((1, 2)).argsort(descending=True)[:per_row]
        for c in range(per_row):
            ax = axes[r, c + 1]
            if c < len(top):
                ax.imshow(fm[top[c]].numpy(), cmap="viridis", interpolation="nearest")
                ax.set_title(f"{name.split(' ')[0]} ch {int(top[c])}", fontsize=6)
        axes[r, 1].set_ylabel(f"{name}\n{tuple(fm.shape)}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def attention_figure(weights: np.ndarray, labels: list[str], title: str, step_name: str = "time step"):
    """Attention over time steps (rows: examples), one heat-map row per example."""
    fig, ax = plt.subplots(figsize=(min(12, 1.5 + 0.3 * weights.shape[1]), 0.9 + 0.45 * len(weights)), dpi=110)
    im = ax.imshow(weights, aspect="auto", cmap="magma", vmin=0)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(step_name)
    fig.colorbar(im, ax=ax, fraction=0.03, label="weight")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig

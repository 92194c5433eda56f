"""The plots people look at, shared by every layer that draws: learning curves, the confusion matrix, what a CNN
learned, attention, sample grids, point clouds, GAN curves and evolution strips, image rows."""
from __future__ import annotations

from contextlib import contextmanager

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    import torch


def pyplot():
    """matplotlib's pyplot drawing into files only (the Agg backend: never a window): every figure's one set-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(cm: np.ndarray, classes: list[str], title: str, axes: tuple[str, str] = ("true", "predicted")):
    plt = pyplot()
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
    ax.set_ylabel(axes[0])
    ax.set_xlabel(axes[1])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def learning_curve_figure(history: list[dict], title: str):
    plt = pyplot()
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
    plt = pyplot()
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
    """First-layer kernels (out, in, kh, kw): one tile each, RGB when the input is RGB, else the mean over inputs;
    the tiles laid out 8 to a row in one image (one axes: a grid of 64 small axes took 0.3 s to draw)."""
    plt = pyplot()
    w = weight.detach().float().cpu()[:max_kernels]
    tiles = w.permute(0, 2, 3, 1) if w.shape[1] == 3 else w.mean(1, keepdim=True).permute(0, 2, 3, 1)
    lo, hi = tiles.amin((1, 2, 3), keepdim=True), tiles.amax((1, 2, 3), keepdim=True)
    tiles = ((tiles - lo) / (hi - lo).clamp_min(1e-8)).numpy()  # each kernel stretched to [0, 1]
    n, kh, kw, c = tiles.shape
    cols = min(8, n)
    rows = -(-n // cols)
    mosaic = np.full((rows * (kh + 1) - 1, cols * (kw + 1) - 1, c), np.nan, dtype=np.float32)  # NaN: the gaps
    for i, t in enumerate(tiles):
        r, q = divmod(i, cols)
        mosaic[r * (kh + 1):r * (kh + 1) + kh, q * (kw + 1):q * (kw + 1) + kw] = t
    fig, ax = plt.subplots(figsize=(1.0 * cols, 1.0 * rows + 0.4), dpi=110)
    ax.axis("off")
    if c == 1:
        cmap = plt.get_cmap("gray").with_extremes(bad="white")
        ax.imshow(np.ma.masked_invalid(mosaic[..., 0]), cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
    else:
        ax.imshow(np.nan_to_num(mosaic, nan=1.0), interpolation="nearest")
    ax.set_title(f"{title} ({tuple(weight.shape[-2:])}, {weight.shape[0]} filters)", fontsize=9)
    return fig


def feature_maps_figure(image: np.ndarray, maps: dict[str, torch.Tensor], title: str, per_row: int = 8):
    """The input image, then up to `per_row` channels of each feature map (those with the most activation)."""
    plt = pyplot()
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(min(12, 1.5 + 0.3 * weights.shape[1]), 0.9 + 0.45 * len(weights)), dpi=110)
    im = ax.imshow(weights, aspect="auto", cmap="magma", vmin=0)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(step_name)
    fig.colorbar(im, ax=ax, fraction=0.03, label="weight")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig



def tile(images, nrow: int = 8) -> np.ndarray:
    # (N, C, H, W) in [0, 1] -> one (H', W', 3) image, nrow images per row, 1-pixel white borders
    import torch
    from torchvision.utils import make_grid

    grid = make_grid(torch.as_tensor(np.asarray(images, dtype=np.float32)), nrow=nrow, padding=1, pad_value=1.0)
    return grid.clamp(0, 1).permute(1, 2, 0).numpy()


def sample_grid_figure(images, nrow: int, title: str):
    plt = pyplot()
    grid = tile(images, nrow)
    fig, ax = plt.subplots(figsize=(max(2.5, grid.shape[1] / 40), max(2.5, grid.shape[0] / 40) + 0.4), dpi=110)
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def curves_figure(history: list[dict], left: list[str], right: list[str], ylabels: tuple[str, str], title: str):
    # two panels of per-epoch curves: the keys `left` and `right` of each epoch's metrics
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    epochs = range(1, len(history) + 1)
    for ax, keys, label in zip(axes, (left, right), ylabels):
        for k in keys:
            ax.plot(epochs, [h[k] for h in history], marker=".", label=k)
        ax.set_ylabel(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _points(ax, real, fake, centers) -> None:
    if real is not None:
        ax.scatter(*np.asarray(real)[:, :2].T, s=2, c="0.6", alpha=0.5, label="real")
    ax.scatter(*np.asarray(fake)[:, :2].T, s=2, c="tab:red", alpha=0.5, label="generated")
    if centers is not None:
        ax.scatter(*np.asarray(centers).T, s=40, marker="x", c="k", label="mode centres")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


def points_figure(real, fake, centers, title: str):
    # 2-D data: real points (grey), generated (red), the mixture's centres (x)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.4), dpi=110)
    _points(ax, real, fake, centers)
    ax.legend(fontsize=7, loc="upper right", markerscale=3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def evolution_strip(samples: list, epochs: list[int], title: str = "", nrow: int = 8, centers=None):
    # One panel per epoch, left to right: an image batch (N, C, H, W) in [0, 1] as a grid, or 2-D points (N, 2)
    # as a scatter (with `centers` marked). Drawn from the fixed noise, so a panel differs only by training.
    plt = pyplot()
    fig, axes = plt.subplots(1, len(samples), figsize=(2.6 * len(samples), 2.9), dpi=110, squeeze=False)
    for ax, s, e in zip(axes[0], samples, epochs):
        s = np.asarray(s)
        if s.ndim == 4:
            ax.imshow(tile(s, nrow), interpolation="nearest")
            ax.axis("off")
        else:
            _points(ax, None, s, centers)
            ax.tick_params(labelsize=6)
        ax.set_title(f"epoch {e}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def rows_figure(rows: list[np.ndarray], labels: list[str], title: str):

    plt = pyplot()
    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(4.0, 0.55 * n + 1.6), 0.62 * len(rows) + 0.8), dpi=110,
                             squeeze=False)
    for ax, r, label in zip(axes[:, 0], rows, labels):
        ax.imshow(tile(r, n), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the evaluate stage's history (DVC plots)


def plot_history(path: Path, history: list[dict], name: str) -> None:
    """The learning curves as an image too: DVC's own rendering of history.csv needs Vega from the network."""
    from tasks.files import atomic_path

    plt = pyplot()
    epochs = range(1, len(history) + 1)
    losses = [k for k in history[0] if k.endswith("loss")] if history else []
    scores = [k for k in history[0] if k.startswith("val_") and not k.endswith("loss")] if history else []
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(8 if scores else 4.5, 3), squeeze=False)
    for k in losses:
        axes[0][0].plot(epochs, [h[k] for h in history], label=k)
    axes[0][0].set(xlabel="epoch", title=f"{name}: loss")
    for k in scores:
        axes[0][1].plot(epochs, [h[k] for h in history], label=k)
    if scores:
        axes[0][1].set(xlabel="epoch", title=f"{name}: validation")
    for ax in axes[0]:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv: one row per epoch (what `dvc plots` draws)."""
    import csv

    from tasks.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", *history[0].keys()])
        w.writeheader()
        for i, h in enumerate(history, 1):
            w.writerow({"epoch": i, **{k: round(v, 6) for k, v in h.items()}})


@contextmanager
def rendered(fig, name: str, also: Path | None = None):
    """The figure rendered once as a PNG file called `name` in a temporary folder (yielded, for the caller to log),
    and copied to `also` when given (written whole or not at all)."""
    import shutil
    import tempfile
    from pathlib import Path

    from tasks.files import atomic_path

    with tempfile.TemporaryDirectory(prefix="nnlab-figure-") as tmp:
        png = Path(tmp) / name
        fig.savefig(png, format="png")
        if also is not None:
            with atomic_path(also) as out:
                shutil.copyfile(png, out)
        yield png

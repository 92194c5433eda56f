"""Data augmentation: random rotation, shift, zoom, horizontal flip and (RGB) colour jitter.

`BatchAugment` is a `torchvision.transforms.v2.Transform`, so it composes with v2 pipelines, but unlike v2's
RandomAffine (one draw of parameters per call, i.e. one transform for a whole batch) it draws parameters per
example and warps the whole (B, C, H, W) batch in one `grid_sample` on the batch's device. Draws come from its
own seeded generator, saved in checkpoints, so a resumed run augments exactly as an uninterrupted one.
`HandwritingAugment` adds shear, narrowing, thinner strokes and contrast, for a classifier of one collection of
handwritten digits that must read another's (CycleGAN's semantic classifier: tasks/kinds/image2image.py).

Also the `augment` stage: a preview grid (originals beside augmented versions) and, optionally, an offline
training set with k augmented copies of every image.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from tasks.config import AugmentConfig
from tasks.data import AUGMENTED, load_prepared, raw_max  # noqa: F401  (AUGMENTED: the stage's folder)
from tasks.figures import pyplot

FLIP_SOURCES = ("cifar10", "fashion_mnist")  # mirrored they are still the same class; a mirrored digit is not


def flips(cfg: AugmentConfig, manifest: dict) -> bool:
    """`horizontal_flip: auto` resolves by source: on for natural images, off for digits (a mirrored 2 is no 2)."""
    return manifest["source"] in FLIP_SOURCES if cfg.horizontal_flip == "auto" else bool(cfg.horizontal_flip)


class BatchAugment(v2.Transform):
    """(B, C, H, W) float batch in `mean`/`std`-normalised units -> an augmented batch in the same units."""

    def __init__(self, cfg: AugmentConfig, *, flip: bool, mean, std, max_value: float, seed: int):
        super().__init__()
        self.cfg, self.flip, self.max_value = cfg, flip, float(max_value)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def for_data(cls, cfg: AugmentConfig, manifest: dict, seed: int, normalised: bool = True) -> "BatchAugment":
        n = manifest["normalization"]
        mean, std = (n["mean"], n["std"]) if normalised else ([0.0] * len(n["mean"]), [1.0] * len(n["std"]))
        return cls(cfg, flip=flips(cfg, manifest), mean=mean, std=std, max_value=raw_max(manifest),
                   seed=seed + 7919)  # apart from the init/dropout stream seeded with `seed`

    def _uniform(self, b: int, bound: float) -> torch.Tensor:  # (b,) in [-bound, bound]
        return (torch.rand(b, generator=self.generator) * 2 - 1) * bound

    def make_params(self, flat_inputs: list) -> dict:
        b, c = flat_inputs[0].shape[0], flat_inputs[0].shape[1]
        c_ = self.cfg
        return {
            "angle": self._uniform(b, math.radians(c_.rotation)),
            "shift": torch.stack([self._uniform(b, 2 * c_.width_shift), self._uniform(b, 2 * c_.height_shift)], 1),
            "scale": 1 + self._uniform(b, c_.zoom),
            "flip": torch.rand(b, generator=self.generator) < (0.5 if self.flip else 0.0),
            "jitter": 1 + self._uniform(3 * b, c_.color_jitter if c == 3 else 0.0).view(3, b),
        }

    def sampling(self, params: dict) -> torch.Tensor:
        """(B, 2, 2): the output -> input map before the shift, (1/s) R(-a), in grid_sample's coordinates."""
        a, s = params["angle"], params["scale"]
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        return torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)

    def finish(self, x01: torch.Tensor, params: dict) -> torch.Tensor:  # the warped batch in [0, 1]: as it is
        return x01

    def transform(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        dev = x.device
        mean, std = self.mean.to(dev), self.std.to(dev)
        x01 = (x.float() * std + mean) / self.max_value  # raw units scaled to [0, 1]; 0 = black background
        rot, t = self.sampling(params), params["shift"]  # output -> input: rot (p - t)
        theta = torch.cat([rot, -(rot @ t.unsqueeze(2))], 2).to(dev)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
        out = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if params["flip"].any():
            out = torch.where(params["flip"].to(dev).view(-1, 1, 1, 1), v2.functional.horizontal_flip(out), out)
        if out.shape[1] == 3 and self.cfg.color_jitter > 0:
            out = _color_jitter(out, *params["jitter"].to(dev))
        out = (self.finish(out, params).clamp(0, 1) * self.max_value - mean) / std
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # one batch tensor in, one out
        return self.transform(x, self.make_params([x]))


class HandwritingAugment(BatchAugment):
    """BatchAugment for reading one collection of handwritten digits as another writes them: besides rotation,
    shift and zoom, per example a shear, a narrower width (1 to 2x: a digit fitted into its box with its aspect
    kept, as MNIST's are, against one stretched to fill it, as scikit-learn's 8x8 digits are), for half of them
    strokes one pixel thinner (a 3x3 minimum) and a contrast stretch (1 to 3x: a blurred 8x8 upscale against a
    sharp scan). What a classifier of one collection must learn to ignore before it can judge another's."""

    SHEAR, NARROW, CONTRAST = 0.3, 2.0, 3.0
    SETTINGS = AugmentConfig(rotation=15.0, width_shift=0.06, height_shift=0.06, zoom=0.15, horizontal_flip=False)

    def __init__(self, *, mean, std, max_value: float, seed: int):
        super().__init__(self.SETTINGS, flip=False, mean=mean, std=std, max_value=max_value, seed=seed)

    def make_params(self, flat_inputs: list) -> dict:
        b, g = flat_inputs[0].shape[0], self.generator
        return {**super().make_params(flat_inputs), "shear": self._uniform(b, self.SHEAR),
                "narrow": 1 + torch.rand(b, generator=g) * (self.NARROW - 1),
                "thin": torch.rand(b, generator=g) < 0.5,
                "contrast": 1 + torch.rand(b, generator=g) * (self.CONTRAST - 1)}

    def sampling(self, params: dict) -> torch.Tensor:  # then x_in = narrow (x + shear y): narrower, slanted
        one, zero = torch.ones_like(params["shear"]), torch.zeros_like(params["shear"])
        skew = torch.stack([torch.stack([params["narrow"], params["narrow"] * params["shear"]], 1),
                            torch.stack([zero, one], 1)], 1)
        return skew @ super().sampling(params)

    def finish(self, x01: torch.Tensor, params: dict) -> torch.Tensor:
        dev = x01.device
        thinner = -F.max_pool2d(-x01, 3, 1, 1)
        out = torch.where(params["thin"].to(dev).view(-1, 1, 1, 1), thinner, x01)
        return (out - 0.5) * params["contrast"].to(dev).view(-1, 1, 1, 1) + 0.5


def _color_jitter(x, brightness, contrast, saturation):  # x (B, 3, H, W) in [0, 1]; factors (B,)
    v = lambda f: f.view(-1, 1, 1, 1)  # noqa: E731
    x = (x * v(brightness)).clamp(0, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W)
    x = ((x - gray.mean((2, 3), keepdim=True)) * v(contrast) + gray.mean((2, 3), keepdim=True)).clamp(0, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return (x - gray) * v(saturation) + gray


# ---------------------------------------------------------------- raw uint8 images (preview, offline copies)

def augment_raw(aug: BatchAugment, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """uint8 (N, C, H, W) in raw units -> augmented uint8, same shape (`aug` built with normalised=False)."""
    out = np.empty_like(x)
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)
        out[i:i + batch_size] = aug(xb).round().clamp(0, aug.max_value).to(torch.uint8).numpy()
    return out


def preview_figure(x: np.ndarray, versions: list[np.ndarray], max_value: float, title: str):
    """Rows: examples; first column the original, then its augmented versions."""
    plt = pyplot()

    n, cols = len(x), 1 + len(versions)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.3 * n + 0.5), squeeze=False)
    for r in range(n):
        for c, img in enumerate([x[r]] + [v[r] for v in versions]):
            ax = axes[r, c]
            img = img.astype(np.float32) / max_value
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def preview(cfg: AugmentConfig, data, seed: int, versions: int = 3):
    """The preview figure for the first `cfg.preview` training images (one per class first)."""
    m = data.manifest
    aug = BatchAugment.for_data(cfg, m, seed, normalised=False)
    firsts = [int(np.flatnonzero(data.y_train == k)[0]) for k in np.unique(data.y_train)][:cfg.preview]
    x = data.x_train[firsts]
    outs = [augment_raw(aug, x) for _ in range(versions)]
    on = [f"rotation ±{cfg.rotation:g}°", f"shift ±{cfg.width_shift:g}/{cfg.height_shift:g}", f"zoom ±{cfg.zoom:g}",
          f"flip {'on' if aug.flip else 'off'}"] + ([f"colour ±{cfg.color_jitter:g}"] if x.shape[1] == 3 else [])
    return preview_figure(x, outs, aug.max_value, f"{m['source']}: {', '.join(on)}")


def expand_offline(cfg: AugmentConfig, data_dir: str | Path, out_dir: str | Path, seed: int) -> dict:
    """A prepared-data folder whose training split holds the originals plus `offline_copies` augmented copies
    of each; val and test unchanged."""
    from tasks.data import write_prepared

    data = load_prepared(data_dir)
    m = data.manifest
    aug = BatchAugment.for_data(cfg, m, seed, normalised=False)
    x = np.concatenate([data.x_train] + [augment_raw(aug, data.x_train) for _ in range(cfg.offline_copies)])
    y = np.concatenate([data.y_train] * (cfg.offline_copies + 1))
    splits = {"train": (x, y), "val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}
    # normalisation stays the original training split's: the statistics of the images the model will see; the
    # data's config and seed stay its own (sizes, files and data hash: write_prepared's, of this folder)
    return write_prepared(Path(out_dir), splits, {
        **{k: v for k, v in m.items() if k not in ("sizes", "config", "seed", "files", "data_hash")},
        "augment": {"offline_copies": cfg.offline_copies, "from": m["data_hash"], **cfg.model_dump()}},
        cfg=m["config"], seed=m["seed"])

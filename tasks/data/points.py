"""Points drawn from known modes: ring8, the mode-collapse benchmark of 2-D GANs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.config import DataConfig
from tasks.data import stratified_split, write_prepared


def prepare_points(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    ring = {"radius": 2.0, "std": 0.02, "centers": centers(8, 2.0).tolist()}  # the benchmark's usual ring
    x, y = read(cfg.ring8_size, seed, ring["radius"], ring["std"])
    splits = stratified_split(x, y, None, cfg, seed)
    classes = [f"mode {k}" for k in range(8)]
    return write_prepared(out_dir, splits, {
        "source": cfg.source, "task": "generation", "description": "8 Gaussians on a circle (mode-collapse benchmark)",
        "input_shape": [2], "num_classes": 8, "classes": classes,
        "counts": {s: {c: int(n) for c, n in zip(classes, np.bincount(ys, minlength=8))} for s, (_, ys) in splits.items()},
        "normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},  # the points' own units
        "ring8": ring,
    }, cfg=cfg, seed=seed)


def centers(k: int = 8, radius: float = 2.0) -> np.ndarray:
    angles = 2 * np.pi * np.arange(k) / k
    return (radius * np.stack([np.cos(angles), np.sin(angles)], 1)).astype(np.float32)  # (k, 2)


def ring8(n: int, seed: int, radius: float = 2.0, std: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    # The mode-collapse benchmark (Metz et al. 2017, unrolled GANs): a mixture of 8 equally likely Gaussians of
    # std `std` on a circle of `radius`. Labels say which Gaussian drew each point.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n)
    points = centers(8, radius)[labels] + rng.normal(0.0, std, (n, 2))
    return points.astype(np.float32), labels.astype(np.int64)  # (n, 2), (n,)

"""Image pairs for image-to-image runs (pix2pix, cyclegan): two domains of digits, paired or not.

Sources (all offline, from bundled digits; every image 32x32, uint8 0..255):
  paired    mnist5k digits (padded 28 -> 32) and an input made from each, by `data.pairing`:
            edges             Canny edges (scikit-image) -> the digit (the paper's edges -> photo);
            super_resolution  the digit shrunk to 8x8, then bicubic back to 32x32 -> the digit (the input IS
                              the bicubic baseline);
            occlusion         a seeded 12x12 grey square over the digit -> the complete digit.
  unpaired  two domains, never paired, by `data.domains`:
            digits_mnist  scikit-learn's 8x8 digits (0..16), upscaled into MNIST's 20x20 box of a 28x28 frame
                          <-> mnist5k (the issue's 59%: an MNIST classifier reads these digits poorly);
            inverted      one half of mnist5k inverted (white ground) <-> the other half as it is;
            colour        one half of mnist5k in grey (as RGB) <-> the other half, each digit in a colour
                          (colour_digits' palette).
Prepared folders: x (N, C, 32, 32) domain A, y (N, C, 32, 32) domain B (paired: the same index is the same
digit; unpaired: the training split repeats the smaller domain to the larger's length, the other splits keep
each domain whole), and `labels.npz`: the digit of every image (a_<split>, b_<split>), which only the
evaluation's classifiers read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import DataConfig
from tasks.data import take_stratified, write_prepared

SIZE = 32  # every prepared image is SIZE x SIZE: U-Nets halve it cleanly down to 1x1
LABELS = "labels.npz"


@dataclass
class Domains:
    a: np.ndarray  # (N, C, 32, 32) uint8: the inputs
    b: np.ndarray  # (M, C, 32, 32) uint8: the outputs wanted (paired: M == N, row i is row i's target)
    labels_a: np.ndarray  # (N,) the digit in each image
    labels_b: np.ndarray  # (M,)
    names: tuple[str, str]  # what domains A and B are, for titles
    paired: bool
    baseline: str  # what "the input, unchanged" is as a translation (paired: the baseline the metrics beat)


def _frame(x: np.ndarray, size: int = SIZE) -> np.ndarray:
    # (N, C, h, w) centred in a (N, C, size, size) zero frame
    n, c, h, w = x.shape
    out = np.zeros((n, c, size, size), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, :, top:top + h, left:left + w] = x
    return out


def _resize(x: np.ndarray, size: int, resample) -> np.ndarray:  # (N, 1, h, w) uint8 -> (N, 1, size, size)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(img[0]).resize((size, size), resample))[None] for img in x])


def mnist32() -> tuple[np.ndarray, np.ndarray]:
    from tasks.data.images import read_mnist32

    x, y, _, _ = read_mnist32(None)
    return x, y  # (5000, 1, 32, 32), (5000,)


def sklearn_digits32() -> tuple[np.ndarray, np.ndarray]:
    # 8x8 at 0..16 -> 0..255, bicubic to 20x20 (MNIST's digits fill a 20x20 box centred in 28x28), framed to 32
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]
    return _frame(_resize(x, 20, Image.Resampling.BICUBIC)), d.target.astype(np.int64)


def edges(x: np.ndarray) -> np.ndarray:  # (N, 1, H, W) -> Canny edges as 0 / 255
    from skimage.feature import canny

    return np.stack([canny(img[0] / 255.0, sigma=1.0)[None] for img in x]).astype(np.uint8) * 255


def low_resolution(x: np.ndarray, factor: int = 4) -> np.ndarray:
    # box-filtered to SIZE / factor (8x8), then bicubic back to SIZE: the classic super-resolution input
    from PIL import Image

    small = _resize(x, SIZE // factor, Image.Resampling.BOX)
    return _resize(small, SIZE, Image.Resampling.BICUBIC)


def occluded(x: np.ndarray, seed: int, side: int = 12) -> np.ndarray:
    # a grey (128) side x side square at a seeded place inside the digit's box (rows/cols 6..26 of 32)
    rng = np.random.default_rng(seed)
    out = x.copy()
    for img, (r, c) in zip(out, rng.integers(6, 26 - side + 1, (len(x), 2))):
        img[:, r:r + side, c:c + side] = 128
    return out


def _halves(n: int, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return take_stratified(np.arange(n), labels, 0.5, seed, "the two domains (half each)")


def read_paired(cfg: DataConfig) -> Domains:
    digits, labels = mnist32()
    if cfg.pairing == "edges":
        a, baseline = edges(digits), "the edge map itself"
    elif cfg.pairing == "super_resolution":
        a, baseline = low_resolution(digits), "bicubic upscaling of the 8x8 image"
    else:
        a, baseline = occluded(digits, seed=0), "the occluded digit itself"
    return Domains(a, digits, labels, labels, (cfg.pairing.replace("_", " "), "digit"), True, baseline)


def read_unpaired(cfg: DataConfig) -> Domains:
    digits, labels = mnist32()
    if cfg.domains == "digits_mnist":
        a, la = sklearn_digits32()
        return Domains(a, digits, la, labels, ("sklearn digits", "mnist"), False, "untranslated")
    first, second = _halves(len(labels), labels, seed=0)  # no digit image is in both domains
    a, b = digits[first], digits[second]
    if cfg.domains == "inverted":
        return Domains(255 - a, b, labels[first], labels[second], ("inverted mnist", "mnist"), False, "untranslated")
    from tasks.data.images import in_colour

    return Domains(np.repeat(a, 3, axis=1), in_colour(b, seed=0), labels[first], labels[second],
                   ("grey mnist", "coloured mnist"), False, "untranslated")


def _split(labels: np.ndarray, cfg: DataConfig, seed: int) -> dict[str, np.ndarray]:
    idx, test = take_stratified(np.arange(len(labels)), labels, cfg.test_fraction, seed, "test (data.test_fraction)")
    train, val = take_stratified(idx, labels, cfg.val_fraction, seed, "val (data.val_fraction)")
    if cfg.max_train and cfg.max_train < len(train):
        _, train = take_stratified(train, labels, cfg.max_train, seed, "train subset (data.max_train)")
    return {"train": train, "val": val, "test": test}


def prepare_image_pairs(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    d = read(cfg)
    ia = _split(d.labels_a, cfg, seed)
    ib = ia if d.paired else _split(d.labels_b, cfg, seed + 1)
    if not d.paired:  # the training split's two domains at one length: the shorter one repeated, seeded
        n = max(len(ia["train"]), len(ib["train"]))
        rng = np.random.default_rng(seed)
        ia["train"], ib["train"] = (_repeat(ia["train"], n, rng), _repeat(ib["train"], n, rng))
    splits = {s: (d.a[ia[s]], d.b[ib[s]]) for s in ia}
    labels = {f"{side}_{s}": lab[idx[s]] for side, lab, idx in (("a", d.labels_a, ia), ("b", d.labels_b, ib))
              for s in ia}
    channels = d.a.shape[1]
    classes = [str(c) for c in range(10)]
    return write_prepared(out_dir, splits, {
        "source": cfg.source, "task": "image_translation",
        "description": f"{d.names[0]} -> {d.names[1]}, {'paired' if d.paired else 'unpaired'}",
        "domains": {"a": d.names[0], "b": d.names[1], "paired": d.paired, "baseline": d.baseline},
        "input_shape": list(d.a.shape[1:]), "num_classes": 10, "classes": classes,
        "sizes_a": {s: len(a) for s, (a, _) in splits.items()},
        "normalization": {"mean": [127.5] * channels, "std": [127.5] * channels},  # uint8 -> [-1, 1]
    }, cfg=cfg, seed=seed, arrays={LABELS: labels})


def _repeat(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(idx) >= n:
        return idx
    return np.concatenate([idx, rng.choice(idx, n - len(idx), replace=n - len(idx) > len(idx))])


def load_labels(data_dir: Path) -> dict[str, np.ndarray]:
    with np.load(Path(data_dir) / LABELS) as z:
        return {k: z[k] for k in z.files}

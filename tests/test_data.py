"""tasks/data/: every source through prepare -> load_prepared, on small files written here (no network)."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from tasks import data as data_mod
from tasks.config import DataConfig
from tasks.data.images import IDX_FILES
from tasks.data import DataError, content_hash, load_prepared, prepare


def split_arrays(ds):
    return {"train": (ds.x_train, ds.y_train), "val": (ds.x_val, ds.y_val), "test": (ds.x_test, ds.y_test)}


def row_hashes(x):
    return {hashlib.sha1(row.tobytes()).hexdigest() for row in x}


def files_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- writers of the standard formats

def write_idx(path, arr, gz=False):
    # idx-ubyte: magic 0x00 0x00 0x08 (uint8) ndim, then each dim as big-endian uint32, then the bytes
    blob = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob += arr.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(blob, mtime=0))
    else:
        path.write_bytes(blob)


def labelled_images(n, shape, seed):
    # every pixel of image i = 20 * label + small noise, so x -> y survives any reordering: x // 20 == y
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = (20 * y).reshape(-1, *[1] * len(shape)) + rng.integers(0, 5, size=(n, *shape))
    return x.astype(np.uint8), y


def write_mnist(root, folder="MNIST", n_train=100, n_test=20, gz=False):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = labelled_images(n, (28, 28), seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y, gz)


def write_cifar(root, per_batch=20, n_test=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [(f"data_batch_{i}", per_batch, i) for i in range(1, 6)] + [("test_batch", n_test, 9)]
    for name, n, seed in batches:
        x, y = labelled_images(n, (3, 32, 32), seed)
        entry = {"batch_label": name, "data": x.reshape(n, 3072), "labels": y.tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}))


def write_image_folder(root, per_class=10):
    # class cat: grey 50, dog: grey 200; modes alternate L / RGB, sizes vary; RGB greys convert to L exactly
    for cls, grey in (("cat", 50), ("dog", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            size = (10 + 7 * i, 12 + 3 * i)
            im = Image.new("L", size, grey) if i % 2 == 0 else Image.new("RGB", size, (grey,) * 3)
            im.save(root / cls / f"{i:02d}.png")


def assert_labels_follow_images(ds):
    for x, y in split_arrays(ds).values():
        assert np.array_equal(x.reshape(len(x), -1)[:, 0] // 20, y)


# ---------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    prepare(DataConfig(source="digits"), seed=0, out_dir=out)
    return out, load_prepared(out)


def test_digits_shapes_and_types(digits):
    _, ds = digits
    m = ds.manifest
    assert m["input_shape"] == [1, 8, 8] and m["num_classes"] == 10 and m["classes"] == [str(i) for i in range(10)]
    total = sum(m["sizes"].values())
    assert total == 1797
    assert m["sizes"]["test"] == pytest.approx(0.2 * total, abs=1)
    assert m["sizes"]["val"] == pytest.approx(0.15 * (total - m["sizes"]["test"]), abs=1)
    for split, (x, y) in split_arrays(ds).items():
        assert x.shape == (m["sizes"][split], 1, 8, 8) and x.dtype == np.uint8 and x.max() <= 16
        assert y.dtype == np.int64
        assert m["counts"][split] == {str(c): int((y == c).sum()) for c in range(10)}


def test_digits_stratified(digits):
    _, ds = digits
    overall = np.bincount(np.concatenate([y for _, y in split_arrays(ds).values()])) / 1797
    for _, y in split_arrays(ds).values():
        assert np.abs(np.bincount(y, minlength=10) / len(y) - overall).max() < 0.02


def test_digits_splits_do_not_overlap(digits):
    _, ds = digits  # load_digits has no duplicate images, so equal rows mean a leak
    hashes = {split: row_hashes(x) for split, (x, _) in split_arrays(ds).items()}
    assert sum(len(h) for h in hashes.values()) == 1797
    assert not hashes["train"] & hashes["val"] and not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_normalization_comes_from_train_split(digits):
    _, ds = digits
    norm = ds.manifest["normalization"]
    assert norm["mean"] == pytest.approx([ds.x_train.mean()], rel=1e-9)
    assert norm["std"] == pytest.approx([ds.x_train.std()], rel=1e-9)
    assert norm["mean"] != pytest.approx([ds.x_val.mean()], rel=1e-6)


def test_same_seed_same_bytes_other_seed_other_hash(digits, tmp_path):
    out, _ = digits
    prepare(DataConfig(source="digits"), seed=0, out_dir=tmp_path / "again")
    assert files_bytes(tmp_path / "again") == files_bytes(out)
    assert content_hash(tmp_path / "again") == content_hash(out)
    prepare(DataConfig(source="digits"), seed=1, out_dir=tmp_path / "other")
    assert content_hash(tmp_path / "other") != content_hash(out)


def test_manifest_files_and_hash(digits):
    out, ds = digits
    m = ds.manifest
    assert m["files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.npz"))}
    pairs = "".join(f"{name}\0{sha}\n" for name, sha in sorted(m["files"].items()))
    assert m["data_hash"] == hashlib.sha256(pairs.encode()).hexdigest() == content_hash(out)
    assert m["config"] == DataConfig(source="digits").model_dump() and m["seed"] == 0
    assert m["task"] == "classification" and m["source"] == "digits"


def test_max_train_is_a_stratified_subset(digits, tmp_path):
    _, full = digits
    prepare(DataConfig(source="digits", max_train=100), 0, tmp_path)
    ds = load_prepared(tmp_path)
    assert len(ds.y_train) == 100
    assert np.bincount(ds.y_train, minlength=10).min() >= 9 and np.bincount(ds.y_train).max() <= 11
    assert np.array_equal(ds.x_val, full.x_val) and np.array_equal(ds.x_test, full.x_test)
    assert row_hashes(ds.x_train) <= row_hashes(full.x_train)


def test_resize_and_channels_apply_to_array_sources(tmp_path):
    m = prepare(DataConfig(source="digits", image_size=16, channels=3), 0, tmp_path)
    ds = load_prepared(tmp_path)
    assert m["input_shape"] == [3, 16, 16] and ds.x_test.shape[1:] == (3, 16, 16)
    assert len(m["normalization"]["mean"]) == 3 and ds.x_train.max() <= 16


# ---------------------------------------------------------------- mnist5k

def test_mnist5k_stratified_despite_sorted_file(tmp_path):
    m = prepare(DataConfig(source="mnist5k"), 0, tmp_path)
    ds = load_prepared(tmp_path)
    assert m["input_shape"] == [1, 28, 28] and sum(m["sizes"].values()) == 5000
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() > 200
    for _, y in split_arrays(ds).values():
        counts = np.bincount(y, minlength=10)
        assert counts.min() > 0 and counts.max() - counts.min() <= 2  # 500 per class in the source
    assert not np.all(np.diff(ds.y_train) >= 0)  # shuffled, not sorted by label


# ---------------------------------------------------------------- torchvision formats

@pytest.mark.parametrize("source, folder, gz", [("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)])
def test_mnist_format_through_torchvision(tmp_path, source, folder, gz):
    write_mnist(tmp_path / "raw", folder, gz=gz)
    m = prepare(DataConfig(source=source, path=str(tmp_path / "raw")), 0, tmp_path / "out")
    ds = load_prepared(tmp_path / "out")
    assert m["sizes"] == {"train": 85, "val": 15, "test": 20}  # official test kept, val from the 100 train
    assert m["input_shape"] == [1, 28, 28] and m["num_classes"] == 10
    assert_labels_follow_images(ds)
    assert np.array_equal(np.sort(ds.y_test), np.sort(np.arange(20) % 10))
    if gz:  # read through a temporary copy: the user's raw folder is left as it was
        assert sorted(p.name for p in (tmp_path / "raw" / folder / "raw").iterdir()) == sorted(
            f"{n}.gz" for n in IDX_FILES)


@pytest.mark.parametrize("source, raw", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
def test_mnist_missing_without_download(tmp_path, source, raw):
    with pytest.raises(DataError) as e:
        prepare(DataConfig(source=source, path=str(tmp_path / "nowhere")), 0, tmp_path / "out")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / raw) in msg
    assert all(name in msg for name in IDX_FILES)
    assert "data.download" in msg
    assert not (tmp_path / "out").exists()


def test_cifar10_pickles(tmp_path):
    write_cifar(tmp_path / "raw")
    m = prepare(DataConfig(source="cifar10", path=str(tmp_path / "raw")), 0, tmp_path / "out")
    ds = load_prepared(tmp_path / "out")
    assert m["sizes"] == {"train": 85, "val": 15, "test": 20} and m["input_shape"] == [3, 32, 32]
    assert m["classes"][:3] == ["airplane", "automobile", "bird"]
    assert ds.x_train.shape[1:] == (3, 32, 32) and ds.x_train.dtype == np.uint8
    assert_labels_follow_images(ds)
    assert len(m["normalization"]["std"]) == 3


def test_cifar10_missing_files(tmp_path):
    write_cifar(tmp_path / "raw")
    (tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3.*cifar-10-batches-py.*data.download"):
        prepare(DataConfig(source="cifar10", path=str(tmp_path / "raw")), 0, tmp_path / "out")


# ---------------------------------------------------------------- image_folder

def test_image_folder_resize_and_channels(tmp_path):
    write_image_folder(tmp_path / "imgs")
    m = prepare(DataConfig(source="image_folder", path=str(tmp_path / "imgs")), 0, tmp_path / "gray")
    ds = load_prepared(tmp_path / "gray")
    assert m["classes"] == ["cat", "dog"] and m["input_shape"] == [1, 32, 32]  # first image is L
    assert m["sizes"] == {"train": 13, "val": 3, "test": 4}
    for x, y in split_arrays(ds).values():
        assert np.array_equal(x.reshape(len(x), -1).mean(1), np.where(y == 0, 50, 200))

    m = prepare(DataConfig(source="image_folder", path=str(tmp_path / "imgs"), image_size=12, channels=3),
                0, tmp_path / "rgb")
    assert m["input_shape"] == [3, 12, 12] and load_prepared(tmp_path / "rgb").x_val.shape[1:] == (3, 12, 12)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare(DataConfig(source="image_folder", path=str(tmp_path / "nope")), 0, tmp_path / "out")
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="0 class sub-folder"):
        prepare(DataConfig(source="image_folder", path=str(tmp_path / "flat")), 0, tmp_path / "out")
    (tmp_path / "flat" / "cat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "cat" / "a.png")
    # one class is no classification (it used to train and report accuracy 1.0000)
    with pytest.raises(DataError, match=r"1 class sub-folder\(s\) \(cat\); classification needs at least 2"):
        prepare(DataConfig(source="image_folder", path=str(tmp_path / "flat")), 0, tmp_path / "out")
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(DataError, match="no images.*empty"):
        prepare(DataConfig(source="image_folder", path=str(tmp_path / "flat")), 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- atomicity and reading back

def test_failing_source_leaves_prepared_folder_intact(digits, tmp_path):
    out, _ = digits
    before = files_bytes(out)
    with pytest.raises(DataError):
        prepare(DataConfig(source="image_folder", path=str(tmp_path / "missing")), 0, out)
    assert files_bytes(out) == before
    assert not list(out.glob("*.tmp"))


def test_crash_while_writing_leaves_no_half_file(tmp_path, monkeypatch):
    def broken_savez(f, **arrays):
        f.write(b"PK half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(data_mod.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        prepare(DataConfig(source="digits"), 0, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_stale_files_are_replaced(tmp_path):
    (tmp_path / "old.npz").write_bytes(b"stale")
    prepare(DataConfig(source="digits"), 0, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "test.npz", "train.npz", "val.npz"]


def test_load_prepared_errors(tmp_path):
    with pytest.raises(DataError, match="nnlab stage prepare"):
        load_prepared(tmp_path / "never")
    with pytest.raises(DataError, match="nnlab stage prepare"):
        content_hash(tmp_path / "never")
    prepare(DataConfig(source="digits"), 0, tmp_path)
    (tmp_path / "val.npz").unlink()
    with pytest.raises(DataError, match="val.npz missing.*dvc repro prepare"):
        load_prepared(tmp_path)

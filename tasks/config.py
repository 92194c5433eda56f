"""params.yaml -> typed, validated config. Parsed once at the edge; everything below takes `Config`.

Errors name the dotted key, the bad value and what is allowed (with a "did you mean" for near misses),
and are raised before anything runs.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.options import UnknownModelError, get_spec
from tasks.explain import format_errors
from tasks.sources import NAMES as SOURCE_NAMES, kind_name, misfit, rules, unread, unwatchable

INIT_ALIASES = {"glorot_normal": "xavier_normal", "glorot_uniform": "xavier_uniform",
                "kaiming_normal": "he_normal", "kaiming_uniform": "he_uniform"}


warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)  # BaseModel.register is ABC's


class ConfigError(ValueError):
    """Invalid params: the message names the key, the value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: Literal[SOURCE_NAMES] = "digits"  # the table in tasks/sources.py
    # folder of mnist/fashion_mnist/cifar10/imdb's standard files or image_folder's classes (default data/raw);
    # text_csv: the CSV/TSV file (required); charlm: a text file (default: the bundled pydoc topics corpus)
    path: str | None = None
    download: bool = False  # allow torchvision to download missing files into `path`
    val_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)  # of the training pool
    test_fraction: float = Field(default=0.2, gt=0.0, lt=0.5)  # ignored where the source has an official test split
    image_size: int | None = Field(default=None, ge=4, le=512)  # resize to this square size (image_folder default 32)
    channels: Literal[1, 3] | None = None  # image_folder colour mode; None = as the first image
    max_train: int | None = Field(default=None, ge=10)  # stratified subset of the training split (small-data studies)
    lookback: int = Field(default=24, ge=2, le=1000)  # sunspots/co2: values in each input window
    horizon: int = Field(default=1, ge=1, le=100)  # sunspots/co2: values to forecast after it
    season: int | None = Field(default=None, ge=2)  # seasonal-naive period (default: sunspots 11, co2 12)
    classes: list[str] | None = Field(default=None, min_length=2)  # keep only these classes (names; digits: "0".."9")
    text_column: str = "text"  # text_csv: column holding the text
    label_column: str = "label"  # text_csv: column holding the label (strings or integers)
    drop_missing_labels: bool = False  # text_csv: leave out rows whose label is empty/NaN/NA/null (else an error)
    # word (lowercased), char, subword (pairs, dates, numbers: sentencepiece); None: the source's own (char for
    # charlm/dates/numbers, subword for a parallel corpus, else word)
    tokenizer: Literal["word", "char", "subword"] | None = None
    # tokens per text (None: 200), charlm/wordlm context (64/35), pairs: longest side kept (None: 50; longer dropped)
    max_length: int | None = Field(default=None, ge=2, le=10_000)
    source_column: str | None = None  # pairs: header of the source column (None: first column, no header row)
    target_column: str | None = None  # pairs: header of the target column (None: second column)
    source_lang: str | None = None  # pairs from a folder of line-aligned train/val/test*.<lang> files: e.g. de
    target_lang: str | None = None  # ... and the side translated into, e.g. en
    test_set: str | None = None  # ... and the test*.<lang> set scored, e.g. test_2016_flickr (null: the only one)
    subword_vocab: int | None = Field(default=None, ge=16, le=64_000)  # pieces a side (None: train pairs/4, 256-8000)
    language: str = "de"  # numbers: the language the integers are written in (num2words' code: de, fr, es, ...)
    number_max: int = Field(default=9_999, ge=10, le=10**9)  # numbers: integers 0..number_max (at most 20,000 drawn)
    min_freq: int = Field(default=2, ge=1)  # a token enters the vocabulary when seen this often in training texts
    max_vocab: int = Field(default=20_000, ge=3)  # vocabulary size cap, padding and out-of-vocabulary ids included
    ring8_size: int = Field(default=8_000, ge=100)  # ring8: points drawn from the 8 Gaussians (all splits)
    pairing: Literal["edges", "super_resolution", "occlusion"] = "edges"  # paired: what the input is made of
    domains: Literal["digits_mnist", "inverted", "colour"] = "digits_mnist"  # unpaired: the two domains
    sample_rate: int = Field(default=16_000, ge=4_000, le=48_000)  # speech: recordings resampled to this (Hz)
    n_mels: int = Field(default=40, ge=8, le=128)  # speech: mel bands of the log-mel features (10 ms frames)
    max_seconds: float = Field(default=10.0, gt=0.0, le=60.0)  # speech: longer recordings are left out (counted)
    # speech front end (tasks/data/audio.py): mel filters' top in Hz (None: the lowest Nyquist frequency of the
    # recordings as recorded, so 8 kHz data read at 16 kHz has no empty bands); silence trimmed from both ends
    # below this many dB under the loudest 25 ms (0: none), keeping trim_margin_ms; each recording's level set;
    # per-utterance mean/variance normalisation of the log-mels
    f_max: float | None = Field(default=None, ge=1_000.0, le=24_000.0)
    trim_db: float = Field(default=35.0, ge=0.0, le=100.0)
    trim_margin_ms: float = Field(default=60.0, ge=0.0, le=1_000.0)
    cmvn: bool = True
    # speech: training recordings also added at these speeds (resampled copies: tempo and pitch; Ko et al. 2015);
    # None: [0.9, 1.1] for speech, none for synth_speech (its voices already speak at 130-210 words a minute)
    speed_perturb: list[float] | None = None
    mix_synth: int = Field(default=0, ge=0, le=100_000)  # speech: eSpeak NG utterances added to training only
    # speech: in training, each utterance's mel axis warped by a factor in [1 - vtlp, 1 + vtlp] (vocal tract
    # length perturbation, on the fly; 0: off), and SpecAugment's masks unless augment.enabled: false
    vtlp: float = Field(default=0.1, ge=0.0, le=0.3)
    test_speakers: list[str] | None = None  # speech: these speakers are the test split (else drawn by seed)
    val_speakers: list[str] | None = None  # speech: these are validation (else by speaker from 8 on, or a slice)
    script: Literal["digits", "commands"] = "digits"  # synth_speech: digit strings or short spoken commands
    utterances: int = Field(default=3_000, ge=30, le=100_000)  # synth_speech: recordings made (all splits)

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source == "text_csv" and not self.path:
            raise ValueError("data.path: text_csv needs the CSV or TSV file to read (e.g. --set data.path=reviews.csv)")
        if self.source == "pairs" and not self.path:
            raise ValueError("data.path: pairs needs a TSV/CSV (`nnlab example-pairs` writes one) or a folder")
        if self.source == "charlm" and self.tokenizer == "word" or self.source == "wordlm" and self.tokenizer == "char":
            raise ValueError(f"data.tokenizer: {self.source} models {'characters' if self.source == 'charlm' else 'words'}"
                             f"; use data.source={'wordlm' if self.source == 'charlm' else 'charlm'} for "
                             f"{'words' if self.source == 'charlm' else 'characters'}")
        if (self.source_column is None) != (self.target_column is None):
            raise ValueError("data.source_column and data.target_column: set both (a header row) or neither")
        return self

    @property
    def folder(self) -> str:
        return self.path or "data/raw"

    @field_validator("classes", mode="before")
    @classmethod
    def _class_names(cls, v):  # `[0, 1, 2]` in YAML means the classes named "0", "1", "2"
        return [str(c) for c in v] if isinstance(v, list) else v


class EarlyStoppingConfig(Section):
    enabled: bool = False
    # maximised: accuracy, translation's BLEU/chrF/exact match (greedy decoding of the val pairs each epoch) and
    # speech's exact match; minimised: the loss, speech's CER and WER (which kind measures what: sources.RULES)
    monitor: Literal["val_loss", "val_accuracy", "val_bleu", "val_chrf", "val_exact_match", "val_cer",
                     "val_wer"] = "val_loss"
    patience: int = Field(default=5, ge=1)  # epochs without improvement before stopping
    min_delta: float = Field(default=0.0, ge=0.0)  # smallest change that counts as improvement
    restore_best: bool = True  # put back the weights of the best epoch when stopping


class DiagnosticsConfig(Section):
    enabled: bool = True
    every: int = Field(default=25, ge=1)  # optimizer steps between measurements (cost: see README)
    probe_size: int = Field(default=256, ge=1)  # validation examples in the fixed dead-unit probe batch


class DistributedConfig(Section):  # one run's training over several processes (tasks/distributed.py)
    nproc_per_node: int = Field(default=1, ge=1, le=64)  # processes on this machine (one per GPU); `nnlab run --nproc`
    nnodes: int = Field(default=1, ge=1, le=64)  # machines, each running the same command (docs/distributed.md)
    rdzv_endpoint: str = Field(default="127.0.0.1:29400", pattern=r"^[^\s:/]+:\d{1,5}$")  # HOST:PORT, nnodes > 1
    timeout: float = Field(default=60.0, ge=5.0, le=3600.0)  # s: meeting the other machines; a rank waiting on a dead one


class TrainConfig(Section):
    epochs: int = Field(default=20, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    optimizer: Literal["sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # for `momentum` (and rmsprop's momentum term: 0 there)
    nesterov: bool = False  # Nesterov momentum for `momentum`
    weight_decay: float = Field(default=0.0, ge=0.0)  # the optimizer's own decay (decoupled for adamw)
    l1: float = Field(default=0.0, ge=0.0)  # penalty l1 * sum|w| on weight matrices and kernels
    l2: float = Field(default=0.0, ge=0.0)  # penalty l2 * sum w^2 on weight matrices and kernels
    schedule: Literal["none", "step", "cosine", "warmup"] = "none"  # warmup: per optimizer step (tasks/train.py)
    warmup_steps: int = Field(default=4_000, ge=1)  # warmup: linear rise to lr, then lr * sqrt(warmup_steps / step)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)  # translation's training loss (Szegedy et al. 2016)
    step_size: int = Field(default=10, ge=1)  # epochs between lr drops for `step`
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)  # lr factor per drop for `step`
    init: Literal["default", "he_normal", "he_uniform", "xavier_normal", "xavier_uniform", "orthogonal"] = "default"
    grad_clip: float | None = Field(default=None, gt=0.0)  # max global grad norm
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True  # NHWC memory format for image batches (faster convolutions)
    # batches of sequences of like length (translation, speech): each pool of `length_pool` batches of the shuffled
    # split is sorted by length and cut into batches, whose order is shuffled again, so a batch pads little; 1: off
    length_pool: int = Field(default=50, ge=1, le=100_000)
    distributed: DistributedConfig = DistributedConfig()  # batch_size is then per process

    @field_validator("init", mode="before")
    @classmethod
    def _init_alias(cls, v):
        return INIT_ALIASES.get(v, v) if isinstance(v, str) else v


class RegisterConfig(Section):
    enabled: bool = True
    # registered model name; auto: the kind's own and the dataset's (nnlab-classifier-digits,
    # nnlab-forecaster-sunspots, ...: tasks/kinds/ register_name), so `champion` is only ever challenged by a
    # model of the same kind and data; a name given holds one dataset
    name: str = Field(default="auto", min_length=1)
    # auto: accuracy (higher wins); forecasts: rmse, charlm/wordlm: perplexity, image GANs: classifier Frechet
    # distance (lower wins); ring8 GANs: mode_overlap, translation: BLEU (higher wins)
    metric: Literal["auto", "test_accuracy", "test_rmse", "test_perplexity", "classifier_fid", "mode_overlap",
                    "frechet_distance", "test_bleu", "test_exact_match", "test_chrf"] = "auto"
    min_delta: float = Field(default=0.0, ge=0.0)  # a challenger must beat the champion by more than this


class SweepConfig(Section):
    """A grid of params values (see tasks/sweep.py); also the schema of a sweep file."""

    name: str = Field(default="sweep", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: str | None = None  # run name (key of `models`) trained in every cell; default: the first one
    fixed: dict[str, Any] = Field(default_factory=dict)  # dotted overrides applied to every cell
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # axis -> levels; cells = cross product
    presets: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)  # axis -> level -> overrides
    search: dict[str, Any] | None = None  # instead of a grid: an Optuna search, method/trials/space (tasks/search.py)
    seeds: list[int] = Field(default_factory=list)  # a search's replicate axis: each trial trains once per seed
    stop: dict[str, Any] = Field(default_factory=dict)  # a search's budget per command: trials, time, target
    prune: dict[str, Any] | None = None  # pruning on seed means (tasks/pruning.py): method, min_epochs, eta, monitor
    workers: int | None = Field(default=None, ge=1, le=64)  # parallel cells; default: the number of cores
    gpus: list[int] = Field(default_factory=list)  # local workers' GPUs (CUDA_VISIBLE_DEVICES each); --gpus 0,1
    per_gpu: int | None = Field(default=None, ge=1, le=16)  # cells at once on a GPU; dask: each asks GPU=1/per_gpu
    register: bool = True  # register the best cell (by its mean over seeds) at the end
    retries: int = Field(default=0, ge=0, le=10)  # a failing cell is run again up to this many times (Prefect's)
    fail_fast: bool = False  # after the first failed cell, launch no more (those launched finish); --fail-fast
    engine: Literal["local", "dask"] = "local"  # where cells run: a local process pool, or an existing Dask cluster
    # the Dask scheduler (engine: dask), tcp://host:port; the cluster's workers then set the parallelism
    address: str | None = Field(default=None, validate_default=True)
    overrides: list[str] = Field(default_factory=list)  # the --set overrides folded into the above (recorded)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None, info):
        if v is None:
            if info.data.get("engine") == "dask":
                raise ValueError("required when sweep.engine is dask: the scheduler's tcp://host:port "
                                 "(e.g. tcp://127.0.0.1:8786, as `dask scheduler` prints it)")
            return v
        m = re.fullmatch(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", v)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError("must look like tcp://host:port, e.g. tcp://127.0.0.1:8786")
        return v


class AugmentConfig(Section):
    """On-the-fly augmentation of each training batch (tasks/augment.py); the `augment` stage previews it."""

    # auto: the kind's own choice: on for speech (SpecAugment, as the field trains), off for images and the rest
    enabled: bool | Literal["auto"] = "auto"
    rotation: float = Field(default=10.0, ge=0.0, le=180.0)  # max degrees, either way
    width_shift: float = Field(default=0.1, ge=0.0, lt=1.0)  # max horizontal shift, fraction of the width
    height_shift: float = Field(default=0.1, ge=0.0, lt=1.0)  # max vertical shift, fraction of the height
    zoom: float = Field(default=0.1, ge=0.0, lt=1.0)  # scale drawn from [1 - zoom, 1 + zoom]
    horizontal_flip: bool | Literal["auto"] = "auto"  # auto: on for cifar10/fashion_mnist, off for digits
    color_jitter: float = Field(default=0.2, ge=0.0, le=1.0)  # RGB only: brightness/contrast/saturation in [1-j, 1+j]
    preview: int = Field(default=10, ge=1, le=64)  # images in the preview grid (one per class first)
    offline_copies: int = Field(default=0, ge=0, le=20)  # >0: train on originals + k augmented copies, written once
    # speech (SpecAugment, Park et al. 2019): bands of mel channels and spans of frames masked in each training
    # utterance; image settings above do not apply to it, nor these to images
    freq_masks: int = Field(default=2, ge=0, le=10)
    freq_width: int = Field(default=6, ge=0, le=64)  # at most this many mel channels per band
    time_masks: int = Field(default=2, ge=0, le=20)
    time_width: int = Field(default=10, ge=0, le=200)  # at most this many 10 ms frames per span


class TrackingConfig(Section):
    experiment: str = Field(default="nnlab", min_length=1)
    system_metrics: bool = True  # CPU, memory, disk, network (GPU with pynvml) series per run: tasks/machine.py
    system_metrics_interval: float = Field(default=10.0, ge=0.5, le=3600)  # seconds between two samples


class Config(Section):
    seed: int = Field(default=0, ge=0)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    # run name -> options of a registered architecture; `arch` defaults to the run name; an optional
    # `train` mapping overrides the shared train settings for this run only
    models: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"mlp": {}, "simple_cnn": {}})
    # what `nnlab run`, `make run` and `dvc repro` train (keys of `models`; null: all); --models picks others
    run: list[str] | None = Field(default=None, min_length=1)
    register: RegisterConfig = RegisterConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig | None = None  # what `nnlab sweep` runs without a sweep file

    @model_validator(mode="after")
    def _run_names(self):
        unknown = [n for n in self.run or [] if n not in self.models]
        if unknown:
            raise ValueError(f"run: {', '.join(map(repr, unknown))} not in models; the runs params.yaml defines: "
                             f"{', '.join(self.models)}")
        return self

    def runs(self) -> list[str]:
        """The runs an experiment trains when not told which: `run`, else every entry of `models`."""
        return list(self.run or self.models)

    def model_options(self, name: str) -> tuple[str, dict[str, Any]]:
        """(architecture, options) of run `name`."""
        opts = dict(self.models[name])
        opts.pop("train", None)
        return opts.pop("arch", name), opts

    def train_for(self, name: str) -> TrainConfig:
        """The shared `train` section with run `name`'s own `train` overrides on top."""
        return TrainConfig.model_validate(deep_merge(self.train.model_dump(), self.models[name].get("train") or {}))


# ---------------------------------------------------------------- loading

def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, train, models, ...), got {type(raw).__name__}")
    return raw


def parse_set(item: str) -> tuple[str, Any]:
    """`dotted.key=value` -> (key, value parsed as a YAML scalar or list; kept as text when it is not YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.lr=0.01")
    key, value = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return key.strip(), value


def apply_sets(raw: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides; values are parsed as YAML scalars/lists."""
    out = json.loads(json.dumps(raw))
    for item in sets:
        key, value = parse_set(item)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty part in key {key!r}")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"--set {item!r}: {p!r} is a value, not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        if parts[0] == "train":  # an explicit shared setting beats the one a run's own `train:` block stores
            for opts in (out.get("models") or {}).values():
                _drop((opts or {}).get("train") if isinstance(opts, dict) else None, parts[1:])
    return out


def _drop(node: Any, parts: list[str]) -> None:
    for p in parts[:-1]:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def load_config(path: str | Path = "params.yaml", sets: list[str] | None = None,
                models: list[str] | None = None) -> Config:
    """The validated params; with `models`, only those runs (kept and judged: params.yaml's `run` need not fit
    the data they train on)."""
    cfg = validate(apply_sets(read_yaml(path), sets or []), judge=not models)
    return select_models(cfg, models) if models else cfg


def validate(raw: dict[str, Any], judge: bool = True) -> Config:
    """Schema, every model's options, and (`judge`) whether the runs `run` names fit the data and settings; a quick
    run's caps (NNLAB_QUICK, tasks/quick.py) over all of it."""
    from tasks.quick import QuickError, caps

    try:
        cfg = Config.model_validate(apply_sets(raw, caps(raw)))
    except ValidationError as e:
        raise ConfigError(format_errors(e, Config)) from None
    except QuickError as e:
        raise ConfigError(str(e)) from None
    resolved = {}
    for name, opts in cfg.models.items():
        resolved[name] = _validate_model(name, opts or {}, cfg.train)
    cfg.models = resolved
    if judge:
        _refuse_inapplicable(cfg, cfg.runs())
    return cfg


def _refuse_inapplicable(cfg: Config, names: list[str]) -> None:
    """Settings the kind of a run that will train cannot honour are errors, never silently ignored (e.g. early
    stopping of a GAN), as are data settings its source does not read. Entries of `models` that this command does
    not train are not judged."""
    lines = unread(cfg.data)
    for name in names:
        arch = cfg.model_options(name)[0]
        why = misfit(arch, cfg.data.source)
        if why:
            lines.append(f"models.{name}: {why}")
            continue
        kind = kind_name(arch, cfg.data.source)
        train = cfg.train_for(name)
        refused = [*rules(kind).refuse(cfg, train), *filter(None, [unwatchable(kind, train)])]
        lines += [f"{line} (models.{name} is a {kind} run)" for line in refused]
    if lines:
        raise ConfigError("invalid params: " + "\n  ".join(lines) if len(lines) == 1 else
                          "invalid params:\n  " + "\n  ".join(lines))


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _validate_model(name: str, opts: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    if not isinstance(opts, dict):
        raise ConfigError(f"models.{name}: expected a mapping of options, got {opts!r}")
    opts = dict(opts)
    arch = opts.pop("arch", name)
    train_over = opts.pop("train", None) or {}  # this run's own training settings over the shared ones
    if not isinstance(train_over, dict):
        raise ConfigError(f"invalid params: models.{name}.train: expected a mapping of train settings")
    try:
        TrainConfig.model_validate(deep_merge(train.model_dump(), train_over))
    except ValidationError as e:
        raise ConfigError(format_errors(e, TrainConfig, prefix=f"models.{name}.train")) from None
    try:
        spec = get_spec(arch)
    except UnknownModelError as e:
        key = f"models.{name}.arch" if arch != name else f"models.{name}"
        raise ConfigError(f"invalid params: {key}: {e}") from None
    try:
        validated = spec.options(**opts)
    except ValidationError as e:
        raise ConfigError(format_errors(e, spec.options, prefix=f"models.{name}")) from None
    return {"arch": arch, **validated.model_dump(), **({"train": train_over} if train_over else {})}


def select_models(cfg: Config, names: list[str]) -> Config:
    """Keep only runs `names`; a registered architecture absent from params gets its defaults."""
    chosen = {}
    for n in names:
        chosen[n] = cfg.models[n] if n in cfg.models else _validate_model(n, {}, cfg.train)
    out = cfg.model_copy(update={"models": chosen, "run": None})
    _refuse_inapplicable(out, names)
    return out


# ---------------------------------------------------------------- identity

def params_hash(obj: Any) -> str:
    blob = json.dumps(obj.model_dump() if isinstance(obj, BaseModel) else obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 0.1}} -> {'train.lr': '0.1'} (MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out

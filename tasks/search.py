"""Search instead of a grid: an Optuna study proposes trials; each trial is one sampled config trained once per
seed (one cell per seed, built and run as a grid's cells are) and is told the mean of its seeds' metric.

In a sweep file, instead of `grid`:

    search:
      method: tpe                       # tpe | random | grid | cmaes (Optuna's samplers)
      trials: 20                        # the study's total, over every --resume
      seed: 0                           # the sampler's seed
      space:                            # dotted params key -> distribution
        train.lr: loguniform(1e-4, 1e-1)
        models.mlp.dropout: uniform(0, 0.5)
        train.batch_size: int(16, 128)
        train.optimizer: choice(adam, sgd)
    seeds: [0, 1, 2]                    # the replicate axis: every trial trains once per seed
    stop: {trials: 10, time: 30m, target: 0.98}   # this command's budget: stop launching when one is reached

Everything here is checked before anything runs (ConfigError naming the key: exit 2). The study lives beside
the MLflow store (`optuna.db` next to a SQLite `mlflow.db`), named after the sweep's parent run.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from tasks.config import Config, ConfigError, SweepConfig, apply_sets, select_models, validate
from tasks.studies import prepare_study_storage, study_name, study_storage
from tasks.sweep import Cell, _dotted, _yaml_value, checked_mapping, one_of

METHODS = ("tpe", "random", "grid", "cmaes")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")
SEARCH_KEYS = ("method", "trials", "space", "seed")
STOP_KEYS = ("trials", "time", "target")
_CALL = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$", re.S)


@dataclass
class Search:
    method: str
    trials: int  # the study's total, whatever the number of commands it takes
    space: dict[str, Any]  # dotted params key -> an optuna distribution
    seed: int  # the sampler's
    seeds: list[int]  # the replicate axis
    stop: dict[str, float]  # this command's budget: trials, time (seconds), target


# ---------------------------------------------------------------- the sweep file's search, checked

def parse(spec: SweepConfig, default_seed: int = 0) -> Search:
    """The sweep's search, every key checked; `default_seed` (params.yaml's) when `seeds` is not given."""
    raw = spec.search
    if raw is None:
        raise ConfigError("sweep.seeds and sweep.stop belong to a search (sweep.search); a grid's replicate axis "
                          "is grid.seed")
    if spec.grid or spec.presets:
        raise ConfigError("sweep: give either `grid` or `search`, not both (a search's replicate axis is `seeds`)")
    checked_mapping(raw, "sweep.search", SEARCH_KEYS, "{method: tpe, trials: 20, space: {train.lr: "
                    "loguniform(1e-4, 1e-1)}}")
    method = one_of(raw.get("method", "tpe"), "sweep.search.method", METHODS)
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError("sweep.search.space: give at least one parameter, e.g. train.lr: loguniform(1e-4, 1e-1)")
    dists = {str(k): distribution(str(k), v) for k, v in space.items()}
    if method == "grid":
        for key, d in dists.items():
            if not hasattr(d, "choices"):
                raise ConfigError(f"sweep.search.space.{key}: method grid takes choice(...) only, e.g. "
                                  "choice(0.001, 0.01)")
    seeds = list(spec.seeds) or [default_seed]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep.seeds: {seeds} repeats a seed")
    return Search(method, _count(raw.get("trials"), "sweep.search.trials"), dists,
                  _integer(raw.get("seed", 0), "sweep.search.seed"), seeds, parse_stop(spec.stop))


def _count(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key}: expected a whole number of trials >= 1, got {v!r}")
    return v


def _integer(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}: expected a whole number, got {v!r}")
    return v


def distribution(key: str, text: Any):
    """`loguniform(1e-4, 1e-1)`, `uniform(0, 0.5)`, `int(16, 128)`, `logint(8, 512)`, `choice(adam, sgd)` (or a
    YAML list, the same as choice) -> an optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"sweep.search.space.{key}"
    if key == "seed":
        raise ConfigError(f"{where}: the seed is the replicate axis: list it in sweep.seeds")
    if isinstance(text, list):
        text = f"choice({', '.join(_yaml_value(v) for v in text)})"
    m = _CALL.match(text) if isinstance(text, str) else None
    if not m:
        hint = " (inside a {...} mapping YAML splits at the comma: quote it)" if str(text).count("(") == 1 else ""
        raise ConfigError(f"{where}: {text!r} is not a distribution{hint}; write uniform(low, high), "
                          "loguniform(low, high), int(low, high), logint(low, high) or choice(a, b, ...)")
    name, body = m[1], m[2].strip()
    args = [a.strip() for a in body.split(",")] if body else []
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {name}(...); known: {', '.join(DISTRIBUTIONS)}")
    if name == "choice":
        values = [_scalar(a, where) for a in args]
        if not values:
            raise ConfigError(f"{where}: choice() is empty; give at least one option")
        if len({json.dumps(v) for v in values}) < len(values):
            raise ConfigError(f"{where}: choice({body}) repeats an option")
        return CategoricalDistribution(values)
    if len(args) != 2:
        raise ConfigError(f"{where}: {name}(low, high) takes two numbers, got {name}({body})")
    whole = name in ("int", "logint")
    lo, hi = (_number(a, where, whole) for a in args)
    if not lo < hi:
        raise ConfigError(f"{where}: empty range {name}({body}): low must be below high")
    if name.startswith("log") and lo <= 0:
        raise ConfigError(f"{where}: {name}({body}) needs low > 0")
    if whole:
        return IntDistribution(int(lo), int(hi), log=name == "logint")
    return FloatDistribution(float(lo), float(hi), log=name == "loguniform")


def _scalar(text: str, where: str) -> Any:
    """One option as YAML reads it (`adam`, `64`, `true`), and `1e-4` as a number (YAML 1.1 wants `1.0e-4`)."""
    try:
        v = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        v = text
    if isinstance(v, str):
        try:
            return float(v) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v) else v
        except ValueError:
            return v
    if v is not None and not isinstance(v, (bool, int, float)):
        raise ConfigError(f"{where}: option {text!r} is not a single value (number, word, true/false)")
    return v


def _number(text: str, where: str, whole: bool) -> float:
    v = _scalar(text, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where}: {text!r} is not a number")
    if whole and v != int(v):
        raise ConfigError(f"{where}: {text!r} is not a whole number")
    return v


def parse_stop(raw: dict) -> dict[str, float]:
    """`stop: {trials: 10, time: 30m, target: 0.98}`: time in s, m or h (a bare number: seconds)."""
    out: dict[str, float] = {}
    for key, v in checked_mapping(raw or {}, "sweep.stop", STOP_KEYS, "{trials: 10, time: 30m}").items():
        if key == "trials":
            out[key] = _count(v, "sweep.stop.trials")
        elif key == "time":
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(v)) if not isinstance(v, bool) else None
            if not m or float(m[1]) <= 0:
                raise ConfigError(f"sweep.stop.time: {v!r} is not a duration; e.g. 90s, 30m, 2h")
            out[key] = float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"sweep.stop.target: expected a number (the metric's value), got {v!r}")
            out[key] = float(v)
    return out


# ---------------------------------------------------------------- cells: one per seed, as a grid's

def base_params(spec: SweepConfig, params: dict, sets: list[str] | None = None) -> dict:
    params = {k: v for k, v in params.items() if k != "sweep"}
    return apply_sets(params, [f"{k}={_yaml_value(v)}" for k, v in _dotted(spec.fixed).items()] + list(sets or []))


def set_value(v: Any) -> str:
    """A sampled value as a --set value YAML reads back as it was: 1e-05 -> 1.0e-05 (YAML 1.1 floats need a dot)."""
    if isinstance(v, float):
        text = repr(v)
        return re.sub(r"^([-+]?\d+)([eE])", r"\1.0\2", text)
    return _yaml_value(v)


def _config(spec: SweepConfig, base: dict, sets: list[str]) -> Config:
    cfg = validate(apply_sets(base, sets), judge=False)
    return select_models(cfg, [spec.model or next(iter(cfg.models))])


def probe_cells(spec: SweepConfig, params: dict, sets: list[str] | None = None) -> list[Cell]:
    """A search checked before anything runs: its keys, every parameter's path in the params schema, the
    ends of every range (and every choice) validated as a cell would be, the study's store; returns one cell per
    seed of the unsampled config (what the data is prepared from and the store and registration are read off)."""
    from tasks.tracking import tracking_uri

    search = parse(spec, params.get("seed", 0))
    study_storage(tracking_uri())
    base = base_params(spec, params, sets)
    try:
        cells = [Cell(f"seed={s}", {"seed": s}, [f"seed={s}"], _config(spec, base, [f"seed={s}"]))
                 for s in search.seeds]
    except ConfigError as e:
        raise ConfigError(f"sweep: {e}") from None
    for key, dist in search.space.items():
        _check_path(key, cells[0].cfg)
        ends = list(dist.choices) if hasattr(dist, "choices") else [dist.low, dist.high]
        for v in ends:
            try:
                _config(spec, base, [f"{key}={set_value(v)}"])
            except ConfigError as e:
                raise ConfigError(f"sweep.search.space.{key}: {v!r} is not a valid value: {e}") from None
    return cells


def expand(spec: SweepConfig, params: dict, sets: list[str] | None = None) -> list[Cell]:
    """A sweep's cells checked before anything runs: a grid's (tasks/sweep.py), or a search's one per seed."""
    from tasks import sweep
    from tasks.pruning import parse_prune
    from tasks.tracking import tracking_uri

    if spec.search is None and not spec.seeds and not spec.stop:
        cells = sweep.expand(spec, params, sets)
    else:
        cells = probe_cells(spec, params, sets)
    if spec.prune is not None:  # its keys, and the study's store (a grid's pruning keeps one too)
        parse_prune(spec.prune, cells[0].cfg, search=spec.search is not None)
        study_storage(tracking_uri())
    return cells


def _check_path(key: str, cfg: Config) -> None:
    """`key` names a setting of the params schema that the sweep's run reads."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "models" and parts[2] == "train":  # a run's own train block
        parts = parts[2:]
    node: Any = cfg.model_dump()
    for i, p in enumerate(parts):
        if not isinstance(node, dict) or p not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "none (a value)"
            raise ConfigError(f"sweep.search.space.{key}: no such parameter ({'.'.join(parts[:i + 1])} is not in "
                              f"the params schema for this sweep's run; there: {known})")
        node = node[p]
    if isinstance(node, dict):
        raise ConfigError(f"sweep.search.space.{key}: a section, not a value")


def _leaves(keys: list[str]) -> dict[str, str]:
    """Short names in cell ids, as a grid's: the last part of each key, the whole key where two share it."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _shown(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cell_ids(number: int, values: dict[str, Any], seeds: list[int]) -> list[str]:
    """`trial=3,lr=0.003162,dropout=0.2,seed=0`: the runs list names a trial's runs by their values."""
    names = _leaves(list(values))
    label = ",".join(f"{names[k]}={_shown(v)}" for k, v in values.items())
    return [f"trial={number},{label},seed={s}" for s in seeds]


def trial_cells(spec: SweepConfig, params: dict, search: Search, number: int, values: dict[str, Any]) -> list[Cell]:
    """A trial's cells, one per seed: its values over the sweep's fixed values; ConfigError when they do not make
    a valid config together (the trial then fails, the search goes on)."""
    base = base_params(spec, params)
    sets = [f"{k}={set_value(v)}" for k, v in values.items()]
    return [Cell(cid, {"trial": f"#{number}", "seed": s}, [*sets, f"seed={s}"],
                 _config(spec, base, [*sets, f"seed={s}"]))
            for cid, s in zip(cell_ids(number, values, search.seeds), search.seeds)]


# ---------------------------------------------------------------- the study

def sampler(search: Search, offset: int = 0):
    """Optuna's sampler for `search.method`, seeded with search.seed + `offset` (the trials the study already
    has), so a resumed search draws afresh rather than the first command's draws again (a grid: the points not
    yet tried, in the same order)."""
    import optuna

    seed = search.seed + offset
    if search.method == "grid":  # the same seed every time: it orders the grid, and the study's trials point into it
        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, *args) -> None:
                """Its study.stop() works only inside study.optimize; stopping is stop_reason's here."""

        return Grid({k: list(d.choices) for k, d in search.space.items()}, seed=search.seed)
    if search.method == "cmaes":  # choice() parameters are drawn independently (CMA-ES is for numbers)
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if search.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(parent_run_id: str, search: Search, lower_is_better: bool, storage: str, pruner=None):
    """The sweep's study, created on its first command and loaded on every --resume; `pruner` judges its trials'
    rungs (tasks/pruning.py)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepare_study_storage(storage)
    study = optuna.create_study(storage=storage, study_name=study_name(parent_run_id), load_if_exists=True,
                                direction="minimize" if lower_is_better else "maximize", pruner=pruner)
    study.sampler = sampler(search, len(study.trials))
    return study


def requeue_interrupted(study) -> list[int]:
    """Trials a killed sweep left RUNNING: each marked FAIL and asked again once, with the same values and the
    same cells (a seed that finished is not trained again, an interrupted one resumes from its checkpoint); one
    its rungs had cut is told PRUNED, the decision standing."""
    from optuna.trial import TrialState

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "nnlab.pruned_at" in t.user_attrs:  # cut before the kill: the decision stands
            study.tell(t.number, state=TrialState.PRUNED)
            continue
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"nnlab.replaces": t.number,
                                                  "nnlab.cells_of": t.user_attrs.get("nnlab.cells_of", t.number)})
        out.append(t.number)
    return out


def requeue_failed(study) -> list[int]:
    """`--rerun-failed`: every failed trial not yet asked again, asked again once with the same values and cells
    (a seed that finished is not trained again)."""
    from optuna.trial import TrialState

    gone, out = replaced(study), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.number not in gone:
            study.enqueue_trial(t.params, user_attrs={"nnlab.replaces": t.number,
                                                      "nnlab.cells_of": t.user_attrs.get("nnlab.cells_of", t.number)})
            out.append(t.number)
    return out


def replaced(study) -> set[int]:
    trials = study.get_trials(deepcopy=False)
    return {t.user_attrs["nnlab.replaces"] for t in trials if "nnlab.replaces" in t.user_attrs}


def counted(study) -> list:
    """The trials that use up search.trials: every trial asked, less those interrupted and asked again."""
    from optuna.trial import TrialState

    gone = replaced(study)
    return [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING and t.number not in gone]


def best_trial(study, lower: bool):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return (min if lower else max)(done, key=lambda t: t.value) if done else None


def stop_reason(study, search: Search, launched: int, seconds: float, lower: bool) -> str | None:
    """Why no more trials are launched now, or None: the study's total, this command's budget, the target."""
    best, n = best_trial(study, lower), len(counted(study))
    if "target" in search.stop and best is not None and (best.value <= search.stop["target"] if lower
                                                         else best.value >= search.stop["target"]):
        return f"target reached: trial {best.number}'s mean {best.value:.4f} (stop.target {search.stop['target']:g})"
    if n >= search.trials:
        return f"all {search.trials} trials of search.trials asked"
    if search.method == "grid" and n >= math.prod(len(d.choices) for d in search.space.values()):
        return "every point of the grid tried"
    if "trials" in search.stop and launched >= search.stop["trials"]:
        return f"stop.trials={int(search.stop['trials'])} reached in this command (nnlab sweep --resume goes on)"
    if "time" in search.stop and seconds >= search.stop["time"]:
        return f"stop.time={search.stop['time']:g}s reached (nnlab sweep --resume goes on)"
    return None


def seed_values(parent_run_id: str, cells: list[Cell], metric: str) -> tuple[list[float], str | None]:
    """A trial's metric per seed from its newest child runs, and why any seed has none (its trial then fails)."""
    from tasks.tracking import child_runs

    newest: dict[str, dict] = {}
    for run in child_runs(parent_run_id):  # newest first
        newest.setdefault(run["cell"], run)
    values, errors = [], []
    for c in cells:
        run = newest.get(c.id)
        if run and run["status"] == "FINISHED" and metric in run["metrics"]:
            values.append(run["metrics"][metric])
        else:
            why = (run["tags"].get("nnlab.error") or run["status"]) if run else "no run"
            errors.append(f"seed {c.cfg.seed}: {why}")
    return values, "; ".join(errors) or None

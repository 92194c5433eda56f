"""A sweep: a grid of params values on top of params.yaml, expanded into cells, each validated up front.

A sweep file (or the `sweep` section of params.yaml) looks like:

    name: optimizers
    model: mlp                      # the run (key of `models`) each cell trains
    fixed: {train.epochs: 10}       # dotted overrides applied to every cell
    grid:                           # one axis per key; the cells are the cross product
      train.optimizer: [sgd, adam]
      seed: [0, 1, 2]
    presets:                        # axes whose levels are named bundles of overrides
      regularizer:
        none: {}
        dropout: {models.mlp.dropout: 0.5}

`seed` is the replicate axis: the report averages over it.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasks.config import (Config, ConfigError, SweepConfig, apply_sets, parse_set, read_yaml,
                          select_models, validate)
from tasks.explain import format_errors
from tasks.kinds import ranking, register_name
from tasks.quick import sweep_capped

SweepSpec = SweepConfig


def checked_mapping(raw: Any, where: str, allowed: tuple[str, ...], example: str) -> dict:
    """`raw` as a mapping whose keys are all `allowed`; else a ConfigError naming `where` (a sweep file's section)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, e.g. {example}")
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key; allowed: {', '.join(allowed)}")
    return raw


def one_of(value: Any, where: str, known: tuple[str, ...], what: str = "method") -> Any:
    if value not in known:
        raise ConfigError(f"{where}: unknown {what} {value!r}; known: {', '.join(known)}")
    return value


@dataclass
class Cell:
    id: str  # stable: the same levels give the same id, run after run
    levels: dict[str, Any]  # axis -> level, in grid order
    sets: list[str]  # dotted.key=value overrides that make this cell
    cfg: Config

    @property
    def factors(self) -> dict[str, Any]:
        return {k: v for k, v in self.levels.items() if k != "seed"}


def load_spec(path: str | Path | None, params: dict) -> SweepSpec:
    raw = read_yaml(path) if path else params.get("sweep")
    if not raw:
        raise ConfigError("no sweep given: pass a sweep file (e.g. sweeps/optimizers.yaml) or add a `sweep` "
                          "section to params.yaml")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, SweepSpec, prefix="sweep")) from None


def fold_sets(spec: dict, sets: list[str] | None) -> dict:
    """`--set` overrides folded into the sweep itself, so that what runs is what the parent run records:
    `sweep.grid.<axis>=[...]` replaces (or adds) an axis, `sweep.fixed.<key>=v` a fixed value, `sweep.<field>=v`
    any other field (workers, model, register, ...); every other `key=value` becomes a fixed value of every cell,
    replacing the file's. A key that the grid or a preset sets in every cell cannot also be fixed: that is an
    error that says how to change it. The overrides are kept in `overrides` (the report lists them)."""
    out = json.loads(json.dumps(spec))
    settable = sorted(set(SweepConfig.model_fields) - {"grid", "fixed", "presets", "overrides"})
    for item in sets or []:
        key, parsed = parse_set(item)
        if key.startswith("sweep."):
            field, _, rest = key[len("sweep."):].partition(".")
            if field in ("grid", "fixed", "stop", "prune") and rest:
                if field == "grid" and not isinstance(parsed, list):
                    raise ConfigError(f"--set {item!r}: the levels of an axis are a list, e.g. "
                                      f"sweep.grid.{rest}=[{item.split('=', 1)[1].strip()}]")
                out.setdefault(field, {})[rest] = parsed
            elif field in settable and not rest:
                out[field] = parsed
            else:
                raise ConfigError(f"--set {item!r}: a sweep is changed with sweep.grid.<axis>=[levels], "
                                  f"sweep.fixed.<key>=value or sweep.<field>=value ({', '.join(settable)}); "
                                  "presets only in the sweep file")
            continue
        if key in out.get("grid", {}):
            raise ConfigError(f"--set {item!r}: {key} is an axis of sweep {out.get('name')}'s grid, set per cell; "
                              f"change its levels with --set 'sweep.grid.{key}=[...]'")
        if key in ((out.get("search") or {}).get("space") or {}):
            raise ConfigError(f"--set {item!r}: {key} is searched (sweep.search.space), sampled per trial; change "
                              "its range in the sweep file")
        for axis, levels in (out.get("presets") or {}).items():
            if axis in out.get("grid", {}) and any(key in (bundle or {}) for bundle in levels.values()):
                raise ConfigError(f"--set {item!r}: the presets of axis {axis} set {key} per cell; change it in "
                                  f"sweep.presets.{axis} of the sweep file, or drop the axis with "
                                  f"--set 'sweep.grid.{axis}=[...]'")
        out.setdefault("fixed", {})[key] = parsed
    if sets:
        out["overrides"] = [*out.get("overrides", []), *(s for s in sets if s not in out.get("overrides", []))]
    return sweep_capped(out)  # NNLAB_QUICK: its first seed, a search's first trials (tasks/quick.py)


def _yaml_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def expand(spec: SweepSpec, params: dict, sets: list[str] | None = None) -> list[Cell]:
    """All cells of the grid, each a validated Config; any invalid cell is an error before anything runs."""
    if spec.search is not None or spec.seeds or spec.stop:
        raise ConfigError("sweep: a search (sweep.search, seeds, stop) is expanded by tasks.search.expand")
    params = dict(params)
    params.pop("sweep", None)
    if not spec.grid:
        raise ConfigError("sweep.grid is empty: give at least one axis, e.g. train.optimizer: [sgd, adam]")
    for axis, levels in spec.grid.items():
        if not levels:
            raise ConfigError(f"sweep.grid.{axis}: no levels given")
        if axis in spec.presets:
            unknown = [lv for lv in levels if str(lv) not in spec.presets[axis]]
            if unknown:
                raise ConfigError(f"sweep.grid.{axis}: unknown preset(s) {unknown}; "
                                  f"defined in sweep.presets.{axis}: {', '.join(spec.presets[axis])}")
    base = apply_sets(params, [f"{k}={_yaml_value(v)}" for k, v in _dotted(spec.fixed).items()] + list(sets or []))
    cells = []
    for combo in itertools.product(*spec.grid.values()):
        levels = dict(zip(spec.grid, combo))
        cell_sets = []
        for axis, level in levels.items():
            bundle = spec.presets[axis][str(level)] if axis in spec.presets else {axis: level}
            cell_sets += [f"{k}={_yaml_value(v)}" for k, v in bundle.items()]
        cell_id = ",".join(f"{k.split('.')[-1] if k not in spec.presets else k}={v}" for k, v in levels.items())
        try:
            cfg = validate(apply_sets(base, cell_sets), judge=False)
            cfg = select_models(cfg, [spec.model or next(iter(cfg.models))])  # the cell's run is the one judged
        except ConfigError as e:
            raise ConfigError(f"sweep cell {cell_id}: {e}") from None
        cells.append(Cell(cell_id, levels, cell_sets, cfg))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):  # two axes ending in the same word: fall back to full keys
        for c in cells:
            c.id = ",".join(f"{k}={v}" for k, v in c.levels.items())
    return cells


def _dotted(fixed: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{register: {enabled: false}}` -> `{register.enabled: false}`: a mapping in `fixed` sets the keys it names
    and leaves the rest of its section as params.yaml has it (never replaces the whole section)."""
    out = {}
    for k, v in fixed.items():
        if isinstance(v, dict) and v:
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def registration_off(spec: SweepSpec, cells: list[Cell]) -> str | None:
    """Why the sweep registers no model, or None: `sweep.register: false`, or `register.enabled: false` in its
    cells (a sweep file's `fixed`, or `--set register.enabled=false`)."""
    if not spec.register:
        return "registration is off (sweep.register: false)"
    if not all(c.cfg.register.enabled for c in cells):
        return "registration is off (register.enabled: false)"
    return None


def default_workers(spec: SweepSpec, n_cells: int) -> int:
    if spec.search:  # a search's cells: one per seed per trial
        n_cells *= spec.search.get("trials", 1)
    per_machine = len(spec.gpus) * (spec.per_gpu or 1) if spec.gpus and spec.engine == "local" else None
    return max(1, min(per_machine or spec.workers or os.cpu_count() or 1, n_cells))


def placement(spec: SweepSpec):
    """Around a cell's submission: on Dask with per_gpu K, the cell asks for 1/K of a worker's `GPU` resource
    (workers started with `--resources GPU=1`, one per GPU), so at most K cells share a GPU; else nothing."""
    if spec.engine == "dask" and spec.per_gpu:
        import dask

        return dask.annotate(resources={"GPU": 1 / spec.per_gpu})
    from contextlib import nullcontext

    return nullcontext()


def gpu_refusal(spec: SweepSpec, visible: int) -> str | None:
    """Why the sweep's GPU placement cannot be done on this machine (`visible` GPUs), or None."""
    if spec.gpus and spec.engine == "dask":
        return ("--gpus names this machine's GPUs for local workers; on a Dask cluster start each worker with "
                "`--resources GPU=1` (and its own CUDA_VISIBLE_DEVICES), and give --per-gpu K: each cell asks 1/K")
    if spec.per_gpu and not spec.gpus and spec.engine == "local":
        return "--per-gpu K needs --gpus (which GPUs: e.g. --gpus 0,1) on a local sweep"
    if missing := sorted({g for g in spec.gpus if g < 0 or g >= visible}):
        return (f"--gpus {','.join(map(str, spec.gpus))}: no GPU {', '.join(map(str, missing))} on this machine "
                f"({visible} visible to torch: ids 0..{visible - 1})" if visible else
                f"--gpus {','.join(map(str, spec.gpus))}: this machine has no GPU torch can use")
    return None


def size(spec: SweepSpec, cells: list[Cell]) -> str:
    """What a sweep runs, for its first line: `15 cells`, or `tpe search, 20 trials x 3 seed(s)`."""
    if spec.search is None:
        return f"{len(cells)} cells"
    return f"{spec.search.get('method', 'tpe')} search, {spec.search.get('trials')} trials x {len(cells)} seed(s)"


# ---------------------------------------------------------------- after the cells: rows, report, registration

def collect_rows(parent_run_id: str, cells: list[Cell], metric: str) -> list[dict]:
    """One row per cell from MLflow (the newest child run of each cell); missing cells count as failed."""
    from tasks.tracking import child_runs, fired_health, metric_history

    newest: dict[str, dict] = {}
    for run in child_runs(parent_run_id):  # newest first
        newest.setdefault(run["cell"], run)
    rows = []
    for cell in cells:
        run = newest.get(cell.id)
        row = {"cell": cell.id, "levels": cell.factors, "seed": cell.cfg.seed, "status": "MISSING",
               metric: None, "history": {}, "diverged": False, "run_id": None}
        if run is not None:
            error = run["tags"].get("nnlab.error", "")
            row.update(status=run["status"], run_id=run["run_id"], error=error,
                       health=fired_health(run["tags"]),
                       model_uri=run["tags"].get("nnlab.model_uri"), diverged="non-finite" in error,
                       history={k: [v for _, v in sorted(metric_history(run["run_id"], k))]
                                for k in ("val_loss", "val_accuracy")})
            row["epochs"] = len(row["history"]["val_loss"])
            if "nnlab.pruned_at" in run["tags"]:  # cut by the sweep's pruning (tasks/pruning.py)
                row["pruned_at"] = int(run["tags"]["nnlab.pruned_at"])
            if run["status"] == "FINISHED":
                row[metric] = run["metrics"].get(metric)
                row.update(train_seconds=run["metrics"].get("train_seconds"),
                           cell_seconds=run["metrics"].get("cell_seconds"))
        rows.append(row)
    return rows


def todo(parent_run_id: str, cells: list[Cell], metric: str, only_failed: bool = False) -> list[Cell]:
    """Cells with no finished child run yet (missing, failed, or killed midway); `only_failed`: those whose
    newest run FAILED. A child killed between training and evaluation is marked FAILED, so it is never mistaken
    for a result."""
    from tasks.tracking import Run, child_runs

    done, newest = set(), {}
    for r in child_runs(parent_run_id):  # newest first
        newest.setdefault(r["cell"], r["status"])
        if r["status"] == "FINISHED" and metric in r["metrics"]:
            done.add(r["cell"])
        elif r["status"] == "FINISHED":
            Run(r["run_id"]).finish("FAILED", "interrupted between training and evaluation; cell run again")
            newest[r["cell"]] = "FAILED"
    return [c for c in cells if c.id not in done and (not only_failed or newest.get(c.id) == "FAILED")]


def report(parent_run_id: str, spec: SweepSpec, cells: list[Cell], out_dir: str | Path,
           rank: dict | None = None, trials: tuple | None = None) -> tuple[dict, list[dict]]:
    """Write the report for `parent_run_id` under out_dir, ranked by `rank` (the sweep's: tasks.kinds.ranking of
    its cells, worked out once), log it to the parent run; returns (paths, rows). A search's report
    (tasks/search_report.py) gives its rows, factors and extra section as `trials`."""
    from tasks.report import write_report
    from tasks.tracking import Run

    rank = rank or ranking(cells[0].cfg)
    metric = rank["metric"]
    rows, factors, extra = trials or (collect_rows(parent_run_id, cells, metric),
                                      [a for a in spec.grid if a != "seed"] or ["seed"], None)
    for r in rows:
        r["levels"] = {**r["levels"], "seed": r["seed"]}
    notes = [spec.description] if spec.description else []
    if spec.overrides:
        notes.append("Overridden on the command line (what ran): " + ", ".join(f"`{o}`" for o in spec.overrides) + ".")
    if spec.fixed:
        notes.append("Every cell: " + ", ".join(f"`{k}={_yaml_value(v)}`" for k, v in spec.fixed.items()) + ".")
    archs = sorted({c.cfg.model_options(next(iter(c.cfg.models)))[0] for c in cells})
    sources = sorted({c.cfg.data.source for c in cells})
    notes.append(f"MLflow parent run `{parent_run_id}`; {'models' if len(archs) > 1 else 'model'} "
                 f"{', '.join(f'`{a}`' for a in archs)} on {', '.join(f'`{s}`' for s in sources)}.")
    paths = write_report(f"Sweep report: {spec.name}", rows, factors, metric, out_dir, notes,
                         lower=rank["lower_is_better"], extra=extra)
    run = Run(parent_run_id)
    for p in paths.values():
        run.log_file(p, "report")
    return {k: str(v) for k, v in paths.items()}, rows


def best_cell(rows: list[dict], rank: dict) -> dict | None:
    """The sweep's best cell by its mean over seeds, and its best seed's run (healthy first): what the parent run
    shows and what registration promotes. None when no cell finished with the metric and a model."""
    from tasks.report import ci95
    from tasks.registration import champion_blockers

    metric = rank["metric"]
    by_cell: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "FINISHED" and r.get(metric) is not None and r.get("model_uri") and not r.get("pruned_at"):
            by_cell.setdefault(tuple(sorted((k, str(v)) for k, v in r["levels"].items() if k != "seed")), []).append(r)
    if not by_cell:
        return None
    pick = min if rank["lower_is_better"] else max
    key, runs = pick(by_cell.items(), key=lambda kv: ci95([r[metric] for r in kv[1]])[0])
    mean, half = ci95([r[metric] for r in runs])
    best = pick([r for r in runs if not champion_blockers(r)] or runs, key=lambda r: r[metric])
    return {"cell": ",".join(f"{k}={v}" for k, v in key), "mean": mean, "ci95": half, "n_seeds": len(runs),
            "run": best}


def show_best_on_parent(parent_run_id: str, rows: list[dict], rank: dict) -> dict | None:
    """The parent run carries its best cell: `<metric>` (its mean over seeds, the runs list's column),
    `<metric>_ci95`, `best_seed_<metric>`, and tags naming the cell and its best run."""
    from tasks.tracking import Run

    best, metric = best_cell(rows, rank), rank["metric"]
    if best is None:
        return None
    run = Run(parent_run_id)
    run.log_metrics({metric: best["mean"], f"{metric}_ci95": best["ci95"],
                     f"best_seed_{metric}": best["run"][metric], "best_cell_seeds": best["n_seeds"]})
    run.set_tags({"nnlab.best_cell": best["cell"], "nnlab.best_run_id": best["run"]["run_id"]})
    return best


def register_by_mean(rows: list[dict], spec: SweepSpec, cfg: Config, parent_run_id: str, rank: dict) -> dict | None:
    """Promotion over seeds: the best cell by its mean over seeds; its best seed's model is registered and
    becomes `champion` only when that mean beats the champion's score by more than register.min_delta."""
    from tasks.registration import champion_blockers, register_version

    metric = rank["metric"]
    found = best_cell(rows, rank)
    if found is None:
        return None
    mean, half, best = found["mean"], found["ci95"], found["run"]
    tags = {"nnlab.metric": metric, "nnlab.sweep": spec.name, "nnlab.sweep_parent": parent_run_id,
            "nnlab.cell": found["cell"], f"mean_{metric}": mean, f"ci95_{metric}": half,
            "n_seeds": found["n_seeds"], "nnlab.run_id": best["run_id"]}
    out = register_version(register_name(cfg), best["model_uri"], mean, cfg.register.min_delta, tags,
                           higher=not rank["lower_is_better"], blocked=champion_blockers(best))
    return {**out, "cell": tags["nnlab.cell"], "mean": mean, "ci95": half, "run_id": best["run_id"]}

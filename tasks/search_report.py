"""A search sweep's report: the grid's report (tasks/report.py) with one cell per trial, plus the trials best
first (their values, the mean ± 95% CI over seeds), Optuna's optimisation history and parameter importances."""
from __future__ import annotations

import math
import warnings

from tasks.config import SweepConfig
from tasks.search import Search, cell_ids, parse, replaced
from tasks.studies import study_name, study_storage
from tasks.sweep import Cell


def load_study(parent_run_id: str):
    """The study of a search sweep's parent run (its tags name its store; else beside this MLflow store)."""
    import optuna

    from tasks.tracking import Run, tracking_uri

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = Run(parent_run_id).tags().get("nnlab.study_storage") or study_storage(tracking_uri())
    return optuna.load_study(study_name=study_name(parent_run_id), storage=storage)


def report_cells(study, search: Search, probe: list[Cell]) -> list[Cell]:
    """One cell per seed of every trial asked (those interrupted and asked again: their rerun's), its level the
    trial (`#3`), with the config of its seed's unsampled cell (the rows only read the seed off it)."""
    from optuna.trial import TrialState

    by_seed = {c.cfg.seed: c.cfg for c in probe}
    gone, cells = replaced(study), []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING or t.number in gone:
            continue
        values = {k: t.params[k] for k in search.space if k in t.params}
        ids = t.user_attrs.get("nnlab.cells") or cell_ids(t.user_attrs.get("nnlab.cells_of", t.number), values,
                                                          search.seeds)
        for cid in ids:
            seed = int(cid.rsplit("seed=", 1)[1])
            cells.append(Cell(cid, {"trial": f"#{t.number}", "seed": seed}, [], by_seed.get(seed, probe[0].cfg)))
    return cells


def report(parent_run_id: str, spec: SweepConfig, cells: list[Cell], out_dir, rank: dict | None = None):
    """tasks/sweep.py's report for either kind of sweep: a search's rows are its trials (`cells`: one per seed)."""
    from tasks import sweep
    from tasks.kinds import ranking

    if spec.search is None:
        return sweep.report(parent_run_id, spec, cells, out_dir, rank)
    rank = rank or ranking(cells[0].cfg)
    return sweep.report(parent_run_id, spec, cells, out_dir, rank, trial_rows(parent_run_id, spec, cells, rank))


def trial_rows(parent_run_id: str, spec: SweepConfig, probe: list[Cell], rank: dict):
    """(rows, factors, extra) for tasks/report.py's write_report: one cell per trial, and the search's section."""
    from tasks.sweep import collect_rows

    search, study = parse(spec, probe[0].cfg.seed), load_study(parent_run_id)
    rows = collect_rows(parent_run_id, report_cells(study, search, probe), rank["metric"])
    errors = {f"#{t.number}": t.user_attrs.get("nnlab.error") for t in study.get_trials(deepcopy=False)}
    for r in rows:
        if r["status"] != "FINISHED" and not r.get("error"):
            r["error"] = errors.get(r["levels"]["trial"]) or r["status"]
    return rows, ["trial"], (trials_section(study, search, rank), study_figures(study, rank["metric"]))


def trials_section(study, search: Search, rank: dict) -> list[str]:
    """The trials, best first: their values, the mean ± 95% CI over seeds, their state."""
    from optuna.trial import TrialState

    from tasks.report import ci95, fmt

    metric, lower, gone = rank["metric"], rank["lower_is_better"], replaced(study)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING and t.number not in gone]
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value if lower else -t.value)
    rest = [t for t in trials if t.state != TrialState.COMPLETE]
    keys = list(search.space)
    states = {s: sum(t.state == s for t in trials)
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    lines = ["## Trials, best first", "",
             f"Optuna `{search.method}` search over {', '.join(f'`{k}`' for k in keys)}; each trial trained once per "
             f"seed {search.seeds} and ranked by its mean. {len(trials)} trials: {states[TrialState.COMPLETE]} "
             f"complete, {states[TrialState.PRUNED]} pruned, {states[TrialState.FAIL]} failed, {states[TrialState.RUNNING]} unfinished. Study "
             f"`{study.study_name}`.", "",
             "| trial | " + " | ".join(keys) + f" | {metric} | seeds | state |", "|" + "---|" * (len(keys) + 4)]
    for i, t in enumerate(done + rest):
        seeds = t.user_attrs.get("nnlab.seed_values") or []
        mean, half = ci95(seeds) if seeds else (math.nan, math.nan)
        star = " ★" if i == 0 and t.state == TrialState.COMPLETE else ""
        note = f" (rerun of #{t.user_attrs['nnlab.replaces']})" if "nnlab.replaces" in t.user_attrs else ""
        values = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (t.params.get(k, "—") for k in keys)]
        state = t.state.name.lower() + (f" at epoch {t.user_attrs['nnlab.pruned_at']}"
                                        if "nnlab.pruned_at" in t.user_attrs else "")
        lines.append(f"| #{t.number}{note} | " + " | ".join(values) + f" | {fmt(mean, half)}{star} | {len(seeds)} | "
                     f"{state} |")
    return [*lines, ""]


def study_figures(study, metric: str) -> dict[str, bytes]:
    """Optuna's optimisation history, parameter importances (fANOVA; it needs two finished trials or more) and
    parallel coordinates (each finished trial a line through its values to its mean)."""
    from optuna.visualization import matplotlib as plots

    from tasks.report import _png

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" and the like
        for name, plot in (("optimization_history.png", plots.plot_optimization_history),
                           ("param_importances.png", plots.plot_param_importances),
                           ("parallel_coordinates.png", plots.plot_parallel_coordinate)):
            try:
                out[name] = _png(plot(study, target_name=f"{metric} (mean over seeds)").figure)
            except (ValueError, RuntimeError, ZeroDivisionError):  # too few finished trials for this figure
                pass
    return out

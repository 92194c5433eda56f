"""A search sweep's loop, inside the sweep flow (flows/sweep.py; the pure parts are tasks/search.py): trials asked
of an Optuna study kept beside the MLflow store, each trial's cells (one per seed) run by the grid's own cell
task on the same pool or Dask cluster, up to `workers` trials in flight, each trial told the mean of its seeds'
metric; a failing cell fails its trial only. Then the report, the best trial on the parent and registration,
as a grid's.

`nnlab sweep --resume <parent>` reloads the study: numbering goes on, finished trials stay, a trial the killed
sweep left RUNNING is asked again once with the same values and cells (tasks/search.py requeue_interrupted).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flows.experiment import prepare_data
from flows.waiting import Completion, Pauses
from tasks.config import ConfigError, SweepConfig
from tasks.kinds import ranking
from tasks.phases import mark
from tasks.pruning import RungWatch, parse_prune, pruner, pruning_note
from tasks.search import (Search, open_study, parse, requeue_failed, requeue_interrupted, seed_values, stop_reason,
                          trial_cells)
from tasks.studies import shown_storage, study_storage
from tasks.sweep import default_workers, placement, register_by_mean, registration_off, show_best_on_parent

SWEEPS = Path(".nnlab/sweeps")  # flows/sweep.py's: each cell's folder (its pruning flag)
JUDGE_EVERY = 0.5  # seconds between two looks at the trials training, when the search prunes


@dataclass
class Flight:
    trial: Any  # an optuna Trial, RUNNING
    cells: list
    tags: dict = field(default_factory=dict)  # its cells' run tags
    futures: list = field(default_factory=list)  # one per cell (and per run again after a rung pause)
    pending: set = field(default_factory=set)  # its cells' futures not done yet
    paused: int = 0  # its cells paused at a rung, waiting for the trial's judgement there (ASHA)


def search_and_report(parent, spec_: SweepConfig, params: dict, probe: list, cell_task, where: dict,
                      report_dir: Path, only_failed: bool = False) -> dict:
    """The search into `parent` (new or reopened), its cells run by `cell_task` (flows/sweep.py's run_cell, told
    `where` the client runs), then its report into `report_dir`; the sweep flow's summary."""
    from tasks.tracking import tracking_uri

    rank = ranking(probe[0].cfg)
    search = parse(spec_, probe[0].cfg.seed)  # no sweep.seeds: params.yaml's seed
    storage = study_storage(tracking_uri())
    prune = parse_prune(spec_.prune, probe[0].cfg, search=True)
    study = open_study(parent.run_id, search, rank["lower_is_better"], storage, prune and pruner(prune))
    parent.set_tags({"nnlab.ranking_metric": rank["metric"], "nnlab.search": search.method,
                     "nnlab.lower_is_better": str(rank["lower_is_better"]).lower(),
                     "nnlab.study": study.study_name, "nnlab.study_storage": shown_storage(storage)})
    requeued = requeue_interrupted(study)
    if requeued:
        print(f"trial(s) {requeued} were interrupted: asked again once, with the same values", flush=True)
    if only_failed:  # --rerun-failed: those trials again, and no new one
        again = requeue_failed(study)
        print(f"failed trial(s) {again}: asked again once, with the same values", flush=True)
        search = replace(search, stop={**search.stop, "trials": len(again) + len(requeued)})
    watch = prune and RungWatch(prune, parent.run_id, SWEEPS, not rank["lower_is_better"], study=study)
    if watch:
        watch.keep_cut(study.get_trials(deepcopy=False))
    launcher = Launcher(cell_task, where, watch, placement=lambda: placement(spec_))
    ran, stopped = drive(study, search, spec_, params, parent.run_id, rank, launcher)
    mark("cells done")
    _close_lost_runs(parent.run_id)
    return finish(parent, spec_, study, probe, rank, ran, stopped, report_dir)


@dataclass
class Launcher:
    cell_task: Any  # flows/sweep.py's run_cell
    where: dict  # the client's checkout and store (flows/sweep.py's origin)
    watch: RungWatch | None = None  # the pruning judge, when the sweep prunes
    data: dict = field(default_factory=dict)  # prepared data per data config and seed
    waiting: Completion = field(default_factory=Completion)
    owner: dict = field(default_factory=dict)  # future -> (trial number, cell)
    placement: Any = nullcontext  # () -> the context a cell is submitted in (tasks/sweep.py placement)

    def submit(self, flight: Flight, cell, parent_id: str) -> None:
        key = cell.cfg.data.model_dump_json() + str(cell.cfg.seed)  # one prepare per data config and seed (split)
        if key not in self.data:
            self.data[key] = prepare_data(cell.cfg)
        data_dir, facts = self.data[key]
        with self.placement():
            f = self.cell_task.submit(cell.cfg, cell.id, data_dir, parent_id, {**facts, **flight.tags}, self.where)
        flight.futures.append(f)
        flight.pending.add(f)
        self.waiting.add(f)
        self.owner[f] = (flight.trial.number, cell)


def drive(study, search: Search, spec_: SweepConfig, params: dict, parent_id: str, rank: dict,
          launcher: Launcher) -> tuple[int, str]:
    """Ask, run and tell until the budget says stop: (cells launched, why it stopped). With `prune`, the trials in
    flight are judged at their rungs on their seeds' mean (tasks/pruning.py) while their cells train; under ASHA a
    cell paused at a rung is run again once its trial is promoted or cut."""
    limit = default_workers(spec_, 10**6)  # trials in flight: sweep.workers, else the cores
    flights: dict[int, Flight] = {}
    watch, waiting = launcher.watch, launcher.waiting
    pauses = Pauses(watch) if watch and watch.pausing else None
    started, launched, cells, stopped = time.monotonic(), 0, 0, None
    while True:
        while stopped is None and len(flights) < limit:
            stopped = stop_reason(study, search, launched, time.monotonic() - started, rank["lower_is_better"])
            if stopped is None:
                flight = launch(study, search, spec_, params, parent_id, launcher)
                launched += 1
                if flight is not None:
                    flights[flight.trial.number] = flight
                    cells += len(flight.cells)
        if not flights:
            return cells, stopped or "nothing left to ask"
        done = waiting.next(*((JUDGE_EVERY, watch.poll) if watch else ())) if waiting.pending else None
        if done is not None:
            number, cell = launcher.owner.pop(done)
            flights[number].pending.discard(done)
            flights[number].paused += bool(pauses and pauses.note(done, (number, cell)))
        for number, cell in pauses.due(stuck=not waiting.pending) if pauses else []:
            flights[number].paused -= 1
            launcher.submit(flights[number], cell, parent_id)
        for number, fl in list(flights.items()):
            if not fl.pending and not fl.paused:  # all its seeds are over: told (its last rungs judged first)
                if watch:
                    watch.poll()
                if not settle(study, fl, parent_id, rank["metric"], watch) and spec_.fail_fast:
                    stopped = stopped or f"fail-fast: trial {number} failed"
                del flights[number]


def launch(study, search: Search, spec_: SweepConfig, params: dict, parent_id: str,
           launcher: Launcher) -> Flight | None:
    """Ask the study for a trial and submit its cells (one per seed); a trial whose values make no valid config
    fails at once (None)."""
    from optuna.trial import TrialState

    trial = study.ask(search.space)
    values = {k: trial.params[k] for k in search.space}
    owner = trial.user_attrs.get("nnlab.cells_of", trial.number)  # a rerun trains the interrupted trial's cells
    try:
        cells = trial_cells(spec_, params, search, owner, values)
    except ConfigError as e:
        trial.set_user_attr("nnlab.error", str(e)[:1000])
        study.tell(trial, state=TrialState.FAIL)
        return None
    trial.set_user_attr("nnlab.cells", [c.id for c in cells])
    tags = {"nnlab.trial": str(owner), "nnlab.study_trial": str(trial.number), "nnlab.study": study.study_name}
    flight = Flight(trial, cells, tags)
    if launcher.watch is not None:
        launcher.watch.add(trial, [c.id for c in cells])
        if launcher.watch.pausing:
            launcher.watch.clear([c.id for c in cells])  # to the first rung (a rerun's cells keep their word)
    for c in cells:
        launcher.submit(flight, c, parent_id)
    return flight


def settle(study, flight: Flight, parent_id: str, metric: str, watch: RungWatch | None = None) -> bool:
    """Tell the study the trial's mean over its seeds, PRUNED when its rungs cut it, or FAIL when any seed has no
    result (then False)."""
    from optuna.trial import TrialState

    values, error = seed_values(parent_id, flight.cells, metric)
    flight.trial.set_user_attr("nnlab.seed_values", values)
    crashed = [f.state.message or "" for f in flight.futures if f.wait() is None and f.state.is_failed()]
    if error and crashed:  # e.g. a cell that raised before its run was created
        error += " (" + "; ".join(m[:300] for m in crashed) + ")"
    if watch is not None:
        watch.told(flight.trial.number)
    if watch is not None and watch.pruned(flight.trial.number) is not None:
        study.tell(flight.trial, state=TrialState.PRUNED)
    elif error:
        flight.trial.set_user_attr("nnlab.error", error[:1000])
        study.tell(flight.trial, state=TrialState.FAIL)
        return False
    else:
        study.tell(flight.trial, sum(values) / len(values))
    return True


def _close_lost_runs(parent_id: str) -> None:
    """Every cell is over: a child run still RUNNING lost its process mid-cell (as the grid's flow does)."""
    from tasks.tracking import Run, child_runs

    for r in child_runs(parent_id):
        if r["status"] == "RUNNING":
            Run(r["run_id"]).finish("FAILED", f"its worker ({r['tags'].get('nnlab.worker', '?')}) died mid-cell; "
                                              "`nnlab sweep --resume` asks its trial again")


def finish(parent, spec_: SweepConfig, study, probe: list, rank: dict, ran: int, stopped: str,
           report_dir: Path) -> dict:
    """The report, the best trial on the parent, registration by the mean over seeds; the flow's summary."""
    from optuna.trial import TrialState

    from tasks.search import counted
    from tasks.search_report import report

    paths, rows = report(parent.run_id, spec_, probe, report_dir, rank)
    mark("report written")
    show_best_on_parent(parent.run_id, rows, rank)
    off = registration_off(spec_, probe)
    registered = register_by_mean(rows, spec_, probe[0].cfg, parent.run_id, rank) if not off else None
    trials = counted(study)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    failed_trials = sum(t.state == TrialState.FAIL for t in trials)
    parent.set_tags({"nnlab.search_stopped": stopped, "nnlab.search_trials": str(len(trials)),
                     "nnlab.sweep_failed_cells": str(sum(r["status"] != "FINISHED" for r in rows))})
    failed = [] if complete else [r for r in rows if r["status"] != "FINISHED"]
    parent.finish("FINISHED" if complete else "FAILED", None if complete else "no trial finished")
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    cut = f"{pruned} pruned, " if spec_.prune is not None else ""
    note = (f"; search: {len(trials)} trials, {complete} complete, {cut}{failed_trials} failed (listed in the "
            f"report); stopped: {stopped}") + (pruning_note(parent, rows) if spec_.prune is not None else "")
    return {"parent_run_id": parent.run_id, "cells": len(rows), "ran": ran, "failed": failed, "report": paths,
            "registered": registered, "registration_off": off, "rows": rows, "note": note, "stopped": stopped}

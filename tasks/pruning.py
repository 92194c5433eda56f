"""Pruning judged on seed means: a sweep's group of cells (a grid cell's seeds, or a search trial's) is compared
with the others at each rung on the MEAN over its seeds of an epoch metric, and only once every seed has reached
that rung, so no group is cut (or kept) on one lucky seed. The decisions are Optuna's pruners' (ASHA, Hyperband,
median) on an Optuna study kept beside the MLflow store; a pruned group stops all its seeds.

In a sweep file (a grid's or a search's):

    prune:
      method: asha          # asha | sha (grids) | hyperband | median
      min_epochs: 1         # the first rung (median: no decision before it)
      eta: 3                # the reduction factor: rungs at min_epochs * eta^k, 1/eta of a rung goes on
      monitor: val_loss     # the epoch metric judged (default: train.early_stopping.monitor)

How a cell learns it was pruned: a flag file the sweep writes in the cell's folder, read after every epoch
(`PruneFlag`); the cell then ends as an early-stopped one does (evaluated, FINISHED), tagged nnlab.pruned_at.
Checked before anything runs (ConfigError naming the key: exit 2).

`sha` is synchronous successive halving (Jamieson & Talwalkar 2016; Li et al. 2020 call the asynchronous form
ASHA): every group of a grid waits at each rung until all the groups still racing have reached it, then the best
ceil(n / eta) go on and the others are cut. Asynchronous ASHA judges a group against those that happened to
reach the rung before it, so with a handful of groups it keeps whichever came first; a grid knows all its groups
up front, so it can wait for them. Only a grid: a search's trials keep arriving.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from tasks.config import Config, ConfigError, EarlyStoppingConfig
from tasks.sweep import checked_mapping, one_of

METHODS = ("asha", "sha", "hyperband", "median")
KEYS = ("method", "min_epochs", "eta", "monitor")
MONITORS = get_args(EarlyStoppingConfig.model_fields["monitor"].annotation)
HIGHER_WINS = ("accuracy", "bleu", "chrf", "exact_match")


@dataclass
class Prune:
    method: str
    min_epochs: int
    eta: int
    monitor: str
    max_epochs: int  # the cells' train.epochs

    @property
    def higher_wins(self) -> bool:
        return self.monitor.endswith(HIGHER_WINS)


def parse_prune(raw: Any, cfg: Config, search: bool = False) -> Prune | None:
    """The sweep file's `prune`, every key checked against what `cfg` (a cell's config) trains."""
    if raw is None:
        return None
    checked_mapping(raw, "sweep.prune", KEYS, "{method: asha, min_epochs: 1, eta: 3}")
    method = one_of(raw.get("method", "asha"), "sweep.prune.method", METHODS)
    if search and method == "sha":
        raise ConfigError("sweep.prune.method: sha (synchronous successive halving) waits for every group at "
                          "each rung, so it needs them all known up front: a grid; a search's trials keep "
                          "arriving: use asha, hyperband or median")
    epochs = cfg.train.epochs
    min_epochs, eta = raw.get("min_epochs", 1), raw.get("eta", 3)
    if isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or not 1 <= min_epochs < epochs:
        raise ConfigError(f"sweep.prune.min_epochs: expected a whole number from 1 to {epochs - 1} (below "
                          f"train.epochs={epochs}), got {min_epochs!r}")
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise ConfigError(f"sweep.prune.eta: expected a whole number >= 2 (the reduction factor), got {eta!r}")
    monitor = raw.get("monitor", cfg.train.early_stopping.monitor)
    one_of(monitor, "sweep.prune.monitor", MONITORS, "metric")
    return Prune(method, min_epochs, eta, monitor, epochs)


def pruner(p: Prune):
    import optuna

    if p.method == "sha":  # decided by RungWatch.halve across all the grid's groups, not trial by trial
        return optuna.pruners.NopPruner()
    if p.method == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_epochs, reduction_factor=p.eta,
                                                      min_early_stopping_rate=0)
    if p.method == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_epochs, max_resource=p.max_epochs,
                                              reduction_factor=p.eta)
    return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=p.min_epochs - 1)


# ---------------------------------------------------------------- the cell's side

class Paused(Exception):
    """A cell stopped at a rung its group has not been judged at yet (ASHA): its checkpoint is kept and its run
    stays open; the sweep runs the cell again once the group is promoted (or cut), and it resumes there."""

    def __init__(self, epoch: int):
        super().__init__(f"paused at epoch {epoch}, its group not yet judged there")
        self.epoch = epoch


@dataclass
class PruneFlag:
    """A cell's word from the sweep, a file in the cell's folder: `pruned E` (its group was cut at epoch E) or
    `until E` (its group is cleared to train up to epoch E). The cell's trainer asks it after every epoch
    (`__call__`): True stops the training as early stopping does; at a cleared epoch it raises Paused."""
    path: Path

    def read(self) -> tuple[str, int] | None:
        try:
            word, epoch = self.path.read_text().split()
            return word, int(epoch)
        except (OSError, ValueError):
            return None

    def __call__(self, epoch: int) -> bool:
        said = self.read()
        if said is None:
            return False
        if said[0] == "until" and epoch >= said[1]:
            raise Paused(epoch)
        return said[0] == "pruned"

    def set(self, epoch: int, word: str = "pruned") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{word} {epoch}\n")
        tmp.replace(self.path)  # whole or not at all: the cell may read it at any moment


def flag_of(sweeps: Path, parent_run_id: str, cell_id: str) -> PruneFlag:
    return PruneFlag(sweeps / parent_run_id / cell_id.replace("/", "_") / "pruned")


# ---------------------------------------------------------------- the sweep's side

@dataclass
class Group:
    trial: Any  # the optuna Trial the group reports to
    cells: list[str]  # cell ids, one per seed
    reported: int = 0  # the last epoch reported
    pruned_at: int | None = None
    told: bool = False  # its trial has its end (no more reports)


@dataclass
class RungWatch:
    """Reads the running groups' epoch metrics from MLflow, reports each epoch every seed has reached (the mean,
    signed to the study's direction) to the group's trial, and flags the cells of a group the pruner cuts."""
    prune: Prune
    parent_run_id: str
    sweeps: Path
    maximize: bool  # the study's direction
    study: Any = None
    groups: dict[int, Group] = field(default_factory=dict)

    @property
    def pausing(self) -> bool:
        """ASHA's cells stop at each rung until their group is judged there (resumed from their checkpoint when
        promoted), so a cut group trains no epoch past its rung; so do synchronous halving's (SHA), until every
        group has reached it; the median and Hyperband pruners judge every epoch, their cells train on meanwhile."""
        return self.prune.method in ("asha", "sha")

    def rungs(self) -> list[int]:
        out, r = [], self.prune.min_epochs
        while r < self.prune.max_epochs:
            out.append(r)
            r *= self.prune.eta
        return out

    def clear(self, cell_ids: list[str], epoch: int | None = None, only_new: bool = False) -> None:
        """Clear cells to train up to `epoch` (the next rung; None: their first rung, unless they have word;
        only_new: unless they have that word already)."""
        for c in cell_ids:
            flag = flag_of(self.sweeps, self.parent_run_id, c)
            said = flag.read()
            if (epoch is None and said is not None) or (only_new and said == ("until", epoch)):
                continue
            flag.set(epoch or self.rungs()[0], "until")

    def ready(self, paused: dict[str, int]) -> list[str]:
        """The paused cells (cell id -> the epoch it paused at) the sweep should run again: their group was
        promoted past that epoch, or cut (the cell then ends at once, evaluated)."""
        out = []
        for c, epoch in paused.items():
            said = flag_of(self.sweeps, self.parent_run_id, c).read()
            if said is None or said[0] == "pruned" or said[1] > epoch:
                out.append(c)
        return out

    def add(self, trial, cell_ids: list[str]) -> None:
        """Watch `trial`'s cells; a trial pruned before a crash stays pruned (its cells' flags set again)."""
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        g = Group(trial, list(cell_ids), reported=max(frozen.intermediate_values, default=0))
        self.groups[trial.number] = g
        if (at := trial.user_attrs.get("nnlab.pruned_at")) is not None:
            self.cut(g, int(at))

    def poll(self) -> list[tuple[int, int]]:
        """Judge what is new; the (trial number, epoch) of the groups pruned now."""
        from tasks.tracking import child_runs, metric_history

        live = [g for g in self.groups.values() if g.pruned_at is None and not g.told]
        if not live:
            return []
        newest: dict[str, str] = {}
        over: set[str] = set()  # cells whose newest run has ended (finished early, failed, killed)
        for run in child_runs(self.parent_run_id):  # newest first
            if newest.setdefault(run["cell"], run["run_id"]) == run["run_id"] and run["status"] != "RUNNING":
                over.add(run["cell"])
        sign = 1.0 if self.prune.higher_wins == self.maximize else -1.0
        synchronous = self.prune.method == "sha"
        cut = []
        for g in live:
            if not all(c in newest for c in g.cells):
                continue
            curves = [dict(metric_history(newest[c], self.prune.monitor)) for c in g.cells]
            reached = min((max(cv) if cv else 0) for cv in curves)
            for epoch in range(g.reported + 1, reached + 1):
                if not all(epoch in cv for cv in curves):
                    continue
                g.trial.report(sign * sum(cv[epoch] for cv in curves) / len(curves), epoch)
                g.reported = epoch
                if synchronous:
                    continue
                if epoch < self.prune.max_epochs and g.trial.should_prune():
                    self.cut(g, epoch, [newest[c] for c in g.cells])
                    cut.append((g.trial.number, epoch))
                    break
                if self.pausing and epoch in self.rungs():  # promoted: on to the next rung, or to the end
                    self.clear(g.cells, next((r for r in self.rungs() if r > epoch), self.prune.max_epochs))
        if synchronous:
            cut += self.halve(live, newest, over)
        return cut

    def halve(self, live: list[Group], newest: dict[str, str], over: set[str]) -> list[tuple[int, int]]:
        """Synchronous successive halving: rung by rung, once every group still racing has reported there (a
        group whose seeds ended short of it, by early stopping or a failure, races no further), the best
        ceil(n / eta) of the n that reached it go on, the others are cut; the kept are cleared to the next
        rung. Decided from the study's stored values alone, so a resumed sweep decides the same way."""
        trials = self.study.get_trials(deepcopy=False)
        cut, decided = [], None
        for rung in self.rungs():
            if any(g.reported < rung and not (set(g.cells) & over) for g in live):
                break  # someone still on the way to this rung
            racing = [t for t in trials if rung in t.intermediate_values
                      and t.user_attrs.get("nnlab.pruned_at", rung) >= rung]
            ranked = sorted(racing, key=lambda t: t.intermediate_values[rung], reverse=self.maximize)
            for t in ranked[math.ceil(len(ranked) / self.prune.eta):]:
                g = self.groups.get(t.number)
                if g is not None and g.pruned_at is None:
                    self.cut(g, rung, [newest[c] for c in g.cells if c in newest])
                    cut.append((t.number, rung))
            decided = rung
        if decided is not None:
            onward = next((r for r in self.rungs() if r > decided), self.prune.max_epochs)
            for g in live:
                if g.pruned_at is None and g.reported >= decided:
                    self.clear(g.cells, onward, only_new=True)
        return cut

    def cut(self, g: Group, epoch: int, run_ids: list[str] = ()) -> None:
        """The group is pruned at `epoch`: its trial and runs say so (the runs list's nnlab.pruned_at), and its
        cells' flags stop their training (a cell that has finished meanwhile keeps its epochs, still pruned)."""
        from tasks.tracking import Run

        g.pruned_at = epoch
        g.trial.set_user_attr("nnlab.pruned_at", epoch)
        for c in g.cells:
            flag_of(self.sweeps, self.parent_run_id, c).set(epoch)
        for run_id in run_ids:
            Run(run_id).set_tags({"nnlab.pruned_at": str(epoch)})

    def keep_cut(self, trials: list) -> None:
        """Trials cut before a crash (frozen, as the study keeps them) stay cut: their cells' flags set again."""
        for t in trials:
            if (at := t.user_attrs.get("nnlab.pruned_at")) is not None:
                for c in t.user_attrs.get("nnlab.cells", []):
                    flag_of(self.sweeps, self.parent_run_id, c).set(int(at))

    def pruned(self, number: int) -> int | None:
        g = self.groups.get(number)
        return g.pruned_at if g else None

    def told(self, number: int) -> None:
        if number in self.groups:
            self.groups[number].told = True


# ---------------------------------------------------------------- a grid's groups

def group_cells(cells: list) -> dict[str, list]:
    """A grid's cells by their levels less the seed (one group per grid cell), in the grid's order."""
    groups: dict[str, list] = {}
    for c in cells:
        groups.setdefault(",".join(f"{k}={v}" for k, v in c.factors.items()) or "all", []).append(c)
    return groups


def open_grid_watch(parent_run_id: str, cells: list, prune: Prune, maximize: bool, storage: str,
                    sweeps: Path) -> RungWatch:
    """A pruned grid's study (one trial per grid cell, named by its levels; created on the first command, loaded
    on --resume) and the watch over its undecided groups."""
    import optuna
    from optuna.trial import Trial, TrialState

    from tasks.studies import prepare_study_storage, study_name

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepare_study_storage(storage)
    study = optuna.create_study(storage=storage, study_name=study_name(parent_run_id), load_if_exists=True,
                                direction="maximize" if maximize else "minimize", pruner=pruner(prune))
    known = {t.user_attrs.get("nnlab.group"): t for t in study.get_trials(deepcopy=False)}
    watch = RungWatch(prune, parent_run_id, sweeps, maximize, study=study)
    for label, members in group_cells(cells).items():
        t = known.get(label)
        if t is not None and t.state != TrialState.RUNNING:
            continue  # decided (complete, pruned or failed) by an earlier command
        if t is None:
            trial = study.ask()
            trial.set_user_attr("nnlab.group", label)
            trial.set_user_attr("nnlab.cells", [c.id for c in members])
        else:
            trial = Trial(study, t._trial_id)
        watch.add(trial, [c.id for c in members])
    return watch


def settle(watch: RungWatch, metric: str) -> None:
    """Every cell is over: each watched trial told PRUNED, or COMPLETE with its seeds' mean `metric` (FAIL when
    a seed has none), so a later --resume finds every group decided."""
    from optuna.trial import TrialState

    from tasks.tracking import child_runs

    newest: dict[str, dict] = {}
    for run in child_runs(watch.parent_run_id):  # newest first
        newest.setdefault(run["cell"], run)
    for g in watch.groups.values():
        if g.pruned_at is not None:
            watch.study.tell(g.trial, state=TrialState.PRUNED)
            continue
        runs = [newest.get(c) for c in g.cells]
        values = [r["metrics"][metric] for r in runs if r and r["status"] == "FINISHED" and metric in r["metrics"]]
        if len(values) == len(g.cells):
            watch.study.tell(g.trial, sum(values) / len(values))
        else:
            watch.study.tell(g.trial, state=TrialState.FAIL)


def pruning_note(parent, rows: list[dict]) -> str:
    """The summary line's part on pruning; the parent run keeps the same figures (nnlab.pruned_cells, metrics)."""
    from tasks.report import pruning_summary

    s = pruning_summary(rows)
    parent.set_tags({"nnlab.pruned_cells": str(s["cut"])})
    parent.log_metrics({"epochs_trained": s["epochs"], "epochs_unpruned": s["full_epochs"]})
    share = f" ({s['epochs'] / s['full_epochs']:.0%})" if s["full_epochs"] else ""
    return f"; pruned {s['cut']} of {s['cells']} cells, epochs trained {s['epochs']} of {s['full_epochs']}{share}"

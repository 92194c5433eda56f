"""Pipeline stages: what `dvc.yaml` runs (through `nnlab stage`) and what the Prefect flows wrap.

Each stage reads its inputs from files, does its work through the pure functions in tasks/ and models/,
and writes its outputs atomically. MLflow is reached only through tasks.tracking.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from models.registry import count_parameters, get_spec
from tasks.config import Config, flatten, params_hash
from tasks.data import AUGMENTED, PROCESSED, load_prepared, prepare, raw_max
from tasks.descriptions import OVERRIDES_TAG, headline, run_title
from tasks.diagnostics import log_health
from tasks.distributed import (DistributedFailed, DistributedInterrupted, check_step, launch, peer_lost, spread,
                               world)
from tasks.files import (StoreWriteError, atomic_path, code_hash, exclusive, load_torch, save_torch, write_failure,
                         write_json)
from tasks.kinds import Job, Kind, get_kind, kind_of, ranking, register_name
from tasks.machine import hardware_tags, samples_in, start_monitor, usage_metrics
from tasks.networks import build, load_trained
from tasks.phases import mark
from tasks.pruning import Paused
from tasks.progress import EpochProgress
from tasks.references import beside, published
from tasks.tracking import Run, git_commit, prepare_model_logging, store_path
from tasks.initialization import init_weights
from tasks.train import CheckpointFormatError, FitResult, Trainer, resolve_device, seed_everything, to_device
from tasks.figures import plot_history, pyplot, write_history

CHECKPOINTS = Path(".nnlab/checkpoints")  # resume state of unfinished runs; never a DVC output (DVC wipes those)


class TrainingFailed(RuntimeError):
    def __init__(self, name: str, run_id: str, reason: str):
        super().__init__(f"{name}: {reason} (MLflow run {run_id})")
        self.name, self.run_id, self.reason = name, run_id, reason

    def __reduce__(self):  # picklable across process pools
        return type(self), (self.name, self.run_id, self.reason)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a run: its MLflow run is marked KILLED and its checkpoint kept, so the same
    command resumes it. Still a KeyboardInterrupt: everything that stops on Ctrl-C stops on it."""

    def __init__(self, name: str, run_id: str, marked: bool = True):
        super().__init__(name, run_id, marked)
        self.name, self.run_id, self.marked = name, run_id, marked


@dataclass
class Trained:
    name: str
    arch: str
    run_id: str
    model_uri: str
    epochs: int
    seconds: float
    resumed: bool
    health: list[str]  # diagnostics rules that fired: vanishing, exploding, dead_units


# ---------------------------------------------------------------- prepare

def prepare_stage(cfg: Config, out_dir: str | Path = PROCESSED) -> dict:
    return prepare(cfg.data, cfg.seed, out_dir)


# ---------------------------------------------------------------- augment

def augment_stage(cfg: Config, data_dir: str | Path = PROCESSED, out_dir: str | Path = AUGMENTED,
                  preview_path: str | Path | None = "plots/augment/preview.png") -> dict:
    """The augmentation preview (a DVC plot) and, with `augment.offline_copies` > 0, the expanded training
    set in `out_dir`. With no offline copies `out_dir` holds only a note, so DVC always has its output."""
    from tasks.augment import expand_offline, preview

    data = load_prepared(data_dir)
    image = len(data.manifest["input_shape"]) == 3
    if preview_path:
        fig = preview(cfg.augment, data, cfg.seed) if image else _no_augmentation_figure(data.manifest["source"])
        with atomic_path(preview_path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        pyplot().close(fig)
    if cfg.augment.offline_copies and not image:
        raise ValueError(f"augment.offline_copies: {data.manifest['source']} holds no images; image augmentation "
                         "applies to image sources only (set augment.offline_copies: 0)")
    if cfg.augment.offline_copies:
        return expand_offline(cfg.augment, data_dir, out_dir, cfg.seed)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for p in Path(out_dir).glob("*.npz"):
        p.unlink()
    (Path(out_dir) / "manifest.json").unlink(missing_ok=True)
    write_json(Path(out_dir) / "augment.json", {"offline_copies": 0, "note": "training augments on the fly"})
    return {"offline_copies": 0}


def _no_augmentation_figure(source: str):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{source}: not images, nothing to augment", ha="center", va="center", fontsize=9)
    return fig


def training_data(cfg: Config, data_dir: str | Path = PROCESSED, augmented_dir: str | Path = AUGMENTED) -> Path:
    """Where a run's training data lives: the offline-augmented set when there is one, else the prepared."""
    return Path(augmented_dir if cfg.augment.offline_copies else data_dir)


# ---------------------------------------------------------------- train

def run_params(cfg: Config, name: str) -> dict:
    """The resolved params of one run: every section, and only this run's model options."""
    d = cfg.model_dump()
    d["models"] = {name: cfg.models[name]}
    d["train"] = cfg.train_for(name).model_dump()  # what this run really used
    return d


def train_stage(cfg: Config, name: str, data_dir: str | Path = PROCESSED, out_dir: str | Path | None = None,
                parent_run_id: str | None = None, extra_tags: dict | None = None, halt=None) -> Trained:
    """Train run `name` the way its kind says; resumes its unfinished checkpoint (same params, same data) into
    the same MLflow run. `halt(epoch)` True after an epoch ends the training there (a sweep's pruning). With
    train.distributed over several processes: torchrun starts them, and each comes back here (tasks/rank.py)."""
    w = world()
    if w is None and spread(cfg.train_for(name)):
        return _launched(cfg, name, data_dir, out_dir, parent_run_id, extra_tags)
    data = load_prepared(data_dir)
    m = data.manifest
    params = run_params(cfg, name)
    phash = params_hash(params)
    ckpt_path = CHECKPOINTS / f"{name}-{params_hash([phash, m['data_hash'], parent_run_id])}.pt"
    # one process per run: a second identical run would resume the first's live checkpoint into its MLflow run
    lock = exclusive(ckpt_path.with_suffix(".lock"), f"run {name!r} (same params and data)") if not (w and w.rank) \
        else nullcontext()
    with lock:
        arch, options, kind, trainer, (train, val, mean, std) = _built(cfg, name, data, halt, w)
        if w is not None and w.rank:  # a helper rank: rank 0's state, the training, no record of its own
            return w.follow(trainer, train, val)
        run, resumed = _open_run(cfg, name, arch, m, params, phash, ckpt_path, trainer, parent_run_id, extra_tags,
                                 data_dir)
        if w is not None:
            w.lead(trainer, run)
        mark("MLflow run opened")
        job = Job(cfg, name, arch, data, Path(data_dir), trainer.model, trainer, run, mean, std)
        prepare_model_logging()
        try:
            result = _fit(job, kind, train, val, ckpt_path)
            return _finish(job, kind, result, options, Path(out_dir or f"data/train/{name}"), ckpt_path, resumed)
        except Exception as e:
            why = write_failure(e, str(store_path() or "the MLflow store"))
            if why is None:
                raise
            state = run.abandon(f"{why} ({type(e).__name__})")  # FAILED if it can be, partial artifacts removed
            raise StoreWriteError(f"{why}; {name}'s MLflow run {run.run_id} {state}, its last epoch's checkpoint "
                                  "kept: free space (or make it writable) and run the same command to resume") from None
        except BaseException as e:  # Ctrl-C, SIGTERM (SystemExit, Prefect's TerminationSignal): resumable
            marked = run.mark_interrupted("interrupted; `nnlab run` with the same params resumes it")
            if isinstance(e, KeyboardInterrupt):
                raise RunInterrupted(name, run.run_id, marked) from None
            raise


def _launched(cfg: Config, name: str, data_dir, out_dir, parent_run_id, extra_tags) -> Trained | None:
    """The run trained by torchrun's processes (tasks/distributed.py): rank 0's Trained, None when rank 0 was on
    another machine; a rank's failure or Ctrl-C as a single process's would be."""
    try:
        done = launch(cfg, name, data_dir, out_dir, parent_run_id, extra_tags)
    except DistributedFailed as e:
        raise TrainingFailed(name, e.run_id or "none opened", e.reason) from None
    except DistributedInterrupted as e:
        raise RunInterrupted(name, e.run_id or "(none yet)", e.run_id is not None) from None
    return Trained(**done) if done else None


def _built(cfg: Config, name: str, data, halt, w):
    """(arch, options, kind, trainer, (train, val, mean, std)): the model built and initialised on its device,
    its trainer, the splits on the device in the kind's scaling."""
    m = data.manifest
    arch, options = cfg.model_options(name)
    kind = kind_of(arch, m["source"])
    tcfg = cfg.train_for(name)
    device = w.device if w else resolve_device(tcfg.device)
    seed_everything(cfg.seed)
    model = build(arch, options, m)
    options = getattr(model, "resolved_options", options)  # e.g. a transfer base pinned to its version
    if kept := init_weights(getattr(model, "fresh", model), tcfg.init):  # `fresh`: transfer's untrained part
        print(f"{name}: train.init {tcfg.init} leaves {kept} layers their own initialisation", flush=True)
    channels_last = len(m["input_shape"]) == 3 and tcfg.channels_last and kind.channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    trainer = Trainer(model, tcfg, cfg.seed, device, kind.step(model, tcfg, cfg.seed, device), kind.augmenter(cfg, m),
                      halt=halt, world=w)
    if w is not None:
        check_step(trainer.step, name)
    mean, std = kind.scaling(m)
    splits = (to_device(data.x_train, data.y_train, mean, std, device, channels_last),
              to_device(data.x_val, data.y_val, mean, std, device, channels_last), mean, std)
    mark("model built")
    return arch, options, kind, trainer, splits


def _fit(job: Job, kind: Kind, train, val, ckpt_path: Path) -> FitResult:
    """The trainer's fit, recorded: an interrupted run stays resumable, a failed one is FAILED with its reason."""
    run, trainer = job.run, job.trainer
    progress = EpochProgress(job.name, trainer.cfg.epochs, trainer.epoch)
    on_epoch = epoch_callback(run, ckpt_path, job.name, progress,
                              lambda epoch, metrics, tr: kind.on_epoch(job, epoch, metrics, tr))
    track = job.cfg.tracking
    monitor = (start_monitor(run.run_id, track.system_metrics_interval, trainer.device) if track.system_metrics
               else None)
    try:
        kind.before_fit(job)
        epoch0 = trainer.epoch
        result = trainer.fit(train, val, on_epoch=on_epoch, progress=progress.step)
        run.log_metrics(usage_metrics(trainer.device, (trainer.epoch - epoch0) * samples_in(train), result.seconds))
        return result
    except Exception as e:
        if write_failure(e) or isinstance(e, Paused) or peer_lost(e):  # not the run's fault (train_stage says so),
            raise  # a sweep's rung pause (tasks/pruning.py), another rank gone: the checkpoint is kept, to resume
        reason = f"{type(e).__name__}: {e}"
        log_health(run, trainer)
        run.finish("FAILED", reason)
        ckpt_path.unlink(missing_ok=True)  # a diverged run would only diverge again from here
        raise TrainingFailed(job.name, run.run_id, reason) from e
    finally:
        progress.close()
        if monitor is not None:
            monitor.finish()


def _finish(job: Job, kind: Kind, result: FitResult, options: dict, out_dir: Path, ckpt_path: Path,
            resumed: bool) -> Trained:
    """After training: the kind's figures, the served model, the self-describing checkpoint, the run closed."""
    run, model, m, cfg = job.run, job.model, job.data.manifest, job.cfg
    kind.after_fit(job, result)
    if job.trainer.augment is not None:  # tasks.augment imports torchvision (~2 s): only runs that augment pay
        from tasks.augment import BatchAugment, preview

        if isinstance(job.trainer.augment, BatchAugment):
            run.log_figure(preview(cfg.augment, job.data, cfg.seed), "plots/augment_preview.png")
    served, example, metadata, extra_files = kind.served(job)
    mark("after-fit figures")
    model_uri = run.log_model(served, example, {"nnlab.arch": job.arch, **metadata}, extra_files)
    mark("model logged")
    run.log_metrics({"epochs_run": result.epochs, "best_epoch": result.best_epoch,
                     "train_seconds": result.seconds, "parameters": count_parameters(model)})
    health = log_health(run, job.trainer)
    run.log_dict(m, "data/manifest.json")
    final = {
        "name": job.name, "arch": job.arch, "family": get_spec(job.arch).family, "options": options,
        "input_shape": m["input_shape"], "num_classes": m["num_classes"], "classes": m["classes"],
        "normalization": {"mean": job.mean, "std": job.std}, "config": cfg.model_dump(),
        "data_hash": m["data_hash"], "task": kind.name, "series": m.get("series"), "source": m["source"],
        "vocab_size": m.get("vocab_size"), "max_value": raw_max(m) if len(m["input_shape"]) == 3 else 0.0,
        "manifest": m, "run_id": run.run_id, "history": result.history, "epochs": result.epochs, "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early, "seconds": result.seconds, "model_uri": model_uri,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    run.set_tags({"nnlab.model_uri": model_uri})
    save_torch(out_dir / "model.pt", final)
    run.log_file(out_dir / "model.pt", "checkpoint")  # self-describing: what transfer learning rebuilds from
    write_json(out_dir / "run.json", {"name": job.name, "arch": job.arch, "run_id": run.run_id, "model_uri": model_uri,
                                      "epochs": result.epochs, "seconds": round(result.seconds, 3)})
    ckpt_path.unlink(missing_ok=True)
    run.finish("FINISHED")
    mark("run finished")
    return Trained(job.name, job.arch, run.run_id, model_uri, result.epochs, result.seconds, resumed, health)


def epoch_callback(run: Run, ckpt_path: Path, name: str, progress: EpochProgress, measure=None):
    """What a real run does after each epoch: the kind's own measurements and figures (`measure`), one batched
    MLflow write (epoch metrics and the diagnostics series), the resume checkpoint, the progress line. Inline:
    on 2 cores a writer thread only competed with the training threads (measured: no gain)."""

    def on_epoch(epoch: int, metrics: dict, tr: Trainer) -> None:
        if measure is not None:
            measure(epoch, metrics, tr)
        run.log_epoch(epoch, metrics)
        if tr.diagnostics is not None:
            run.log_series(tr.diagnostics.drain())
        save_torch(ckpt_path, {"run_id": run.run_id, "name": name, "trainer": tr.state_dict()})
        progress.epoch_end(epoch, metrics)

    return on_epoch


def _open_run(cfg, name, arch, manifest, params, phash, ckpt_path, trainer, parent_run_id, extra_tags, data_dir):
    if ckpt_path.exists():
        state = load_torch(ckpt_path, map_location=trainer.device)
        try:
            run = Run.reopen(state["run_id"])
        except Exception:  # the run was deleted from the store: start over
            ckpt_path.unlink()
        else:
            try:
                trainer.load_state_dict(state["trainer"])
            except CheckpointFormatError as e:  # written by an older nnlab: its run ends, a new one starts
                run.finish("FAILED", f"not resumed: {e}; retrained from scratch")
                print(f"{name}: {ckpt_path} is {e}: MLflow run {run.run_id} marked FAILED, training from scratch",
                      flush=True)
                ckpt_path.unlink()
            else:
                print(f"{name}: resuming MLflow run {run.run_id} after epoch {trainer.epoch}", flush=True)
                run.set_tags(hardware_tags(trainer.device))  # where it goes on (a sweep cell: maybe elsewhere)
                return run, True
    tags = {
        "nnlab.model": arch, "nnlab.family": get_spec(arch).family, "nnlab.dataset": manifest["source"],
        "nnlab.git_commit": git_commit(), "nnlab.code_hash": code_hash(), "nnlab.data_hash": manifest["data_hash"],
        "nnlab.params_hash": phash,
        "nnlab.run": name, **hardware_tags(trainer.device), **(extra_tags or {}),
    }
    overrides = json.loads(tags.get(OVERRIDES_TAG, "[]"))  # the command line's --set (flows/experiment.py)
    title = run_title(name, manifest["source"], overrides, tags.get("nnlab.sweep_cell"))
    # beside models.<name>.*: the architecture's options (defaults filled in) under one prefix, model.*, so runs
    # of different architectures line up in MLflow's compare view
    logged = flatten({**params, "model": model_params(arch, cfg.model_options(name)[1])})
    run = Run.start(cfg.tracking.experiment, title, tags, logged, parent_run_id)
    run.log_dataset(manifest, data_dir)
    return run, False


def model_params(arch: str, options: dict) -> dict:
    """`arch`, `family` and every option of the architecture, its defaults filled in."""
    spec = get_spec(arch)
    try:
        options = spec.options.model_validate(options).model_dump()
    except Exception:  # validated before (load_config); a transfer base resolved since: as given
        pass
    return {"arch": arch, "family": spec.family, **options}


# ---------------------------------------------------------------- evaluate

def evaluate_stage(cfg: Config, name: str, data_dir: str | Path = PROCESSED, train_dir: str | Path | None = None,
                   metrics_path: str | Path | None = None, plots_dir: str | Path | None = None,
                   summary_path: str | Path | None = None) -> dict:
    """The trained run's test measurements, as its kind takes them, into its MLflow run, metrics/<name>.json
    (numbers only: DVC's metrics) and data/evaluate/<name>.json (the whole summary registration reads)."""
    train_dir = Path(train_dir or f"data/train/{name}")
    metrics_path = Path(metrics_path or f"metrics/{name}.json")
    plots_dir = Path(plots_dir or f"plots/{name}")
    summary_path = Path(summary_path or f"data/evaluate/{name}.json")
    device = resolve_device(cfg.train.device)
    model, final = load_trained(train_dir / "model.pt", device)
    data = load_prepared(data_dir)
    kind = get_kind(final.get("task", "classification"))
    ev = kind.evaluate(cfg, name, model, final, data, Path(data_dir), device)
    rank = ranking(cfg)  # recorded with the evaluation: registration and sweeps read it, never work it out again
    ev.tags = {**ev.tags, "nnlab.ranking_metric": rank["metric"],
               "nnlab.lower_is_better": str(rank["lower_is_better"]).lower()}
    verdict = beats_baseline(kind, kind.metric_for(final["source"]), ev.metrics)
    if verdict is not None:
        ev.tags = {**ev.tags, "nnlab.beats_baseline": str(verdict[0]).lower(), "nnlab.baseline": verdict[1]}
        ev.summary = {**ev.summary, "beats_baseline": verdict[0], "baseline": verdict[1]}
        if not verdict[0]:
            print(f"{name}: does NOT beat the trivial baseline ({verdict[1]}): it will not be registered", flush=True)
    ref = published(data.manifest.get("benchmark"), final["arch"], ev.metrics)
    if ref:  # data that is a public benchmark nnlab knows: the published figure beside the run's
        ev.summary, ev.tags = {**ev.summary, "reference": ref}, {**ev.tags, "nnlab.reference": beside(ref, ev.metrics)}
    run = Run(final["run_id"])
    run.log_metrics(ev.metrics)
    if head := headline(kind, final["source"], ev.metrics):  # its description, and the runs list's one column
        run.log_headline(kind.name, **head, registry=None if cfg.register.enabled else "**Registry:** not "
                         "registered: register.enabled is false")
    if ev.tags:
        run.set_tags(ev.tags)
    plots_dir.mkdir(parents=True, exist_ok=True)
    run.log_figure(ev.figure, ev.artifact, also=plots_dir / "test.png")  # and DVC's plot: the same PNG
    for artifact, text in ev.texts.items():
        run.log_text(text, artifact)
    for artifact, fig in ev.figures.items():
        run.log_figure(fig, artifact)
    write_history(plots_dir / "history.csv", final["history"])
    plot_history(plots_dir / "history.png", final["history"], name)
    summary = {**ev.metrics, **ev.summary, "health": run.health(), "name": name, "arch": final["arch"],
               "family": final["family"],
               "run_id": final["run_id"], "model_uri": final["model_uri"], "epochs": final["epochs"],
               "seconds": round(final["seconds"], 3), "ranking": rank}
    write_json(summary_path, summary)
    write_json(metrics_path, numbers_only(summary))
    return summary


def numbers_only(summary: dict) -> dict:
    """What `dvc metrics show` shows: the numbers (names, ids and URIs stay in the summary and in MLflow)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def publish_for_dvc(name: str, flow_dir: Path) -> None:
    """A flow run of params.yaml as it is computes what `dvc repro`'s evaluate stage would: its metrics and plots
    are copied to DVC's declared paths (metrics/<name>.json, plots/<name>/), so `dvc metrics show` and
    `dvc plots show` show the run just made."""
    import shutil

    for src, dst in ((flow_dir / "metrics.json", Path(f"metrics/{name}.json")),
                     *((p, Path(f"plots/{name}") / p.name) for p in sorted((flow_dir / "plots").glob("*")))):
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def beats_baseline(kind: Kind, metric: str, metrics: dict) -> tuple[bool, str] | None:
    """(whether `metric` beats the kind's trivial predictor on the same test split, what was compared), or None
    when the kind has none for it (GAN samples)."""
    base = kind.baselines.get(metric)
    if base is None or base not in metrics or metric not in metrics:
        return None
    value, ref = metrics[metric], metrics[base]
    wins = value < ref if kind.lower_wins(metric) else value > ref
    return wins, f"{metric} {value:.4f} vs {base} {ref:.4f}"


# ---------------------------------------------------------------- register

def register_stage(cfg: Config, results: list[dict], out_path: str | Path | None = "data/register.json") -> dict:
    """Register the best of `results` (evaluate summaries) by the ranking their evaluation recorded; alias
    `champion` only if it beats the current one."""
    from tasks.registration import register_best

    rank = recorded_ranking(results) or ranking(cfg)  # summaries written before rankings were recorded: work it out
    outcome = register_best(register_name(cfg), rank["metric"], results, cfg.register.min_delta,
                            not rank["lower_is_better"])
    if out_path:
        write_json(out_path, outcome)
    return outcome


def recorded_ranking(results: list[dict]) -> dict | None:
    """The ranking the evaluations of `results` recorded (None if none did); results ranked differently cannot be
    compared."""
    found = {(r["ranking"]["metric"], r["ranking"]["lower_is_better"]): r["ranking"] for r in results if r.get("ranking")}
    if len(found) > 1:
        raise ValueError("these results were ranked by different metrics and cannot be compared: "
                         + ", ".join(f"{r.get('name')}: {r['ranking']['metric']}" for r in results if r.get("ranking")))
    return next(iter(found.values()), None)

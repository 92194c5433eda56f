"""Pipeline stages: what `dvc.yaml` runs (through `nnlab stage`) and what the Prefect flows wrap.

Each stage reads its inputs from files, does its work through the pure functions in tasks/ and models/,
and writes its outputs atomically. MLflow is reached only through tasks.tracking.
"""
from __future__ import annotations

import copy
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.registry import Deployed, count_parameters, create_model, get_spec, list_models
from tasks.config import Config, flatten, main_metric, params_hash, register_name
from tasks.augment import AUGMENTED, BatchAugment
from tasks.data import PROCESSED, load_prepared, prepare
from tasks.evaluate import classification_metrics, confusion_figure, learning_curve_figure, predict
from tasks.files import atomic_path, save_torch, write_json
from tasks.progress import EpochProgress
from tasks.text import VOCAB, Vocab, sample_text
from tasks.tracking import Run, git_commit
from tasks.train import Trainer, init_weights, resolve_device, seed_everything, to_device

CHECKPOINTS = Path(".nnlab/checkpoints")  # resume state of unfinished runs; never a DVC output (DVC wipes those)


class TrainingFailed(RuntimeError):
    def __init__(self, name: str, run_id: str, reason: str):
        super().__init__(f"{name}: {reason} (MLflow run {run_id})")
        self.name, self.run_id, self.reason = name, run_id, reason

    def __reduce__(self):  # picklable across process pools
        return type(self), (self.name, self.run_id, self.reason)


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
        import matplotlib.pyplot as plt

        plt.close(fig)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def build(arch: str, options: dict, manifest: dict) -> torch.nn.Module:
    """create_model for the data `manifest` describes; token data hands its vocabulary size to the embedding."""
    if manifest.get("vocab_size"):
        if "vocab_size" not in get_spec(arch).options.model_fields:
            takes = [n for n in list_models() if "vocab_size" in get_spec(n).options.model_fields]
            raise ValueError(f"model {arch!r} does not read token ids ({manifest.get('source', 'the data')} is text); "
                             f"models that do: {', '.join(takes)}")
        options = {**options, "vocab_size": manifest["vocab_size"]}
    return create_model(arch, input_shape=tuple(manifest["input_shape"]), num_classes=manifest["num_classes"], **options)


def train_stage(cfg: Config, name: str, data_dir: str | Path = PROCESSED, out_dir: str | Path | None = None,
                parent_run_id: str | None = None, extra_tags: dict | None = None) -> Trained:
    """Train run `name`; resumes its unfinished checkpoint (same params, same data) into the same MLflow run."""
    if get_spec(cfg.model_options(name)[0]).family == "gan":  # two networks, their own step and measurements
        from tasks.gan_stages import train_gan_stage

        return train_gan_stage(cfg, name, data_dir, out_dir, parent_run_id, extra_tags)
    out_dir = Path(out_dir or f"data/train/{name}")
    data = load_prepared(data_dir)
    m = data.manifest
    arch, options = cfg.model_options(name)
    spec = get_spec(arch)
    params = run_params(cfg, name)
    phash = params_hash(params)
    ckpt_path = CHECKPOINTS / f"{name}-{params_hash([phash, m['data_hash'], parent_run_id])}.pt"

    tcfg = cfg.train_for(name)
    device = resolve_device(tcfg.device)
    seed_everything(cfg.seed)
    model = build(arch, options, m)
    options = getattr(model, "resolved_options", options)  # e.g. a transfer base pinned to its version
    init_weights(getattr(model, "fresh", model), tcfg.init)  # `fresh`: only the untrained part (transfer's head)
    image = len(m["input_shape"]) == 3
    channels_last = image and tcfg.channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    augment = BatchAugment.for_data(cfg.augment, m, cfg.seed) if cfg.augment.enabled and image else None
    trainer = Trainer(model, tcfg, cfg.seed, device, task=m.get("task", "classification"), augment=augment)

    mean, std = m["normalization"]["mean"], m["normalization"]["std"]
    train = to_device(data.x_train, data.y_train, mean, std, device, channels_last)
    val = to_device(data.x_val, data.y_val, mean, std, device, channels_last)

    run, resumed = _open_run(cfg, name, arch, spec.family, m, params, phash, ckpt_path, trainer, parent_run_id,
                             extra_tags)
    progress = EpochProgress(name, tcfg.epochs, trainer.epoch)

    on_epoch = epoch_callback(run, ckpt_path, name, progress)
    try:
        result = trainer.fit(train, val, on_epoch=on_epoch, progress=progress.step)
    except KeyboardInterrupt:
        run.finish("KILLED", "interrupted; `nnlab run` with the same params resumes it")
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        _log_health(run, trainer)
        run.finish("FAILED", reason)
        ckpt_path.unlink(missing_ok=True)  # a diverged run would only diverge again from here
        raise TrainingFailed(name, run.run_id, reason) from e
    finally:
        progress.close()

    final = {
        "name": name, "arch": arch, "family": spec.family, "options": options,
        "input_shape": m["input_shape"], "num_classes": m["num_classes"], "classes": m["classes"],
        "normalization": m["normalization"], "config": cfg.model_dump(), "data_hash": m["data_hash"],
        "task": m.get("task", "classification"), "series": m.get("series"), "source": m["source"],
        "vocab_size": m.get("vocab_size"),
        "run_id": run.run_id, "history": result.history, "epochs": result.epochs, "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early, "seconds": result.seconds,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    deployed = Deployed(copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format), mean, std,
                        m.get("task", "classification"), len(m["input_shape"]))
    tokens = m.get("vocab_size") is not None
    example = data.x_test[:4] if tokens else data.x_test[:4].astype(np.float32)
    vocab = Path(data_dir) / VOCAB
    model_uri = run.log_model(deployed, example, metadata={"nnlab.arch": arch, "classes": m["classes"]},
                              extra_files=[vocab] if tokens else None)  # the registered model encodes new text
    run.log_metrics({"epochs_run": result.epochs, "best_epoch": result.best_epoch,
                     "train_seconds": result.seconds, "parameters": count_parameters(model)})
    health = _log_health(run, trainer)
    run.log_figure(learning_curve_figure(result.history, f"{name} on {m['source']}"), "plots/learning_curve.png")
    run.log_dict(m, "data/manifest.json")
    if augment is not None:
        from tasks.augment import preview

        run.log_figure(preview(cfg.augment, data, cfg.seed), "plots/augment_preview.png")
    if image and isinstance(getattr(model, "features", None), torch.nn.Sequential):
        _log_what_it_learned(run, model, data.x_test[:1], mean, std, name)
    if hasattr(model, "attention_weights"):  # attention models: where they looked, for a few test examples
        _log_attention(run, model, data, mean, std, name)
    if tokens:
        run.log_file(vocab, "data")
    if m.get("task") == "language_model":
        _log_samples(run, model, Vocab.load(vocab), cfg.seed, name)
    final["model_uri"] = model_uri
    run.set_tags({"nnlab.model_uri": model_uri})
    save_torch(out_dir / "model.pt", final)
    run.log_file(out_dir / "model.pt", "checkpoint")  # self-describing: what transfer learning rebuilds from
    write_json(out_dir / "run.json", {"name": name, "arch": arch, "run_id": run.run_id, "model_uri": model_uri,
                                      "epochs": result.epochs, "seconds": round(result.seconds, 3)})
    ckpt_path.unlink(missing_ok=True)
    run.finish("FINISHED")
    return Trained(name, arch, run.run_id, model_uri, result.epochs, result.seconds, resumed, health)


def epoch_callback(run: Run, ckpt_path: Path, name: str, progress: EpochProgress):
    """What a real run does after each epoch: one batched MLflow write (epoch metrics and the diagnostics
    series), the resume checkpoint, the progress line. Inline: on 2 cores a writer thread only competed with
    the training threads (measured: no gain)."""

    def on_epoch(epoch: int, metrics: dict, tr: Trainer) -> None:
        run.log_epoch(epoch, metrics)
        if tr.diagnostics is not None:
            run.log_series(tr.diagnostics.drain())
        save_torch(ckpt_path, {"run_id": run.run_id, "name": name, "trainer": tr.state_dict()})
        progress.epoch_end(epoch, metrics)

    return on_epoch


def _log_what_it_learned(run: Run, model, x_raw: np.ndarray, mean, std, name: str) -> None:
    """CNNs: the first-layer kernels, and the feature maps of one test image after an early and a late block."""
    from tasks.evaluate import feature_maps, feature_maps_figure, kernels_figure

    first = getattr(model, "first_conv", None) or next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    run.log_figure(kernels_figure(first.weight, f"{name}: first-layer kernels"), "plots/kernels.png")
    x = to_device(x_raw, np.zeros(1), mean, std, next(model.parameters()).device, channels_last=False).x
    maps = feature_maps(model, x)
    run.log_figure(feature_maps_figure(x_raw[0], maps, f"{name}: feature maps of one test image"),
                   "plots/feature_maps.png")


def _log_attention(run: Run, model, data, mean, std, name: str, n: int = 6) -> None:
    from tasks.evaluate import attention_figure

    dev = next(model.parameters()).device
    x = to_device(data.x_test[:n], data.y_test[:n], mean, std, dev, channels_last=False).x
    model.eval()
    with torch.no_grad():
        w = model.attention_weights(x).float().cpu().numpy()
    classes = data.manifest.get("classes") or []
    labels = [f"#{i}" + (f" ({classes[int(y)]})" if classes else "") for i, y in enumerate(data.y_test[:n])]
    step = "image row" if len(data.manifest["input_shape"]) == 3 else "time step"
    run.log_figure(attention_figure(w, labels, f"{name}: attention over {step}s", step), "plots/attention.png")


def _log_samples(run: Run, model, vocab: Vocab, seed: int, name: str, temperatures=(0.5, 0.8, 1.2),
                 length: int = 300, prompt: str = "The ") -> None:
    """Language models: text drawn from the trained model at a few temperatures (samples.txt)."""
    samples = sample_text(model, vocab, prompt, length, list(temperatures), seed)
    text = "".join(f"--- temperature {t} ---\n{s}\n\n" for t, s in samples.items())
    run.log_text(text, "samples.txt")
    print(f"{name}: sample at temperature {temperatures[1]}: {samples[temperatures[1]][:160]!r}", flush=True)


def _log_health(run: Run, trainer: Trainer) -> list[str]:
    """Tags nnlab.health.* by the rules in tasks/diagnostics.py; returns the names of those that fired."""
    d = trainer.diagnostics
    if d is None:
        return []
    if d.records:
        run.log_series(d.drain())
    health = d.health()
    run.set_tags({f"nnlab.health.{k}": str(v).lower() for k, v in health.items()})
    run.log_metrics(d.summary())
    fired = [k for k, v in health.items() if v]
    for k in fired:
        print(f"{run.run_id}: health warning: {k.replace('_', ' ')} (see nnlab.health.{k})", flush=True)
    return fired


def _open_run(cfg, name, arch, family, manifest, params, phash, ckpt_path, trainer, parent_run_id, extra_tags):
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=trainer.device, weights_only=False)
        try:
            run = Run.reopen(state["run_id"])
        except Exception:  # the run was deleted from the store: start over
            ckpt_path.unlink()
        else:
            trainer.load_state_dict(state["trainer"])
            print(f"{name}: resuming MLflow run {run.run_id} after epoch {trainer.epoch}", flush=True)
            return run, True
    tags = {
        "nnlab.model": arch, "nnlab.family": family, "nnlab.dataset": manifest["source"],
        "nnlab.git_commit": git_commit(), "nnlab.data_hash": manifest["data_hash"], "nnlab.params_hash": phash,
        "nnlab.run": name, **(extra_tags or {}),
    }
    return Run.start(cfg.tracking.experiment, name, tags, flatten(params), parent_run_id), False


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained network from its self-describing `model.pt`."""
    final = torch.load(path, map_location=device, weights_only=False)
    model = build(final["arch"], final["options"], final)
    model.load_state_dict(final["model"])
    return model.to(device).eval(), final


# ---------------------------------------------------------------- evaluate

def evaluate_stage(cfg: Config, name: str, data_dir: str | Path = PROCESSED, train_dir: str | Path | None = None,
                   metrics_path: str | Path | None = None, plots_dir: str | Path | None = None) -> dict:
    if get_spec(cfg.model_options(name)[0]).family == "gan":
        from tasks.gan_stages import evaluate_gan_stage

        return evaluate_gan_stage(cfg, name, data_dir, train_dir, metrics_path, plots_dir)
    train_dir = Path(train_dir or f"data/train/{name}")
    metrics_path = Path(metrics_path or f"metrics/{name}.json")
    plots_dir = Path(plots_dir or f"plots/{name}")
    device = resolve_device(cfg.train.device)
    model, final = load_trained(train_dir / "model.pt", device)
    data = load_prepared(data_dir)
    norm = final["normalization"]
    test = to_device(data.x_test, data.y_test, norm["mean"], norm["std"], device, channels_last=False)
    run = Run(final["run_id"])
    if final.get("task") == "regression":
        metrics, fig, artifact = _forecast_evaluation(name, model, test, data, final, run)
    elif final.get("task") == "language_model":
        metrics, fig, artifact = _language_model_evaluation(name, model, test, final)
    else:
        metrics, cm = classification_metrics(predict(model, test.x), test.y, final["num_classes"])
        fig = confusion_figure(cm, final["classes"], f"{name}: test accuracy {metrics['test_accuracy']:.4f}")
        artifact = "plots/confusion_matrix.png"
    run.log_metrics(metrics)
    plots_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(plots_dir / "test.png") as tmp:  # DVC's plot: confusion matrix, or forecast vs actual
        fig.savefig(tmp, format="png")
    run.log_figure(fig, artifact)
    _write_history(plots_dir / "history.csv", final["history"])
    summary = {**metrics, "name": name, "arch": final["arch"], "run_id": final["run_id"],
               "model_uri": final["model_uri"], "epochs": final["epochs"], "seconds": round(final["seconds"], 3)}
    write_json(metrics_path, summary)
    return summary


def _forecast_evaluation(name: str, model, test, data, final: dict, run: Run):
    """Test RMSE/MAE in the series' units beside the naive and seasonal-naive forecasts of the same windows."""
    from tasks.series import arima_reference, baselines, forecast_figure, forecast_metrics

    norm, season = final["normalization"], final["series"]["season"]
    pred = predict(model, test.x).cpu().numpy() * norm["std"][0] + norm["mean"][0]
    metrics = forecast_metrics(pred, data.y_test, data.x_test, season)
    metrics |= arima_reference(data.manifest, data.y_test)
    if "arima_test_rmse" in metrics:
        metrics["test_rmse_vs_arima"] = metrics["test_rmse"] / max(metrics["arima_test_rmse"], 1e-12)
    beats = metrics["test_rmse"] < metrics["naive_test_rmse"]
    run.set_tags({"nnlab.beats_naive": str(beats).lower()})
    verdict = "beats" if beats else "does NOT beat"
    print(f"{name}: test RMSE {metrics['test_rmse']:.4g} {verdict} the naive forecast's "
          f"{metrics['naive_test_rmse']:.4g} (ratio {metrics['test_rmse_vs_naive']:.3f})"
          + (f"; seasonal naive {metrics['seasonal_naive_test_rmse']:.4g}" if "seasonal_naive_test_rmse" in metrics
             else "") + (f"; ARIMA {metrics['arima_test_rmse']:.4g}" if "arima_test_rmse" in metrics else ""),
          flush=True)
    naive = baselines(data.x_test, pred.shape[1], season)["naive"]
    fig = forecast_figure(data.x_test, data.y_test, pred, naive,
                          f"{name}: test RMSE {metrics['test_rmse']:.4g} vs naive {metrics['naive_test_rmse']:.4g}")
    return metrics, fig, "plots/forecast.png"


def _language_model_evaluation(name: str, model, test, final: dict):
    """Next-character accuracy and perplexity (exp of the mean cross-entropy) on the held-out end of the text."""
    import math

    import torch.nn.functional as F

    from tasks.evaluate import perplexity_figure

    logits = predict(model, test.x)
    ce = float(F.cross_entropy(logits.float(), test.y))
    metrics = {"test_accuracy": float((logits.argmax(1) == test.y).float().mean()), "test_loss": ce,
               "test_perplexity": math.exp(ce)}
    print(f"{name}: test perplexity {metrics['test_perplexity']:.3f} over {final['num_classes']} characters "
          f"(uniform guessing: {final['num_classes']}), next-character accuracy {metrics['test_accuracy']:.4f}",
          flush=True)
    fig = perplexity_figure(final["history"], f"{name}: test perplexity {metrics['test_perplexity']:.3f}")
    return metrics, fig, "plots/perplexity.png"


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", *history[0].keys()])
        w.writeheader()
        for i, h in enumerate(history, 1):
            w.writerow({"epoch": i, **{k: round(v, 6) for k, v in h.items()}})


# ---------------------------------------------------------------- register

def register_stage(cfg: Config, results: list[dict], out_path: str | Path | None = "data/register.json") -> dict:
    """Register the best of `results` (evaluate summaries); alias `champion` only if it beats the current one."""
    from tasks.tracking import register_best

    outcome = register_best(register_name(cfg), main_metric(cfg), results, cfg.register.min_delta)
    if out_path:
        write_json(out_path, outcome)
    return outcome


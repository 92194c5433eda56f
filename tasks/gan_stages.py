"""The GAN family's train and evaluate stages: the same machinery as tasks/stages.py (config, seeding, resume
checkpoints, MLflow runs, progress) around GanTrainer, and the measurements that say whether a GAN worked.

Images are scaled to [-1, 1] (the generator ends in tanh); 2-D points (ring8) keep their units. What gets logged
and registered is the `Sampler`: noise (B, latent) -> samples in the data's raw units.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.registry import create_model, get_spec
from tasks.augment import raw_max
from tasks.config import Config, params_hash
from tasks.data import load_prepared
from tasks.files import atomic_path, save_torch, write_json
from tasks.gan import (GanTrainer, class_coverage, evolution_strip, frechet_distance, label_entropy, mode_collapse,
                       mode_coverage, points_figure, sample_grid_figure)
from tasks.progress import EpochProgress
from tasks.train import Trainer, resolve_device, seed_everything, to_device

EVAL_SAMPLES = 2000  # generated samples measured at evaluation (ring8; images: up to the test split's size)
EPOCH_SAMPLES = 1000  # ring8: samples measured after every epoch (modes_covered per epoch)
SNAPSHOTS = 8  # sample grids logged over a run (and panels of the evolution strip)
JUDGE_EPOCHS = 6  # epochs of the classifier trained on the fly when no champion was trained on the same data


def scaling(manifest: dict) -> tuple[list[float], list[float]]:
    """(mean, std) taking raw data to the generator's range: images [0, max] -> [-1, 1]; points unchanged."""
    if len(manifest["input_shape"]) == 3:
        half = raw_max(manifest) / 2
        return [half] * manifest["input_shape"][0], [half] * manifest["input_shape"][0]
    return manifest["normalization"]["mean"], manifest["normalization"]["std"]


class Sampler(nn.Module):
    """What a GAN run logs and registers: noise (B, latent_dim) -> samples (B, *shape) in raw data units."""

    def __init__(self, generator: nn.Module, latent_dim: int, mean: list[float], std: list[float], image: bool,
                 max_value: float):
        super().__init__()
        self.generator, self.latent_dim, self.image, self.max_value = generator, latent_dim, image, max_value
        shape = (1, -1, 1, 1) if image else (1, -1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, z):
        x = self.generator(z.float()).float() * self.std + self.mean
        return x.clamp(0, self.max_value) if self.image else x


def snapshot_epochs(epochs: int) -> set[int]:
    return {int(round(e)) for e in np.linspace(1, epochs, min(SNAPSHOTS, epochs))}


def to_unit(x: torch.Tensor | np.ndarray, max_value: float) -> np.ndarray:  # raw images -> [0, 1] for plots
    return np.asarray(torch.as_tensor(x).float().cpu()) / max_value


# ---------------------------------------------------------------- train

def train_gan_stage(cfg: Config, name: str, data_dir, out_dir, parent_run_id, extra_tags):
    from tasks.stages import CHECKPOINTS, Trained, TrainingFailed, _open_run, build, run_params

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
    model = build(arch, options, m).to(device)
    trainer = GanTrainer(model, tcfg, cfg.seed, device)
    image = len(m["input_shape"]) == 3
    mean, std = scaling(m)
    max_value = raw_max(m) if image else 0.0
    train = to_device(data.x_train, data.y_train, mean, std, device, channels_last=False)
    val = to_device(data.x_val[:1], data.y_val[:1], mean, std, device, channels_last=False)  # unused by a GAN

    run, resumed = _open_run(cfg, name, arch, spec.family, m, params, phash, ckpt_path, trainer, parent_run_id,
                             extra_tags)
    snapshots: dict[int, np.ndarray] = {}
    if resumed:
        snapshots = torch.load(ckpt_path, weights_only=False).get("snapshots", {})
    progress = EpochProgress(name, tcfg.epochs, trainer.epoch)
    due = snapshot_epochs(tcfg.epochs)

    def raw(x: torch.Tensor) -> torch.Tensor:  # generator space -> raw units
        shape = (1, -1, 1, 1) if image else (1, -1)
        return x.float().cpu() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)

    def on_epoch(epoch: int, metrics: dict, tr: GanTrainer) -> None:
        if m["source"] == "ring8":  # coverage per epoch: collapse shows as a drop, recovery as a rise
            with torch.no_grad():
                pts = raw(model.sample(EPOCH_SAMPLES, torch.Generator().manual_seed(epoch))).numpy()
            metrics.update(mode_coverage(pts, np.array(m["ring8"]["centers"]), m["ring8"]["std"]))
        run.log_epoch(epoch, metrics)
        if epoch in due:
            fixed = raw(tr.fixed_samples())
            snapshots[epoch] = to_unit(fixed, max_value) if image else fixed.numpy()
            fig = (sample_grid_figure(snapshots[epoch], 8, f"{name}: epoch {epoch}") if image else
                   points_figure(data.x_val, snapshots[epoch], m["ring8"]["centers"], f"{name}: epoch {epoch}"))
            run.log_figure(fig, f"samples/epoch_{epoch:04d}.png")
        save_torch(ckpt_path, {"run_id": run.run_id, "name": name, "trainer": tr.state_dict(), "snapshots": snapshots})
        progress.epoch_end(epoch, metrics)

    try:
        result = trainer.fit(train, val, on_epoch=on_epoch, progress=progress.step)
    except KeyboardInterrupt:
        run.finish("KILLED", "interrupted; `nnlab run` with the same params resumes it")
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        run.finish("FAILED", reason)
        ckpt_path.unlink(missing_ok=True)
        raise TrainingFailed(name, run.run_id, reason) from e
    finally:
        progress.close()

    epochs = sorted(snapshots)
    centers = m.get("ring8", {}).get("centers")
    run.log_figure(evolution_strip([snapshots[e] for e in epochs], epochs, f"{name}: the same noise over training",
                                   centers=centers), "plots/samples_evolution.png")
    run.log_figure(_losses_figure(result.history, f"{name} on {m['source']}"), "plots/learning_curve.png")
    sampler = Sampler(copy.deepcopy(model.generator).float().cpu(), model.latent_dim, mean, std, image, max_value)
    example = torch.randn(4, model.latent_dim, generator=torch.Generator().manual_seed(0)).numpy()
    model_uri = run.log_model(sampler, example, metadata={
        "nnlab.arch": arch, "nnlab.kind": "generator", "latent_dim": model.latent_dim, "image": image,
        "max_value": max_value, "shape": m["input_shape"], "source": m["source"]})
    run.log_metrics({"epochs_run": result.epochs, "train_seconds": result.seconds,
                     "parameters_generator": sum(p.numel() for p in model.generator.parameters()),
                     "parameters_discriminator": sum(p.numel() for p in model.discriminator.parameters())})
    run.log_dict(m, "data/manifest.json")
    final = {
        "name": name, "arch": arch, "family": spec.family, "options": options, "input_shape": m["input_shape"],
        "num_classes": m["num_classes"], "classes": m["classes"], "normalization": {"mean": mean, "std": std},
        "config": cfg.model_dump(), "data_hash": m["data_hash"], "task": "generation", "source": m["source"],
        "run_id": run.run_id, "history": result.history, "epochs": result.epochs, "best_epoch": result.epochs,
        "stopped_early": False, "seconds": result.seconds, "model_uri": model_uri, "max_value": max_value,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    run.set_tags({"nnlab.model_uri": model_uri})
    save_torch(out_dir / "model.pt", final)
    run.log_file(out_dir / "model.pt", "checkpoint")
    write_json(out_dir / "run.json", {"name": name, "arch": arch, "run_id": run.run_id, "model_uri": model_uri,
                                      "epochs": result.epochs, "seconds": round(result.seconds, 3)})
    ckpt_path.unlink(missing_ok=True)
    run.finish("FINISHED")
    return Trained(name, arch, run.run_id, model_uri, result.epochs, result.seconds, resumed, [])


def _losses_figure(history: list[dict], title: str):
    import matplotlib.pyplot as plt

    keys = [k for k in ("d_loss", "g_loss", "critic_gap", "gradient_penalty") if k in history[0]]
    probs = [k for k in ("d_real", "d_fake", "modes_covered") if k in history[0]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    epochs = range(1, len(history) + 1)
    for k in keys:
        axes[0].plot(epochs, [h[k] for h in history], marker=".", label=k)
    for k in probs:
        axes[1].plot(epochs, [h[k] for h in history], marker=".", label=k)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("D output (mean) / modes")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- evaluate

def evaluate_gan_stage(cfg: Config, name: str, data_dir, train_dir, metrics_path, plots_dir) -> dict:
    """Samples from the trained generator, measured: ring8 mode coverage and the Frechet distance of the points;
    images: what a classifier trained on the same data says they are (class coverage, label entropy) and the
    Frechet distance of its penultimate features (classifier_fid). Tag nnlab.health.mode_collapse."""
    from tasks.stages import load_trained
    from tasks.tracking import Run

    train_dir = Path(train_dir or f"data/train/{name}")
    metrics_path, plots_dir = Path(metrics_path or f"metrics/{name}.json"), Path(plots_dir or f"plots/{name}")
    device = resolve_device(cfg.train.device)
    model, final = load_trained(train_dir / "model.pt", device)
    data = load_prepared(data_dir)
    run = Run(final["run_id"])
    sampler = Sampler(model.generator, model.latent_dim, final["normalization"]["mean"], final["normalization"]["std"],
                      len(final["input_shape"]) == 3, final["max_value"]).to(device).eval()
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 12345)
    if data.manifest["source"] == "ring8":
        n = EVAL_SAMPLES
        with torch.no_grad():
            fake = sampler(torch.randn(n, model.latent_dim, generator=gen).to(device)).cpu().numpy()
        ring = data.manifest["ring8"]
        metrics = mode_coverage(fake, np.array(ring["centers"]), ring["std"])
        metrics["frechet_distance"] = frechet_distance(data.x_test.astype(np.float64), fake.astype(np.float64))
        collapsed = mode_collapse(metrics["modes_covered"], len(ring["centers"]))
        fig = points_figure(data.x_test, fake, ring["centers"],
                            f"{name}: {metrics['modes_covered']}/8 modes, "
                            f"{metrics['high_quality_fraction']:.0%} within 3σ")
        artifact, judge = "plots/samples.png", None
    else:
        n = min(len(data.x_test), 1000)
        with torch.no_grad():
            fake = torch.cat([sampler(torch.randn(min(500, n - i), model.latent_dim, generator=gen).to(device))
                              for i in range(0, n, 500)]).cpu()
        clf, judge = judge_classifier(cfg, data_dir, data, device)
        probs_fake, feats_fake = judge_outputs(clf, fake.numpy(), data.manifest, device)
        _, feats_real = judge_outputs(clf, data.x_test[:n].astype(np.float32), data.manifest, device)
        k = data.manifest["num_classes"]
        metrics = {"class_coverage": class_coverage(probs_fake), "label_entropy": label_entropy(probs_fake),
                   "label_entropy_max": float(np.log(k)),
                   "classifier_fid": frechet_distance(feats_real, feats_fake)}
        collapsed = mode_collapse(metrics["class_coverage"], k)
        labels = probs_fake.argmax(1)
        fig = sample_grid_figure(to_unit(fake[:64], final["max_value"]), 8,
                                 f"{name}: {metrics['class_coverage']}/{k} classes, FID {metrics['classifier_fid']:.2f}"
                                 f"\nclassifier says: {' '.join(str(data.manifest['classes'][i]) for i in labels[:16])}…")
        artifact = "plots/samples.png"
    metrics["samples_measured"] = n
    run.log_metrics(metrics)
    tags = {"nnlab.health.mode_collapse": str(collapsed).lower()}
    if judge:
        tags["nnlab.gan.judge"] = judge
    run.set_tags(tags)
    print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
          + ("  [mode collapse]" if collapsed else ""), flush=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(plots_dir / "test.png") as tmp:
        fig.savefig(tmp, format="png")
    run.log_figure(fig, artifact)
    from tasks.stages import _write_history

    _write_history(plots_dir / "history.csv", final["history"])
    summary = {**metrics, "mode_collapse": collapsed, "name": name, "arch": final["arch"], "family": "gan",
               "run_id": final["run_id"], "model_uri": final["model_uri"], "epochs": final["epochs"],
               "seconds": round(final["seconds"], 3)}
    write_json(metrics_path, summary)
    return summary


# ---------------------------------------------------------------- the judge: a classifier of the same data

def judge_classifier(cfg: Config, data_dir, data, device) -> tuple[nn.Module, str]:
    """The registered champion classifier when it was trained on exactly this data (same data hash); else a
    simple_cnn trained here, without MLflow, cached beside the prepared data under its hash."""
    from tasks.stages import build

    m = data.manifest
    try:
        from tasks.tracking import load_checkpoint

        final, uri = load_checkpoint(f"models:/{cfg.register.name}@champion")
        if final.get("data_hash") == m["data_hash"]:
            clf = build(final["arch"], final["options"], final)
            clf.load_state_dict(final["model"])
            return clf.to(device).eval(), f"{uri} ({final['arch']})"
    except Exception:  # no champion yet, or one without a checkpoint
        pass
    cache = Path(".nnlab/judges") / f"simple_cnn-{m['data_hash'][:16]}.pt"
    clf = create_model("simple_cnn", input_shape=tuple(m["input_shape"]), num_classes=m["num_classes"])
    if cache.is_file():
        state = torch.load(cache, map_location="cpu", weights_only=False)
        clf.load_state_dict(state["model"])
        return clf.to(device).eval(), state["judge"]
    seed_everything(cfg.seed)
    tcfg = cfg.train.model_copy(update={"epochs": JUDGE_EPOCHS, "optimizer": "adam", "lr": 1e-3,
                                        "early_stopping": cfg.train.early_stopping.model_copy(update={"enabled": False})})
    tcfg.diagnostics.enabled = False
    clf.to(device)
    mean, std = m["normalization"]["mean"], m["normalization"]["std"]
    tr = Trainer(clf, tcfg, cfg.seed, device)
    tr.fit(to_device(data.x_train, data.y_train, mean, std, device, False),
           to_device(data.x_val, data.y_val, mean, std, device, False))
    acc = tr.evaluate(to_device(data.x_test, data.y_test, mean, std, device, False), "test")["test_accuracy"]
    judge = f"simple_cnn trained for the judgement ({JUDGE_EPOCHS} epochs, test accuracy {acc:.3f})"
    save_torch(cache, {"model": {k: v.cpu() for k, v in clf.state_dict().items()}, "judge": judge})
    return clf.eval(), judge


def judge_outputs(clf: nn.Module, raw: np.ndarray, manifest: dict, device) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (N, K), penultimate features (N, F): the input of the classifier's last Linear)."""
    last = [mod for mod in clf.modules() if isinstance(mod, nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda mod, inp, out: feats.append(inp[0].detach().float().cpu()))
    mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
    x = to_device(raw, np.zeros(len(raw), dtype=np.int64), mean, std, device, channels_last=False).x
    probs = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), 500):
                probs.append(torch.softmax(clf(x[i:i + 500]).float(), 1).cpu())
    finally:
        hook.remove()
    return torch.cat(probs).numpy(), torch.cat(feats).numpy().astype(np.float64)

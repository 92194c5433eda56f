"""The generation kind: GANs on the shared loop and run lifecycle. Its step is tasks/kinds/gan.py's GanStep; here are
what it measures each epoch (ring8 coverage, sample grids of a fixed noise), what it logs and registers, and the
evaluation that says whether a GAN worked.

Images are scaled to [-1, 1] (the generator ends in tanh); 2-D points (ring8) keep their units. What gets logged
and registered is the `Sampler`: noise (B, latent) -> samples in the data's raw units.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from models.registry import create_model
from tasks import quick
from tasks.data import raw_max
from tasks.config import Config
from tasks.files import save_torch
from tasks.kinds.gan import GanStep, class_coverage, frechet_distance, label_entropy, mode_collapse, mode_coverage
from tasks.figures import curves_figure, evolution_strip, points_figure, sample_grid_figure
from tasks.kinds import Evaluation, Job, Kind, Served, ServingError, get_kind, register_kind
from tasks.sources import data_kind
from tasks.train import Trainer, seed_everything, to_device
from tasks.kinds.supervised import SupervisedStep

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


def snapshot_epochs(epochs: int, shots: int = SNAPSHOTS) -> set[int]:
    return {int(round(e)) for e in np.linspace(1, epochs, min(shots, epochs))}


def to_unit(x: torch.Tensor | np.ndarray, max_value: float) -> np.ndarray:  # raw images -> [0, 1] for plots
    return np.asarray(torch.as_tensor(x).float().cpu()) / max_value


# ---------------------------------------------------------------- served

class ServedSampler(Served):
    """A GAN generator: n draws of seeded noise -> n samples in raw data units (images (n, C, H, W), or points
    (n, 2)); `png` draws them as a grid of images, or a scatter plot of points. `truncation` (psi < 1) needs a
    mapping network (ServedStyleSampler); this one refuses it."""

    takes, gives, command = "noise", "samples", "sample"

    def __call__(self, n: int, seed: int = 0, truncation: float = 1.0) -> np.ndarray:
        if truncation != 1.0 and not self.truncates:
            raise ServingError(f"{self.uri} ({self.meta.get('nnlab.arch', 'its generator')}) has no mapping network, "
                               "so no mean w to truncate towards; it needs a style-based generator "
                               "(`nnlab run --models stylegan`)")
        z = torch.randn(n, int(self.meta["latent_dim"]), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return torch.cat([self.module(z[i:i + 256]) for i in range(0, n, 256)]).numpy()

    def png(self, samples: np.ndarray, path) -> None:
        n, title = len(samples), f"{len(samples)} samples from {self.uri}"
        if self.meta["image"]:
            fig = sample_grid_figure(samples / float(self.meta["max_value"]), max(1, int(round(n ** 0.5))), title)
        else:
            fig = points_figure(None, samples, None, title)
        fig.savefig(path, format="png")


# ---------------------------------------------------------------- the kind

@register_kind
class Generation(Kind):
    """GANs: trained by GanStep; what gets logged and registered is the `Sampler`; judged by their samples."""

    name, metric, registry = "generation", "classifier_fid", "nnlab-generator"
    lower_is_better = ("classifier_fid", "frechet_distance")
    channels_last = False  # the GAN trainer has always fed contiguous batches
    served_as = ServedSampler

    def metric_for(self, source: str) -> str:
        # points from known modes: how the samples share out over them (a Frechet distance between 2-D Gaussian
        # fits cannot see modes); images: the Frechet distance in a classifier's features
        return "mode_overlap" if data_kind(source) == "points" else "classifier_fid"

    def scaling(self, manifest: dict) -> tuple[list[float], list[float]]:
        return scaling(manifest)

    def step(self, model, cfg, seed, device) -> GanStep:
        return GanStep(model, cfg, seed, device)

    def on_epoch(self, job: Job, epoch: int, metrics: dict, trainer) -> None:
        m, model = job.data.manifest, job.model
        if "ring8" in m:  # coverage per epoch: collapse shows as a drop, recovery as a rise
            with torch.no_grad():
                pts = raw(model.sample(EPOCH_SAMPLES, torch.Generator().manual_seed(epoch)), job).numpy()
            metrics.update(mode_coverage(pts, np.array(m["ring8"]["centers"]), m["ring8"]["std"]))
        if epoch in snapshot_epochs(job.trainer.cfg.epochs):
            fixed, image = raw(trainer.step.fixed_samples(), job), len(m["input_shape"]) == 3
            shot = trainer.step.snapshots[epoch] = to_unit(fixed, raw_max(m)) if image else fixed.numpy()
            fig = (sample_grid_figure(shot, 8, f"{job.name}: epoch {epoch}") if image else
                   points_figure(job.data.x_val, shot, m["ring8"]["centers"], f"{job.name}: epoch {epoch}"))
            job.run.log_figure(fig, f"samples/epoch_{epoch:04d}.png")

    def after_fit(self, job: Job, result) -> None:
        snapshots, model, m = job.trainer.step.snapshots, job.model, job.data.manifest
        epochs = sorted(snapshots)
        job.run.log_figure(evolution_strip([snapshots[e] for e in epochs], epochs,
                                           f"{job.name}: the same noise over training",
                                           centers=m.get("ring8", {}).get("centers")), "plots/samples_evolution.png")
        job.run.log_figure(_losses_figure(result.history, f"{job.name} on {m['source']}"), "plots/learning_curve.png")
        job.run.log_metrics({"parameters_generator": sum(p.numel() for p in model.generator.parameters()),
                             "parameters_discriminator": sum(p.numel() for p in model.discriminator.parameters())})

    def served(self, job: Job):
        model, m = job.model, job.data.manifest
        image = len(m["input_shape"]) == 3
        max_value = raw_max(m) if image else 0.0
        sampler = self.wrap(copy.deepcopy(model).float().cpu(), m, job.mean, job.std)
        example = torch.randn(4, model.latent_dim, generator=torch.Generator().manual_seed(0)).numpy()
        return sampler, example, {"nnlab.kind": "generator", "latent_dim": model.latent_dim, "image": image,
                                  "max_value": max_value, "shape": m["input_shape"], "source": m["source"]}, None

    def wrap(self, net, manifest, mean, std):
        image = len(manifest["input_shape"]) == 3
        # eval mode: batch norm from its running statistics, not those of whatever batch is being sampled
        return Sampler(net.sampling_generator, net.latent_dim, mean, std, image,
                       raw_max(manifest) if image else 0.0).eval()

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        return evaluate_generator(cfg, name, model, final, data, data_dir, device)


def raw(x: torch.Tensor, job: Job) -> torch.Tensor:  # generator space -> raw units
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    return x.float().cpu() * torch.tensor(job.std).view(shape) + torch.tensor(job.mean).view(shape)


def _losses_figure(history: list[dict], title: str):
    keys = [k for k in ("d_loss", "g_loss", "critic_gap", "gradient_penalty") if k in history[0]]
    probs = [k for k in ("d_real", "d_fake", "modes_covered") if k in history[0]]
    return curves_figure(history, keys, probs, ("loss", "D output (mean) / modes"), title)


# ---------------------------------------------------------------- evaluate

def evaluate_generator(cfg: Config, name: str, model, final: dict, data, data_dir, device) -> Evaluation:
    """Samples from the trained generator, measured: ring8 mode coverage and the Frechet distance of the points;
    images: what a classifier trained on the same data says they are (class coverage, label entropy) and the
    Frechet distance of its penultimate features (classifier_fid). Tag nnlab.health.mode_collapse."""
    sampler = Sampler(model.sampling_generator, model.latent_dim, final["normalization"]["mean"], final["normalization"]["std"],
                      len(final["input_shape"]) == 3, final["max_value"]).to(device).eval()
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 12345)
    if "ring8" in data.manifest:
        metrics, collapsed, fig, judge = _points_evaluation(name, sampler, model.latent_dim, data, device, gen)
    else:
        metrics, collapsed, fig, judge = _image_evaluation(cfg, name, sampler, model.latent_dim, final, data,
                                                           data_dir, device, gen)
    tags = {"nnlab.health.mode_collapse": str(collapsed).lower()}
    if judge:
        tags["nnlab.gan.judge"] = judge
    print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
          + ("  [mode collapse]" if collapsed else ""), flush=True)
    return Evaluation(metrics, fig, "plots/samples.png", tags, {"mode_collapse": collapsed})


def _points_evaluation(name, sampler, latent_dim, data, device, gen):
    n = EVAL_SAMPLES
    with torch.no_grad():
        fake = sampler(torch.randn(n, latent_dim, generator=gen).to(device)).cpu().numpy()
    ring = data.manifest["ring8"]
    metrics = mode_coverage(fake, np.array(ring["centers"]), ring["std"])
    metrics["frechet_distance"] = frechet_distance(data.x_test.astype(np.float64), fake.astype(np.float64))
    collapsed = mode_collapse(metrics["modes_covered"], len(ring["centers"]))
    fig = points_figure(data.x_test, fake, ring["centers"],
                        f"{name}: {metrics['modes_covered']}/8 modes, {metrics['high_quality_fraction']:.0%} within 3σ")
    metrics["samples_measured"] = n
    return metrics, collapsed, fig, None


CONFIDENT = 0.9  # a sample "reads as" a class when the judge gives that class at least this probability


def _image_evaluation(cfg, name, sampler, latent_dim, final, data, data_dir, device, gen):
    n = min(len(data.x_test), quick.at_most(1000))
    with torch.no_grad():
        fake = torch.cat([sampler(torch.randn(min(500, n - i), latent_dim, generator=gen).to(device))
                          for i in range(0, n, 500)]).cpu()
    clf, judge = judge_classifier(cfg, data_dir, data, device)
    probs_fake, feats_fake = judge_outputs(clf, fake.numpy(), data.manifest, device)
    _, feats_real = judge_outputs(clf, data.x_test[:n].astype(np.float32), data.manifest, device)
    k = data.manifest["num_classes"]
    metrics = {"class_coverage": class_coverage(probs_fake), "label_entropy": label_entropy(probs_fake),
               "label_entropy_max": float(np.log(k)), "classifier_fid": frechet_distance(feats_real, feats_fake),
               # samples that read as one class: the judge gives it CONFIDENT or more
               "confident_share": float((probs_fake.max(1) >= CONFIDENT).mean())}
    collapsed = mode_collapse(metrics["class_coverage"], k)
    labels = probs_fake.argmax(1)
    fig = sample_grid_figure(to_unit(fake[:64], final["max_value"]), 8,
                             f"{name}: {metrics['class_coverage']}/{k} classes, FID {metrics['classifier_fid']:.2f}"
                             f"\nclassifier says: {' '.join(str(data.manifest['classes'][i]) for i in labels[:16])}…")
    metrics["samples_measured"] = n
    return metrics, collapsed, fig, judge


# ---------------------------------------------------------------- the judge: a classifier of the same data

def judge_classifier(cfg: Config, data_dir, data, device) -> tuple[nn.Module, str]:
    """The registered champion classifier when it was trained on exactly this data (same data hash); else a
    simple_cnn trained here, without MLflow, cached beside the prepared data under its hash."""
    from tasks.networks import build

    m = data.manifest
    try:
        from tasks.registration import load_checkpoint

        from tasks.kinds import for_dataset

        final, uri = load_checkpoint(f"models:/{for_dataset(get_kind('classification').registry, cfg.data)}@champion")
        if final.get("data_hash") == m["data_hash"]:
            clf = build(final["arch"], final["options"], final)
            clf.load_state_dict(final["model"])
            return clf.to(device).eval(), f"{uri} ({final['arch']})"
    except Exception:  # no champion yet, or one without a checkpoint
        pass
    clf, judge, _ = trained_judge(cfg, m["data_hash"][:16], (data.x_train, data.y_train), (data.x_val, data.y_val),
                                  (data.x_test, data.y_test), m["classes"], device, m["normalization"])
    return clf, judge


def trained_judge(cfg: Config, key: str, train, val, test, classes: list[str], device,
                  normalization: dict | None = None, augment: Callable[[dict], Callable] | None = None,
                  epochs: int = JUDGE_EPOCHS) -> tuple[nn.Module, str, dict]:
    """A simple_cnn trained on the images and labels `train` (each split an (x, y) pair in raw units), without
    MLflow, cached under .nnlab/judges/ by `key`. Returns it, what it is (with its test accuracy) and the
    {"normalization": ...} its inputs take (`normalization`, or the training images' per-channel statistics).
    `augment`: given that normalisation, the batch augmentation (tasks/augment.py) of its training batches; made
    only when the judge is trained, not when it is read from the cache."""
    from tasks.data import channel_stats

    if normalization is None:
        mean, std = channel_stats(np.asarray(train[0]))
        normalization = {"mean": mean, "std": std}
    stats = {"normalization": normalization}
    cache = Path(".nnlab/judges") / f"simple_cnn-{key}.pt"
    clf = create_model("simple_cnn", input_shape=tuple(train[0].shape[1:]), num_classes=len(classes))
    if cache.is_file():
        from tasks.files import load_torch

        state = load_torch(cache)
        clf.load_state_dict(state["model"])
        return clf.to(device).eval(), state["judge"], stats
    seed_everything(cfg.seed)
    tcfg = cfg.train.model_copy(update={"epochs": epochs, "optimizer": "adam", "lr": 1e-3, "batch_size": 64,
                                        "early_stopping": cfg.train.early_stopping.model_copy(update={"enabled": False})})
    tcfg.diagnostics.enabled = False
    clf.to(device)
    mean, std = normalization["mean"], normalization["std"]
    split = [to_device(x, y, mean, std, device, False) for x, y in (train, val, test)]
    aug = augment(normalization) if augment is not None else None
    tr = Trainer(clf, tcfg, cfg.seed, device, SupervisedStep(clf, tcfg, device), augment=aug)
    tr.fit(split[0], split[1])
    acc = tr.evaluate(split[2], "test")["test_accuracy"]
    how = f"{type(aug).__name__}, " if aug is not None else ""
    judge = f"simple_cnn trained for the judgement ({how}{epochs} epochs, test accuracy {acc:.3f})"
    save_torch(cache, {"model": {k: v.cpu() for k, v in clf.state_dict().items()}, "judge": judge})
    return clf.eval(), judge, stats


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

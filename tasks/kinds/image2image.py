"""Image-to-image runs: paired (pix2pix) and unpaired (cyclegan) translation on the shared loop and lifecycle.

The data (the paired and unpaired digit domains, prepared as 32x32 pairs with their digits' labels) is
tasks/data/image_pairs.py.

The steps (Pix2PixStep, CycleStep: one batch each) are tasks/kinds/image2image_steps.py. Evaluation: L1,
PSNR, SSIM (scikit-image) against the targets, and what a classifier trained only on the target domain reads
in the outputs.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from models.image2image import SourceClassifier
from tasks import quick
from tasks.figures import rows_figure
from tasks.data.image_pairs import load_labels
from tasks.kinds import Evaluation, Job, Kind, Served, ServingError, register_kind
from tasks.kinds.image2image_steps import CycleStep, Pix2PixStep, TwoNetworkStep
from tasks.train import rng_state, set_rng_state

EXAMPLES = 8  # validation examples drawn in the per-epoch translation grids
SNAPSHOTS = 6  # translation grids logged over a run
EVAL_MAX = 1000  # test images measured per domain
HANDWRITING_EPOCHS = 12  # of the semantic classifier trained with HandwritingAugment (6 without: JUDGE_EPOCHS)


# ---------------------------------------------------------------- the served model


class ImageTranslator(nn.Module):
    """What an image-to-image run logs and registers: images (B, C, H, W) in raw units 0..255 -> the
    translation, same shape and units."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, x):
        return ((self.generator(x.float() / 127.5 - 1).float() + 1) * 127.5).clamp(0, 255)


def translate(net: nn.Module, raw: np.ndarray, device) -> np.ndarray:  # uint8 (N, C, H, W) -> float 0..255
    with torch.no_grad():
        x = torch.as_tensor(raw, dtype=torch.float32)
        return torch.cat([net(x[i:i + 256].to(device)).cpu() for i in range(0, len(x), 256)]).numpy()



class Translated(NamedTuple):
    inputs: np.ndarray  # (N, C, H, W) float32 in 0..255: the images as read, at the model's channels and size
    outputs: np.ndarray  # their translations, same shape and units


class ServedImageTranslator(Served):
    """An image-to-image generator: image files (up to 64), each read at the model's channels and size ->
    `Translated` (the images as read, their translations); `png` writes one image's translation as that image
    itself, several as a grid of inputs (top) over outputs."""

    takes, gives, command = "image", "image", "sample --input"

    def __call__(self, images: list[Path]) -> Translated:
        x = np.stack([self._read(f) for f in images[:64]])
        return Translated(x, translate(self.module, x, torch.device("cpu")))

    def _read(self, f: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.meta["shape"]
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError) as e:
            raise ServingError(f"cannot read image {f}: {e}") from None
        a = np.asarray(im, np.float32)
        return a[None] if c == 1 else a.transpose(2, 0, 1)

    def png(self, t: Translated, path) -> None:
        from PIL import Image

        if len(t.outputs) == 1:
            pixels = np.round(t.outputs[0]).astype(np.uint8)
            Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0)).save(path, format="PNG")
        else:
            rows_figure([t.inputs / 255.0, t.outputs / 255.0], ["input", "output"],
                        f"{len(t.inputs)} images translated by {self.uri}").savefig(path, format="png")


# ---------------------------------------------------------------- the kind


@register_kind
class ImageTranslation(Kind):
    """pix2pix and cyclegan: trained by their steps, served as an ImageTranslator (A -> B), ranked by how often
    a classifier trained only on domain B reads the source digit in the translation."""

    name, metric, registry = "image_translation", "class_agreement", "nnlab-image-translator"
    lower_is_better = ("test_l1", "baseline_l1", "classifier_fid_ba", "cycle_l1_a", "cycle_l1_b")
    channels_last = False
    summary_columns = ("test_ssim", "cycle_l1_a")
    served_as = ServedImageTranslator

    def step(self, model, cfg, seed, device) -> TwoNetworkStep:
        return Pix2PixStep(model, cfg, seed, device) if model.kind == "paired" else CycleStep(model, cfg, seed, device)

    def before_fit(self, job: Job) -> None:
        step = job.trainer.step
        if isinstance(step, CycleStep) and step.options.conditional:
            labels, device = load_labels(job.data_dir), job.trainer.device
            step.classes = tuple(torch.as_tensor(labels[f"{side}_train"], device=device) for side in "ab")
            job.run.set_tags({"nnlab.image2image.conditional": "both domains' training labels"})
        if isinstance(step, CycleStep) and step.options.lambda_semantic:
            data, device, saved = job.data, job.trainer.device, rng_state(job.trainer.shuffle)
            clf, about, stats = domain_judge(job.cfg, data, load_labels(job.data_dir), "a", job.data_dir, device,
                                             handwriting=step.options.semantic_augment)
            set_rng_state(saved, job.trainer.shuffle)  # training it (not cached yet) seeds: a resume stays exact
            n = stats["normalization"]
            step.semantic = SourceClassifier(clf, job.mean, job.std, n["mean"], n["std"]).to(device)
            job.run.set_tags({"nnlab.image2image.semantic": f"domain A's {about}"})
            print(f"{job.name}: semantic consistency by domain A's {about}", flush=True)

    def on_epoch(self, job: Job, epoch: int, metrics: dict, trainer) -> None:
        from tasks.kinds.generation import snapshot_epochs

        if epoch in snapshot_epochs(job.trainer.cfg.epochs, SNAPSHOTS):
            rows, labels = translation_rows(job.model, job.data.x_val[:EXAMPLES], job.data.y_val[:EXAMPLES],
                                            job.data.manifest, trainer.device)
            job.run.log_figure(rows_figure(rows, labels, f"{job.name}: epoch {epoch}"),
                               f"samples/epoch_{epoch:04d}.png")

    def after_fit(self, job: Job, result) -> None:
        job.run.log_figure(losses_figure(result.history, f"{job.name} on {job.data.manifest['description']}"),
                           "plots/learning_curve.png")
        model = job.model
        job.run.log_metrics({"parameters_generator": sum(p.numel() for g in model.generators() for p in g.parameters()),
                             "parameters_discriminator": sum(p.numel() for d in model.discriminators()
                                                             for p in d.parameters())})

    def served(self, job: Job):
        m = job.data.manifest
        net = self.wrap(copy.deepcopy(job.model).float().cpu(), m, job.mean, job.std)
        example = job.data.x_val[:4].astype(np.float32)
        return net, example, {"nnlab.kind": "image_translator", "shape": m["input_shape"], "max_value": 255.0,
                              "source": m["source"], "domains": m["domains"]}, None

    def wrap(self, net, manifest, mean, std):
        return ImageTranslator(net.generators()[0].eval())

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        return evaluate_translation(cfg, name, model, data, Path(data_dir), device)


# ---------------------------------------------------------------- evaluation


def image_scores(out: np.ndarray, target: np.ndarray, prefix: str) -> dict:
    """Mean L1, PSNR (dB) and SSIM of outputs against targets, both (N, C, H, W) in 0..255 (scikit-image)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    o, t = np.asarray(out, np.float64) / 255, np.asarray(target, np.float64) / 255
    multichannel = o.shape[1] > 1
    psnr = [min(peak_signal_noise_ratio(ti, oi, data_range=1.0), 100.0) if not np.array_equal(ti, oi) else 100.0
            for oi, ti in zip(o, t)]  # identical images: infinite PSNR, capped at 100 dB
    ssim = [structural_similarity(ti, oi, data_range=1.0, channel_axis=0) if multichannel
            else structural_similarity(ti[0], oi[0], data_range=1.0)
            for oi, ti in zip(o, t)]
    return {f"{prefix}_l1": float(np.abs(o - t).mean()), f"{prefix}_psnr": float(np.mean(psnr)),
            f"{prefix}_ssim": float(np.mean(ssim))}


def domain_judge(cfg, data, labels: dict, side: str, data_dir: Path, device, handwriting: bool = False):
    """A simple_cnn trained only on domain `side` ('a' or 'b') of the training split (cached by data hash);
    `handwriting`: trained longer, on batches varied as another hand would draw them (HandwritingAugment)."""
    from tasks.kinds.generation import trained_judge

    x = data.x_train if side == "a" else data.y_train
    key, extra = f"{data.manifest['data_hash'][:16]}-{side}", {}
    if handwriting:
        extra = {"epochs": HANDWRITING_EPOCHS, "augment": lambda n: _handwriting(n, cfg.seed)}
        key += "-handwriting"
    return trained_judge(cfg, key, (x, labels[f"{side}_train"]),
                         (data.x_val if side == "a" else data.y_val, labels[f"{side}_val"]),
                         (data.x_test if side == "a" else data.y_test, labels[f"{side}_test"]),
                         data.manifest["classes"], device, **extra)


def _handwriting(normalization: dict, seed: int):
    from tasks.augment import HandwritingAugment  # torchvision: imported only when such a judge is trained

    return HandwritingAugment(mean=normalization["mean"], std=normalization["std"], max_value=255.0, seed=seed + 4049)


def judged(judge, stats: dict, fake: np.ndarray, source: np.ndarray, source_labels: np.ndarray, real: np.ndarray,
           real_labels: np.ndarray, device) -> tuple[tuple[float, float, float, float], np.ndarray]:
    """One direction, by a classifier of its target domain: (its agreement with the source digit on the
    translations, the same on the untranslated sources, its accuracy on real targets, the Frechet distance
    between its features of real targets and of translations), and what it reads in the translations of each
    source class: (K, K) counts, source class x class read."""
    from tasks.kinds.gan import frechet_distance
    from tasks.kinds.generation import judge_outputs
    from tasks.kinds.supervised import confusion_counts

    probs, feats_fake = judge_outputs(judge, fake, stats, device)
    probs_in, _ = judge_outputs(judge, source.astype(np.float32), stats, device)
    probs_real, feats_real = judge_outputs(judge, real.astype(np.float32), stats, device)
    read = probs.argmax(1)
    confusion = confusion_counts(source_labels, read, probs.shape[1])
    return ((float((read == source_labels).mean()), float((probs_in.argmax(1) == source_labels).mean()),
             float((probs_real.argmax(1) == real_labels).mean()), frechet_distance(feats_real, feats_fake)),
            confusion)


def by_class(confusion: np.ndarray, classes: list[str], name: str) -> dict[str, float]:
    """`name`_<class>: the share of each source class read as itself (classes without test images left out),
    and `name`_se: the binomial standard error of the overall share (how far another test set might move it)."""
    n = confusion.sum()
    p = np.trace(confusion) / n
    shares = {f"{name}_{c}": float(confusion[i, i] / confusion[i].sum())
              for i, c in enumerate(classes) if confusion[i].sum()}
    return shares | {f"{name}_se": float(np.sqrt(p * (1 - p) / n))}


def classes_figure(confusion: np.ndarray, classes: list[str], title: str):
    from tasks.figures import confusion_figure

    return confusion_figure(confusion, classes, title, axes=("source digit", "read in its translation"))


def evaluate_translation(cfg, name: str, model, data, data_dir: Path, device) -> Evaluation:
    m, labels = data.manifest, load_labels(data_dir)
    na, nb = min(len(data.x_test), quick.at_most(EVAL_MAX)), min(len(data.y_test), quick.at_most(EVAL_MAX))
    a, b, la, lb = data.x_test[:na], data.y_test[:nb], labels["a_test"][:na], labels["b_test"][:nb]
    g_ab = ImageTranslator(model.generators()[0]).to(device).eval()
    fake_b = translate(g_ab, a, device)
    judge_b, about_b, stats_b = domain_judge(cfg, data, labels, "b", data_dir, device)
    scores, confusion = judged(judge_b, stats_b, fake_b, a, la, b, lb, device)
    metrics = dict(zip(("class_agreement", "untranslated_agreement", "target_accuracy", "classifier_fid"), scores))
    metrics |= by_class(confusion, m["classes"], "class_agreement")
    figures = {"plots/translation_classes.png": classes_figure(
        confusion, m["classes"], f"{name}: what the {m['domains']['b']} classifier reads in {len(a)} translations "
                                 f"(class agreement {metrics['class_agreement']:.1%})")}
    tags = {"nnlab.image2image.judge_b": about_b}
    if m["domains"]["paired"]:
        metrics |= image_scores(fake_b, b, "test") | image_scores(a, b, "baseline")
        tags["nnlab.image2image.baseline"] = m["domains"]["baseline"]
        title = (f"L1 {metrics['test_l1']:.3f} (baseline {metrics['baseline_l1']:.3f}), SSIM {metrics['test_ssim']:.3f} "
                 f"(baseline {metrics['baseline_ssim']:.3f}), class agreement {metrics['class_agreement']:.3f}")
    else:
        g_ba = ImageTranslator(model.generators()[1]).to(device).eval()
        fake_a = translate(g_ba, b, device)
        judge_a, about_a, stats_a = domain_judge(cfg, data, labels, "a", data_dir, device)
        scores, _ = judged(judge_a, stats_a, fake_a, b, lb, a, la, device)
        metrics |= dict(zip(("class_agreement_ba", "untranslated_agreement_ba", "source_accuracy",
                             "classifier_fid_ba"), scores))
        metrics |= {"cycle_l1_a": float(np.abs(translate(g_ba, fake_b, device) - a).mean() / 255),
                    "cycle_l1_b": float(np.abs(translate(g_ab, fake_a, device) - b).mean() / 255)}
        tags["nnlab.image2image.judge_a"] = about_a
        title = (f"A->B: the B classifier reads {metrics['class_agreement']:.1%} ± {metrics['class_agreement_se']:.1%} "
                 f"(untranslated {metrics['untranslated_agreement']:.1%}, real B {metrics['target_accuracy']:.1%}); "
                 f"cycle L1 {metrics['cycle_l1_a']:.3f}")
    rows, row_labels = translation_rows(model, a[:EXAMPLES], b[:EXAMPLES], m, device)
    fig = rows_figure(rows, row_labels, f"{name} on {m['description']}\n{title}")
    shown = {k: v for k, v in metrics.items() if k.removeprefix("class_agreement_") not in m["classes"]}
    print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()), flush=True)
    return Evaluation(metrics, fig, "plots/translations.png", tags, {"domains": m["domains"]}, figures=figures)


# ---------------------------------------------------------------- figures


def translation_rows(model, a: np.ndarray, b: np.ndarray, manifest: dict, device) -> tuple[list, list[str]]:
    """Rows of images in [0, 1] for a grid: paired: input, output, target; unpaired: a, G(a), F(G(a)) and
    b, F(b), G(F(b))."""
    names = manifest["domains"]
    was_training = model.training
    model.eval()
    g_ab = ImageTranslator(model.generators()[0]).to(device)
    fake_b = translate(g_ab, a, device)
    if names["paired"]:
        rows = [a, fake_b, b]
        labels = [f"input ({names['a']})", "output", "target"]
    else:
        g_ba = ImageTranslator(model.generators()[1]).to(device)
        fake_a = translate(g_ba, b, device)
        rows = [a, fake_b, translate(g_ba, fake_b, device), b, fake_a, translate(g_ab, fake_a, device)]
        labels = [f"A: {names['a']}", "G(A)", "F(G(A))", f"B: {names['b']}", "F(B)", "G(F(B))"]
    model.train(was_training)
    return [np.asarray(r, np.float32) / 255 for r in rows], labels


def losses_figure(history: list[dict], title: str):
    from tasks.figures import curves_figure

    return curves_figure(history, ["d_loss", "g_adversarial"], [k for k in history[0] if "l1" in k],
                         ("adversarial loss", "L1 (pixels in [0, 1])"), title)

"""The style-generation kind: StyleGAN (models/stylegan.py) on the shared loop and run lifecycle. It is the
generation kind (tasks/kinds/generation.py: GanStep trains it, the same samples, judge, classifier FID, registry
`nnlab-generator`) plus what shows that styles act at different scales:

- the style-mixing grid: row sources A on the left, column sources B on top, each cell the synthesis with A's w
  at the coarse layers (4x4 and 8x8 at 32x32) and B's w at the fine ones (16x16 and 32x32); logged per run;
- at evaluation, measured on MIX_PAIRS random pairs: `mixing_class_follows_coarse`, the share of mixed images
  whose class (as the judge classifier says) is the one it says for A, beside its baselines: the share that
  follows the fine source B, and chance (1 / classes); on data with a palette (colour_digits)
  `mixing_colour_follows_fine`, the share whose ink colour is B's, beside the share that is A's and chance.
  Colour is read from pixels: the mean RGB of the ink, named by the nearest palette colour in direction.

What gets logged and registered is a `StyleSampler`: the generation kind's sampler with the truncation trick,
its psi a buffer, so `nnlab sample --truncation PSI` sets it on the loaded model.
"""
from __future__ import annotations

import numpy as np
import torch

from tasks import quick
from tasks.data import raw_max
from tasks.figures import pyplot, tile
from tasks.kinds.generation import (Generation, Sampler, ServedSampler, evaluate_generator, judge_classifier,
                                    judge_outputs, to_unit)
from tasks.kinds import Evaluation, Job, register_kind

MIX_PAIRS = 1000  # random (A, B) pairs measured at evaluation
GRID = 6  # the mixing grid: GRID row sources x GRID column sources
INK = 0.35  # a pixel is ink when its brightest channel reaches this share of the image's brightest pixel


class StyleSampler(Sampler):
    """noise (B, latent_dim) -> images (B, C, H, W) in raw units, with w = w_avg + psi (w - w_avg)."""

    def __init__(self, generator, latent_dim, mean, std, max_value):
        super().__init__(generator, latent_dim, mean, std, True, max_value)
        self.register_buffer("truncation", torch.ones(()))  # psi: 1 off, 0 every sample the mean w's image

    def forward(self, z):
        x = self.generator(z.float(), self.truncation).float() * self.std + self.mean
        return x.clamp(0, self.max_value)



class ServedStyleSampler(ServedSampler):
    """A style-based generator: as any sampler, and `truncation` psi in (0, 1] pulls every w towards the mean w
    (w = w_avg + psi (w - w_avg)): smaller psi, samples closer to the average one."""

    truncates = True

    def __call__(self, n: int, seed: int = 0, truncation: float = 1.0) -> np.ndarray:
        self.module.truncation.fill_(truncation)  # the served StyleSampler's psi
        return super().__call__(n, seed, truncation)


# ---------------------------------------------------------------- mixing, in raw units


@torch.no_grad()
def mixed_images(generator, z_a, z_b, mean, std, max_value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A's images, B's images, mixed: A's w at the coarse layers, B's at the fine ones), raw units, on the CPU."""
    shape = (1, -1, 1, 1)
    mean, std = torch.tensor(mean).view(shape).to(z_a.device), torch.tensor(std).view(shape).to(z_a.device)
    w_a, w_b = generator.mapping(z_a), generator.mapping(z_b)
    out = [generator.synthesis(ws) for ws in (generator.broadcast(w_a), generator.broadcast(w_b),
                                              generator.mix(w_a, w_b))]
    return tuple((x.float() * std + mean).clamp(0, max_value).cpu() for x in out)


def ink_colours(raw: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) RGB images -> (N,) index of the palette colour nearest in direction to the mean colour of
    each image's ink (pixels at least INK x its brightest): the ink's brightness varies, its hue does not."""
    x = np.asarray(raw, dtype=np.float64)
    bright = x.max(1)  # (N, H, W)
    ink = bright >= INK * np.maximum(bright.reshape(len(x), -1).max(1), 1e-6)[:, None, None]
    rgb = (x * ink[:, None]).sum((2, 3)) / np.maximum(ink.sum((1, 2)), 1)[:, None]  # (N, 3) mean ink colour
    unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)  # noqa: E731
    return (unit(rgb) @ unit(np.asarray(palette, dtype=np.float64)).T).argmax(1)


def mixing_metrics(generator, clf, manifest: dict, mean, std, max_value, device, seed: int,
                   n: int = MIX_PAIRS) -> dict:
    gen = torch.Generator().manual_seed(seed)
    z_a, z_b = (torch.randn(n, generator.mapping.net[0].in_features, generator=gen).to(device) for _ in range(2))
    a, b, ab = mixed_images(generator, z_a, z_b, mean, std, max_value)
    cls = [judge_outputs(clf, x.numpy(), manifest, device)[0].argmax(1) for x in (a, b, ab)]
    out = {"mixing_class_follows_coarse": float((cls[2] == cls[0]).mean()),
           "mixing_class_follows_fine": float((cls[2] == cls[1]).mean()),  # baseline: B carries no class
           "mixing_class_chance": 1.0 / manifest["num_classes"]}
    if "palette" in manifest:
        col = [ink_colours(x.numpy(), manifest["palette"]["rgb"]) for x in (a, b, ab)]
        out |= {"mixing_colour_follows_fine": float((col[2] == col[1]).mean()),
                "mixing_colour_follows_coarse": float((col[2] == col[0]).mean()),  # baseline: A carries no colour
                "mixing_colour_chance": 1.0 / len(manifest["palette"]["rgb"])}
    out["mixing_pairs_measured"] = n
    return out


def mixing_grid(generator, mean, std, max_value, device, seed: int, rows: int = GRID) -> np.ndarray:
    """((rows + 1) x (rows + 1) tiles, C, H, W) in [0, 1]: a blank corner, B sources along the top, A sources
    down the left, cell (i, j) = coarse from A_i, fine from B_j."""
    gen = torch.Generator().manual_seed(seed)
    z_a, z_b = (torch.randn(rows, generator.mapping.net[0].in_features, generator=gen).to(device)
                for _ in range(2))
    za, zb = z_a.repeat_interleave(rows, 0), z_b.repeat(rows, 1)  # cell (i, j) at i * rows + j
    a, b, ab = mixed_images(generator, za, zb, mean, std, max_value)
    a, b, ab = (to_unit(x, max_value) for x in (a, b, ab))
    tiles = [np.ones_like(a[0])] + list(b[:rows])  # the top row: the column (fine) sources
    for i in range(rows):
        tiles += [a[i * rows]] + list(ab[i * rows:(i + 1) * rows])
    return np.stack(tiles)


def mixing_figure(grid: np.ndarray, coarse: str, fine: str, title: str):
    plt = pyplot()
    n = int(round(len(grid) ** 0.5))
    image = tile(grid, n)
    fig, ax = plt.subplots(figsize=(max(3.0, image.shape[1] / 38), max(3.0, image.shape[0] / 38) + 0.6), dpi=110)
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"top row: fine sources B ({fine})", fontsize=8)
    ax.set_ylabel(f"left column: coarse sources A ({coarse})", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def scales(generator) -> tuple[str, str]:  # ("4x4-8x8", "16x16-32x32") for a 32x32 generator
    res, k = generator.synthesis.resolutions, generator.coarse_layers // 2
    span = lambda rs: f"{rs[0]}x{rs[0]}" + (f"-{rs[-1]}x{rs[-1]}" if len(rs) > 1 else "")  # noqa: E731
    return span(res[:k]), span(res[k:])


# ---------------------------------------------------------------- the kind

@register_kind
class StyleGeneration(Generation):
    """StyleGAN: a generator whose styles act at different scales; measured by its mixing grid as well."""

    name = "style_generation"
    summary_columns = ("mixing_class_follows_coarse", "mixing_colour_follows_fine")
    served_as = ServedStyleSampler

    def after_fit(self, job: Job, result) -> None:
        super().after_fit(job, result)
        G, m = job.model.sampling_generator, job.data.manifest
        was_training = G.training
        G.eval()
        grid = mixing_grid(G, job.mean, job.std, raw_max(m), job.trainer.device, job.cfg.seed + 7)
        G.train(was_training)
        coarse, fine = scales(G)
        job.run.log_figure(mixing_figure(grid, coarse, fine, f"{job.name}: style mixing"), "plots/style_mixing.png")

    def served(self, job: Job):
        style, example, metadata, extra = super().served(job)
        G = job.model.sampling_generator
        return style, example, {**metadata, "truncation": True, "num_ws": G.num_ws,
                                "coarse_layers": G.coarse_layers}, extra

    def wrap(self, net, manifest, mean, std):
        sampler = super().wrap(net, manifest, mean, std)
        # eval: the fixed noise buffers, no mixing, no w_avg update (a generator in training mode mixes styles)
        return StyleSampler(sampler.generator, sampler.latent_dim, mean, std, sampler.max_value).eval()

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        ev = evaluate_generator(cfg, name, model, final, data, data_dir, device)
        pyplot().close(ev.figure)
        G, m = model.sampling_generator.eval(), data.manifest
        mean, std, top = final["normalization"]["mean"], final["normalization"]["std"], final["max_value"]
        clf, _ = judge_classifier(cfg, data_dir, data, device)
        mix = mixing_metrics(G, clf, m, mean, std, top, device, cfg.seed + 54321, quick.at_most(MIX_PAIRS))
        coarse, fine = scales(G)
        rates = f"class follows coarse {mix['mixing_class_follows_coarse']:.0%} " \
                f"(fine {mix['mixing_class_follows_fine']:.0%}, chance {mix['mixing_class_chance']:.0%})"
        if "mixing_colour_follows_fine" in mix:
            rates += f"\ncolour follows fine {mix['mixing_colour_follows_fine']:.0%} " \
                     f"(coarse {mix['mixing_colour_follows_coarse']:.0%}, chance {mix['mixing_colour_chance']:.0%})"
        fig = mixing_figure(mixing_grid(G, mean, std, top, device, cfg.seed + 7), coarse, fine,
                            f"{name}: FID {ev.metrics['classifier_fid']:.2f}, "
                            f"{ev.metrics['class_coverage']}/{m['num_classes']} classes\n{rates}")
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in mix.items()), flush=True)
        return Evaluation({**ev.metrics, **mix}, fig, "plots/style_mixing_test.png", ev.tags, ev.summary)

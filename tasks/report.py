"""The sweep report: which training choices matter, read off one page.

Input: one row per child run (levels of each factor, seed, status, final metric, per-epoch history).
Output: report.md and a self-contained report.html (plots embedded as PNG), plus the PNG files.
No MLflow here: the caller collects the rows and logs the files.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import matplotlib.ticker  # noqa: F401
import numpy as np

from tasks.effects import ci95, effects_lines
from tasks.figures import pyplot

plt = pyplot()


def fmt(mean: float, half: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.4f}" if not math.isfinite(half) else f"{mean:.4f} ± {half:.4f}"


def epochs_to_95(history: list[float]) -> int | None:
    """First epoch whose validation accuracy reaches 95% of the run's best."""
    if not history:
        return None
    best = max(history)
    return next(i + 1 for i, v in enumerate(history) if v >= 0.95 * best)


def cell_table(rows: list[dict], factors: list[str], metric: str, lower: bool = False) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(tuple(str(r["levels"][f]) for f in factors), []).append(r)
    table = []
    for key, runs in cells.items():
        ok = [r for r in runs if r["status"] == "FINISHED" and r.get(metric) is not None]
        mean, half = ci95([r[metric] for r in ok])
        speed = [e for e in (epochs_to_95(r["history"].get("val_accuracy", [])) for r in ok) if e is not None]
        seconds = {k: [r[k] for r in ok if r.get(k) is not None] for k in ("train_seconds", "cell_seconds")}
        table.append({"levels": dict(zip(factors, key)), "n": len(ok), "mean": mean, "ci": half,
                      "epochs_to_95": float(np.mean(speed)) if speed else float("nan"),
                      **{k: float(np.mean(v)) if v else float("nan") for k, v in seconds.items()},
                      "diverged": sum(r.get("diverged", False) for r in runs),
                      "failed": sum(r["status"] != "FINISHED" for r in runs),
                      "pruned_at": max((r["pruned_at"] for r in runs if r.get("pruned_at")), default=None)})
    sign = 1 if lower else -1  # best first: lowest error, or highest accuracy; cells cut by pruning after the rest
    table.sort(key=lambda c: (c["pruned_at"] is not None, sign * c["mean"] if math.isfinite(c["mean"]) else math.inf))
    return table


def main_effects(rows: list[dict], factors: list[str], metric: str) -> dict[str, list[dict]]:
    """Per factor and level: the mean over every other factor and seed, with its interval."""
    ok = [r for r in rows if r["status"] == "FINISHED" and r.get(metric) is not None]
    out = {}
    for f in factors:
        levels = list(dict.fromkeys(str(r["levels"][f]) for r in rows))
        out[f] = [dict(zip(("level", "mean", "ci"), (lv, *ci95([r[metric] for r in ok if str(r["levels"][f]) == lv]))))
                  for lv in levels]
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_figure(rows: list[dict], factor: str, key: str = "val_loss"):
    """Validation loss per epoch, one line per level of `factor` (mean over everything else, band = ±1 sd)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    levels = list(dict.fromkeys(str(r["levels"][factor]) for r in rows))
    for i, lv in enumerate(levels):
        curves = [r["history"].get(key, []) for r in rows if str(r["levels"][factor]) == lv and r["history"].get(key)]
        if not curves:
            continue
        n = min(map(len, curves))
        a = np.array([c[:n] for c in curves], dtype=float)
        a = np.where(np.isfinite(a), a, np.nan)
        mean, sd = np.nanmean(a, 0), np.nanstd(a, 0)
        x = np.arange(1, n + 1)
        ax.plot(x, mean, marker=".", color=f"C{i}", label=f"{lv} (n={len(curves)})")
        ax.fill_between(x, mean - sd, mean + sd, color=f"C{i}", alpha=0.15)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(key.replace("_", " "))
    lo, hi = ax.get_ylim()
    if key.endswith("loss") and lo > 0 and hi / lo > 10:  # losses spanning decades read better on a log axis
        ax.set_yscale("log")
    ax.set_title(f"{key.replace('_', ' ')} by {factor}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # no finished run: an empty figure, no legend
        ax.legend(fontsize=8)
    return fig


def effects_figure(effects: dict[str, list[dict]], metric: str):
    n = len(effects)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (factor, levels) in zip(axes[0], effects.items()):
        means = [lv["mean"] for lv in levels]
        errs = [lv["ci"] if math.isfinite(lv["ci"]) else 0 for lv in levels]
        ax.errorbar(range(len(levels)), means, yerr=errs, fmt="o", capsize=4)
        ax.set_xticks(range(len(levels)), [lv["level"] for lv in levels], rotation=30, ha="right")
        ax.set_title(factor, fontsize=10)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle("main effects (mean, 95% CI over all other factors and seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def activations_figure():
    """The textbook figure: activations and their derivatives. Sigmoid's derivative never exceeds 0.25,
    so a gradient shrinks at least 4x per sigmoid layer on its way down."""
    import torch

    x = torch.linspace(-5, 5, 401, requires_grad=True)
    fns = {"relu": torch.relu, "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.01),
           "tanh": torch.tanh, "sigmoid": torch.sigmoid}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, f) in enumerate(fns.items()):
        y = f(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        axes[0].plot(x.detach(), y.detach(), color=f"C{i}", label=name)
        axes[1].plot(x.detach(), g, color=f"C{i}", label=name)
    axes[0].set_title("activation f(x)", fontsize=10)
    axes[1].set_title("derivative f'(x)  (sigmoid peaks at 0.25)", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_report(title: str, rows: list[dict], factors: list[str], metric: str, out_dir: str | Path,
                 notes: list[str] | None = None, lower: bool = False,
                 extra: tuple[list[str], dict[str, bytes]] | None = None) -> dict[str, Path]:
    """Write report.md, report.html and the PNGs into out_dir, cells ranked by `metric` (lower=True: lower
    wins, as the sweep's ranking says), `extra` (Markdown lines, PNGs) before the figures; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = cell_table(rows, factors, metric, lower)
    effects = main_effects(rows, factors, metric)
    figures = {"main_effects.png": _png(effects_figure(effects, metric))}
    for f in factors:
        figures[f"curves_{f}.png"] = _png(curves_figure(rows, f))
    if any(f.endswith("activation") for f in factors):
        figures["activations.png"] = _png(activations_figure())
    figures.update((extra or ([], {}))[1])
    for name, data in figures.items():
        (out_dir / name).write_bytes(data)

    md = _markdown(title, rows, factors, metric, lower, table, effects, list(figures), notes or [],
                   (extra or ([], {}))[0])
    (out_dir / "report.md").write_text(md)
    (out_dir / "report.html").write_text(_html(title, md, figures))
    return {"md": out_dir / "report.md", "html": out_dir / "report.html",
            **{n: out_dir / n for n in figures}}


def _markdown(title, rows, factors, metric, lower, table, effects, figures, notes, extra=()) -> str:
    finished = sum(r["status"] == "FINISHED" for r in rows)
    diverged = sum(r.get("diverged", False) for r in rows)
    lines = [f"# {title}", "",
             f"{len(rows)} runs, {finished} finished, {diverged} diverged. Main metric: `{metric}` "
             f"(test split; mean ± 95% CI over seeds; {'lower' if lower else 'higher'} is better). "
             "★ marks the best cell.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    accuracy = any(math.isfinite(c["epochs_to_95"]) for c in table)  # classifiers: how fast, too
    timed = any(math.isfinite(c.get("cell_seconds", math.nan)) for c in table)  # what a cell costs beyond training
    pruned = any(c.get("pruned_at") for c in table)
    lines += pruning_lines(rows, table) if pruned else []
    lines += ["## Cells", "", "| " + " | ".join([*factors, metric, "seeds",
                                                  *(["epochs to 95% of best val acc"] if accuracy else []),
                                                  *(["seconds: training / whole cell"] if timed else []),
                                                  *(["pruned at epoch"] if pruned else []),
                                                  "diverged"]) + " |",
              "|" + "---|" * (len(factors) + 3 + accuracy + timed + pruned)]
    for i, c in enumerate(table):
        star = " ★" if i == 0 and math.isfinite(c["mean"]) and not c.get("pruned_at") else ""
        speed = [f"{c['epochs_to_95']:.1f}" if math.isfinite(c["epochs_to_95"]) else "—"] if accuracy else []
        cost = [f"{c['train_seconds']:.1f} / {c['cell_seconds']:.1f}" if math.isfinite(c["cell_seconds"]) else "—"
                ] if timed else []
        cut = [str(c["pruned_at"] or "—")] if pruned else []
        lines.append("| " + " | ".join([*(str(c["levels"][f]) for f in factors), fmt(c["mean"], c["ci"]) + star,
                                        str(c["n"]), *speed, *cost, *cut, str(c["diverged"])]) + " |")
    lines += ["", "## Main effects", "", "Each level's mean over all other factors and seeds.", ""]
    for f, levels in effects.items():
        pick = min if lower else max
        best = pick((lv for lv in levels if math.isfinite(lv["mean"])), key=lambda lv: lv["mean"], default=None)
        lines.append(f"**{f}**: " + " · ".join(
            f"{lv['level']} {fmt(lv['mean'], lv['ci'])}" + (" (best)" if lv is best else "") for lv in levels))
        lines.append("")
    lines += effects_lines(rows, factors, metric) if len(factors) > 1 else []
    lines += [*extra, "## Figures", ""] + [f"![{n}]({n})" for n in figures] + [""]
    failed = [r for r in rows if r["status"] != "FINISHED"]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['cell']}`: {r.get('error') or r['status']}" for r in failed] + [""]
    return "\n".join(lines)


def pruning_summary(rows: list[dict]) -> dict[str, int]:
    """A pruned sweep's cost against a full one, from its report rows: cells cut, epochs trained, and the epochs
    the same cells would have trained unpruned (the longest uncut cell's epochs, each)."""
    full = max((r.get("epochs", 0) for r in rows if not r.get("pruned_at")), default=0)
    return {"cells": len(rows), "cut": sum(bool(r.get("pruned_at")) for r in rows),
            "epochs": sum(r.get("epochs", 0) for r in rows), "full_epochs": full * len(rows)}


def pruning_lines(rows: list[dict], table: list[dict]) -> list[str]:
    """What pruning cut and what it saved: the cells stopped early, the epochs trained against a full sweep's."""
    s = pruning_summary(rows)
    cut = sum(bool(c.get("pruned_at")) for c in table)
    share = f" ({s['epochs'] / s['full_epochs']:.0%})" if s["full_epochs"] else ""
    return ["## Pruning", "", f"{cut} of {len(table)} cells cut on the mean over their seeds, listed after the "
            f"others with the epoch they were judged at; never the best cell nor registered. Epochs trained: "
            f"{s['epochs']} of the {s['full_epochs']}{share} the same runs would train unpruned.", ""]


def _html(title: str, md: str, figures: dict[str, bytes]) -> str:
    """The Markdown report as one HTML file that opens anywhere, offline: Python-Markdown with its tables
    extension, the figures inlined as data URIs."""
    import re

    import markdown

    body = markdown.markdown(md, extensions=["tables"], output_format="html")
    body = re.sub(r'src="([^"]+)"', lambda m: f'src="data:image/png;base64,{base64.b64encode(figures[m[1]]).decode()}"'
                  if m[1] in figures else m[0], body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}code{background:#f3f3f3;padding:1px 4px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")

"""NNLAB_QUICK: every command as written, in seconds, to check that commands work (the documented commands' test,
CI, a first look at a new machine), never to judge a model.

With NNLAB_QUICK=1 (or a number of training examples, at least 10; 1 means 200):
- every run trains one epoch on at most that many training examples (`train.epochs=1`, `data.max_train`), whatever
  params.yaml, a sweep file or `--set` say; the sources that make their data make less of it (synth_speech:
  1.5 recordings per training example, `data.utterances`; ring8: 5 points, `data.ring8_size`), and evaluations
  that measure a fixed number of samples (generated images, translated test images, mixed pairs, decoded
  validation pairs or recordings) measure at most as many as there are training examples;
- a grid sweep runs every cell of its first seed only, a search 2 trials of its first seed, without pruning;
- registration keeps its order (champion only on a better score) but not its quality gates: a model that does not
  beat its trivial baseline, or that a health rule bars, is registered all the same, tagged `nnlab.quick`;
- the store is mlruns/quick/mlflow.db unless MLFLOW_TRACKING_URI says otherwise, so quick runs never reach the
  project's own registry.
Standard library only: the config and the tracking modules read it before anything heavy is imported.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENV = "NNLAB_QUICK"
DEFAULT_EXAMPLES = 200
STORE = Path("mlruns") / "quick"
SEARCH_TRIALS = 2


class QuickError(ValueError):
    """NNLAB_QUICK holds a value that is not allowed (tasks/config.py makes it a ConfigError: exit 2)."""


def examples() -> int | None:
    """Training examples a quick run keeps, or None when NNLAB_QUICK is off (unset, empty or 0)."""
    raw = os.environ.get(ENV, "").strip()
    if raw in ("", "0"):
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 1 or 1 < n < 10:
        raise QuickError(f"{ENV}={raw!r}: expected 1 (quick runs on {DEFAULT_EXAMPLES} training examples), a number "
                         "of training examples of at least 10, or 0 / unset (off)")
    return DEFAULT_EXAMPLES if n == 1 else n


def caps(raw: dict[str, Any]) -> list[str]:
    """The `--set` overrides that make params `raw` a quick run (one epoch, at most examples() training examples,
    less data made); none when NNLAB_QUICK is off."""
    n = examples()
    if n is None:
        return []
    data = raw.get("data") or {}
    limits = {"max_train": n, "utterances": max(30, n * 3 // 2), "ring8_size": max(100, n * 5)}
    return ["train.epochs=1", *(f"data.{k}={_at_most(data.get(k), cap)}" for k, cap in limits.items())]


def _at_most(given: Any, cap: int) -> int:
    return min(given, cap) if isinstance(given, int) and not isinstance(given, bool) else cap


def sweep_capped(spec: dict[str, Any]) -> dict[str, Any]:
    """A sweep's settings (a dict) cut to a quick sweep: its first seed, a search's first trials, no pruning."""
    if examples() is None:
        return spec
    out = dict(spec)
    grid = dict(out.get("grid") or {})
    if grid.get("seed"):
        grid["seed"] = list(grid["seed"])[:1]
        out["grid"] = grid
    if out.get("seeds"):
        out["seeds"] = list(out["seeds"])[:1]
    if out.get("search") is not None:
        out["stop"] = {**(out.get("stop") or {}), "trials": SEARCH_TRIALS}
        out["search"] = {**out["search"], **({"trials": SEARCH_TRIALS} if "trials" in out["search"] else {})}
    out["prune"] = None
    return out


def at_most(n: int) -> int:
    """How many samples an evaluation measures where it would measure `n`: n, or the quick examples() if fewer."""
    q = examples()
    return n if q is None else min(n, q)


def gates() -> bool:
    """Whether registration applies its quality gates (trivial baseline, health rules): always, except quick."""
    return examples() is None


def store() -> Path | None:
    """Where quick runs keep their store when MLFLOW_TRACKING_URI is unset (None when NNLAB_QUICK is off; a value
    that is not allowed is refused where settings are read: `nnlab run`, `nnlab sweep`, exit 2)."""
    try:
        return STORE if examples() is not None else None
    except QuickError:
        return None


def banner() -> str | None:
    """What a quick command says first (None when NNLAB_QUICK is off)."""
    n = examples()
    if n is None:
        return None
    where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else f"{STORE}/"
    return (f"quick run ({ENV}): 1 epoch on at most {n} training examples, a sweep's first seed, registered "
            f"without the quality gates; store: {where}. To check commands, not to judge models.")

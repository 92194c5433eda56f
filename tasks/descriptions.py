"""What a run, a model version and a registered model say about themselves in MLflow's lists and pages: the run
name (`mlp · digits · epochs=2`), the headline (the kind's main metric beside its trivial baseline) and the
registry's decision in words. Plain strings from plain values: tasks/tracking.py and tasks/registration.py write
them, tasks/stages.py and the flows hand them what they know."""
from __future__ import annotations

import json
import re

OVERRIDES_TAG = "nnlab.overrides"  # the command line's --set overrides of a run (a JSON list), what its name shows

# Overrides a run name leaves out: the data source is in the name already; registration, tracking and sweep
# settings change nothing the run trains.
NOT_IN_NAME = ("register", "tracking", "sweep", "run")
NAME_WIDTH = 80  # characters of overrides in a run name; the rest is counted (`+2 more`), all of them are a tag


def overrides_tag(sets: list[str] | None) -> dict[str, str]:
    """The tag that records a run's --set overrides (none: no tag)."""
    return {OVERRIDES_TAG: json.dumps(list(sets))} if sets else {}


def run_title(name: str, source: str, overrides: list[str] | None = None, cell: str | None = None) -> str:
    """The MLflow run name, what tells runs apart in the runs list: the run, its data and what the command line
    changed of params.yaml, `mlp · digits · epochs=2 · lr=0.01` (`mlp · digits` when nothing); a sweep cell by its
    levels, `mlp · optimizer=adam · seed=0` (the parent names the sweep and the data)."""
    if cell:
        return " · ".join([name, *re.split(r",(?=[\w.]+=)", cell)])
    return " · ".join([name, source, *_fitted(compact_overrides(name, overrides or []))])


def compact_overrides(name: str, sets: list[str]) -> list[str]:
    """`train.epochs=2`, `models.mlp.hidden=[64, 32]` -> `epochs=2`, `hidden=[64,32]`: leaf names (the whole key
    where two share a leaf: `train.lr`, `mlp.train.lr`), values as typed, long ones cut. The last of a key wins."""
    found: dict[str, str] = {}
    for item in sets:
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        other_run = parts[0] == "models" and len(parts) > 1 and parts[1] != name
        if key.strip() == "data.source" or parts[0] in NOT_IN_NAME or other_run:
            continue
        value = re.sub(r"\s+", "", value) if value.strip().startswith(("[", "{")) else value.strip()
        found.pop(key.strip(), None)
        found[key.strip()] = value if len(value) <= 16 else value[:15] + "…"
    leaves = [k.split(".")[-1] for k in found]
    out = []
    for key, value in found.items():
        leaf = key.split(".")[-1]
        out.append(f"{leaf if leaves.count(leaf) == 1 else key.removeprefix('models.')}={value}")
    return out


def _fitted(items: list[str]) -> list[str]:
    shown, width = [], 0
    for i, item in enumerate(items):
        if width + len(item) > NAME_WIDTH and shown:
            return [*shown, f"+{len(items) - i} more"]
        shown.append(item)
        width += len(item) + 3
    return shown


def headline(kind, source: str, metrics: dict) -> dict | None:
    """{metric, value, text} of a run of `kind` on data `source`: the kind's main metric (what `register.metric:
    auto` ranks by), beside the kind's trivial predictor on the same test split where it has one; None when the
    run has no such metric. `text` is Markdown: `**test_wer 0.4120** · trivial baseline (baseline_test_wer)
    0.9300: beaten`."""
    metric = kind.metric_for(source)
    if metric not in metrics:
        return None
    value, base = float(metrics[metric]), kind.baselines.get(metric)
    text = f"**{metric} {value:.4f}**"
    if base in metrics:
        beaten = value < metrics[base] if kind.lower_wins(metric) else value > metrics[base]
        text += f" · trivial baseline ({base}) {metrics[base]:.4f}: {'beaten' if beaten else 'NOT beaten'}"
    return {"metric": metric, "value": value, "text": text}


def train_longer(results: list[dict]) -> str:
    """What to do when short runs beat nothing: train them longer, with a number to try."""
    ran = max((int(r.get("epochs") or 0) for r in results), default=0)
    if not ran:
        return "train longer: --set train.epochs=N"
    return f"train longer (ran {ran} epoch{'s' * (ran != 1)}): e.g. --set train.epochs={max(10, 5 * ran)}"


def registry_line(outcome: dict) -> str:
    """The registry's decision on one run, for its description: `registered as champion v3 of nnlab-...` or
    `not registered in nnlab-...: <why>`."""
    if outcome.get("registered"):
        return (f"**Registry:** registered as **{outcome['alias']} v{outcome['version']}** of {outcome['name']} "
                f"({outcome['decision']})")
    return f"**Registry:** not registered in {outcome['name']}: {outcome['reason']}"


def version_description(metric: str, score: float, outcome: dict, tags: dict, run_name: str | None) -> str:
    """A registered version's description: its score, the decision, and where it came from."""
    what = f"mean {metric} over {tags['n_seeds']} seeds" if "n_seeds" in tags else metric
    cell = f" (sweep cell {tags['nnlab.cell']})" if tags.get("nnlab.cell") else ""
    return (f"{what} {score:.4f}; {outcome['decision']}. Run {run_name or '?'}{cell}, MLflow run "
            f"{tags.get('nnlab.run_id', '?')}.")


def model_description(kind: str | None, dataset: str | None, metric: str, higher: bool) -> str:
    """A registered model's description: what its versions are and how they are ranked."""
    return (f"nnlab {kind or 'model'} runs trained on {dataset or 'one dataset'}, ranked by {metric} "
            f"({'higher' if higher else 'lower'} wins). @champion: the best so far; @challenger: the latest "
            "version that did not beat it.")

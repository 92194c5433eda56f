"""What differs between two runs (`nnlab diff A B`): only the params that differ, the metric deltas, and the
identity of what ran (data hash, git commit, code hash) where it differs. A side is a run id (or runs:/<id>),
a registered version (models:/<name>@<alias>, models:/<name>/<version>: the run behind it), or a sweep cell over
its seeds, `<parent run id>/<levels>` (e.g. `<id>/optimizer=adam`): then each metric is the mean over the
cell's seeds with its 95% interval, and the seed itself is no difference."""
from __future__ import annotations

import re
from dataclasses import dataclass

from tasks.store_reader import open_store, run_of

SERIES = ("health/", "system/")  # step-level series: their last value compares nothing
IDENTITY = ("nnlab.data_hash", "nnlab.git_commit", "nnlab.code_hash", "nnlab.dataset", "nnlab.model")
SCHEMA = {  # `nnlab diff --json`
    "type": "object", "required": ["a", "b", "params", "metrics", "identity"], "additionalProperties": False,
    "properties": {
        "a": {"$ref": "#/$defs/side"}, "b": {"$ref": "#/$defs/side"},
        "params": {"type": "object", "additionalProperties": {
            "type": "array", "items": {"type": ["string", "null"]}, "minItems": 2, "maxItems": 2}},
        "metrics": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["a", "b", "delta"], "additionalProperties": False,
            "properties": {k: {"type": ["number", "null"]} for k in ("a", "b", "delta", "a_ci95", "b_ci95")}}},
        "identity": {"type": "object", "additionalProperties": {
            "type": "array", "items": {"type": ["string", "null"]}, "minItems": 2, "maxItems": 2}},
    },
    "$defs": {"side": {"type": "object", "required": ["ref", "runs", "kind"], "additionalProperties": False,
                       "properties": {"ref": {"type": "string"}, "kind": {"type": ["string", "null"]},
                                      "runs": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}},
}


class DiffError(ValueError):
    """A side that is not there, or two sides that cannot be compared (the CLI's exit 2)."""


@dataclass
class Side:
    ref: str
    runs: list  # runs in MLflow's shape (tasks/store_reader.py): one, or a sweep cell's seeds
    cell: bool = False  # a sweep cell over its seeds: the seed is no difference

    @property
    def kind(self) -> str | None:
        return self.runs[0].data.tags.get("nnlab.kind")


def _levels(cell_id: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in cell_id.split(",") if "=" in part)


def side(ref: str, store=None) -> Side:
    """`ref` as runs: a sweep cell's finished seeds, or the one run behind a run id or a registered version."""
    store = store or open_store()
    m = re.fullmatch(r"([0-9a-f]{32})/(.+)", ref)
    if m:  # a sweep cell: its seeds
        want = {k: v for k, v in _levels(m[2]).items() if k != "seed"}
        parent = store.get_run(m[1])
        if parent is None:
            raise DiffError(f"{ref}: no run {m[1]} in {store.uri}")
        runs = [r for r in store.children(parent)
                if r.info.status == "FINISHED" and {k: v for k, v in _levels(r.data.tags.get("nnlab.sweep_cell", "")
                                                                              ).items() if k != "seed"} == want]
        if not runs:
            raise DiffError(f"{ref}: no finished cell {m[2]!r} under sweep parent run {m[1]}")
        return Side(ref, runs, cell=True)
    try:
        run_id = run_of(ref, store)
    except (LookupError, ValueError) as e:
        raise DiffError(str(e)) from None
    run = store.get_run(run_id)
    if run is None:
        raise DiffError(f"{ref}: no run {run_id} in {store.uri}")
    return Side(ref, [run])


def _ci(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and 95% half-width (None for one value); NaN as None, so the JSON stays JSON."""
    from tasks.effects import ci95

    mean, half = ci95(values)
    return (mean if mean == mean else None), (half if len(values) > 1 and half == half else None)


def _one(values: set) -> str | None:
    return next(iter(values)) if len(values) == 1 else (", ".join(sorted(map(str, values))) if values else None)


def diff(a_ref: str, b_ref: str, store=None) -> dict:
    """A against B (see the module); `store` (tasks/store_reader.py): read through it, default open_store()."""
    store = store or open_store()
    a, b = side(a_ref, store), side(b_ref, store)
    if a.kind and b.kind and a.kind != b.kind:
        raise DiffError(f"{a_ref} is a {a.kind} run and {b_ref} a {b.kind} run: their params and metrics do not "
                        "compare; diff two runs of one kind")
    cells = a.cell or b.cell

    def values(s: Side, key: str, where: str) -> str | None:
        return _one({getattr(r.data, where)[key] for r in s.runs if key in getattr(r.data, where)})

    keys = {k for s in (a, b) for r in s.runs for k in r.data.params} - ({"seed"} if cells else set())
    params = {k: [values(a, k, "params"), values(b, k, "params")] for k in sorted(keys)}
    params = {k: v for k, v in params.items() if v[0] != v[1]}
    identity = {k: [values(a, k, "tags"), values(b, k, "tags")] for k in IDENTITY}
    identity = {k: v for k, v in identity.items() if v[0] != v[1]}
    metrics = {}
    shared = set.intersection(*({k for k in r.data.metrics if not k.startswith(SERIES)} for r in a.runs + b.runs))
    for k in sorted(shared):
        (ma, ha), (mb, hb) = (_ci([r.data.metrics[k] for r in s.runs]) for s in (a, b))
        delta = mb - ma if ma is not None and mb is not None else None
        metrics[k] = {"a": ma, "b": mb, "delta": delta, **({"a_ci95": ha, "b_ci95": hb} if cells else {})}
    return {"a": {"ref": a_ref, "kind": a.kind, "runs": [r.info.run_id for r in a.runs]},
            "b": {"ref": b_ref, "kind": b.kind, "runs": [r.info.run_id for r in b.runs]},
            "params": params, "metrics": metrics, "identity": identity}

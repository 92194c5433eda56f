"""The door to MLflow's model registry: versions registered by the project's rules (one dataset per registered
model, never the same result twice, `champion` only for a better and healthy score), and a logged or registered
model found again by reference (its checkpoint, vocabularies and metadata)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from tasks import quick
from tasks.descriptions import model_description, registry_line, train_longer, version_description
from tasks.tracking import Run, client, tracking_uri


# What makes two registered versions the same result: the run's tags that a version copies.
IDENTITY = ("nnlab.dataset", "nnlab.data_hash", "nnlab.params_hash", "nnlab.code_hash")

# Health tags (nnlab.health.<rule> = true) that bar a run from `champion`: it trained on broken gradients or its
# generator collapsed. Such a run may still be registered, as `challenger`, with the reason as a tag. Dead units
# alone are a warning: a net with many dead ReLUs can still be the best one.
BLOCKS_CHAMPION = ("vanishing", "exploding", "mode_collapse")


def champion_blockers(result: dict) -> list[str]:
    """The health rules in a result's `health` that bar it from `champion` (none in a quick run: tasks/quick.py)."""
    return sorted(set(result.get("health") or []) & set(BLOCKS_CHAMPION)) if quick.gates() else []


def register_best(name: str, metric: str, results: list[dict], min_delta: float = 0.0, higher: bool = True) -> dict:
    """Register the best result's model under `name` (see `register_version`): the highest `metric`, or the
    lowest with higher=False. A result barred by its health (`champion_blockers`) competes only when no healthy
    result has the metric, and then as `challenger`."""
    ok = [r for r in results if r.get(metric) is not None]
    if not ok:
        raise ValueError(f"nothing to register: no result has {metric!r}")
    trivial = [r for r in ok if r.get("beats_baseline") is False and quick.gates()]
    ok = [r for r in ok if r not in trivial]
    if not ok:  # a model at chance is no model: nothing goes into the registry; say what to do about it
        out = {"name": name, "registered": False, "metric": metric,
               "reason": "no run beats its trivial baseline (" + "; ".join(f"{r['name']}: {r['baseline']}"
                                                                      for r in trivial) + "); " + train_longer(trivial)}
        for r in trivial:
            describe_run(r.get("run_id"), registry_line(out))
        return out
    best = (max if higher else min)([r for r in ok if not champion_blockers(r)] or ok, key=lambda r: r[metric])
    out = register_version(name, best["model_uri"], best[metric], min_delta,
                           {"nnlab.run": best["name"], "nnlab.run_id": best["run_id"], metric: best[metric],
                            "nnlab.metric": metric}, higher=higher, blocked=champion_blockers(best))
    for r in ok:  # the others: why not them
        if r is not best:
            describe_run(r.get("run_id"), f"**Registry:** not registered in {name}: {best['name']} ranked first "
                                          f"({metric} {best[metric]:.4f})")
    for r in trivial:
        describe_run(r.get("run_id"), f"**Registry:** not registered in {name}: does not beat its trivial baseline "
                                      f"({r['baseline']})")
    return {**out, "run_id": best["run_id"], "model": best["name"], metric: best[metric]}


def describe_run(run_id: str | None, registry: str) -> None:
    """The run's description: its headline and `registry`, what the registry made of it. Descriptive: a run that
    cannot be described (not in this store) is one line, never a failed registration."""
    if not run_id:
        return
    try:
        Run(run_id).describe(registry)
    except Exception as e:
        print(f"MLflow run {run_id}: description not written ({type(e).__name__}: {str(e)[:200]})", flush=True)


def register_version(name: str, model_uri: str, score: float, min_delta: float, tags: dict,
                     higher: bool = True, blocked: list[str] | tuple = ()) -> dict:
    """New version of `name`; alias `champion` moves to it only when `score` beats the current champion's by
    more than `min_delta` (higher is better, or lower with higher=False: test_rmse), else it gets
    `challenger`. A version `blocked` by health rules (mode collapse, vanishing or exploding gradients) is
    never champion, even as the first. The decision and the numbers behind it are tags of the version."""
    import mlflow

    c = client()
    identity, refused = _identity_and_refusal(c, name, score, tags)
    if refused is not None:
        describe_run(tags.get("nnlab.run_id"), registry_line(refused))
        return refused
    champ, champ_score = _champion(c, name, tags.get("nnlab.metric", "test_accuracy"))
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow's "Successfully registered…": nnlab says it itself
        version = mlflow.register_model(model_uri, name)
    if blocked:
        wins = False
    elif champ_score is None or champ_score != champ_score:
        wins = True
    else:
        wins = score > champ_score + min_delta if higher else score < champ_score - min_delta
    alias = "champion" if wins else "challenger"
    if blocked:
        decision = f"health: {', '.join(blocked)}: never champion, registered as challenger"
        tags = {**tags, "nnlab.not_champion": ", ".join(blocked)}
    elif champ is None:
        decision = "first version: champion"
    else:
        decision = f"{score:.4f} vs champion v{champ.version} {champ_score:.4f} (min_delta {min_delta}): {alias}"
    if not quick.gates():
        tags = {**tags, "nnlab.quick": "true"}
        decision += "; quick run (NNLAB_QUICK): registered without the baseline and health gates"
    for k, v in {**tags, **identity, "nnlab.score": score, "nnlab.decision": decision, "nnlab.alias": alias,
                 "nnlab.previous_champion_score": champ_score}.items():
        c.set_model_version_tag(name, version.version, k, str(v))
    c.set_registered_model_alias(name, alias, version.version)
    out = {"name": name, "registered": True, "version": int(version.version), "alias": alias, "score": score,
           "previous_champion": champ_score, "decision": decision}
    _describe(c, out, tags, higher)
    return out


def _describe(c, outcome: dict, tags: dict, higher: bool) -> None:
    """In words (tasks/descriptions.py): the new version's description (its score, the decision, its run), the
    registered model's (its kind, its data, its ranking) and the run's (its headline and this decision)."""
    metric, run_id = tags.get("nnlab.metric", "test_accuracy"), tags.get("nnlab.run_id")
    try:
        run_tags = c.get_run(run_id).data.tags if run_id else {}
        c.update_model_version(outcome["name"], str(outcome["version"]), description=version_description(
            metric, outcome["score"], outcome, tags, run_tags.get("nnlab.run")))
        c.update_registered_model(outcome["name"], description=model_description(
            run_tags.get("nnlab.kind"), run_tags.get("nnlab.dataset"), metric, higher))
    except Exception as e:  # descriptive: never fails a registration done
        print(f"{outcome['name']} v{outcome['version']}: description not written ({type(e).__name__}: "
              f"{str(e)[:200]})", flush=True)
    describe_run(run_id, registry_line(outcome))


def _identity_and_refusal(c, name: str, score: float, tags: dict) -> tuple[dict, dict | None]:
    """(the dataset, data, params and code of the run behind the model, or {} when no run is named; the outcome
    of a refusal or None): a registered model holds one dataset, and the same result is never registered twice."""
    if not tags.get("nnlab.run_id"):
        return {}, None
    run_tags = c.get_run(tags["nnlab.run_id"]).data.tags
    identity = {k: run_tags[k] for k in IDENTITY if k in run_tags}
    versions = _versions(c, name)  # read once: the dataset rule and the duplicate rule look at the same list
    held = {v.tags.get("nnlab.dataset") for v in versions} - {None, identity.get("nnlab.dataset")}
    not_registered = {"name": name, "registered": False, "version": None, "alias": None, "score": score,
                      "previous_champion": None}
    if held and identity.get("nnlab.dataset"):  # one registered model, one dataset: never compared across
        return identity, {**not_registered,
                          "reason": f"{name} holds models trained on {', '.join(sorted(held))}, this one on "
                                    f"{identity['nnlab.dataset']}: set register.name to auto (one registered model "
                                    "per dataset) or to a name of this dataset's own"}
    same = _same_result(versions, identity, score)
    if same is not None:
        return identity, {**not_registered, "version": int(same.version),
                          "reason": f"identical to version {same.version} (same dataset, data, params and code, "
                                    "same score)"}
    return identity, None


def _champion(c, name: str, metric: str):
    """(the current champion version or None, its score or None)."""
    try:
        champ = c.get_model_version_by_alias(name, "champion")
        champ_score = float(champ.tags.get("nnlab.score", "nan"))
        if champ_score != champ_score:  # registered before scores were tagged: its run's metric
            champ_score = c.get_run(champ.run_id).data.metrics.get(metric, float("nan"))
    except Exception:  # no such model or alias yet
        return None, None
    return champ, champ_score


def _versions(c, name: str) -> list:
    try:
        return c.search_model_versions(f"name = '{name}'", max_results=1000)
    except Exception:  # no such registered model yet
        return []


def _same_result(versions: list, identity: dict[str, str], score: float):
    """The version among `versions` with the same identity (every IDENTITY tag known and equal) and the same score: the
    same run again (training is seeded, so the same inputs give the same model). None when there is none."""
    import math

    if len(identity) < len(IDENTITY):
        return None
    for v in versions:
        try:
            same_score = math.isclose(float(v.tags.get("nnlab.score", "nan")), score, rel_tol=1e-9, abs_tol=1e-12)
        except ValueError:
            same_score = False
        if same_score and all(v.tags.get(k) == val for k, val in identity.items()):
            return v
    return None


def resolve_model_uri(ref: str) -> str:
    """A pinned URI for `ref`, checked against the project's store (`tracking_uri()`, which it also makes MLflow's
    for the loads that follow: never MLflow's default ./mlflow.db): models:/<name>@<alias> -> models:/<name>/<version>
    (an alias may move later), a bare run id -> runs:/<id>/model; models:/<name>/<version> and runs:/<id>/... as
    given, once the version or run is found there."""
    import re

    c = client()  # sets MLflow's tracking URI to the project's store
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        ref = f"runs:/{ref}/model"
    if re.fullmatch(r"models:/[^@/]+(@[\w.-]+|/\d+)", ref):  # the store reader's rule (the per-dataset name too)
        from tasks.store_reader import MlflowStore, version_of

        name, version = version_of(ref, MlflowStore())
        return f"models:/{name}/{version}"
    m = re.fullmatch(r"models:/([^@/]+)/(\d+)(/.*)?", ref)
    if m:
        try:
            c.get_model_version(m[1], m[2])
        except Exception as e:
            raise LookupError(f"{ref}: no version {m[2]} of registered model {m[1]!r} in {tracking_uri()} "
                              f"({type(e).__name__})") from None
        return ref
    m = re.fullmatch(r"runs:/([0-9a-f]{32})(/.*)?", ref)
    if m:
        try:
            c.get_run(m[1])
        except Exception as e:
            raise LookupError(f"{ref}: no run {m[1]} in {tracking_uri()} ({type(e).__name__})") from None
        return ref
    raise ValueError(f"{ref!r} is not a model reference: use models:/<name>@<alias>, models:/<name>/<version>, "
                     "runs:/<run id>/model or a run id")


def load_checkpoint(ref: str) -> tuple[dict, str]:
    """(the self-describing checkpoint a training run logged under checkpoint/model.pt, the pinned URI of `ref`),
    read as weights and plain data only (tasks.files.load_torch): a planted pickle is refused, never run."""
    from tasks.files import load_torch
    from tasks.store_reader import local_model

    local = local_model(ref)  # a registered version in a local SQLite store: its files read without MLflow
    if local is not None:
        return load_torch(local.checkpoint), local.uri
    import mlflow.artifacts

    uri = resolve_model_uri(ref)
    c = client()
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/")[0]
    else:
        name, version = uri[len("models:/"):].split("/")[:2]
        try:
            run_id = c.get_model_version(name, version).run_id
        except Exception as e:
            raise LookupError(f"{uri}: no such model version in {tracking_uri()} ({type(e).__name__})") from None
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/model.pt",
                                                    tracking_uri=tracking_uri())
    except Exception as e:
        raise LookupError(f"{uri}: run {run_id} has no checkpoint/model.pt artifact (not trained by nnlab?): "
                          f"{type(e).__name__}") from None
    return load_torch(local), uri


def extra_file(uri: str, name: str) -> dict | None:
    """A JSON file logged beside a model (its vocabularies), or None when it has none."""
    import json

    from tasks.store_reader import local_model

    local = local_model(uri)
    if local is not None:
        return local.extra(name)
    import mlflow.artifacts

    try:
        return json.loads(Path(mlflow.artifacts.download_artifacts(f"{uri}/extra_files/{name}",
                                                                   tracking_uri=tracking_uri())).read_text())
    except Exception:
        return None


def model_metadata(uri: str) -> dict:
    """The metadata logged with a model (its MLmodel file: YAML, no code)."""
    from tasks.store_reader import local_model

    local = local_model(uri)
    if local is not None:
        return local.metadata()
    from mlflow.models import get_model_info

    try:
        return get_model_info(uri).metadata or {}
    except Exception as e:
        raise LookupError(f"{uri}: cannot read the model's description from {tracking_uri()} ({type(e).__name__}: {e})"
                          ) from None

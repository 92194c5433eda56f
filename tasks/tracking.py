"""The one module that talks to MLflow. Everything else hands it plain dicts, figures and modules."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


# Offline, MLflow's telemetry thread deletes an environment variable while a REST call's proxy lookup iterates
# os.environ: a random KeyError in log_batch against a tracking server. MLflow is imported below this line only.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_STORE = Path("mlruns")
RUN_TAGS = ("nnlab.model", "nnlab.family", "nnlab.dataset", "nnlab.git_commit", "nnlab.data_hash", "nnlab.params_hash")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the project's SQLite store under mlruns/."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    # SQLite stores keep artifacts beside the database (mlruns/artifacts), not in the working directory.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def store_path() -> Path | None:
    """The SQLite database file of the tracking store, when it is one."""
    uri = tracking_uri()
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_store() -> None:
    """Fail at once (StoreWriteError, one line) when the tracking store cannot be written: its database file or
    artifact folder sits under a regular file, is read-only, or the disk is full. Called before any work, so a
    run never prepares data or boots a server only to find it cannot record anything. A remote store (a
    tracking server, PostgreSQL) is checked by its first write."""
    from tasks.files import StoreWriteError, check_writable

    db = store_path()
    if db is None:
        uri = tracking_uri()
        if "://" not in uri or uri.startswith("file://"):  # a local folder store
            check_writable(Path(uri[len("file://"):] if uri.startswith("file://") else uri), "MLflow store")
        return
    check_writable(db.parent, "MLflow store")
    if db.exists() and (db.is_dir() or not os.access(db, os.W_OK)):
        raise StoreWriteError(f"MLflow store: read-only: {db}" if not db.is_dir() else
                              f"MLflow store: {db} is a folder, not a SQLite database file")
    check_writable(db.parent / "artifacts", "MLflow store")


def client():
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return _Retrying(MlflowClient(uri))


_MODEL_LOGGING_READY = threading.Event()


def prepare_model_logging() -> None:
    """Start, once per process and in the background, the one-off work of a process's first `log_model`:
    MLflow's map of installed packages (it checks the model's pip requirements against it; ~1.5 s, cached for
    the process) and torch.export's modules. Called as training starts: done while the model trains, it is off
    the time after training. Nothing depends on it finishing; log_model does the same work itself if need be."""
    if _MODEL_LOGGING_READY.is_set():
        return
    _MODEL_LOGGING_READY.set()

    def work():
        try:
            import torch.export  # noqa: F401
            from mlflow.utils import requirements_utils

            requirements_utils._init_packages_to_modules_map()  # what warn_dependency_requirement_mismatches calls
        except Exception:  # an MLflow without it: log_model builds the map itself
            pass

    threading.Thread(target=work, name="nnlab-model-logging-warm-up", daemon=True).start()


class _Retrying:
    """MlflowClient whose calls retry for a while when SQLite says the database is locked (parallel cells
    writing at the same moment); any other error goes straight through."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            for attempt in range(40):
                try:
                    return attr(*args, **kwargs)
                except Exception as e:
                    if "database is locked" not in str(e) or attempt == 39:
                        raise
                    time.sleep(min(0.05 * 2 ** attempt, 1.0))

        return call


def prepare_store(experiment: str) -> str:
    """Create and migrate the store and the experiment once, before parallel writers start (8 processes
    opening a brand-new SQLite store at once race on its schema migration). Also switches SQLite to WAL,
    so readers never block the writer. Returns the experiment id."""
    exp = experiment_id(experiment)
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(uri[len("sqlite:///"):], timeout=30) as con:
            con.execute("PRAGMA journal_mode=WAL")
    return exp


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_artifact_root(tracking_uri()))
    except Exception:  # created meanwhile by a parallel process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# What makes two registered versions the same result: the run's tags that a version copies.
IDENTITY = ("nnlab.dataset", "nnlab.data_hash", "nnlab.params_hash", "nnlab.code_hash")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Health tags (nnlab.health.<rule> = true) that bar a run from `champion`: it trained on broken gradients or its
# generator collapsed. Such a run may still be registered, as `challenger`, with the reason as a tag. Dead units
# alone are a warning: a net with many dead ReLUs can still be the best one.
BLOCKS_CHAMPION = ("vanishing", "exploding", "mode_collapse")


def champion_blockers(result: dict) -> list[str]:
    """The health rules in a result's `health` that bar it from `champion`."""
    return sorted(set(result.get("health") or []) & set(BLOCKS_CHAMPION))


def fired_health(tags: dict[str, str]) -> list[str]:
    """The health rules that fired for a run: its nnlab.health.* tags set to true."""
    return sorted(k[len("nnlab.health."):] for k, v in tags.items() if k.startswith("nnlab.health.") and v == "true")


class Run:
    """A handle on one MLflow run: new (`Run.start`) or reopened (`Run.reopen`) after a crash."""

    def __init__(self, run_id: str):
        self.c = client()
        self.run_id = run_id
        self._logged_steps: set[int] | None = None
        self._series_upto = 0  # step-level series (diagnostics) already logged before a resume

    @classmethod
    def start(cls, experiment: str, name: str, tags: dict[str, str], params: dict[str, str],
              parent_run_id: str | None = None) -> "Run":
        from mlflow.entities import Param, RunTag

        c = client()
        all_tags = {"mlflow.runName": name, **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = c.create_run(experiment_id(experiment), run_name=name, tags=all_tags)
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            c.log_batch(run.info.run_id, params=items[i:i + 100], tags=[RunTag("nnlab.status", "training")])
        return cls(run.info.run_id)

    @classmethod
    def reopen(cls, run_id: str) -> "Run":
        r = cls(run_id)
        r.c.update_run(run_id, status="RUNNING")
        r._logged_steps = {m.step for m in r.c.get_metric_history(run_id, "train_loss")}
        r._series_upto = max((m.step for m in r.c.get_metric_history(run_id, "health/grad_norm")), default=0)
        return r

    def log_dataset(self, manifest: dict, data_dir: str | Path) -> None:
        """The prepared data as the run's MLflow dataset input (the runs list's Dataset column): its source as the
        name, the data hash as the digest, the split sizes and shapes as the profile and schema."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=manifest["source"], digest=manifest["data_hash"][:36], source_type="local",
            source=json.dumps({"uri": str(Path(data_dir).resolve())}),
            schema=json.dumps({"input_shape": manifest.get("input_shape"), "num_classes": manifest.get("num_classes")}),
            profile=json.dumps({"sizes": manifest.get("sizes", {})}))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
        for attempt in range(5):
            try:
                self.c.log_inputs(self.run_id, inputs)
                return
            except Exception as e:  # parallel cells race to insert the same dataset row: the next try reuses it
                if "unique constraint" not in str(e).lower() or attempt == 4:  # descriptive: never fail the run on it
                    print(f"MLflow run {self.run_id}: dataset input not logged ({type(e).__name__}: {str(e)[:200]})",
                          flush=True)
                    return
                time.sleep(0.05 * (attempt + 1))

    def log_epoch(self, step: int, metrics: dict[str, float]) -> None:
        """One write per epoch: all values in a single batch."""
        if self._logged_steps and step in self._logged_steps:
            return  # logged before the crash this run resumed from
        self.log_metrics(metrics, step)

    def log_series(self, records: list[tuple[int, dict[str, float]]]) -> None:
        """Step-level values (e.g. diagnostics) in as few writes as MLflow allows (1000 values each)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for step, rec in records if step > self._series_upto
                 for k, v in rec.items()]
        for i in range(0, len(items), 1000):
            self.c.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.c.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def tags(self) -> dict[str, str]:
        return dict(self.c.get_run(self.run_id).data.tags)

    def health(self) -> list[str]:
        return fired_health(self.tags())

    def mark_interrupted(self, reason: str) -> None:
        """KILLED with `reason`, in one try each. The interrupt may have cut an MLflow write short and left the
        SQLite store locked until this process ends; waiting on it (the retries) would keep Ctrl-C from ending
        the process. If it cannot be written the run stays RUNNING, and resuming works all the same."""
        from mlflow.entities import RunTag

        try:
            self.c._inner.log_batch(self.run_id, tags=[RunTag("nnlab.error", reason), RunTag("nnlab.status", "killed")])
            self.c._inner.set_terminated(self.run_id, status="KILLED")
        except Exception as e:
            print(f"MLflow run {self.run_id} not marked KILLED ({type(e).__name__}: {str(e)[:80]}); the same command "
                  "resumes it", flush=True)

    def abandon(self, reason: str) -> None:
        """After a failed write (disk full, read-only): FAILED with `reason`, in one try (the store itself may be
        what cannot be written), and the partial model and checkpoint artifacts removed, with any logged-model
        entry that did not get to READY."""
        import shutil
        from urllib.parse import unquote, urlparse

        from mlflow.entities import RunTag

        def remove(uri: str, *subs: str) -> None:
            where = urlparse(uri)
            if where.scheme in ("", "file"):  # a local artifact store (a server's own cleans up after itself)
                for sub in subs or ("",):
                    shutil.rmtree(Path(unquote(where.path)) / sub, ignore_errors=True)

        try:
            info = self.c._inner.get_run(self.run_id).info
            remove(info.artifact_uri, "model", "checkpoint")
            for m in self.c._inner.search_logged_models([info.experiment_id], max_results=1000):
                if m.source_run_id == self.run_id:  # the served model of a run that failed: no use to anyone
                    remove(m.artifact_location)
                    self.c._inner.delete_logged_model(m.model_id)
        except Exception:
            pass
        try:
            self.c._inner.log_batch(self.run_id, tags=[RunTag("nnlab.error", reason[:5000]),
                                                       RunTag("nnlab.status", "failed")])
            self.c._inner.set_terminated(self.run_id, status="FAILED")
        except Exception:
            pass

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_figure(self, fig, path: str, close: bool = True) -> None:
        import matplotlib.pyplot as plt

        self.c.log_figure(self.run_id, fig, path)
        if close:  # pyplot keeps every open figure alive: a sweep worker would pile them up
            plt.close(fig)

    def log_dict(self, d: dict, path: str) -> None:
        self.c.log_dict(self.run_id, d, path)

    def log_file(self, local: str | Path, folder: str | None = None) -> None:
        self.c.log_artifact(self.run_id, str(local), folder)

    def log_text(self, text: str, path: str) -> None:
        self.c.log_text(self.run_id, text, path)

    def log_model(self, module, example, metadata: dict | None = None, extra_files: list | None = None) -> str:
        """Log `module` (raw inputs -> class probabilities) with signature and input example; returns its URI."""
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        import numpy as np
        import torch

        with torch.no_grad():
            out = module(torch.as_tensor(example)).numpy()
        signature = infer_signature(example, out)
        with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pytorch.log_model(
                module, name="model", signature=signature, input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], metadata=metadata,
                extra_files=[str(f) for f in extra_files] if extra_files else None,
                # torch.export cannot trace packed sequences (their lengths are data): those models are pickled
                serialization_format="pickle" if not np.issubdtype(np.asarray(example).dtype, np.floating) else None,
            )
            self.c.update_run(self.run_id, status="RUNNING")  # leaving the context marked it FINISHED
        return info.model_uri

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        if error:
            self.set_tags({"nnlab.error": error[:5000]})
        self.set_tags({"nnlab.status": status.lower()})
        self.c.set_terminated(self.run_id, status=status)



def register_best(name: str, metric: str, results: list[dict], min_delta: float = 0.0, higher: bool = True) -> dict:
    """Register the best result's model under `name` (see `register_version`): the highest `metric`, or the
    lowest with higher=False. A result barred by its health (`champion_blockers`) competes only when no healthy
    result has the metric, and then as `challenger`."""
    ok = [r for r in results if r.get(metric) is not None]
    if not ok:
        raise ValueError(f"nothing to register: no result has {metric!r}")
    trivial = [r for r in ok if r.get("beats_baseline") is False]
    ok = [r for r in ok if r.get("beats_baseline") is not False]
    if not ok:  # a model at chance is no model: nothing goes into the registry
        return {"name": name, "registered": False, "metric": metric,
                "reason": "no run beats its trivial baseline (" + "; ".join(f"{r['name']}: {r['baseline']}"
                                                                       for r in trivial) + ")"}
    best = (max if higher else min)([r for r in ok if not champion_blockers(r)] or ok, key=lambda r: r[metric])
    out = register_version(name, best["model_uri"], best[metric], min_delta,
                           {"nnlab.run": best["name"], "nnlab.run_id": best["run_id"], metric: best[metric],
                            "nnlab.metric": metric}, higher=higher, blocked=champion_blockers(best))
    return {**out, "run_id": best["run_id"], "model": best["name"], metric: best[metric]}


def register_version(name: str, model_uri: str, score: float, min_delta: float, tags: dict,
                     higher: bool = True, blocked: list[str] | tuple = ()) -> dict:
    """New version of `name`; alias `champion` moves to it only when `score` beats the current champion's by
    more than `min_delta` (higher is better, or lower with higher=False: test_rmse), else it gets
    `challenger`. A version `blocked` by health rules (mode collapse, vanishing or exploding gradients) is
    never champion, even as the first. The decision and the numbers behind it are tags of the version."""
    import mlflow

    c = client()
    identity = {}
    if tags.get("nnlab.run_id"):  # the dataset, data, params and code of the run behind the model
        run_tags = c.get_run(tags["nnlab.run_id"]).data.tags
        identity = {k: run_tags[k] for k in IDENTITY if k in run_tags}
        versions = _versions(c, name)  # read once: the dataset rule and the duplicate rule look at the same list
        held = {v.tags.get("nnlab.dataset") for v in versions} - {None, identity.get("nnlab.dataset")}
        if held and identity.get("nnlab.dataset"):  # one registered model, one dataset: never compared across
            return {"name": name, "registered": False, "version": None, "alias": None, "score": score,
                    "previous_champion": None,
                    "reason": f"{name} holds models trained on {', '.join(sorted(held))}, this one on "
                              f"{identity['nnlab.dataset']}: set register.name to auto (one registered model per "
                              "dataset) or to a name of this dataset's own"}
        same = _same_result(versions, identity, score)
        if same is not None:
            return {"name": name, "registered": False, "version": int(same.version), "alias": None,
                    "score": score, "previous_champion": None,
                    "reason": f"identical to version {same.version} (same dataset, data, params and code, same "
                              "score)"}
    try:
        champ = c.get_model_version_by_alias(name, "champion")
        champ_score = float(champ.tags.get("nnlab.score", "nan"))
        if champ_score != champ_score:  # registered before scores were tagged: its run's metric
            metric = tags.get("nnlab.metric", "test_accuracy")
            champ_score = c.get_run(champ.run_id).data.metrics.get(metric, float("nan"))
    except Exception:  # no such model or alias yet
        champ, champ_score = None, None
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
    for k, v in {**tags, **identity, "nnlab.score": score, "nnlab.decision": decision,
                 "nnlab.previous_champion_score": champ_score}.items():
        c.set_model_version_tag(name, version.version, k, str(v))
    c.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "registered": True, "version": int(version.version), "alias": alias, "score": score,
            "previous_champion": champ_score, "decision": decision}


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


# ---------------------------------------------------------------- sweeps

def child_runs(parent_run_id: str) -> list[dict]:
    """The sweep's child runs, newest first: run id, cell, status, metrics, tags, params."""
    c = client()
    parent = c.get_run(parent_run_id)
    runs = c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                         order_by=["attributes.start_time DESC"], max_results=5000)
    return [{"run_id": r.info.run_id, "cell": r.data.tags.get("nnlab.sweep_cell"), "status": r.info.status,
             "metrics": dict(r.data.metrics), "tags": dict(r.data.tags), "params": dict(r.data.params),
             "start_time": r.info.start_time} for r in runs]


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client().get_metric_history(run_id, key)]


def load_artifact_json(run_id: str, path: str) -> dict:
    import json

    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracking_uri())
    return json.loads(Path(local).read_text())


# ---------------------------------------------------------------- reuse of logged models

def resolve_model_uri(ref: str) -> str:
    """A pinned URI for `ref`, checked against the project's store (`tracking_uri()`, which it also makes MLflow's
    for the loads that follow: never MLflow's default ./mlflow.db): models:/<name>@<alias> -> models:/<name>/<version>
    (an alias may move later), a bare run id -> runs:/<id>/model; models:/<name>/<version> and runs:/<id>/... as
    given, once the version or run is found there."""
    import re

    c = client()  # sets MLflow's tracking URI to the project's store
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        ref = f"runs:/{ref}/model"
    m = re.fullmatch(r"models:/([^@/]+)@([\w.-]+)", ref)
    if m:
        name = _per_dataset(c, m[1])
        try:
            version = c.get_model_version_by_alias(name, m[2]).version
        except Exception as e:
            raise LookupError(f"{ref}: no registered model {name!r} with alias {m[2]!r} in {tracking_uri()} "
                              f"({type(e).__name__})") from None
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


def _per_dataset(c, name: str) -> str:
    """`name` itself when registered; else the one `name-<dataset>` there is (register.name auto registers one
    model per dataset: models:/nnlab-asr@champion finds nnlab-asr-synth_speech); several: an error naming them."""
    try:
        c.get_registered_model(name)
        return name
    except Exception:
        pass
    found = sorted(m.name for m in c.search_registered_models(f"name LIKE '{name}-%'", max_results=1000))
    if len(found) > 1:
        raise LookupError(f"models:/{name}: one registered model per dataset; name one of: {', '.join(found)}")
    return found[0] if found else name


def load_checkpoint(ref: str) -> tuple[dict, str]:
    """(the self-describing checkpoint a training run logged under checkpoint/model.pt, the pinned URI of `ref`),
    read as weights and plain data only (tasks.files.load_torch): a planted pickle is refused, never run."""
    import mlflow.artifacts

    from tasks.files import load_torch

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

    import mlflow.artifacts

    try:
        return json.loads(Path(mlflow.artifacts.download_artifacts(f"{uri}/extra_files/{name}",
                                                                   tracking_uri=tracking_uri())).read_text())
    except Exception:
        return None


def model_metadata(uri: str) -> dict:
    """The metadata logged with a model (its MLmodel file: YAML, no code)."""
    from mlflow.models import get_model_info

    try:
        return get_model_info(uri).metadata or {}
    except Exception as e:
        raise LookupError(f"{uri}: cannot read the model's description from {tracking_uri()} ({type(e).__name__}: {e})"
                          ) from None

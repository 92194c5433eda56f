"""The door to MLflow's tracking: the store, runs and what they log (tasks/registration.py is the door to its model
registry). Everything else hands them plain dicts, figures and modules."""
from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import warnings
from pathlib import Path

from tasks import quick
from tasks.interrupts import signals_held


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
    return f"sqlite:///{((quick.store() or DEFAULT_STORE) / 'mlflow.db').resolve()}"  # NNLAB_QUICK: a store apart


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
    if uri.startswith("sqlite:///") and uri not in _OPENED:
        open_sqlite_store(uri)
        logging.getLogger("mlflow.store.db.utils").addFilter(_not_raised_errors)
    mlflow.set_tracking_uri(uri)
    return _Retrying(MlflowClient(uri))


_OPENED: set[str] = set()  # SQLite stores this process has opened (created and migrated if need be)


def _not_raised_errors(record: logging.LogRecord) -> bool:
    """Drops MLflow's log of an SQL store's error (a read-only or full disk, a locked database), a traceback
    on stderr each time: the same error is raised to the caller, which retries it, explains it in one line or
    lets it through with its own traceback."""
    return not str(record.msg).startswith("SQLAlchemy database error")


def open_sqlite_store(uri: str) -> None:
    """Open the SQLite store at `uri` for this process, creating and migrating it if it is new, under an
    inter-process lock (flock on <db>.lock beside it): MLflow creates a missing store's tables by running its
    migrations, and two processes doing that at once (two `nnlab run` on a fresh store) crash one of them
    (alembic: `... 0 found`, then `duplicate column name`). The kernel drops the lock when its holder ends,
    however it ends. A store whose folder takes no lock file (read-only) is opened without it: it is not created."""
    import fcntl

    from mlflow.tracking import MlflowClient

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(db.with_name(db.name + ".lock"), "a")
    except OSError:
        lock = None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process creates the store
        # a new store's "Creating initial MLflow database tables" / "Updating database tables" and alembic's lines:
        # not the user's run (the CLI prints where the store is)
        for name in ("mlflow.store.db.utils", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        c = MlflowClient(uri)
        c.search_experiments(max_results=1)  # the tracking tables: created and migrated here when new
        c.search_registered_models(max_results=1)  # the registry's
    finally:
        if lock is not None:
            lock.close()  # releases the lock
    _OPENED.add(uri)


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
    writing at the same moment); any other error goes straight through. Ctrl-C and SIGTERM wait for a call to
    end (signals_held): never one cut in half, its transaction left open and the store locked."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            for attempt in range(40):
                try:
                    with signals_held():
                        return attr(*args, **kwargs)
                except Exception as e:
                    if "database is locked" not in str(e) or attempt == 39:
                        raise
                    time.sleep(min(0.05 * 2 ** attempt, 1.0))

        return call


def prepare_store(experiment: str) -> str:
    """Create the store (client: under a lock) and the experiment once, before parallel writers start. Also
    switches SQLite to WAL, so readers never block the writer. Returns the experiment id."""
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


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The runs list's one column for every kind: each run logs its kind's main metric (test_accuracy, test_bleu,
# test_wer, test_rmse, ...: tasks/descriptions.py headline) a second time as `headline`, and names it in the tag
# nnlab.headline_metric. One unprefixed word, so it sits with the run's own metrics (MLflow charts metrics named
# `prefix/...`, such as the diagnostics' health/* and layers/*, in sections of their own). Its direction is the
# metric's: higher accuracy wins, lower WER wins; compare headlines of one kind only.
HEADLINE = "headline"
NOTE = "mlflow.note.content"  # the run's description: shown on its page (Markdown)


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

    def mark_interrupted(self, reason: str, patience: float = 5.0) -> bool:
        """KILLED with `reason`; False (said in one line) if the store would not take it within `patience` seconds
        (other processes writing: a sweep's cells all stop at once). The run then stays RUNNING, and resuming
        works all the same."""
        from mlflow.entities import RunTag

        deadline = time.monotonic() + patience
        while True:
            try:
                with signals_held():
                    self.c._inner.log_batch(self.run_id, tags=[RunTag("nnlab.error", reason),
                                                               RunTag("nnlab.status", "killed")])
                    self.c._inner.set_terminated(self.run_id, status="KILLED")
                return True
            except Exception as e:
                if "database is locked" in str(e) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                print(f"MLflow run {self.run_id} not marked KILLED ({type(e).__name__}: {str(e)[:80]}); the same "
                      "command resumes it", flush=True)
                return False

    def abandon(self, reason: str) -> str:
        """After a failed write (disk full, read-only): FAILED with `reason`, in one try (the store itself may be
        what cannot be written), and the partial model and checkpoint artifacts removed, with any logged-model
        entry that did not get to READY. Returns the run's state in the store, in words: `is FAILED`, or when the
        store took no write, `stays RUNNING in the store (which cannot be written)`."""
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
            return "stays RUNNING in the store (which cannot be written)"
        return "is FAILED"

    def log_headline(self, kind: str, metric: str, value: float, text: str, registry: str | None = None) -> None:
        """The run's headline (tasks/descriptions.py): its metric `headline` (see HEADLINE), its kind and headline as
        tags, and its description, with `registry` (what the registry made of it) when known already."""
        self.log_metrics({HEADLINE: value})
        self.set_tags({"nnlab.kind": kind, "nnlab.headline_metric": metric, "nnlab.headline": text,
                       NOTE: "\n\n".join(filter(None, [text, registry]))})

    def describe(self, registry: str) -> None:
        """The run's description: its headline and `registry`, what the registry made of it."""
        head = self.tags().get("nnlab.headline")
        self.set_tags({NOTE: "\n\n".join(filter(None, [head, registry]))})

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_figure(self, fig, path: str, close: bool = True, also: Path | None = None) -> None:
        """The figure as artifact `path` (a PNG); `also`: the same file written there too, rendered once."""
        from tasks.figures import pyplot, rendered

        with rendered(fig, Path(path).name, also) as png:
            self.c.log_artifact(self.run_id, str(png), str(Path(path).parent) if "/" in path else None)
        if close:  # pyplot keeps every open figure alive: a sweep worker would pile them up
            pyplot().close(fig)

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
        with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None), warnings.catch_warnings():
            # torch.export of a recurrent net: its cuDNN-style flat weight list is reassigned while tracing (a
            # harmless warning about torch's own nn.LSTM/GRU, not the user's model)
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
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

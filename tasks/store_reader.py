"""What the read-only commands (`nnlab diff`, and the serving commands' look-up) ask of the tracking store, answered two ways behind one interface:
`SqliteStore` reads a local SQLite store's tables directly (read-only, standard library: ~0.05 s), `MlflowStore`
asks MLflow's client (any store: a tracking server, PostgreSQL). Importing MLflow and its SQL store costs 2-3 s
on a small machine before the first question; a command that only reads a few rows need not pay it.

`open_store()` picks the direct reader only for a `sqlite:///` store whose tables have every column it reads
(MLflow's schema, as its migrations leave it); anything else, or any doubt, is MLflow's client. Runs come back
in MLflow's shape (`run.info.run_id/status/experiment_id`, `run.data.params/metrics/tags`; metrics are the
latest value of each key), so callers do not care which answered.

`local_model(ref)`: a registered version whose checkpoint and logged model are plain local files, found through
the direct reader (or None: the caller goes through MLflow)."""
from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from tasks.tracking import store_path, tracking_uri

# the tables and columns SqliteStore reads: a store without one of them is read through MLflow
COLUMNS = {"runs": {"run_uuid", "status", "experiment_id", "lifecycle_stage", "start_time"},
           "params": {"run_uuid", "key", "value"}, "tags": {"run_uuid", "key", "value"},
           "latest_metrics": {"run_uuid", "key", "value", "is_nan"},
           "registered_models": {"name"}, "model_versions": {"name", "version", "run_id", "storage_location"},
           "registered_model_aliases": {"name", "alias", "version"}}


@dataclass
class RunInfo:
    run_id: str
    status: str
    experiment_id: str


@dataclass
class RunData:
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


@dataclass
class StoredRun:
    info: RunInfo
    data: RunData


class SqliteStore:
    """A local SQLite tracking store, opened read-only (it is never written, never migrated)."""

    def __init__(self, db: Path):
        self.uri = tracking_uri()
        self.db = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=30)

    def _rows(self, sql: str, *args) -> list[tuple]:
        return self.db.execute(sql, args).fetchall()

    def _runs(self, where: str, *args) -> list[StoredRun]:
        """The runs `where` selects (in MLflow's search order), each with its params, tags and latest metrics."""
        runs = {r[0]: StoredRun(RunInfo(r[0], r[1], str(r[2])), RunData())
                for r in self._rows(f"SELECT run_uuid, status, experiment_id FROM runs WHERE {where} "
                                    "ORDER BY start_time DESC, run_uuid", *args)}
        if not runs:
            return []
        chosen = f"run_uuid IN (SELECT run_uuid FROM runs WHERE {where})"
        for run_id, key, value in self._rows(f"SELECT run_uuid, key, value FROM params WHERE {chosen}", *args):
            runs[run_id].data.params[key] = value
        for run_id, key, value in self._rows(f"SELECT run_uuid, key, value FROM tags WHERE {chosen}", *args):
            runs[run_id].data.tags[key] = value
        for run_id, key, value, nan in self._rows(
                f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE {chosen}", *args):
            runs[run_id].data.metrics[key] = float("nan") if nan else float(value)
        return list(runs.values())

    def get_run(self, run_id: str) -> StoredRun | None:
        return next(iter(self._runs("run_uuid = ?", run_id)), None)

    def children(self, parent: StoredRun) -> list[StoredRun]:
        """The active runs whose mlflow.parentRunId is `parent`'s."""
        return self._runs("lifecycle_stage = 'active' AND run_uuid IN (SELECT run_uuid FROM tags WHERE "
                          "key = 'mlflow.parentRunId' AND value = ?)", parent.info.run_id)

    def registered(self, name: str) -> bool:
        return bool(self._rows("SELECT 1 FROM registered_models WHERE name = ?", name))

    def names_like(self, prefix: str) -> list[str]:
        """Registered names starting with `prefix` (its own LIKE wildcards taken literally)."""
        return sorted(n for (n,) in self._rows("SELECT name FROM registered_models") if n.startswith(prefix))

    def alias_version(self, name: str, alias: str) -> str | None:
        rows = self._rows("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", name, alias)
        return str(rows[0][0]) if rows else None

    def version_run(self, name: str, version: str) -> str | None:
        rows = self._rows("SELECT run_id FROM model_versions WHERE name = ? AND version = ?", name, int(version))
        return rows[0][0] if rows else None

    def run_versions(self, run_id: str) -> list[tuple[str, str, list[str]]]:
        """(name, version, its aliases) of every registered version of the run."""
        out = []
        for name, version in self._rows("SELECT name, version FROM model_versions WHERE run_id = ?", run_id):
            aliases = self._rows("SELECT alias FROM registered_model_aliases WHERE name = ? AND version = ?",
                                 name, version)
            out.append((name, str(version), sorted(a for (a,) in aliases)))
        return out

    def files(self, name: str, version: str) -> tuple[Path, Path] | None:
        """(the run's artifact folder, the logged model's folder) of a registered version, when both are local."""
        rows = self._rows("SELECT r.artifact_uri, v.storage_location FROM model_versions v JOIN runs r "
                          "ON r.run_uuid = v.run_id WHERE v.name = ? AND v.version = ?", name, int(version))
        folders = [_local(u) for u in rows[0]] if rows else [None]
        return None if None in folders else tuple(folders)


def _local(uri: str | None) -> Path | None:
    """A local folder for an artifact URI (file:// or a plain absolute path), None for anything else."""
    if not uri:
        return None
    u = urlparse(uri)
    path = Path(unquote(u.path)) if u.scheme == "file" and u.netloc in ("", "localhost") else (
        Path(uri) if not u.scheme and uri.startswith("/") else None)
    return path if path is not None and path.is_dir() else None


class MlflowStore:
    """The same questions through MLflow's client: any tracking store."""

    def __init__(self):
        from tasks.tracking import client

        self.c = client()
        self.uri = self.c.tracking_uri

    def get_run(self, run_id: str):
        try:
            return self.c.get_run(run_id)
        except Exception:
            return None

    def children(self, parent) -> list:
        return self.c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=5000)

    def registered(self, name: str) -> bool:
        try:
            self.c.get_registered_model(name)
            return True
        except Exception:
            return False

    def names_like(self, prefix: str) -> list[str]:
        return sorted(m.name for m in self.c.search_registered_models(f"name LIKE '{prefix}%'", max_results=1000)
                      if m.name.startswith(prefix))

    def alias_version(self, name: str, alias: str) -> str | None:
        try:
            return str(self.c.get_model_version_by_alias(name, alias).version)
        except Exception:
            return None

    def version_run(self, name: str, version: str) -> str | None:
        try:
            return self.c.get_model_version(name, version).run_id
        except Exception:
            return None

    def run_versions(self, run_id: str) -> list[tuple[str, str, list[str]]]:
        # a search leaves the aliases out: each version read again (a run has one or two)
        return [(v.name, str(v.version), sorted(self.c.get_model_version(v.name, v.version).aliases or []))
                for v in self.c.search_model_versions(f"run_id = '{run_id}'", max_results=100)]


def version_of(ref: str, store) -> tuple[str, str]:
    """models:/<name>@<alias> or models:/<name>/<version> -> (name, version): a name not registered as such is the
    one `<name>-<dataset>` there is (register.name auto registers one model per dataset). LookupError naming what
    is not there; ValueError for anything else."""
    m = re.fullmatch(r"models:/([^@/]+)(?:@([\w.-]+)|/(\d+))", ref)
    if not m:
        raise ValueError(f"{ref!r} is not a registered version: use models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = m[1], m[2], m[3]
    if not store.registered(name):
        found = store.names_like(f"{name}-")
        if len(found) > 1:
            raise LookupError(f"models:/{name}: one registered model per dataset; name one of: {', '.join(found)}")
        name = found[0] if found else name
    if alias is not None:
        version = store.alias_version(name, alias)
        if version is None:
            raise LookupError(f"{ref}: no registered model {name!r} with alias {alias!r} in {store.uri}")
    if store.version_run(name, version) is None:
        raise LookupError(f"{ref}: no version {version} of registered model {name!r} in {store.uri}")
    return name, version


def run_of(ref: str, store) -> str:
    """The run id behind a run id, runs:/<id>[/...] or a registered version (version_of)."""
    m = re.fullmatch(r"(?:runs:/)?([0-9a-f]{32})(/.*)?", ref)
    if m:
        return m[1]
    if not ref.startswith("models:/"):
        raise ValueError(f"{ref!r} is not a run or model reference: use a run id, runs:/<run id>, "
                         "models:/<name>@<alias>, models:/<name>/<version> or <sweep parent run id>/<cell levels>")
    return store.version_run(*version_of(ref, store))


@dataclass
class LocalModel:
    """A registered version whose files are on this machine: read as they are, without MLflow."""
    uri: str  # pinned: models:/<name>/<version>
    checkpoint: Path  # the run's checkpoint/model.pt
    model_dir: Path  # the logged model's folder (MLmodel, extra_files/)

    def extra(self, name: str) -> dict | None:
        import json

        f = self.model_dir / "extra_files" / name
        return json.loads(f.read_text()) if f.is_file() else None

    def metadata(self) -> dict:
        import yaml

        return (yaml.safe_load((self.model_dir / "MLmodel").read_text()) or {}).get("metadata") or {}


def local_model(ref: str) -> LocalModel | None:
    """`ref` (models:/<name>@<alias> or /<version>) as local files, when the store is a local SQLite one that has
    it and its files are plain local folders; None otherwise (or on any doubt): the caller asks MLflow, whose
    answer (or error) is then the one the user sees. (About a millisecond: the serving commands ask it for each
    file they read.)"""
    store = open_store() if ref.startswith("models:/") else None
    if not isinstance(store, SqliteStore):
        return None
    try:
        name, version = version_of(ref, store)
    except (LookupError, ValueError):
        return None
    folders = store.files(name, version)
    if folders is None or not (folders[0] / "checkpoint" / "model.pt").is_file() or not (folders[1] / "MLmodel").is_file():
        return None
    return LocalModel(f"models:/{name}/{version}", folders[0] / "checkpoint" / "model.pt", folders[1])


def open_store() -> SqliteStore | MlflowStore:
    """The direct reader for a local SQLite store that has every table and column it reads; else MLflow's."""
    db = store_path()
    if db is not None and db.is_file():
        try:
            store = SqliteStore(db)
            for table, cols in COLUMNS.items():
                have = {row[1] for row in store._rows(f"PRAGMA table_info({table})")}
                if not cols <= have or ("workspace" in have and store._rows(
                        f"SELECT 1 FROM {table} WHERE workspace != 'default' LIMIT 1")):
                    raise LookupError(table)  # not as expected, or MLflow workspaces in use: MLflow's client
            return store
        except (sqlite3.Error, LookupError):
            pass
    return MlflowStore()

"""What the read-only commands (`nnlab diff`) ask of the tracking store, answered two ways behind one interface:
`SqliteStore` reads a local SQLite store's tables directly (read-only, standard library: ~0.05 s), `MlflowStore`
asks MLflow's client (any store: a tracking server, PostgreSQL). Importing MLflow and its SQL store costs 2-3 s
on a small machine before the first question; a command that only reads a few rows need not pay it.

`open_store()` picks the direct reader only for a `sqlite:///` store whose tables have every column it reads
(MLflow's schema, as its migrations leave it); anything else, or any doubt, is MLflow's client. Runs come back
in MLflow's shape (`run.info.run_id/status/experiment_id`, `run.data.params/metrics/tags`; metrics are the
latest value of each key), so callers do not care which answered."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from tasks.tracking import store_path, tracking_uri

# the tables and columns SqliteStore reads: a store without one of them is read through MLflow
COLUMNS = {"runs": {"run_uuid", "status", "experiment_id", "lifecycle_stage", "start_time"},
           "params": {"run_uuid", "key", "value"}, "tags": {"run_uuid", "key", "value"},
           "latest_metrics": {"run_uuid", "key", "value", "is_nan"},
           "registered_models": {"name"}, "model_versions": {"name", "version", "run_id"},
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
        self.db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)

    def _rows(self, sql: str, *args) -> list[tuple]:
        return self.db.execute(sql, args).fetchall()

    def _runs(self, where: str, *args) -> list[StoredRun]:
        runs = {r[0]: StoredRun(RunInfo(r[0], r[1], str(r[2])), RunData())
                for r in self._rows(f"SELECT run_uuid, status, experiment_id FROM runs WHERE {where} "
                                             "ORDER BY start_time DESC, run_uuid", *args)}  # MLflow's search order
        if not runs:
            return []
        marks = ",".join("?" * len(runs))
        for run_id, key, value in self._rows(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({marks})",
                                             *runs):
            runs[run_id].data.params[key] = value
        for run_id, key, value in self._rows(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({marks})",
                                             *runs):
            runs[run_id].data.tags[key] = value
        for run_id, key, value, nan in self._rows(
                f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({marks})", *runs):
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


def open_store() -> SqliteStore | MlflowStore:
    """The direct reader for a local SQLite store that has every table and column it reads; else MLflow's."""
    db = store_path()
    if db is not None and db.is_file():
        try:
            store = SqliteStore(db)
            for table, cols in COLUMNS.items():
                if not cols <= {row[1] for row in store._rows(f"PRAGMA table_info({table})")}:
                    raise LookupError(table)
            return store
        except (sqlite3.Error, LookupError):
            pass
    return MlflowStore()

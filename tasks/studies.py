"""Where a sweep's Optuna study lives: in the MLflow store's own database (`optuna.db` beside a SQLite
`mlflow.db`, or the same PostgreSQL database in a schema of its own), named after the sweep's parent run. Used by
searches (tasks/search.py) and by pruning (tasks/pruning.py)."""
from __future__ import annotations

from pathlib import Path

from tasks.config import ConfigError

STUDY_SCHEMA = "nnlab_optuna"  # a PostgreSQL store keeps its studies in this schema of the same database


def study_storage(uri: str) -> str:
    """Where the study is kept, in the project's own store: `optuna.db` beside a SQLite `mlflow.db`, or the same
    PostgreSQL database as MLflow's, in its own schema (Optuna's tables, and its alembic_version, apart from
    MLflow's)."""
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{(Path(uri[len('sqlite:///'):]).parent / 'optuna.db').resolve()}"
    if uri.startswith(("postgresql://", "postgresql+", "postgres://")):
        from sqlalchemy.engine import make_url

        url = make_url("postgresql" + uri[len("postgres"):] if uri.startswith("postgres://") else uri)
        return url.update_query_dict({"options": f"-csearch_path={STUDY_SCHEMA}"}).render_as_string(False)
    raise ConfigError(f"sweep.search / sweep.prune: the study is kept in the MLflow store's own database (optuna.db "
                      f"beside a SQLite mlflow.db, or the same PostgreSQL database); a {uri.split('://')[0]}:// store "
                      "has none here: run it with MLFLOW_TRACKING_URI set to the database itself (sqlite:///…/mlflow.db "
                      "or postgresql://…)")


def shown_storage(storage: str) -> str:
    """The study's storage as a tag may show it: without a password."""
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True) if "://" in storage else storage


def prepare_study_storage(storage: str) -> None:
    """A PostgreSQL store's study schema, created once (Optuna creates its tables in it)."""
    if storage.startswith("postgresql"):
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        url = make_url(storage)
        engine = create_engine(url.difference_update_query(["options"]))
        try:
            with engine.begin() as con:
                con.execute(text(f"CREATE SCHEMA IF NOT EXISTS {STUDY_SCHEMA}"))
        finally:
            engine.dispose()


def study_name(parent_run_id: str) -> str:
    return f"nnlab-sweep-{parent_run_id}"

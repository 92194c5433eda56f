"""Operating a shared MLflow tracking server (`nnlab tracking-server`): runs and the registry in PostgreSQL,
artifacts served through the server. Operations, beside deploy.py; tasks/tracking.py only logs to it.
"""
from __future__ import annotations

import os
from pathlib import Path


class StoreUnreachable(Exception):
    """The server's database cannot be reached or created."""


def _postgres_url(uri: str):
    """The SQLAlchemy URL of a PostgreSQL `uri` (postgres://, postgresql://, postgresql+driver://), else None."""
    from sqlalchemy.engine import make_url

    if not uri.startswith(("postgres://", "postgresql://", "postgresql+")):
        return None
    return make_url(uri.replace("postgres://", "postgresql://", 1))


def server_store_uri(uri: str) -> str:
    """`uri` as MLflow's server must get it. A bare postgresql:// is SQLAlchemy 2.1's psycopg (3), which the
    project ships: it goes unchanged; only libpq's `postgres://` alias, which SQLAlchemy refuses, is spelled out."""
    return "postgresql://" + uri[len("postgres://"):] if uri.startswith("postgres://") else uri


def ensure_database(uri: str) -> bool:
    """Create the PostgreSQL database `uri` names when it does not exist (True: created). MLflow creates
    its tables in it on start, but not the database itself. Other stores are left to MLflow."""
    url = _postgres_url(uri)
    if url is None:
        return False
    import psycopg
    from psycopg import sql

    shown = url.set(drivername="postgresql").render_as_string(hide_password=True)
    args = {**url.translate_connect_args(username="user", database="dbname"), **dict(url.query),
            "connect_timeout": 5}
    db = args.get("dbname") or "postgres"

    def unreachable(e: Exception) -> StoreUnreachable:
        where = f"-h {url.host or '127.0.0.1'} -p {url.port or 5432}"
        return StoreUnreachable(
            f"cannot connect to PostgreSQL for {shown}: {str(e).strip().splitlines()[0]}. Is it running? Check "
            f"with `pg_isready {where}`; start it with `sudo pg_ctlcluster <version> main start` (Debian/Ubuntu; "
            "versions in /etc/postgresql) or `sudo systemctl start postgresql`, or pass another --backend-store-uri")

    try:
        psycopg.connect(**args).close()
        return False
    except psycopg.OperationalError as e:
        if f'database "{db}" does not exist' not in str(e):
            raise unreachable(e) from None
    try:  # the maintenance database of the same server; CREATE DATABASE cannot run inside a transaction
        con = psycopg.connect(**{**args, "dbname": "postgres"}, autocommit=True)
    except psycopg.OperationalError as e:
        raise unreachable(e) from None
    try:
        con.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    except psycopg.errors.DuplicateDatabase:  # created meanwhile
        return False
    except psycopg.Error as e:
        raise StoreUnreachable(f"cannot create database {db!r} for {shown}: {str(e).strip()}") from None
    finally:
        con.close()
    return True


def server_command(artifacts_destination: str | Path, host: str, port: int, workers: int | None = None,
                   extra: list[str] | tuple = ()) -> list[str]:
    """`mlflow server`, artifacts uploaded and downloaded through the server (clients need no access to the
    folder; runs record mlflow-artifacts:/ URIs). `extra`: further `mlflow server` options (--app-name
    basic-auth, --allowed-hosts ...). The store's URI is not on the command line, where every user's `ps` would
    show its password: `server_env` passes it."""
    import sys

    dest = str(artifacts_destination)
    if "://" not in dest:  # a local folder: absolute, so the server's working directory does not matter
        dest = str(Path(dest).expanduser().resolve())
    cmd = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts", "--artifacts-destination", dest,
           "--host", host, "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    return cmd + list(extra)


def server_env(backend_store_uri: str) -> dict[str, str]:
    """Environment for the server: the store's URI (MLflow's own MLFLOW_BACKEND_STORE_URI; a process's
    environment is readable by its user only, its command line by everyone), then defaults a user's own settings
    win over. MLflow 3 starts a job runner and 7 consumer processes (GenAI scorers and judges, ~1 GB) beside any
    SQL-backed server: nnlab uses none of it. MLflow reads DO_NOT_TRACK only when it is "true": the project's
    DO_NOT_TRACK=1 is passed on explicitly."""
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if os.environ.get("DO_NOT_TRACK", "").lower() in ("1", "true", "yes"):
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return {**{k: v for k, v in env.items() if k not in os.environ},
            "MLFLOW_BACKEND_STORE_URI": server_store_uri(backend_store_uri)}


def server_client_uri(host: str, port: int) -> str:
    """The MLFLOW_TRACKING_URI clients set for a server bound to `host`."""
    import socket

    if host in ("0.0.0.0", "::", ""):  # every interface: clients use the machine's name
        host = socket.getfqdn()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

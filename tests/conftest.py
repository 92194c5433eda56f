import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["GIT_PYTHON_REFRESH"] = "quiet"
# One torch (OpenMP) thread per process, here and in every CLI the tests start: the suite's models are tiny and
# CI has 2 cores, often shared by two trainings at once (a CLI and its sweep cells, two CLIs, or another job).
# A second thread then only spins: measured on a busy 2-core machine, 80 epochs of test_gan.py's ring8 GAN take
# 8 s on 1 thread and over 400 s on 2. Set before torch is imported (conftest is); a value already set wins.
THREAD_VARS_SET_HERE = [v for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if v not in os.environ]
for _var in THREAD_VARS_SET_HERE:
    os.environ[_var] = "1"


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """One temp MLflow store for the whole session; never the repository's mlruns/."""
    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session", autouse=True)
def prefect_server(tmp_path_factory):
    """One Prefect server (temp PREFECT_HOME, 127.0.0.1) for every `nnlab run` / `nnlab sweep` the tests start:
    their own temporary server would boot again in each (~4 s apiece). Exported as PREFECT_API_URL, which the
    CLI uses instead of booting one; tests that need no server or their own remove it from their env."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    try:
        import prefect  # noqa: F401
    except ImportError:  # a bare GPU machine running tests/test_cuda.py alone: no CLI runs to serve
        yield None
        return
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-shared"))
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    yield server.api_url
    os.environ.pop("PREFECT_API_URL", None)
    server.stop()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working folder with the repository's params.yaml; relative paths (data/, .nnlab/) land here."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def group_alive(pgid: int) -> bool:
    """Whether any process of process group `pgid` still runs."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def group_left(pgid: int, wait: float = 10.0) -> list[str]:
    """The processes of group `pgid` still there after up to `wait` seconds (zombies not counted), as
    "pid: command" lines; [] when the group is gone."""
    import psutil

    end = time.monotonic() + wait
    while True:
        left = []
        for proc in psutil.process_iter(["pid", "status", "cmdline"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:120]}")
            except (ProcessLookupError, psutil.Error):
                pass
        if not left or time.monotonic() >= end:
            return left
        time.sleep(0.2)


def write_params(path: Path, **sections) -> Path:
    """params.yaml = the repository's, with `sections` merged in (dicts merged one level deep)."""
    import yaml

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    if "models" in sections and "run" not in sections:
        base["run"] = list(sections["models"])  # the given models are the ones to train (dvc.yaml's foreach)
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "models":
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path

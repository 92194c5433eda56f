"""The temporary Prefect server of `nnlab run` / `nnlab sweep` (flows/prefect_server.py, issue 13): a port of its
own, a generous startup timeout, and no server left behind however the CLI exits.

The CLI tests run `python -m flows.cli run` without PREFECT_API_URL (conftest exports the shared server's), so
each starts its own server; PREFECT_HOME and the MLflow store are per test."""
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, group_alive
from flows import prefect_server as ps

RUN = ["run", "--models", "mlp", "--set", "train.epochs=1", "--set", "data.source=digits",
       "--set", "register.enabled=false"]
SERVER_LINE = re.compile(r"temporary Prefect server on http://127\.0\.0\.1:(\d+) \(pid (\d+)\)")
VIEW_LINE = re.compile(r"View at http://127\.0\.0\.1:(\d+)/")


@pytest.fixture(scope="module")
def migrated_home(tmp_path_factory, prefect_server) -> Path:
    """A PREFECT_HOME whose database is already migrated, copied into each test's own: a server on a fresh home
    spends ~15 s on 2 busy cores creating its tables. A snapshot of conftest's shared server's database, or
    else made by this module's server, started and stopped in-process."""
    home = tmp_path_factory.mktemp("prefect-template")
    shared = Path(os.environ.get("PREFECT_HOME", "/nonexistent")) / "prefect.db"
    if shared.is_file() and tmp_path_factory.getbasetemp() in shared.parents:  # conftest's server: a snapshot
        with closing(sqlite3.connect(shared)) as src, closing(sqlite3.connect(home / "prefect.db")) as dst:
            src.backup(dst)
        return home
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        for k in [k for k in os.environ if k.startswith("NNLAB_PREFECT_SERVER_")]:
            mp.delenv(k)
        server = ps.TemporaryServer.launch()
        try:
            server.wait_ready(timeout=240)
        finally:
            server.stop()
    assert not group_alive(server.pid)
    assert (home / "prefect.db").is_file()
    return home


def cli_env(tmp_path: Path, home: Path, **extra) -> dict:
    """The CLI's environment: no PREFECT_API_URL (so it starts its own server), a PREFECT_HOME of its own (a copy
    of `home`), a temp MLflow store."""
    prefect_home = tmp_path / "prefect"
    if not prefect_home.exists():
        shutil.copytree(home, prefect_home)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_PROFILE") and not k.startswith("NNLAB_PREFECT_SERVER_")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_UI_ENABLED="false", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               GIT_PYTHON_REFRESH="quiet", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def workdir(tmp_path: Path, name: str = "w") -> Path:
    d = tmp_path / name
    d.mkdir()
    shutil.copy(ROOT / "params.yaml", d / "params.yaml")
    return d


class Cli:
    """`python -m flows.cli ...` in the background: its output read line by line, its server (port, pid) parsed
    from stderr, and every process below it recorded while it runs (to check afterwards that none survived)."""

    def __init__(self, args, cwd, env):
        # SIGINT at its default in the CLI, as in a terminal: a suite started in the background of a
        # non-interactive shell inherits SIGINT ignored, and the CLI would rightly ignore Ctrl-C too
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.out: list[str] = []
        self.err: list[str] = []
        self.seen: dict[str, float] = {}  # line -> when it was read
        self.port = self.server_pid = None
        self.descendants: dict[int, tuple[float, str]] = {}  # pid -> (create time, command line)
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
                         threading.Thread(target=self._watch, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, stream, lines):
        for line in stream:
            with self._changed:
                lines.append(line)
                self.seen.setdefault(line, time.monotonic())
                m = SERVER_LINE.search(line)
                if m and self.port is None:
                    self.port, self.server_pid = int(m.group(1)), int(m.group(2))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _watch(self):
        try:
            me = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        while self.proc.poll() is None:
            try:
                for p in me.children(recursive=True):
                    if p.pid not in self.descendants:
                        try:
                            self.descendants[p.pid] = (p.create_time(), " ".join(p.cmdline()))
                        except (psutil.NoSuchProcess, psutil.AccessDenied):
                            pass
            except psutil.NoSuchProcess:
                return
            time.sleep(0.1)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        end = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.err + self.out:
                    if m := re.search(pattern, line):
                        return m
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads[:2])):
                    raise AssertionError(f"no {pattern!r} in the CLI's output:\n{self.output()}")
                self._changed.wait(min(left, 0.5))

    def when(self, pattern: str) -> float:
        """When the first line matching `pattern` was read."""
        return min(t for line, t in self.seen.items() if re.search(pattern, line))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the CLI did not exit within {timeout} s:\n{self.output()}") from None
        for t in self._threads:
            t.join(timeout=10)
        return code

    def output(self) -> str:
        return "".join(self.out[-40:]) + "\n--- stderr ---\n" + "".join(self.err[-60:])

    def survivors(self) -> list[str]:
        """Processes the CLI started (the server among them) that still run."""
        left = []
        for pid, (created, cmd) in self.descendants.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {cmd}")
            except psutil.NoSuchProcess:
                pass
        return left

    def kill(self):
        for pid in (self.server_pid, self.proc.pid):
            if pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def clis():
    started: list[Cli] = []

    def start(args, cwd, env) -> Cli:
        cli = Cli(args, cwd, env)
        started.append(cli)
        return cli

    yield start
    for cli in started:  # whatever a failed test left running
        cli.kill()


def processes_on_port(port: int) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"--port {port}" in cmd and ("prefect" in cmd or "uvicorn" in cmd):
            found.append(f"{p.info['pid']} {cmd}")
    return found


def assert_all_stopped(cli: Cli) -> None:
    assert cli.server_pid, cli.output()
    assert cli.server_pid in cli.descendants, "the server was not a child of the CLI"
    assert not group_alive(cli.server_pid), f"the server's process group {cli.server_pid} survived the CLI"
    assert not cli.survivors(), f"still running after the CLI exited: {cli.survivors()}"
    assert not processes_on_port(cli.port), processes_on_port(cli.port)


# ----------------------------------------------------------------------------------------------- no server needed

def test_a_taken_first_port_is_skipped():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock = ps.bind_free_port(port)
        try:
            assert sock.getsockname()[1] not in (port, 0)
        finally:
            sock.close()
    free = ps.bind_free_port(None)
    first = free.getsockname()[1]
    free.close()
    sock = ps.bind_free_port(first)  # a free first choice is the one used
    try:
        assert sock.getsockname()[1] == first
    finally:
        sock.close()


def test_startup_timeout_setting(monkeypatch):
    monkeypatch.delenv(ps.TIMEOUT_ENV, raising=False)
    assert ps.startup_timeout() == ps.DEFAULT_TIMEOUT >= 120
    monkeypatch.setenv(ps.TIMEOUT_ENV, "600")
    assert ps.startup_timeout() == 600
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv(ps.TIMEOUT_ENV, bad)
        with pytest.raises(ps.PrefectServerError, match=ps.TIMEOUT_ENV):
            ps.startup_timeout()


def test_the_users_api_wins(monkeypatch, tmp_path):
    monkeypatch.setattr(ps.TemporaryServer, "launch", classmethod(lambda cls: pytest.fail("a server was started")))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert isinstance(ps.start(), ps.NoServer)
    monkeypatch.delenv("PREFECT_API_URL")  # `prefect config set PREFECT_API_URL=...` writes the profile
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    (tmp_path / "profiles.toml").write_text('active = "mine"\n[profiles.mine]\n'
                                            'PREFECT_API_URL = "http://127.0.0.1:4200/api"\n')
    assert isinstance(ps.start(), ps.NoServer)


# --------------------------------------------------------------------------------------------------- the CLI

@pytest.mark.slow
def test_sigterm_or_sigint_mid_run_stops_the_server(tmp_path, clis, migrated_home):
    """Two runs at once (to save time), one sent SIGTERM and one SIGINT while training: each exits and its server's
    process group is gone. Meanwhile another process listens on the port both would take first
    (NNLAB_PREFECT_SERVER_PORT): they start their servers elsewhere and never connect to it."""
    args = [a if a != "train.epochs=1" else "train.epochs=3000" for a in RUN]  # minutes: still running when hit
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        other.setblocking(False)
        taken = other.getsockname()[1]
        env = cli_env(tmp_path, migrated_home, NNLAB_PREFECT_SERVER_PORT=taken)
        # Prefect's "View at" link to the temporary server is left out of the terminal (no UI there, gone after the
        # command); NNLAB_SHOW_PREFECT_LINKS=1 prints it, which shows which server the SIGTERM run's flow used
        runs = {sig: clis(args, workdir(tmp_path, sig.name),
                          {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / sig.name}.db",
                           "NNLAB_SHOW_PREFECT_LINKS": str(int(sig == signal.SIGTERM))})
                for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig, cli in runs.items():
            cli.wait_for(r"mlp epoch 1/3000", timeout=300)  # the flow is training
            assert group_alive(cli.server_pid)
            cli.proc.send_signal(sig)
        sent, run_ids = time.monotonic(), {}
        for sig, cli in runs.items():
            code = cli.wait(timeout=90)
            assert code == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], f"{sig.name}: {cli.output()}"
            assert cli.port != taken
            if sig == signal.SIGTERM:
                assert int(cli.wait_for(VIEW_LINE.pattern, 1).group(1)) == cli.port  # the flow used its own server
            else:
                said = "".join(cli.out + cli.err)  # all of it: output() keeps only the last lines
                # Prefect's INFO lines stay off the terminal unless asked for (NNLAB_SHOW_PREFECT_LINKS=1)
                assert "View at" not in said and "Beginning flow run" not in said, cli.output()
            assert_all_stopped(cli)
            with sqlite3.connect(tmp_path / f"{sig.name}.db") as db:  # resumable: KILLED, not left RUNNING
                (run_ids[sig], status), = db.execute("select run_uuid, status from runs").fetchall()
            assert status == "KILLED", f"{sig.name}: {cli.output()}"
        assert time.monotonic() - sent < 30, "Ctrl-C / SIGTERM took long to end the runs"
        err = "".join(runs[signal.SIGINT].err)  # Ctrl-C: one line of ours naming the run, no tracebacks
        assert f"interrupted: mlp's MLflow run {run_ids[signal.SIGINT]} is marked KILLED" in err, err
        assert "Traceback" not in err and "Crash detected" not in err, err
        with pytest.raises(BlockingIOError):
            other.accept()  # nobody connected to the other process's port


@pytest.mark.slow
def test_the_server_stops_itself_when_its_cli_is_killed(tmp_path, migrated_home):
    """SIGKILL leaves the CLI no way to clean up: the server notices it is orphaned and stops its group."""
    code = ("from flows.prefect_server import TemporaryServer as T; s = T.launch(); print(s.pid, flush=True); "
            "s.wait_ready(); print('ready', flush=True); import time; time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], env=cli_env(tmp_path, migrated_home),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    server = None
    try:
        server = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "ready"
        parent.kill()
        parent.wait(timeout=10)
        end = time.monotonic() + 30
        while group_alive(server) and time.monotonic() < end:
            time.sleep(0.1)
        assert not group_alive(server), "the orphaned server kept running"
    finally:
        for pid in (server, parent.pid):
            if pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        parent.wait(timeout=10)


@pytest.mark.slow
def test_a_server_that_never_answers_fails_clearly(tmp_path, clis, migrated_home):
    cli = clis(RUN, workdir(tmp_path), cli_env(tmp_path, migrated_home, NNLAB_PREFECT_SERVER_START_DELAY=600,
                                               NNLAB_PREFECT_SERVER_TIMEOUT=2))
    code = cli.wait(timeout=120)
    err = "".join(cli.err)
    assert code == 1, cli.output()
    assert "did not answer within 2 s" in err and f"{ps.TIMEOUT_ENV}=" in err and "PREFECT_API_URL" in err
    assert "Traceback" not in err and "Beginning flow run" not in err
    assert_all_stopped(cli)


@pytest.mark.slow
def test_two_runs_at_once_each_use_their_own_server_and_leave_nothing(tmp_path, clis, migrated_home):
    """Two normal runs started together. Both would take the same port first (the clash of issue 13, on purpose)
    and they share PREFECT_HOME, as two terminals do; b's server boots 22 s late (Prefect's own temporary server
    gives up after 20 s) and b waits for it. Both finish (exit 0), each flow on its own server, and nothing either
    CLI started is left. Their MLflow stores differ: two processes creating one new sqlite store race in MLflow's
    migrations."""
    first = ps.bind_free_port(None)
    port = first.getsockname()[1]
    first.close()
    env = cli_env(tmp_path, migrated_home, NNLAB_PREFECT_SERVER_PORT=port, NNLAB_SHOW_PREFECT_LINKS=1)
    a = clis(RUN, workdir(tmp_path, "a"), {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'a.db'}"})
    b = clis(RUN, workdir(tmp_path, "b"), {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'b.db'}",
                                           ps.DELAY_ENV: "22"})
    codes = a.wait(timeout=400), b.wait(timeout=400)
    assert codes == (0, 0), a.output() + "\n=====\n" + b.output()
    assert a.port != b.port and port in (a.port, b.port)
    for cli in (a, b):
        assert int(cli.wait_for(VIEW_LINE.pattern, 1).group(1)) == cli.port  # each flow used its own server
        assert "Error logging to API" not in cli.output()  # Prefect's queued logs went out before the stop
        assert_all_stopped(cli)
    assert b.when("Beginning flow run") - b.when(SERVER_LINE.pattern) > 20

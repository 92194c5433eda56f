"""The temporary local Prefect API server that `nnlab run` / `nnlab sweep` use when no PREFECT_API_URL is set.

Prefect's own `SubprocessASGIServer` (ephemeral mode) waits 20 s at most, can leave its uvicorn process behind,
and on a port clash may end up talking to another process's server. This one:

- binds a free port on 127.0.0.1 *in this process* and hands the listening socket to the server, so the port
  is ours before the server starts: nothing else can answer on it, two CLIs never share a server, and a port
  that is taken (NNLAB_PREFECT_SERVER_PORT, a first choice) is simply skipped;
- starts the server at once, in its own process group (`start_new_session`), so its boot overlaps the CLI's
  heavy imports; `wait_ready()` waits for /api/health only just before the flow, for NNLAB_PREFECT_SERVER_TIMEOUT
  seconds (default 180);
- stops the whole group (SIGTERM, then SIGKILL after a few seconds) and reaps it on every way out: `with`
  around the flow, atexit, and a SIGTERM handler that turns SIGTERM into SystemExit so those run; the server
  also stops itself if this process dies without any of them (SIGKILL);
- keeps the project's flow runs apart from other checkouts', in .nnlab/prefect/prefect.db (`nnlab history`),
  unless PREFECT_HOME or PREFECT_SERVER_DATABASE_CONNECTION_URL is set.

Environment: NNLAB_PREFECT_SERVER_TIMEOUT (seconds to wait for the server), NNLAB_PREFECT_SERVER_PORT (port tried
first), NNLAB_PREFECT_SERVER_START_DELAY (tests only: seconds the server sleeps before it starts).
Only the standard library is imported here: `start()` runs before the CLI's heavy imports.
"""
from __future__ import annotations

import atexit
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TIMEOUT_ENV = "NNLAB_PREFECT_SERVER_TIMEOUT"
PORT_ENV = "NNLAB_PREFECT_SERVER_PORT"
DELAY_ENV = "NNLAB_PREFECT_SERVER_START_DELAY"
DEFAULT_TIMEOUT = 180.0
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
HOST = "127.0.0.1"


class PrefectServerError(RuntimeError):
    """The temporary server could not be started or did not become healthy."""


# ---------------------------------------------------------------------------------------------------- the port

def bind_free_port(first: int | None = None, host: str = HOST) -> socket.socket:
    """A listening TCP socket on `host`: on port `first` when it is free, else on a free port the OS picks.
    The socket is bound before any server starts, so the port cannot be taken between choosing and using it."""
    candidates = ([first] if first else []) + [0]
    last: OSError | None = None
    for port in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers; never a second listener
            sock.bind((host, port))
            sock.listen(128)
            return sock
        except OSError as e:
            sock.close()
            if e.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise
            last = e
    raise PrefectServerError(f"no free port on {host} for the temporary Prefect server ({last})")


def _first_port() -> int | None:
    raw = os.environ.get(PORT_ENV, "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise PrefectServerError(f"{PORT_ENV}={raw!r}: not a port number (1-65535)") from None
    return port


def startup_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
        if value <= 0:
            raise ValueError
    except ValueError:
        raise PrefectServerError(f"{TIMEOUT_ENV}={raw!r}: not a positive number of seconds") from None
    return value


# ------------------------------------------------------------------------------------------- the user's own API

def _profile_setting(name: str) -> str | None:
    """Setting `name` of the active Prefect profile (`prefect config set`), read without importing Prefect."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    profile = (data.get("profiles") or {}).get(os.environ.get("PREFECT_PROFILE") or data.get("active")) or {}
    return profile.get(name) or None


def user_api_url() -> str | None:
    """The API the user configured: PREFECT_API_URL in the environment or in the active profile."""
    return os.environ.get("PREFECT_API_URL") or _profile_setting("PREFECT_API_URL")


PROJECT_DATABASE = Path(".nnlab/prefect/prefect.db")  # this checkout's flow-run history (`nnlab history`)
DATABASE_SETTINGS = ("PREFECT_HOME", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def project_database() -> Path | None:
    """Where the temporary server keeps its flow runs: the project's .nnlab/prefect/prefect.db (absolute), apart
    from other checkouts'; None when the user chose Prefect's home or database (environment or active profile)."""
    if any(os.environ.get(k) or _profile_setting(k) for k in DATABASE_SETTINGS):
        return None
    return PROJECT_DATABASE.resolve()


# ------------------------------------------------------------------------------------------------- the server

class TemporaryServer:
    """One Prefect API server process (group) this process started; see the module docstring."""

    def __init__(self, proc: subprocess.Popen, port: int, log):
        self.proc, self.port, self.log = proc, port, log  # log: the server's output, a file with no name
        self._lock = threading.RLock()
        self._stopped = False
        self._ready = False
        self._owner = os.getpid()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.address}/api"

    # --- start

    @classmethod
    def launch(cls) -> "TemporaryServer":
        """Start the server process now; returns at once (the server boots in the background)."""
        sock = bind_free_port(_first_port())
        port = sock.getsockname()[1]
        fd = sock.fileno()
        log = tempfile.TemporaryFile(prefix=f"nnlab-prefect-server-{port}-")  # unlinked: never left behind
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        # what Prefect's SubprocessASGIServer sets: no UI, no background services, last app of the process
        env.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})
        if (db := project_database()) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{db}"
        cmd = [sys.executable, "-m", "flows.prefect_server", "--fd", str(fd), "--port", str(port),
               "--parent", str(os.getpid())]
        try:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(fd,), start_new_session=True)
        except BaseException:
            log.close()
            raise
        finally:
            sock.close()  # the server holds its own copy; if it dies, the port is free and clients are refused
        return cls(proc, port, log)

    # --- wait

    def wait_ready(self, timeout: float | None = None) -> str:
        """Block until the server answers /api/health, for `timeout` seconds (default NNLAB_PREFECT_SERVER_TIMEOUT,
        else 180), or fail with one clear message. Returns the API URL."""
        timeout = startup_timeout() if timeout is None else timeout
        if self._ready:
            return self.api_url
        deadline = time.monotonic() + timeout
        opener = _no_proxy_opener()
        while True:
            if self._exited():
                raise PrefectServerError(self._died_message())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PrefectServerError(
                    f"the temporary Prefect server (pid {self.pid}, {self.address}) did not answer within "
                    f"{timeout:g} s. On a busy machine give it longer, e.g. {TIMEOUT_ENV}=600, or run "
                    f"`prefect server start` in another terminal and export "
                    f"PREFECT_API_URL=http://127.0.0.1:4200/api.{self._log_tail()}")
            try:
                with opener.open(f"{self.api_url}/health", timeout=min(5.0, max(0.1, remaining))) as r:
                    if r.status == 200:
                        break
            except OSError:  # refused (not yet), timed out (booting: the socket listens, nobody accepts yet)
                pass
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if self._exited():  # only ours holds the port; still, never hand over a server that is gone
            raise PrefectServerError(self._died_message())
        self._ready = True
        return self.api_url

    def _exited(self) -> bool:
        """Has the server process exited? Does not reap it (its pid, the group's id, stays ours until stop())."""
        if self.proc.returncode is not None:
            return True
        if hasattr(os, "waitid"):
            try:
                return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            except ChildProcessError:
                return True
        return self.proc.poll() is not None

    def _died_message(self) -> str:
        code = self.proc.returncode
        if code is None and hasattr(os, "waitid"):
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
            if info is not None:
                code = info.si_status if info.si_code == os.CLD_EXITED else f"signal {info.si_status}"
        return (f"the temporary Prefect server (pid {self.pid}, {self.address}) exited (code {code}) before it "
                f"was ready.{self._log_tail()}")

    def _log_tail(self, n: int = 2000) -> str:
        try:  # pread: the server shares the file offset, so never move it
            fd = self.log.fileno()
            size = os.fstat(fd).st_size
            text = os.pread(fd, n, max(0, size - n)).decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"\nits output:\n{text}" if text else ""

    # --- stop

    def stop(self) -> None:
        """Terminate the server's whole process group and reap it: SIGTERM, up to STOP_GRACE seconds, SIGKILL.
        Idempotent, safe from atexit, a no-op in a forked child; Ctrl-C / SIGTERM arriving meanwhile do not cut
        it short. PREFECT_API_URL keeps naming the stopped server: Prefect's exit-time flushes then fail fast
        instead of starting an ephemeral server of their own."""
        if os.getpid() != self._owner:
            return
        with self._lock:
            if self._stopped:
                return
            with _signals_deferred():
                if self._ready and self._exited():  # it died under the flow: say so, with its last words
                    print(self._died_message().replace("before it was ready", "while in use"), file=sys.stderr)
                elif self._ready:
                    _drain_prefect_workers()  # logs and events still queued: sent while the server is up
                pgid = self.pid  # start_new_session: the server leads its own group
                if self.proc.returncode is None:  # not reaped yet, so the group id is still ours
                    _killpg(pgid, signal.SIGTERM)
                    end = time.monotonic() + STOP_GRACE
                    while not self._exited() and time.monotonic() < end:
                        time.sleep(0.05)
                    _killpg(pgid, signal.SIGKILL)  # whatever is left of the group (the leader is a zombie at most)
                self.proc.wait()
                self._stopped = True
                self.log.close()

    def __enter__(self) -> "TemporaryServer":
        try:
            use_server(self)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class NoServer:
    """The user's own API (PREFECT_API_URL): nothing to start, wait for or stop."""

    pid = port = api_url = None

    def wait_ready(self, timeout: float | None = None):
        return None

    def stop(self) -> None:
        pass

    def __enter__(self) -> "NoServer":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _signals_deferred:
    """In the main thread, hold SIGINT and SIGTERM while the server is being stopped (the process is on
    its way out anyway); elsewhere a no-op."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.saved[sig] = signal.signal(sig, lambda *_: None)
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass


def _drain_prefect_workers(timeout: float = 5.0) -> None:
    """Have Prefect's background workers (API logs, events) send what they hold now. Left for Prefect's own
    exit hook, they would retry against the stopped server for over a minute before giving up."""
    services = sys.modules.get("prefect._internal.concurrency.services")
    queue_service = getattr(services, "QueueService", None)
    if queue_service is None:
        return
    try:
        queue_service.drain_all(timeout=timeout)  # every instance of every kind (one registry)
    except Exception:
        pass


def _no_proxy_opener():
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy


# ------------------------------------------------------------------------------------- this process's server

def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # finally-blocks, `with` exits and atexit run; the server is stopped


def _install_sigterm_handler() -> None:
    """SIGTERM's default kills the process without running any cleanup; make it a SystemExit instead.
    A handler someone else installed is left alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _sigterm)
    except (ValueError, OSError):
        pass


def start() -> TemporaryServer | NoServer:
    """Start the temporary server now unless the user configured a Prefect API (PREFECT_API_URL in the
    environment or the active profile). Call early; `with` the result around the flow (it waits for the
    server, then stops it however the block is left). atexit and SIGTERM stop it as well."""
    if user_api_url():
        return NoServer()
    _install_sigterm_handler()
    server = TemporaryServer.launch()
    atexit.register(server.stop)
    print(f"temporary Prefect server on {server.address} (pid {server.pid}); "
          f"set PREFECT_API_URL to use your own", file=sys.stderr, flush=True)
    return server


def use_server(server: TemporaryServer) -> str | None:
    """Wait for `server`, then make it this process's Prefect API: PREFECT_API_URL in os.environ (process-pool
    workers inherit it), Prefect's ephemeral mode off (a client that somehow saw no URL fails loudly instead of
    starting an untracked server of its own), and Prefect's settings refreshed (they are read at import).
    When Prefect's own settings (prefect.toml, .env, ...) name an API, that one wins and the server is stopped."""
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url
    if configured and configured != server.api_url:
        server.stop()
        return None
    url = server.wait_ready()
    from flows.console import TEMPORARY_API

    TEMPORARY_API[:] = [url]  # no UI behind it, gone after the command: Prefect's "View at" links stay unprinted
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    _refresh_prefect_settings()
    return url


def _refresh_prefect_settings() -> None:
    ctx = sys.modules.get("prefect.context")
    refresh = getattr(ctx, "refresh_global_settings_context", None)
    if refresh is not None:
        try:
            refresh()
        except Exception:
            pass


# ------------------------------------------------------------------------------------ the server process itself

def _watch_parent(parent: int) -> None:
    """Stop this server when the CLI that started it is gone without stopping it (SIGKILL, a crash)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    _killpg(os.getpgrp(), signal.SIGTERM)  # uvicorn shuts down gracefully ...
    time.sleep(STOP_GRACE * 2)
    _killpg(os.getpgrp(), signal.SIGKILL)  # ... or not


def _serve(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m flows.prefect_server")
    ap.add_argument("--fd", type=int, required=True, help="listening socket inherited from the CLI")
    ap.add_argument("--port", type=int, help="its port (shown in ps)")
    ap.add_argument("--parent", type=int, required=True, help="the CLI's pid")
    args = ap.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True, name="parent-watch").start()
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay > 0:  # tests: a slow boot
        time.sleep(delay)
    sock = socket.socket(fileno=args.fd)

    import uvicorn

    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, log_level="error",
                            lifespan="on", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)


if __name__ == "__main__":
    _serve(sys.argv[1:])

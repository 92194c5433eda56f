"""A stop signal that lands inside a garbage collector's callback is swallowed there by Python; tasks/signals.py
sends it again (used by the CLI for Ctrl-C and SIGTERM, and by each rank of a distributed run), and a rank whose
collective failed because a peer left first ends as a stopped rank, without a traceback of its own."""
import signal
import sys
import time

from tasks.rank import _peer_left
from tasks.signals import resend_lost


class _Finalised:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def __del__(self):  # a finaliser, as SQLAlchemy's weakref callbacks are: what it raises is "ignored"
        raise self.exc


def test_a_stop_lost_in_a_finaliser_is_sent_again_and_anything_else_goes_to_the_previous_hook(monkeypatch):
    got, unraisable = [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(type(u.exc_value)))
    previous = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        resend_lost(lambda e: signal.SIGUSR1 if isinstance(e, KeyboardInterrupt) else None)
        _Finalised(KeyboardInterrupt())  # dropped at once: its finaliser raises, Python swallows it
        _Finalised(ValueError("not a stop"))
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert got == [signal.SIGUSR1]  # the lost Ctrl-C, delivered again
    assert unraisable == [ValueError]  # reported as before


def test_a_rank_knows_a_collective_that_failed_because_its_peer_had_gone():
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:27324")
    assert _peer_left(gone) and _peer_left(RuntimeError("read: Connection reset by peer"))
    assert not _peer_left(RuntimeError("CUDA out of memory")) and not _peer_left(ValueError("Connection closed by peer"))


def test_the_cli_sends_a_lost_ctrl_c_again_and_a_lost_sigterm_as_a_first_one():
    from flows import console

    assert console._lost_signal(KeyboardInterrupt()) == signal.SIGINT and console._lost_signal(ValueError()) is None
    console._TERMINATED.append(signal.SIGTERM)  # the handler ran, but its Terminated was lost
    try:
        assert console._lost_signal(console.Terminated()) == signal.SIGTERM and not console.terminated()
    finally:
        console._TERMINATED.clear()


def test_a_rank_resends_the_signal_behind_its_lost_stop():
    from tasks.rank import _Stop, _lost_stop

    assert _lost_stop(_Stop(128 + signal.SIGTERM)) == signal.SIGTERM
    assert _lost_stop(KeyboardInterrupt()) == signal.SIGINT and _lost_stop(RuntimeError()) is None

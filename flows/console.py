"""What a terminal user sees of Prefect's own logging when a run ends for a reason nnlab reports itself.

Prefect logs a failed or crashed task run and flow run with full tracebacks (three for one bad data folder, four
lines for a Ctrl-C). When the cause is one nnlab explains in one line of its own (bad data, a full or read-only
disk, DVC's lock held too long, an interrupt), those records are left out of the terminal; they still reach
the Prefect API, so the Prefect UI keeps the whole story. Any other failure is shown as Prefect logs it.
Prefect's INFO lines (runs begun and finished) and MLflow's known chatter stay off the terminal too: a run prints
its own lines (NNLAB_SHOW_PREFECT_LINKS=1 brings Prefect's back).

And how SIGTERM (`kill`, a scheduler's or a container's stop) ends `nnlab run` and `nnlab sweep`: the way Ctrl-C
does (take_sigterm), with exit code 143.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

# exception class names whose message is the whole story (tasks.data.DataError, tasks.files.StoreWriteError,
# tasks.dvc.DvcLockTimeout, tasks.stages.RunInterrupted) and Prefect's words for a crash by interrupt
EXPLAINED = ("DataError", "StoreWriteError", "DvcLockTimeout", "RunInterrupted", "KeyboardInterrupt")
CRASH_WORDS = ("aborted by an interrupt signal", "aborted by a termination signal", "Execution was cancelled by the runtime environment")


# Prefect's "View at <UI>/runs/flow-run/<id>" points at the server the flow reports to. nnlab's temporary server
# serves no UI and stops with the command: such a link is dead on arrival, so it stays out of the terminal
# (flows/prefect_server.py sets this while its temporary server is the API; NNLAB_SHOW_PREFECT_LINKS=1 shows it);
# a link to the user's own server (PREFECT_API_URL) is printed.
TEMPORARY_API: list[str] = []


def prefect_chatter_shown() -> bool:
    """Prefect's INFO lines (flow and task runs begun and finished, the "View at" link) on the terminal: off by
    default, a run prints its own lines; NNLAB_SHOW_PREFECT_LINKS=1 shows them (the Prefect UI has them all)."""
    return os.environ.get("NNLAB_SHOW_PREFECT_LINKS") == "1"


class HideExplained(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect") or record.levelno < logging.INFO:
            return True
        if record.levelno < logging.WARNING and not prefect_chatter_shown():
            # a link into the UI of the user's own Prefect server is worth its line; the temporary one has none
            return not TEMPORARY_API and record.getMessage().startswith("View at ")
        if record.exc_info and record.exc_info[0] is not None:
            if any(c.__name__ in EXPLAINED for c in record.exc_info[0].__mro__):
                return False
        message = record.getMessage()
        if any(w in message for w in CRASH_WORDS):
            return False
        return not any(f"{name}(" in message or f"{name}:" in message for name in EXPLAINED)


# MLflow's lines that are not about the user's run: the store's first migration, and the pickle caution of models
# whose inputs torch.export cannot trace (token ids): nnlab serves them from the logged weights alone
# (tasks/serving.py: no code from the store runs); loading that MLflow model with mlflow.pyfunc does unpickle it,
# as docs/pipeline.md says. Everything else MLflow logs is shown.
MLFLOW_CHATTER = ("Creating initial MLflow database tables", "Updating database tables",
                  "Saving pytorch model by Pickle or CloudPickle format")


class HideLibraryChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("mlflow") and record.levelno < logging.ERROR
                    and record.getMessage().startswith(MLFLOW_CHATTER))


def quiet_libraries() -> None:
    """MLflow's known, harmless console lines left out (its logger has a handler of its own; alembic's INFO lines
    of a first migration go to the root)."""
    import mlflow  # noqa: F401  (sets up MLflow's logging on import)

    logging.getLogger("alembic").setLevel(logging.WARNING)
    for handler in logging.getLogger("mlflow").handlers:
        if not any(isinstance(f, HideLibraryChatter) for f in handler.filters):
            handler.addFilter(HideLibraryChatter())


def _thread_excepthook(args) -> None:
    """An interrupt re-raised in a helper thread (the process pool's result callbacks) is the main thread's to
    report; anything else is printed as Python would."""
    if isinstance(args.exc_value, KeyboardInterrupt):
        return
    _default_excepthook(args)


_default_excepthook = threading.excepthook


def hide_explained_failures() -> None:
    """Attach the filter to the console handlers of Prefect's loggers (after Prefect has set up logging)."""
    import prefect.main  # noqa: F401  (sets up Prefect's logging on import)

    threading.excepthook = _thread_excepthook
    quiet_libraries()

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # "": the root, where run logs land
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, HideExplained)
                                                                      for f in handler.filters):
                handler.addFilter(HideExplained())


# ---------------------------------------------------------------- SIGTERM, taken as Ctrl-C

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt: whatever stops on Ctrl-C stops on it
    (the run being trained is marked KILLED, a sweep's workers are stopped, the resume command printed)."""


_TERMINATED: list[int] = []  # the signal, once SIGTERM has arrived
_resending: list[bool] = []  # once the hook that sends a lost Ctrl-C again is in place


def _on_sigterm(signum, frame) -> None:
    if _TERMINATED:  # a second SIGTERM while the first is being handled: the cleanup goes on
        return
    _TERMINATED.append(signum)
    raise Terminated()


def _lost_signal(e: BaseException) -> int | None:
    if isinstance(e, Terminated):  # the SIGTERM never took effect: the next one must not be taken as a second
        _TERMINATED.clear()
        return signal.SIGTERM
    return signal.SIGINT if isinstance(e, KeyboardInterrupt) else None


def take_sigterm(*_hook_args) -> None:
    """From now on SIGTERM raises Terminated in the main thread. Called as a command starts, and again as its flow's
    `on_running` hook: for a flow's duration Prefect puts its own SIGTERM handler in place, whose TerminationSignal
    is no KeyboardInterrupt (nothing is marked KILLED) and which then re-sends the signal to the handler it found;
    the hook puts this one back inside the flow (Prefect restores it as the flow ends)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        if not _resending:  # a Ctrl-C lost in a garbage collector's callback comes again (tasks/signals.py)
            from tasks.signals import resend_lost

            resend_lost(_lost_signal)
            _resending.append(True)


def terminated() -> bool:
    return bool(_TERMINATED)


def interruption() -> tuple[str, int]:
    """How an interrupted command says so, and its exit code: after SIGTERM 143 (128 + 15), after Ctrl-C 130."""
    return ("terminated (SIGTERM)", 128 + _TERMINATED[0]) if _TERMINATED else ("interrupted", 130)

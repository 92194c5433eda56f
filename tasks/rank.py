"""The processes of a data-parallel run (tasks/distributed.py).

`python -m tasks.rank --agent TORCHRUN_ARGS...`: torchrun itself (torch.distributed.run's parser and elastic
agent), ending quietly with an exit code when a rank fails or a signal stops it: the launcher names the rank and
the reason in one line of its own, instead of the agent's report and tracebacks.

`python -m tasks.rank SPEC`: one rank, started by the agent. It joins the process group, runs the training stage as the launcher's process would have (rank 0 records the
run and writes what the stage returned beside the spec), and leaves a word for the launcher: `rank-N.started`,
then `rank-N.done` or `rank-N.error` (why)."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from tasks.distributed import enter, join
from tasks.signals import resend_lost


RENDEZVOUS_FAILED = 3  # the agent's exit code when the processes of the run never met


class _Stop(SystemExit):
    pass


def _stopped(signum, frame):
    raise _Stop(128 + signum)


def _lost_stop(e: BaseException) -> int | None:  # the signal behind a stop swallowed in a callback
    if isinstance(e, _Stop):
        return e.code - 128
    return signal.SIGINT if isinstance(e, KeyboardInterrupt) else None


def _peer_left(e: BaseException) -> bool:
    """A collective that failed because another rank had gone (stopped or crashed) before this one heard why."""
    return isinstance(e, RuntimeError) and any(w in str(e) for w in ("Connection closed by peer",
                                                                      "Connection reset by peer"))


def _watch_agent(patience: float = 15.0) -> None:
    """The agent starts each rank in a session of its own: if the agent is gone (killed -9 with its launcher), a
    rank stops as the agent's SIGTERM would stop it (rank 0 marks its run), ended after `patience` s at most."""
    import threading
    import time

    agent = os.getppid()

    def watch():
        while os.getppid() == agent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(patience)
        os._exit(143)

    threading.Thread(target=watch, name="nnlab-watch-agent", daemon=True).start()


def main(spec_path: str) -> int:
    from tasks.config import validate
    from tasks.files import write_json

    job = Path(spec_path).parent
    spec = json.loads(Path(spec_path).read_text())
    cfg = validate(spec["config"])
    name = spec["name"]
    w = join(cfg.train_for(name).distributed.timeout)
    w.job = job
    enter(w)
    (job / f"rank-{w.rank}.started").write_text(str(os.getpid()))
    signal.signal(signal.SIGTERM, _stopped)
    resend_lost(_lost_stop)  # a Ctrl-C or SIGTERM lost in a callback: this rank would train on alone
    _watch_agent()
    try:
        from tasks.stages import train_stage

        trained = train_stage(cfg, name, spec["data_dir"], spec["out_dir"], spec["parent_run_id"],
                              spec["extra_tags"])
        if w.rank == 0:
            write_json(job / "trained.json", vars(trained))
        (job / f"rank-{w.rank}.done").touch()
        return 0
    except (KeyboardInterrupt, _Stop) as e:  # Ctrl-C, or the agent stopping the ranks: rank 0 marked its run
        (job / f"rank-{w.rank}.error").write_text("stopped by torchrun (another rank failed, or Ctrl-C)")
        return 143 if isinstance(e, _Stop) else 130
    except BaseException as e:
        if _peer_left(e):  # an echo: the peer's own error, or the stop that reached it first, says why
            (job / f"rank-{w.rank}.error").write_text(f"stopped by torchrun (a peer left first: {e})")
            return 1
        (job / f"rank-{w.rank}.error").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def agent(argv: list[str]) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # "shutting down workers", ...
    try:
        run(parse_args(argv))
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError:
        return 1
    except RendezvousError as e:  # the machines never met: the launcher says where and how long it waited
        print(f"rendezvous: {type(e).__name__}{f': {e}' if str(e) else ''}", file=sys.stderr, flush=True)
        return RENDEZVOUS_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(agent(sys.argv[2:]) if sys.argv[1] == "--agent" else main(sys.argv[1]))

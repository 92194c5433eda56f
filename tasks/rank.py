"""One rank of a data-parallel run (tasks/distributed.py): `python -m tasks.rank SPEC`, started by torchrun.

It joins the process group, runs the training stage as the launcher's process would have (rank 0 records the
run and writes what the stage returned beside the spec), and leaves a word for the launcher: `rank-N.started`,
then `rank-N.done` or `rank-N.error` (why)."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from tasks.distributed import enter, join


class _Stop(SystemExit):
    pass


def _stopped(signum, frame):
    raise _Stop(128 + signum)


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
    try:
        from tasks.stages import train_stage

        trained = train_stage(cfg, name, spec["data_dir"], spec["out_dir"], spec["parent_run_id"],
                              spec["extra_tags"])
        if w.rank == 0:
            write_json(job / "trained.json", vars(trained))
        (job / f"rank-{w.rank}.done").touch()
        return 0
    except BaseException as e:
        why = "stopped by torchrun (another rank failed, or Ctrl-C)" if isinstance(e, (KeyboardInterrupt, _Stop)) \
            else f"{type(e).__name__}: {e}"
        (job / f"rank-{w.rank}.error").write_text(why)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

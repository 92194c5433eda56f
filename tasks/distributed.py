"""One run's training over several processes: data-parallel with torch.distributed, launched by torchrun.

`train.distributed.nproc_per_node` N > 1 (`nnlab run --nproc N`) makes the training stage start `torchrun`
(torch.distributed.run: elastic launch, c10d rendezvous) on `python -m tasks.rank SPEC`; each of the N
processes (ranks) runs the same training stage with a `World`:

- every rank draws the same batches (the run's seeded order) of `batch_size` x world size rows and trains on its
  own slice of each; DistributedDataParallel averages the gradients (gloo on the CPU, NCCL on GPUs, one GPU a
  rank), each rank's loss weighted by its share of the batch, so N processes at batch B follow one process at
  batch N x B;
- rank 0 alone holds the run's lock, opens (or reopens) the MLflow run, logs, checkpoints and writes the model;
  the others start from rank 0's exact state (its checkpoint when resuming), broadcast before the first epoch;
- the epoch's training metrics are averaged over ranks (weighted by their rows); each rank evaluates the whole
  validation split (the same weights: the same numbers); rank 0 decides when to stop, for all.

Several machines: each runs the same command with `nnodes` and one `rdzv_endpoint` (HOST:PORT of one of them);
the machine whose process gets rank 0 records the run. Faults: a rank that dies makes torchrun stop the others,
and the launcher marks the run FAILED naming the rank; the same command resumes from the last checkpoint.
Steps with more than one optimizer (the GANs) are refused: DDP's one backward per step does not fit them.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

JOBS = Path(".nnlab/distributed")  # one folder per launch: the spec, rank 0's run id and result, ranks' errors
_WORLD: World | None = None  # set in a rank process (tasks/rank.py)


class DistributedRefused(ValueError):
    """A run that cannot be trained data-parallel (its step, its device): said before anything starts."""


class DistributedFailed(RuntimeError):
    """A rank failed or died: why, and the run rank 0 had opened (marked FAILED), if any."""

    def __init__(self, reason: str, run_id: str | None):
        super().__init__(reason)
        self.reason, self.run_id = reason, run_id


class DistributedInterrupted(KeyboardInterrupt):
    """Ctrl-C: every rank stopped; rank 0 marked its run (`run_id`, None if it had none yet) KILLED."""

    def __init__(self, run_id: str | None):
        super().__init__(run_id)
        self.run_id = run_id


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    backend: str
    device: torch.device
    job: Path | None = None  # the launch's folder (rank 0 leaves the run id there)

    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's rows of a batch every rank drew, and its share of the batch x the world size (the weight
        that makes DDP's average of per-rank mean losses the whole batch's mean)."""
        mine = idx.tensor_split(self.size)[self.rank]
        return mine, len(mine) * self.size / max(len(idx), 1)

    def mean(self, metrics: dict, rows: int) -> dict:
        """Per-rank means -> the world's, weighted by each rank's rows."""
        import torch.distributed as dist

        import torch

        keys = sorted(metrics)
        t = torch.tensor([rows] + [metrics[k] * rows for k in keys], dtype=torch.float64, device=self._on())
        dist.all_reduce(t)
        out = {k: float(t[i + 1] / t[0]) for i, k in enumerate(keys)}
        if "train_perplexity" in out:  # exp of the mean loss, not a mean of exps
            import math

            out["train_perplexity"] = math.exp(min(out["train_loss"], 50.0))
        return out

    def same(self, value):
        """Rank 0's value, on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._on())
        return box[0]

    def share_state(self, trainer) -> None:
        """Every rank starts where rank 0 does (fresh or resumed): its whole trainer state, broadcast."""
        import torch

        buf = None
        if self.rank == 0:
            b = io.BytesIO()
            torch.save(trainer.state_dict(), b)
            buf = b.getvalue()
        buf = self.same(buf)
        if self.rank:
            trainer.load_state_dict(torch.load(io.BytesIO(buf), map_location=trainer.device, weights_only=False))

    def wrap(self, step) -> None:
        """DistributedDataParallel around the model the step's forward pass calls."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        step.net = DistributedDataParallel(step.model, device_ids=ids)

    def lead(self, trainer, run) -> None:
        """Rank 0, its run open: its state to every rank, the world on the run, its id for the launcher."""
        run.set_tags(self.tags())
        if self.job is not None:
            (self.job / "run_id").write_text(run.run_id)
        self.share_state(trainer)
        self.wrap(trainer.step)

    def follow(self, trainer, train, val) -> None:
        """Another rank: from rank 0's state, the same epochs; rank 0 alone logs and checkpoints."""
        self.share_state(trainer)
        self.wrap(trainer.step)
        trainer.fit(train, val)
        return None

    def tags(self) -> dict[str, str]:
        return {"nnlab.world_size": str(self.size), "nnlab.backend": self.backend,
                "nnlab.devices": ", ".join(f"cuda:{i}" for i in range(self.size)) if self.device.type == "cuda"
                else f"cpu x {self.size} processes"}

    def _on(self) -> torch.device:
        import torch

        return self.device if self.backend == "nccl" else torch.device("cpu")


def world() -> World | None:
    """This process's place in a data-parallel run, or None (the usual single process)."""
    return _WORLD


def enter(w: World) -> None:
    global _WORLD
    _WORLD = w


def spread(tcfg) -> bool:
    """Whether train.distributed asks for more than one process."""
    return tcfg.distributed.nproc_per_node * tcfg.distributed.nnodes > 1


def refusal(cfg) -> str | None:
    """Why a run of `cfg` cannot train as train.distributed asks (before anything starts), or None."""
    from models.options import MODELS  # the torch-free catalogue: validation imports no torch

    for name in cfg.models:
        tcfg = cfg.train_for(name)
        if not spread(tcfg):
            continue
        import torch

        arch = cfg.model_options(name)[0]
        if MODELS[arch].family == "gan":
            return (f"{name}: {arch} cannot train data-parallel (train.distributed.nproc_per_node > 1, --nproc): a "
                    "GAN steps its generator and discriminator with two optimizers, and DistributedDataParallel "
                    "averages one backward pass per step; train it in one process")
        gpus = torch.cuda.device_count() if tcfg.device != "cpu" and torch.cuda.is_available() else 0
        if gpus and tcfg.distributed.nproc_per_node > gpus:
            return (f"{name}: train.distributed.nproc_per_node {tcfg.distributed.nproc_per_node} asks for more "
                    f"GPUs than this machine has ({gpus}); one process a GPU: at most {gpus} (or train.device=cpu)")
    return None


def peer_lost(e: BaseException) -> bool:
    """A collective that failed because another rank is gone (gloo's read error on a reset connection, NCCL's
    DistBackendError): not this run's fault; the launcher names the rank that died."""
    if _WORLD is None:
        return False
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo/transport" in str(e))


def check_step(step, name: str) -> None:
    from tasks.kinds.supervised import SupervisedStep

    if not isinstance(step, SupervisedStep):
        raise DistributedRefused(
            f"{name}: {type(step).__name__} cannot train data-parallel (train.distributed.nproc_per_node > 1): it "
            "steps more than one network with more than one optimizer (a GAN's generator and discriminator), and "
            "DistributedDataParallel averages one backward pass per step; train it in one process (nproc 1)")


# ---------------------------------------------------------------- the launcher (the training stage's process)


def launch(cfg, name: str, data_dir, out_dir, parent_run_id: str | None, extra_tags: dict | None) -> dict | None:
    """torchrun the training stage over train.distributed's processes; what rank 0's stage returned (None when
    rank 0 ran on another machine). Ctrl-C or SIGTERM stops every rank; a rank's death fails the run, naming it."""
    from tasks.files import write_json

    d = cfg.train_for(name).distributed
    job = JOBS / f"{name}-{os.getpid()}-{int(time.time())}"
    job.mkdir(parents=True, exist_ok=True)
    write_json(job / "spec.json", {"config": cfg.model_dump(mode="json"), "name": name, "data_dir": str(data_dir),
                                   "out_dir": str(out_dir) if out_dir else None, "parent_run_id": parent_run_id,
                                   "extra_tags": extra_tags or {}})
    cmd = [sys.executable, "-m", "tasks.rank", "--agent", "--nproc-per-node", str(d.nproc_per_node),
           "--max-restarts", "0", "--monitor-interval", "0.5"]
    if d.nnodes == 1:
        cmd += ["--standalone"]  # a rendezvous on a free local port
    else:
        rdzv_id = f"nnlab-{name}-{cfg.seed}"  # the same on every machine running the same command
        cmd += ["--nnodes", str(d.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", d.rdzv_endpoint,
                "--rdzv-id", rdzv_id, "--rdzv-conf", f"join_timeout={int(d.timeout)}"]
    cmd += ["-m", "tasks.rank", str(job / "spec.json")]
    print(f"{name}: training on {d.nproc_per_node * d.nnodes} processes ({d.nproc_per_node} here"
          + (f", {d.nnodes} machines meeting at {d.rdzv_endpoint}" if d.nnodes > 1 else "") + ")", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // d.nproc_per_node))}
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C: the agent and the ranks had it too, and are stopping
        _stop(proc, first=10.0)
        raise DistributedInterrupted(_read(job / "run_id")) from None
    except BaseException:  # SIGTERM to this process alone: every rank stops
        _stop(proc)
        raise
    if rc == 0:
        result = job / "trained.json"
        done = json.loads(result.read_text()) if result.exists() else None
        shutil.rmtree(job, ignore_errors=True)  # kept only when something failed: what each rank said
        if done is None:
            print(f"{name}: this machine's ranks finished; the machine that had rank 0 recorded the run", flush=True)
        return done
    reason = _why(job, rc) if rc != 3 else (  # tasks/rank.py RENDEZVOUS_FAILED
        f"the {d.nnodes} machines did not all meet at {d.rdzv_endpoint} within train.distributed.timeout "
        f"({d.timeout:g} s): start the same command on each, all reaching that address")
    run_id = _read(job / "run_id")
    if run_id:
        _mark_failed(run_id, reason)
    raise DistributedFailed(reason + ("; the run is marked FAILED, and the same command resumes it from its last "
                                      "checkpoint" if run_id else ""), run_id)


def _stop(proc: subprocess.Popen, first: float = 0.0, patience: float = 20.0) -> None:
    """The agent ended: given `first` seconds to end by itself, then SIGTERM (it stops its ranks: SIGTERM, then
    SIGKILL), then SIGKILL."""
    for sig, wait in ((None, first), (signal.SIGTERM, patience), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            return
        if sig is not None:
            proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _why(job: Path, rc: int) -> str:
    """The root cause first: a rank that died without a word (its peers' errors are then only its echo)."""
    started = sorted(int(p.stem.split("-")[1]) for p in job.glob("rank-*.started"))
    silent = [r for r in started if not (job / f"rank-{r}.error").exists() and not (job / f"rank-{r}.done").exists()]
    if silent:
        return (f"rank {silent[0]} died without a word (killed: a signal, or out of memory); torchrun stopped the "
                f"others (exit {rc})")
    errors = sorted((int(p.stem.split("-")[1]), _read(p)) for p in job.glob("rank-*.error"))
    said = [f"rank {r}: {e}" for r, e in errors if e and "stopped by torchrun" not in e]
    if said:
        return "; ".join(said)
    if started:
        return f"every rank was stopped (exit {rc})"
    return f"torchrun exited with {rc} before every rank started (rendezvous, or the processes' start)"


def _mark_failed(run_id: str, reason: str) -> None:
    from tasks.tracking import Run

    try:
        Run(run_id).finish("FAILED", reason)
    except Exception as e:  # said, never hiding the training's own failure
        print(f"MLflow run {run_id}: not marked FAILED ({type(e).__name__}: {e})", flush=True)


# ---------------------------------------------------------------- a rank (python -m tasks.distributed SPEC)


def join(timeout: float) -> World:
    import datetime

    import torch
    import torch.distributed as dist

    rank, local, size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return World(rank, local, size, backend, device)

"""What our training loop costs over plain PyTorch, what bf16/channels_last buy on this CPU, and the fixed
start-up costs of a run (imports, tracking store, Prefect flow, model logging).

    .venv/bin/python benchmarks/loop_overhead.py [--quick] [--models mlp,simple_cnn,resnet] [--dataset mnist5k|digits]
        [--device cpu|cuda]

On CUDA both loops run as a run there would: bf16 autocast and channels_last (the hand-written loop too).

Prints tables and writes benchmarks/results.json (or --out). Everything it writes besides that goes to a temp
folder: its own MLflow store (MLFLOW_TRACKING_URI) and PREFECT_HOME; never mlruns/ or ~/.prefect.

Method: loops being compared live in one process and run in turns (A, B, A, B, ...) after a warm-up, so
drift and other load on the machine hit both alike; a ratio is the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `tasks`, `models` also when the package is not installed
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false"}
SEED = 0
EPOCHS_PER_ROUND = 3  # full-epoch comparison: the writes of all but the last epoch of a round overlap training
CORES = len(os.sched_getaffinity(0))
DEVICE = "cpu"  # --device
BATCH_SIZE = 64  # --batch-size (the params.yaml default)


def sync() -> None:  # CUDA work is asynchronous: a round ends when the device is done
    if DEVICE.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------- machine load

def machine_busy_s() -> float:
    # CPU seconds all cores spent busy since boot (first line of /proc/stat, in clock ticks)
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_busy_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def foreign_load(out: dict):
    # Share of the machine other processes used meanwhile: 0.0 = we had it to ourselves; 0.5 = one of 2 cores gone.
    t0, m0, o0 = time.perf_counter(), machine_busy_s(), own_busy_s()
    yield
    wall = time.perf_counter() - t0
    out["foreign_load"] = max(0.0, (machine_busy_s() - m0) - (own_busy_s() - o0)) / (wall * CORES)
    out["section_seconds"] = wall


# ---------------------------------------------------------------- data and models

def load_data(source: str, tmp: Path):
    from tasks.config import DataConfig
    from tasks.data import load_prepared, prepare

    prepare(DataConfig(source=source), SEED, tmp / "data")  # the same splits and statistics a run gets
    return load_prepared(tmp / "data")


def splits(d, channels_last: bool):
    import torch

    from tasks.train import to_device

    norm, dev = d.manifest["normalization"], torch.device(DEVICE)
    return [to_device(x, y, norm["mean"], norm["std"], dev, channels_last)
            for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test))]


def build(arch: str, manifest: dict, channels_last: bool):
    import torch

    from models.registry import create_model
    from tasks.train import seed_everything

    seed_everything(SEED)  # same seed -> same initial weights for every loop that builds this arch
    model = create_model(arch, input_shape=tuple(manifest["input_shape"]), num_classes=manifest["num_classes"])
    return model.to(DEVICE, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def train_config(**over):
    from tasks.config import TrainConfig

    # TrainConfig's defaults are params.yaml's train section (adam, lr 1e-3, batch 64, no l1/l2/clip/schedule)
    return TrainConfig(**{"device": DEVICE, "epochs": 1, "batch_size": BATCH_SIZE, **over})


# ---------------------------------------------------------------- the two loops

def baseline_loop(model, train, val, cfg, validate: bool):
    # The minimal loop: preloaded tensors, randperm + slicing, forward, loss, zero_grad, backward, step.
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen, bs, n = torch.Generator().manual_seed(SEED), cfg.batch_size, len(train.y)
    cuda = DEVICE.startswith("cuda")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)  # noqa: E731

    def epoch():
        model.train()
        perm = torch.randperm(n, generator=gen).to(DEVICE)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            with autocast():
                loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if validate:  # the same pass Trainer.evaluate makes: batches of 1024, loss and accuracy
            model.eval()
            with torch.no_grad():
                with autocast():
                    out = torch.cat([model(val.x[i:i + 1024]) for i in range(0, len(val.y), 1024)]).float()
                float(F.cross_entropy(out, val.y)), int((out.argmax(1) == val.y).sum())  # to host, as there

    return epoch


def our_loop(model, train, val, cfg, name: str, tmp: Path, epochs: int | None, on_epoch_ms: dict):
    # Trainer plus the very callback stages.train_stage uses after each epoch (MLflow batch with the
    # diagnostics series, checkpoint, progress line). epochs=None: Trainer.train_one_epoch alone.
    import torch

    from tasks.config import flatten
    from tasks.progress import EpochProgress
    from tasks.stages import epoch_callback
    from tasks.tracking import Run
    from tasks.train import Trainer
    from tasks.kinds.supervised import SupervisedStep

    trainer = Trainer(model, cfg, SEED, torch.device(DEVICE), SupervisedStep(model, cfg, torch.device(DEVICE)))
    progress = EpochProgress(name, 10_000, live=False)
    if epochs is not None:  # only whole epochs write to MLflow (training steps alone need no store)
        run = Run.start("loop-overhead", name, {"nnlab.run": name}, flatten({"train": cfg.model_dump()}))
        real = epoch_callback(run, tmp / f"{name}.pt", name, progress)

    def on_epoch(epoch: int, metrics: dict, tr: Trainer) -> None:
        t0 = time.perf_counter()
        real(epoch, metrics, tr)
        on_epoch_ms["main"].append(1000 * (time.perf_counter() - t0))

    def one_round():
        with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch progress line: keep our table readable
            if epochs is None:
                trainer.train_one_epoch(train, progress.step)
                return
            trainer.cfg = trainer.cfg.model_copy(update={"epochs": trainer.epoch + epochs})
            trainer.fit(train, val, on_epoch=on_epoch, progress=progress.step)

    return one_round


# ---------------------------------------------------------------- measuring

def alternate(loops: dict, rounds: int, target_s: float) -> dict[str, list[float]]:
    """Warm up each loop once, then run them in turns; returns seconds per round for each.
    Fast loops get more rounds, up to `target_s` each (at most 60 rounds): their rounds are the noisiest."""
    warm = {}
    for name, epoch in loops.items():
        t0 = time.perf_counter()
        epoch()
        sync()
        warm[name] = time.perf_counter() - t0
    rounds = max(rounds, min(60, int(target_s / max(max(warm.values()), 1e-3))))
    times = {name: [] for name in loops}
    for _ in range(rounds):
        for name, epoch in loops.items():
            t0 = time.perf_counter()
            epoch()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: dict[str, list[float]], n: int, ref: str) -> dict:
    # samples/s from the median round; ratio = median over rounds of (ref seconds / this loop's seconds)
    out = {}
    for name, ts in times.items():
        ratios = [r / t for r, t in zip(times[ref], ts)]
        out[name] = {"samples_per_s": n / statistics.median(ts), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": len(ts),
                     "seconds": [round(t, 5) for t in ts]}
    return out


def loop_overhead(arch: str, d, mode: str, quick: bool, tmp: Path) -> dict:
    image = len(d.manifest["input_shape"]) == 3
    cfg = train_config()  # as a run: precision auto (fp32 on CPU, bf16 on CUDA), channels_last, diagnostics on
    channels_last = image and cfg.channels_last
    train, val, _ = splits(d, channels_last)
    on_epoch_ms: dict[str, list[float]] = {"main": []}
    fit = mode == "epoch"
    epochs = EPOCHS_PER_ROUND if fit else None
    baseline = baseline_loop(build(arch, d.manifest, channels_last), train, val, cfg, validate=fit)
    loops = {
        "ours": our_loop(build(arch, d.manifest, channels_last), train, val, cfg, f"{arch}-{mode}", tmp, epochs,
                         on_epoch_ms),
        "baseline": lambda: [baseline() for _ in range(epochs or 1)],
    }
    times = alternate(loops, rounds=2 if quick else 5, target_s=0 if quick else 8)
    res = summarise(times, len(train.y) * (epochs or 1), ref="baseline")
    ms = on_epoch_ms["main"]  # per epoch, in the training thread
    res["ours"]["on_epoch_ms"] = statistics.median(ms) if ms else 0.0
    res["settings"] = {"precision": "bf16" if DEVICE.startswith("cuda") else "fp32", "device": DEVICE, "channels_last": channels_last, "batch_size": cfg.batch_size,
                       "train_samples": len(train.y), "validation": fit, "epochs_per_round": epochs or 1,
                       "diagnostics_every": cfg.diagnostics.every if cfg.diagnostics.enabled else None}
    return res


def precision_formats(arch: str, d, quick: bool) -> dict:
    # Trainer.train_one_epoch under each setting; channels_last converts model and inputs, as train_stage does.
    import torch

    from tasks.train import Trainer
    from tasks.kinds.supervised import SupervisedStep

    image = len(d.manifest["input_shape"]) == 3
    loops = {}
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            if channels_last and not image:
                continue
            cfg = train_config(precision=precision, channels_last=channels_last)
            model = build(arch, d.manifest, channels_last)
            trainer = Trainer(model, cfg, SEED, torch.device(DEVICE), SupervisedStep(model, cfg, torch.device(DEVICE)))
            train = splits(d, channels_last)[0]
            loops[f"{precision} {'channels_last' if channels_last else 'contiguous'}"] = (
                lambda t=trainer, s=train: t.train_one_epoch(s))
    times = alternate(loops, rounds=2 if quick else 5, target_s=0 if quick else 4)
    return summarise(times, len(d.y_train), ref="fp32 contiguous")


def bf16_accuracy(arch: str, d, epochs: int) -> dict:
    # Same seed, same data: does bf16 autocast + channels_last train as well as fp32? Tested in fp32, as
    # evaluate_stage does (the trained weights are fp32 in both cases).
    import torch

    from tasks.kinds.supervised import classification_metrics, predict
    from tasks.train import Trainer
    from tasks.kinds.supervised import SupervisedStep

    out = {}
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        train, val, _ = splits(d, channels_last)
        test = splits(d, False)[2]
        model = build(arch, d.manifest, channels_last)
        trainer = Trainer(model, train_config(precision=precision, channels_last=channels_last, epochs=epochs),
                          SEED, torch.device(DEVICE), SupervisedStep(model, train_config(precision=precision, channels_last=channels_last, epochs=epochs), torch.device(DEVICE)))
        res = trainer.fit(train, val)
        model = model.float().to(memory_format=torch.contiguous_format)
        metrics, _ = classification_metrics(predict(model, test.x), test.y, d.manifest["num_classes"])
        out[f"{precision} {'channels_last' if channels_last else 'contiguous'}"] = {
            "test_accuracy": metrics["test_accuracy"], "val_accuracy": res.history[-1]["val_accuracy"],
            "train_loss": res.history[-1]["train_loss"], "seconds_per_epoch": res.seconds / res.epochs}
    return out


# ---------------------------------------------------------------- fixed costs (each in a fresh process)

def child(kind: str, arg: str) -> dict:
    # Runs inside the subprocess; returns what it measured in seconds.
    t0 = time.perf_counter()
    if kind == "import":
        __import__(arg)
        return {"seconds": time.perf_counter() - t0}
    if kind == "tracking":
        return {"seconds": timed_run_start()[1]}
    if kind == "flow":
        return child_flow(heartbeats=arg == "on")
    if kind == "log_model":
        return child_log_model()
    raise ValueError(kind)


def timed_run_start():
    # experiment (created if new) + run + params in the store at MLFLOW_TRACKING_URI; imports kept out of the time
    import mlflow  # noqa: F401
    from mlflow.entities import Param, RunTag  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401

    from tasks.tracking import Run

    t0 = time.perf_counter()
    run = Run.start("bench", "setup", {"nnlab.run": "setup"}, {"train.lr": "0.001"})
    return run, time.perf_counter() - t0


def child_flow(heartbeats: bool) -> dict:
    from prefect import flow, task
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    @task
    def one() -> int:
        return 1

    @flow
    def trivial() -> int:
        return one()

    # off: what flows/launch.py local_flow_settings() does for `nnlab run`; on: Prefect's default frequency
    settings = contextlib.nullcontext() if heartbeats else temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
    times = []
    with settings:
        # #1 boots the temporary server; #2-#4 cost one more flow each. #2 alone is not enough: right after
        # the boot it sometimes takes ~2 s more (seen with heartbeats off, where nothing else hides it).
        for _ in range(4):
            t0 = time.perf_counter()
            trivial()
            times.append(time.perf_counter() - t0)
        frequency = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    return {"first": times[0], "more": statistics.median(times[1:]), "each": times,
            "heartbeat_frequency_s": frequency}


def child_log_model() -> dict:
    import numpy as np

    from models.registry import Deployed, create_model

    run, start = timed_run_start()
    model = Deployed(create_model("mlp", input_shape=(1, 28, 28), num_classes=10), [33.0], [78.0])
    example = np.zeros((4, 1, 28, 28), np.float32)  # raw pixels, as train_stage logs x_test[:4]
    times = []
    for _ in range(2):  # first: includes mlflow.pytorch's lazy imports; second: the logging itself
        t0 = time.perf_counter()
        run.log_model(model, example, metadata={"nnlab.arch": "mlp"})
        times.append(time.perf_counter() - t0)
    return {"start": start, "first": times[0], "second": times[1]}


def spawn(args: list[str], env: dict) -> tuple[dict, float]:
    # -> (what the child measured, wall seconds of the whole process as the parent sees it)
    t0 = time.perf_counter()
    p = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), wall


FIXED_ROWS = (  # in the order a run meets them
    "python -c pass (interpreter start)", "nnlab --help", "import torch", "import mlflow", "import prefect",
    "tracking: experiment + run, new store", "tracking: experiment + run, existing store",
    "Run.log_model, first (lazy imports)", "Run.log_model, second",
    "prefect flow #1, fresh PREFECT_HOME (server boot + DB)",
    "prefect flow #1 (server boot), heartbeats on", "prefect flow #1 (server boot), heartbeats off",
    "prefect flows #2-#4 (per flow), heartbeats on", "prefect flows #2-#4 (per flow), heartbeats off",
)


def fixed_costs(repeats: int, tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")}
    env |= QUIET_ENV | {"PREFECT_HOME": str(tmp / "prefect")}
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    nnlab = str(Path(sys.executable).parent / "nnlab")
    rows: dict[str, list] = {key: [] for key in FIXED_ROWS}

    def add(key, value, wall):
        rows[key].append({"seconds": value, "process_wall": wall})

    # a brand-new PREFECT_HOME: the first flow also creates the server's database (once per machine/user)
    got, wall = spawn(me + ["flow", "off"], env)
    add("prefect flow #1, fresh PREFECT_HOME (server boot + DB)", got["first"], wall)
    add("prefect flows #2-#4 (per flow), heartbeats off", got["more"], None)  # unaffected by the DB creation
    for i in range(repeats):
        add("python -c pass (interpreter start)", None, spawn([sys.executable, "-c", "pass"], env)[1])
        add("nnlab --help", None, spawn([nnlab, "--help"], env)[1])
        for module in ("torch", "mlflow", "prefect"):
            got, wall = spawn(me + ["import", module], env)
            add(f"import {module}", got["seconds"], wall)
        store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / f'store{i}' / 'mlflow.db'}"}
        got, wall = spawn(me + ["tracking", "-"], env | store)
        add("tracking: experiment + run, new store", got["seconds"], wall)
        got, wall = spawn(me + ["log_model", "-"], env | store)  # the store exists now
        add("tracking: experiment + run, existing store", got["start"], None)
        add("Run.log_model, first (lazy imports)", got["first"], wall)
        add("Run.log_model, second", got["second"], None)
        for hb in ("on", "off") if repeats > 1 else ("on",):  # quick: `off` comes from the fresh-home run
            got, wall = spawn(me + ["flow", hb], env)
            add(f"prefect flow #1 (server boot), heartbeats {hb}", got["first"], wall)
            add(f"prefect flows #2-#4 (per flow), heartbeats {hb}", got["more"], None)

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    return {key: {"seconds": med([r["seconds"] for r in rs]) if rs[0]["seconds"] is not None
                  else med([r["process_wall"] for r in rs]),
                  "process_wall": med([r["process_wall"] for r in rs]), "runs": len(rs),
                  "wall_only": rs[0]["seconds"] is None, "each": rs}
            for key, rs in rows.items() if rs}


# ---------------------------------------------------------------- report

def table(title: str, columns: list[str], rows: list[list], caption: str = ""):
    from rich.table import Table

    t = Table(title=title, caption=caption, caption_justify="left", title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def load_note(section: dict) -> str:
    load = section.get("foreign_load", 0.0)
    warn = "  [bold red]results distorted: the machine was shared[/]" if load > 0.1 else ""
    return f"other processes used {100 * load:.0f}% of the CPU during this section{warn}"


def show_loops(console, results: dict) -> None:
    labels = {"epoch": "full epoch: train + validation + on_epoch (MLflow batch + checkpoint) vs. train + "
                       "the same validation pass",
              "train": "train epoch only: Trainer.train_one_epoch vs. the hand-written train loop"}
    for mode, label in labels.items():
        if mode not in results["loop"]:
            continue
        section, rows = results["loop"][mode], []
        for arch, r in section["models"].items():
            o, b = r["ours"], r["baseline"]
            on_epoch = f"{o['on_epoch_ms']:.1f}" if mode == "epoch" else "-"
            rows.append([arch, f"{b['samples_per_s']:,.0f}", f"{o['samples_per_s']:,.0f}",
                         f"[bold]{o['ratio']:.3f}[/]", f"{o['ratio_min']:.3f}-{o['ratio_max']:.3f}", on_epoch,
                         o["rounds"]])
        s = next(iter(section["models"].values()))["settings"]
        rounds = f"rounds of {s['epochs_per_round']} epochs, " if s["epochs_per_round"] > 1 else ""
        console.print(table(f"Loop overhead, {label}",
                            ["model", "baseline samples/s", "ours samples/s", "ratio ours/baseline",
                             "ratio range", "on_epoch ms", "rounds"], rows,
                            f"{s['precision']} on {s['device']}, channels_last={s['channels_last']}, batch {s['batch_size']}, "
                            f"{s['train_samples']} training samples, {rounds}diagnostics every "
                            f"{s['diagnostics_every']} steps (ours); {load_note(section)}"))


def show_precision(console, results: dict) -> None:
    rows = []
    for arch, r in results["precision"]["models"].items():
        for variant, v in r.items():
            rows.append([f"{arch} {variant}", f"{v['samples_per_s']:,.0f}", f"[bold]{v['ratio']:.3f}[/]",
                         f"{v['ratio_min']:.3f}-{v['ratio_max']:.3f}", v["rounds"]])
    console.print(table(f"Precision / memory format on {DEVICE}, batch {BATCH_SIZE} (Trainer.train_one_epoch, train only)",
                        ["model, setting", "samples/s", "speed vs fp32 contiguous", "range", "rounds"], rows,
                        load_note(results["precision"])))
    if results.get("accuracy"):
        acc = results["accuracy"]
        rows = [[k, f"{v['test_accuracy']:.4f}", f"{v['val_accuracy']:.4f}", f"{v['train_loss']:.4f}",
                 f"{v['seconds_per_epoch']:.2f}"] for k, v in acc["runs"].items()]
        console.print(table(f"{acc['arch']} trained {acc['epochs']} epochs, seed {SEED} (test accuracy in fp32)",
                            ["setting", "test accuracy", "val accuracy", "final train loss", "s/epoch"], rows,
                            load_note(acc)))


def show_fixed(console, results: dict) -> None:
    rows = []
    for key, v in results["fixed"]["rows"].items():
        wall = f"{v['process_wall']:.2f}" if v["process_wall"] is not None else "-"
        rows.append([key, f"{v['seconds']:.3f}", wall, v["runs"]])
    console.print(table("Fixed costs, each in a fresh process (seconds, median)",
                        ["what", "measured s", "whole process s", "runs"], rows,
                        "measured: perf_counter around the step inside the process (for `python -c pass` and "
                        "`nnlab --help`: the whole process)\n" + load_note(results["fixed"])))


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 rounds on 1024 training samples, 1 fixed-cost run, no accuracy training")
    p.add_argument("--models", default="mlp,simple_cnn", help="comma-separated registered architectures")
    p.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "digits"])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--modes", default="epoch,train", help="loop section: epoch (with MLflow writes), train (steps only)")
    p.add_argument("--threads", type=int, default=CORES, help="torch threads (all loops)")
    p.add_argument("--sections", default="loop,precision,fixed", help="any of loop,precision,fixed")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the bf16 accuracy comparison (full mode)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.json")
    p.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args, results: dict, tmp: Path, console) -> None:
    sections = set(args.sections.split(","))
    models = results["models"]
    if sections & {"loop", "precision"}:
        d = load_data(args.dataset, tmp)
        if args.quick:  # a smoke test of the script, not a measurement: 16 steps per epoch
            d.x_train, d.y_train = d.x_train[:1024], d.y_train[:1024]
        results["data"] = {"sizes": d.manifest["sizes"], "input_shape": d.manifest["input_shape"]}
    if "loop" in sections:
        results["loop"] = {}
        for mode in args.modes.split(","):
            section = results["loop"][mode] = {"models": {}}
            with foreign_load(section):
                for arch in models:
                    section["models"][arch] = loop_overhead(arch, d, mode, args.quick, tmp)
        show_loops(console, results)
    if "precision" in sections:
        section = results["precision"] = {"models": {}}
        with foreign_load(section):
            for arch in models:
                section["models"][arch] = precision_formats(arch, d, args.quick)
        if not args.quick and "simple_cnn" in models and DEVICE == "cpu" and len(d.manifest["input_shape"]) == 3:
            results["accuracy"] = {"arch": "simple_cnn", "epochs": args.epochs}
            with foreign_load(results["accuracy"]):
                results["accuracy"]["runs"] = bf16_accuracy("simple_cnn", d, args.epochs)
        show_precision(console, results)
    if "fixed" in sections:
        results["fixed"] = {}
        with foreign_load(results["fixed"]):
            results["fixed"]["rows"] = fixed_costs(1 if args.quick else 3, tmp)
        show_fixed(console, results)


def main(argv=None) -> dict:
    global DEVICE, BATCH_SIZE
    args = parse_args(argv)
    DEVICE, BATCH_SIZE = args.device, args.batch_size
    if args.child:
        print(json.dumps(child(*args.child)))
        return {}
    os.environ.update(QUIET_ENV)
    tmp = Path(tempfile.mkdtemp(prefix="nnlab-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")

    import torch
    from rich.console import Console

    if "epoch" in args.modes or "fixed" in args.sections:
        import mlflow  # noqa: F401  (it sets its own log level on import: quiet it after)

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    command = shlex.join([sys.executable, *sys.argv])
    console.print(f"[bold]command:[/] {command}")
    results = {"command": command, "quick": args.quick, "dataset": args.dataset,
               "models": [m.strip() for m in args.models.split(",") if m.strip()],
               "machine": {"cpu": _cpu_name(), "cores": CORES, "torch_threads": args.threads,
                           "torch": torch.__version__, "device": DEVICE,
                           "gpu": torch.cuda.get_device_name() if DEVICE.startswith("cuda") else None, "python": platform.python_version(),
                           "load_average_at_start": os.getloadavg()}}
    try:
        measure(args, results, tmp, console)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out}")
    return results


def _cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()

"""The `nnlab` command. Heavy libraries (torch, Prefect, MLflow) are imported inside commands so
`nnlab --help` stays fast."""
from __future__ import annotations

import atexit
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from tasks.phases import mark

atexit.register(mark, "exit handlers done")  # registered first, so it runs last of them

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproducible, tracked deep-learning experiments: Prefect flows, DVC data, MLflow runs.")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (the one source of settings)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override: dotted.key=value (repeatable)")]


def quiet_prefect() -> None:
    """Offline-friendly Prefect defaults; a user's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")  # the temporary local server needs no UI


def boot_prefect_server():
    """Start the temporary local Prefect server now (unless the user set PREFECT_API_URL), so its boot overlaps
    the torch/MLflow imports. `with prefect_api(server):` around the flow waits for it and stops it however
    the block is left (flows/prefect_server.py; atexit and SIGTERM stop it too)."""
    from flows.prefect_server import PrefectServerError, start

    try:
        return start()
    except PrefectServerError as e:
        fail(str(e), code=1)


@contextmanager
def prefect_api(server):
    """Wait for the server boot_prefect_server() started and make it the flow's API; stop it on the way out."""
    from flows.prefect_server import PrefectServerError

    try:
        with server:
            mark("server ready")
            yield
    except PrefectServerError as e:
        fail(str(e), code=1)


def local_flow_settings():
    """Settings for a flow run started from this terminal. Heartbeats exist to spot crashed runs on
    workers; here the thread's shutdown join costs ~1 s per flow, so they are off unless the user set them."""
    from contextlib import nullcontext

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ or "PREFECT_RUNNER_HEARTBEAT_FREQUENCY" in os.environ:
        return nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def fail(msg: str, code: int = 2):
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code)


def load(params: Path, sets: list[str] | None, models: str | None = None, runs: bool = False):
    """Validated config; with `models` (a,b) only those runs, with `runs` else params.yaml's `run`."""
    from tasks.config import ConfigError, load_config, select_models

    names = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
    if names == []:
        fail(f"--models: {models!r} names no run; give one or more entries of params.yaml's `models`, comma-separated "
             "(e.g. --models mlp,simple_cnn), or leave --models out to train params.yaml's `run`")
    try:
        cfg = load_config(params, sets or [], names)
        if runs and not names:
            cfg = select_models(cfg, cfg.runs())
        return cfg, names
    except ConfigError as e:
        fail(str(e))


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
        models: Annotated[Optional[str], typer.Option("--models", "-m", help="comma-separated runs to train")] = None):
    """Run the experiment flow: prepare data, train each model, evaluate, register the best."""
    cfg, names = load(params, set_, models, runs=True)  # validate before anything runs: no MLflow run, no data
    check_writable_places()
    mark("config validated")
    quiet_prefect()
    server = boot_prefect_server()
    from flows.console import hide_explained_failures
    from flows.experiment import ExperimentFailed, experiment

    warm_up(cfg)
    hide_explained_failures()
    with explained_failures(), prefect_api(server):
        try:
            with local_flow_settings():
                summary = experiment(str(params), set_ or [], names)
            code = 0
        except ExperimentFailed as e:
            summary, code = e.summary, 1
    mark("flow done")
    print_summary(summary, cfg)
    if summary.get("nnlab.data_source") == "dvc":
        lock_hint()
    mark("summary printed")
    raise typer.Exit(code)


def lock_hint() -> None:
    """The run reproduced DVC's data stages: when that changed dvc.lock (or it was never committed), say so. It
    records which data the runs trained on; committed beside params.yaml, `git checkout` + `dvc checkout`
    bring that data back."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return
    if out.returncode == 0 and out.stdout.strip():
        what = "is new" if out.stdout.startswith("??") else "changed"
        typer.echo(f"dvc.lock {what} (the data these runs used): commit it with params.yaml, "
                   "git add dvc.lock params.yaml && git commit")


def warm_up(cfg) -> None:
    """flows/warm.py's preload for this config's runs, while the temporary server boots."""
    from flows.warm import preload

    preload({(cfg.model_options(name)[0], cfg.data.source) for name in cfg.models})
    mark("imported")


def check_writable_places() -> None:
    """The tracking store and the working folder (data, checkpoints) take writes, before any work starts."""
    from tasks.files import StoreWriteError, check_writable
    from tasks.tracking import check_store

    try:
        check_store()
        check_writable(Path(".nnlab"), "working folder")
    except StoreWriteError as e:
        fail(str(e))


@contextmanager
def explained_failures():
    """End the command with one line of its own for what it can explain: bad data (exit 2), a full or read-only
    disk, DVC's lock held past the timeout (exit 1), Ctrl-C (exit 130, the interrupted run named)."""
    from tasks.data import DataError
    from tasks.dvc import DvcLockTimeout
    from tasks.files import StoreWriteError

    try:
        yield
    except DataError as e:
        fail(str(e))
    except (StoreWriteError, DvcLockTimeout) as e:
        fail(str(e), code=1)
    except KeyboardInterrupt as e:
        run_id = getattr(e, "run_id", None)
        typer.secho(f"interrupted: {e.name}'s MLflow run {run_id} is marked KILLED; the same command resumes it from "
                    "its last finished epoch" if run_id else "interrupted", fg="yellow", err=True)
        raise typer.Exit(130) from None


def print_summary(summary: dict, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    from tasks.kinds import experiment_kind, main_metric
    from tasks.tracking import tracking_uri

    metric, more = main_metric(cfg), experiment_kind(cfg).summary_columns  # e.g. a forecast's naive RMSE beside it
    console = Console() if sys.stdout.isatty() else Console(width=140)
    table = Table(title=f"nnlab experiment on {cfg.data.source}", pad_edge=False)
    width = max([len("architecture"), *(len(r["name"]) for r in summary["results"] + summary["failed"])])
    table.add_column("architecture", no_wrap=True, min_width=width)  # 80 columns: the number headers wrap
    for col in (metric, *more, "epochs", "seconds"):
        table.add_column(col.replace("_", " "), min_width=max(len(w) for w in col.split("_")))
    table.add_column("MLflow run id", no_wrap=True, min_width=32)
    for r in summary["results"]:
        values = [f"{r[k]:.4f}" if isinstance(r.get(k), (int, float)) else "-" for k in (metric, *more)]
        table.add_row(r["name"], *values, str(r["epochs"]), f"{r['seconds']:.1f}", r["run_id"])
    for f in summary["failed"]:
        table.add_row(f["name"], "[red]FAILED[/red]", *["-"] * len(more), "-", "-", f["error"][:60])
    console.print(table)
    reg = summary.get("registered")
    if reg and reg.get("registered") is False:
        console.print(f"[yellow]not registered[/yellow] in {reg['name']}: {reg['reason']}")
    elif reg:
        console.print(f"registered {reg['name']} v{reg['version']} ({reg['model']}, {metric} "
                      f"{reg[metric]:.4f}) as [bold]{reg['alias']}[/bold]"
                      + (f" ({reg['decision']})" if reg.get("decision", "").startswith("health") else ""))
    for r in summary["results"]:
        for h in r.get("health", []):
            curves = "the run's health/grad_norm and layers/grad_norm.* curves"
            what = {"vanishing": f"vanishing gradients (see {curves})", "exploding": f"exploding gradients (see {curves})",
                    "dead_units": "dead ReLU units (see the run's health/dead_units curve)",
                    "mode_collapse": "mode collapse (see the run's samples/ and plots/samples.png)"}.get(h, h)
            console.print(f"[yellow]health[/yellow] {r['name']}: {what}; tag nnlab.health.{h}")
    for f in summary["failed"]:
        console.print(f"[red]failed[/red] {f['name']}: {f['error']}")
    uri = tracking_uri()
    console.print(f"MLflow UI: {uri}" if uri.startswith(("http://", "https://")) else
                  f"MLflow UI: nnlab ui   (or: mlflow ui --backend-store-uri {uri})")


@app.command("sweep")
def sweep_cmd(file: Annotated[Optional[Path], typer.Argument(help="sweep file; default: params.yaml's `sweep`")] = None,
              params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
              resume: Annotated[Optional[str], typer.Option("--resume", help="parent run id to finish")] = None,
              workers: Annotated[Optional[int], typer.Option(help="parallel cells (default: cores)")] = None,
              engine: Annotated[Optional[str], typer.Option(help="local | dask (default: sweep.engine)")] = None,
              address: Annotated[Optional[str], typer.Option(help="Dask scheduler tcp://host:port "
                                                                  "(default: sweep.address)")] = None):
    """Run a grid of training choices in parallel, one child MLflow run per cell, then the report."""
    from pydantic import ValidationError

    from tasks.config import ConfigError, SweepConfig, format_errors, read_yaml
    from tasks.sweep import default_workers, expand, fold_sets, load_spec

    try:
        if resume:
            spec, raw, sets = _sweep_definition(resume)
        else:
            raw = read_yaml(params)
            spec = load_spec(file, raw).model_dump()
            sets = set_ or []
        spec, sets = fold_sets(spec, sets), []  # what runs is what the parent records: the sweep itself changes
        flags = {k: v for k, v in {"workers": workers, "engine": engine, "address": address}.items() if v}
        try:
            spec_ = SweepConfig.model_validate({**spec, **flags})
        except ValidationError as e:
            raise ConfigError(format_errors(e, SweepConfig, prefix="sweep")) from None
        cells = expand(spec_, raw, sets)  # every cell validated before anything runs
    except ConfigError as e:
        fail(str(e))
    if spec_.engine == "dask":  # fail now, not after Dask's 30 s connect timeout with a parent run open
        import socket

        host, port = spec_.address[len("tcp://"):].rsplit(":", 1)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as e:
            fail(f"sweep.address {spec_.address}: no Dask scheduler answers there ({e.strerror or e}); start one "
                 f"with `dask scheduler`, or run with --engine local")
    n = default_workers(spec_, len(cells))
    where = f"the Dask cluster at {spec_.address}" if spec_.engine == "dask" else f"{n} worker(s)"
    check_writable_places()
    mark("config validated")
    typer.echo(f"sweep {spec_.name}: {len(cells)} cells, {where}")
    quiet_prefect()
    server = boot_prefect_server()
    from flows.console import hide_explained_failures
    from flows.sweep import SweepCrashed, WarmPool, stop_after_interrupt, sweep, task_runner

    from flows.warm import preload

    pool = task_runner(spec_, n, cells)
    try:
        if isinstance(pool, WarmPool):  # its workers start and preload while the server boots
            from tasks.tracking import prepare_store

            prepare_store(cells[0].cfg.tracking.experiment)  # a new store migrated before any worker opens it
            pool.warm()
        preload(())  # this process opens the parent run and writes the report: the store, Prefect's engines
        mark("imported")
        hide_explained_failures()
        with explained_failures(), prefect_api(server), local_flow_settings():
            try:
                out = sweep.with_options(task_runner=pool)(spec_.model_dump(), raw, sets, resume)
            except KeyboardInterrupt:  # before the server stops: the pool's workers first, the runs marked KILLED
                typer.secho(stop_after_interrupt(), fg="yellow", err=True)
                raise typer.Exit(130) from None
            except SweepCrashed as e:
                fail(str(e), code=1)
    finally:
        if isinstance(pool, WarmPool):
            pool.close()  # stopped however the command ends (a flow that ran has stopped it already)
    mark("flow done")
    print_sweep(out)
    mark("summary printed")
    raise typer.Exit(1 if out["failed"] else 0)


def _sweep_definition(parent_run_id: str):
    from tasks.config import ConfigError
    from tasks.tracking import load_artifact_json

    try:
        d = load_artifact_json(parent_run_id, "sweep/sweep.json")
    except Exception as e:
        raise ConfigError(f"--resume {parent_run_id}: not a sweep parent run in {_uri()} ({type(e).__name__})")
    return d["spec"], d["params"], d["sets"]


def _uri() -> str:
    from tasks.tracking import tracking_uri

    return tracking_uri()


def print_sweep(out: dict) -> None:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=140)
    console.print(f"sweep parent run {out['parent_run_id']}: {out['cells']} cells, ran {out['ran']} now, "
                  f"{len(out['failed'])} not finished")
    console.print(f"report: {out['report']['html']}  (and {out['report']['md']})")
    reg = out.get("registered")
    if reg and reg.get("registered") is False:
        console.print(f"[yellow]not registered[/yellow] in {reg['name']} ({reg['cell']}): {reg['reason']}")
    elif reg:
        console.print(f"registered {reg['name']} v{reg['version']} ({reg['cell']}, mean {reg['mean']:.4f}"
                      f" ± {reg['ci95']:.4f}) as [bold]{reg['alias']}[/bold]: {reg['decision']}")
    for r in out["failed"]:
        console.print(f"[red]not finished[/red] {r['cell']}: {r.get('error') or r['status']}")
    if out["failed"]:
        console.print(f"finish them with: nnlab sweep --resume {out['parent_run_id']}")


@app.command("report")
def report_cmd(parent_run_id: Annotated[str, typer.Argument(help="the sweep's parent MLflow run id")],
               out: Annotated[Optional[Path], typer.Option(help="folder (default reports/<sweep>-<id>)")] = None):
    """(Re)write the comparison report of a sweep."""
    from tasks.config import ConfigError, SweepConfig
    from tasks.sweep import expand, report

    try:
        spec, raw, sets = _sweep_definition(parent_run_id)
        spec_ = SweepConfig.model_validate(spec)
        cells = expand(spec_, raw, sets)
    except ConfigError as e:
        fail(str(e))
    paths, rows = report(parent_run_id, spec_, cells, out or Path("reports") / f"{spec_.name}-{parent_run_id[:8]}")
    typer.echo(f"report: {paths['html']}  (and {paths['md']})")


@app.command()
def stage(name: Annotated[str, typer.Argument(help="prepare | augment | train | evaluate | register")],
          model: Annotated[Optional[str], typer.Option("--model", help="run name (train, evaluate)")] = None,
          params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None):
    """Run one pipeline stage (what dvc.yaml calls)."""
    stages = ("prepare", "augment", "train", "evaluate", "register")
    if name not in stages:
        fail(f"unknown stage {name!r}; allowed: {', '.join(stages)}")
    cfg, _ = load(params, set_)
    if name in ("train", "evaluate") and (not model or model not in cfg.models):
        fail(f"stage {name} needs --model, one of: {', '.join(cfg.models)}")
    if name in ("train", "evaluate", "register"):
        check_writable_places()
    from tasks import stages as st
    from tasks.files import Busy

    try:
        with explained_failures():
            _run_stage(st, name, cfg, model)
    except (st.TrainingFailed, Busy) as e:
        fail(str(e), code=1)


def _run_stage(st, name: str, cfg, model: str | None) -> None:
    if name == "prepare":
        st.prepare_stage(cfg)
    elif name == "augment":
        st.augment_stage(cfg)
    elif name == "train":
        st.train_stage(cfg, model, st.training_data(cfg))
    elif name == "evaluate":
        st.evaluate_stage(cfg, model)
    else:
        import json

        results = [json.loads(Path(f"data/evaluate/{n}.json").read_text()) for n in cfg.runs()]
        st.register_stage(cfg, results)


def read_texts(text: list[str] | None, file: Path | None, verb: str) -> list[str]:
    """The texts given with --text and --file (one per line); none is an error."""
    texts = list(text or [])
    if file is not None:
        if not file.is_file():
            fail(f"--file: {file} is not a file")
        texts += [line for line in file.read_text().splitlines() if line.strip()]
    if not texts:
        fail(f"give texts to {verb} with --text or --file")
    return texts


def served_model(ref: str):
    """stages.load_served (rebuilt from weights, never unpickled), its errors (UnsafeCheckpoint among them) as
    exit 2."""
    from tasks.stages import load_served

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file: noise
    try:
        return load_served(ref)
    except (LookupError, ValueError) as e:
        fail(str(e))


@app.command()
def predict(model: Annotated[str, typer.Argument(help="models:/<name>@<alias>, models:/<name>/<version> or a run id")],
            text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="a text to classify (repeatable)")] = None,
            file: Annotated[Optional[Path], typer.Option("--file", "-f", help="texts to classify, one per line")] = None,
            top: Annotated[int, typer.Option(help="classes shown per text")] = 3):
    """Classify new text with a logged or registered text model (it carries its own vocabulary)."""
    texts = read_texts(text, file, "classify")
    import torch

    from tasks.data.text import Vocab

    net, vocab, meta, uri = served_model(model)
    if vocab is None:
        fail(f"{uri} was not trained on text (it has no extra_files/vocab.json); predict reads text models only")
    v, classes = Vocab.from_dict(vocab), meta.get("classes") or []
    with torch.no_grad():
        probs = net(torch.as_tensor(v.encode(texts)))
    for t, p in zip(texts, probs):
        best = torch.topk(p, min(top, len(p)))
        shown = ", ".join(f"{classes[i] if i < len(classes) else i} {float(q):.3f}"
                          for q, i in zip(best.values, best.indices.tolist()))
        typer.echo(f"{shown}\t{t[:80]}")


@app.command()
def translate(model: Annotated[str, typer.Argument(help="models:/<name>@<alias>, models:/<name>/<version> or a run id")]
              = "models:/nnlab-translator@champion",
              text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="a text to translate (repeatable)")] = None,
              file: Annotated[Optional[Path], typer.Option("--file", "-f", help="texts to translate, one per line")] = None):
    """Translate new text with a logged or registered translation model (it carries both vocabularies)."""
    texts = read_texts(text, file, "translate")
    import torch

    from tasks.data.text import Vocab
    from tasks.tracking import extra_file
    from tasks.data.pairs import TARGET_VOCAB
    from tasks.kinds.translation import outputs_as_text

    net, vocab, meta, uri = served_model(model)
    target = extra_file(uri, TARGET_VOCAB)
    if vocab is None or target is None:
        fail(f"{uri} is not a translation model (it has no extra_files/{TARGET_VOCAB}); translate reads models "
             "trained on pairs, dates or numbers")
    source = Vocab.from_dict(vocab)
    source.max_length = max(source.max_length, max(len(source.ids(t)) for t in texts))  # encode without cutting
    with torch.no_grad():
        ids = net(torch.as_tensor(source.encode(texts)))
    for t, out in zip(texts, outputs_as_text(Vocab.from_dict(target), ids.tolist())):
        typer.echo(f"{t}\t{out}")


@app.command()
def transcribe(model: Annotated[str, typer.Argument(help="models:/<name>@<alias>, models:/<name>/<version> or a run id")],
               audio: Annotated[list[Path], typer.Argument(help="recordings to transcribe (WAV, FLAC or OGG)")],
               beam: Annotated[Optional[int], typer.Option(min=1, max=64, help="CTC beam width (default: the model's "
                                                           "own; 1: greedy)")] = None):
    """Transcribe recordings with a logged or registered speech model (ctc_asr, conformer): one line per file."""
    import numpy as np
    import torch

    from models.speech import beam_search, greedy
    from tasks.data import DataError
    from tasks.kinds.speech import as_text
    from tasks.data.audio import load_audio

    missing = [str(p) for p in audio if not p.is_file()]
    if missing:
        fail(f"no such recording: {', '.join(missing)}")
    net, _, meta, uri = served_model(model)
    if meta.get("nnlab.kind") != "transcriber":
        fail(f"{uri} is not a speech model (train one with `nnlab run --models ctc_asr --set data.source=synth_speech`)")
    width = beam or int(meta.get("beam_size", 1))
    for path in audio:
        try:
            wave = load_audio(path, int(meta["sample_rate"]))
        except DataError as e:
            fail(str(e))
        pcm = torch.as_tensor(np.clip(wave * 32768.0, -32768, 32767).astype(np.int16))[None]
        with torch.no_grad():
            lp = net(pcm)
        ids = greedy(lp)[0] if width == 1 else beam_search(lp, beam=width)[0]
        typer.echo(f"{path}\t{as_text(meta['alphabet'], [ids])[0]}")


@app.command()
def sample(model: Annotated[str, typer.Option("--model", help="generator: models:/<name>@<alias>, "
                                               "models:/<name>/<version> or a run id")] = "models:/nnlab-generator@champion",
           n: Annotated[int, typer.Option("-n", min=1, max=4096, help="samples to draw")] = 64,
           out: Annotated[Path, typer.Option("-o", "--out", help="PNG to write")] = Path("samples.png"),
           seed: Annotated[int, typer.Option(help="seed of the noise")] = 0,
           truncation: Annotated[float, typer.Option(help="the truncation trick's psi in (0, 1]: w = w_avg + psi "
                                                          "(w - w_avg); style-based generators (stylegan); 1: off")] = 1.0,
           input: Annotated[Optional[Path], typer.Option("--input", "-i", help="pix2pix / cyclegan: an image, or a "
                                                         "folder of images, to translate")] = None):
    """Draw samples from a logged or registered GAN generator into a PNG grid (a scatter plot for 2-D data), or
    translate images with an image-to-image generator (`--input`: one image -> one PNG; a folder -> a grid)."""
    import torch

    from tasks.files import atomic_path
    from tasks.figures import points_figure, sample_grid_figure

    if not 0.0 < truncation <= 1.0:
        fail(f"--truncation: psi must be in (0, 1] (1: off, smaller: closer to the average sample); got {truncation}")
    net, _, meta, uri = served_model(model)
    if meta.get("nnlab.kind") == "image_translator":
        if input is None:
            fail(f"{uri} translates images: give one with --input IMAGE (or a folder of images)")
        translate_images(net, meta, input, out, uri)
        return
    if input is not None:
        fail(f"--input: {uri} is not an image-to-image model (pix2pix, cyclegan); it draws from noise")
    if meta.get("nnlab.kind") != "generator":
        fail(f"{uri} is not a GAN generator (train one with e.g. `nnlab run --models dcgan`)")
    if truncation != 1.0:
        if not meta.get("truncation"):
            fail(f"--truncation: {uri} ({meta.get('nnlab.arch', 'its generator')}) has no mapping network, so no "
                 "mean w to truncate towards; it needs a style-based generator (`nnlab run --models stylegan`)")
        dict(net.named_buffers())["truncation"].fill_(truncation)  # the served StyleSampler's psi
    z = torch.randn(n, int(meta["latent_dim"]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = torch.cat([net(z[i:i + 256]) for i in range(0, n, 256)]).numpy()
    if meta["image"]:
        fig = sample_grid_figure(x / float(meta["max_value"]), max(1, int(round(n ** 0.5))), f"{n} samples from {uri}")
    else:
        fig = points_figure(None, x, None, f"{n} samples from {uri}")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    typer.echo(f"{out}: {n} samples from {uri}" + (f" (truncation psi {truncation})" if truncation != 1.0 else ""))


def translate_images(net, meta: dict, path: Path, out: Path, uri: str) -> None:
    """`nnlab sample --input`: each image read at the model's channels and size, translated; one image is written
    as the output image itself, a folder's as a grid of inputs (top) over outputs."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from tasks.files import atomic_path
    from tasks.figures import rows_figure

    c, h, w = meta["shape"]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".gif"})
        if not files:
            fail(f"--input: no images (.png, .jpg, .bmp, .gif) in folder {path}")
    elif path.is_file():
        files = [path]
    else:
        fail(f"--input: {path}: no such image or folder")
    images = []
    for f in files[:64]:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError) as e:
            fail(f"--input: cannot read image {f}: {e}")
        a = np.asarray(im, np.float32)
        images.append(a[None] if c == 1 else a.transpose(2, 0, 1))
    with torch.no_grad():
        y = net(torch.as_tensor(np.stack(images))).numpy()  # (N, C, H, W) in 0..255
    with atomic_path(out) as tmp:
        if len(files) == 1:
            pixels = np.round(y[0]).astype(np.uint8)
            Image.fromarray(pixels[0] if c == 1 else pixels.transpose(1, 2, 0)).save(tmp, format="PNG")
        else:
            rows = [np.stack(images) / 255.0, y / 255.0]
            rows_figure(rows, ["input", "output"], f"{len(images)} images translated by {uri}").savefig(tmp, format="png")
    typer.echo(f"{out}: {len(images)} image{'s' if len(images) > 1 else ''} translated by {uri}")


@app.command("tracking-server", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def tracking_server(
        ctx: typer.Context,
        backend_store_uri: Annotated[str, typer.Option(
            help="PostgreSQL database for runs and the registry (created if missing); with a password, set it "
                 "in MLFLOW_BACKEND_STORE_URI or ~/.pgpass instead: a command line is visible to every user",
            envvar="MLFLOW_BACKEND_STORE_URI", show_envvar=False)]
        = "postgresql://postgres@127.0.0.1:5432/mlflow",
        artifacts_destination: Annotated[str, typer.Option(
            help="folder (or s3://... URI) where the server keeps artifacts; clients go through the server")]
        = "mlruns/server-artifacts",
        host: Annotated[str, typer.Option(help="interface to bind; 0.0.0.0: every one (then add authentication)")]
        = "127.0.0.1",
        port: int = 5000,
        workers: Annotated[Optional[int], typer.Option(help="server processes (default: MLflow's, 4)")] = None):
    """A shared MLflow tracking server: runs and models in PostgreSQL, artifacts served through it.
    Further `mlflow server` options go after `--`, e.g. `-- --app-name basic-auth`."""
    from flows.tracking_server import StoreUnreachable, ensure_database, server_client_uri, server_command, server_env

    try:
        if ensure_database(backend_store_uri):
            typer.echo(f"created database {backend_store_uri.rsplit('/', 1)[-1].split('?')[0]}")
    except StoreUnreachable as e:
        fail(str(e))
    cmd = server_command(artifacts_destination, host, port, workers, ctx.args)
    uri = server_client_uri(host, port)
    typer.echo(f"MLflow tracking server on {uri}, artifacts in {cmd[cmd.index('--artifacts-destination') + 1]}"
               " (Ctrl-C to stop)")
    typer.echo(f"clients: export MLFLOW_TRACKING_URI={uri}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"bound to {host}: whoever reaches this port can read and write every run and model; put it "
                    "behind authentication (README: a shared tracking server)", fg="yellow", err=True)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, {**os.environ, **server_env(backend_store_uri)})


@app.command("example-csv")
def example_csv(out: Annotated[Path, typer.Argument(help="CSV file to write")] = Path("docstrings.csv")):
    """Write a real text CSV to try `text_csv` offline: standard-library docstrings (text) labelled by module (label)."""
    from tasks.data.text import DOC_MODULES, docstrings_csv

    n = docstrings_csv(out)
    typer.echo(f"{out}: {n} docstrings of {', '.join(DOC_MODULES)} (columns text, label)")


@app.command("example-pairs")
def example_pairs_cmd(out: Annotated[Path, typer.Argument(help="TSV file to write")] = Path("en-de-dates.tsv")):
    """Write a small English -> German parallel corpus (Tatoeba's layout) to try `pairs` offline."""
    from tasks.data.pairs import example_pairs

    n = example_pairs(out)
    typer.echo(f"{out}: {n} English -> German date phrases, made from CLDR locale data (source<TAB>target<TAB>note)")


@app.command("models")
def models_cmd(input_shape: Annotated[str, typer.Option(help="C,H,W of the input")] = "1,28,28",
               classes: Annotated[int, typer.Option(help="number of classes")] = 10):
    """List the registered architectures: family, parameters, MACs and receptive field for this input."""
    from rich.console import Console
    from rich.table import Table

    shape = tuple(int(s) for s in input_shape.split(","))
    table = Table(title=f"registered architectures (input {shape}, {classes} classes)")
    for col in ("name", "family", "parameters", "MACs", "receptive field", "description"):
        table.add_column(col, no_wrap=col in ("name", "parameters", "MACs"),
                         min_width=16 if col == "description" else None)  # 80 columns: headers wrap
    for row in model_rows(shape, classes):
        table.add_row(*row)
    (Console() if sys.stdout.isatty() else Console(width=160)).print(table)


def model_rows(shape: tuple[int, ...], classes: int) -> list[list[str]]:
    """`nnlab models`' rows: every architecture built for `shape`, its parameters, MACs and receptive field.
    Building and probing them all takes seconds (the image-to-image generators' fields most), so the rows are
    kept in .nnlab/cache under the shape, the classes and the hash of the code that computes them."""
    import hashlib

    from tasks.files import code_hash, write_json

    key = hashlib.sha256(f"{shape}|{classes}|{code_hash()}".encode()).hexdigest()[:16]
    cache = Path(".nnlab/cache") / f"models-{key}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    from models.analysis import count_macs, format_count, receptive_field_bound
    from models.registry import count_parameters, create_model, get_spec, list_models

    probe = max(64, 4 * max(shape[1:], default=1))  # fields wider than 4x the input are shown as a lower bound
    rows = []
    for name in list_models():
        spec = get_spec(name)
        try:
            model = create_model(name, input_shape=shape, num_classes=classes)
        except Exception as e:  # any family may reject a shape (an MLP never does, an RNN might)
            rows.append([name, spec.family, "n/a", "-", "-", f"{spec.description} (not for this input: {e})"])
            continue
        try:
            macs = format_count(count_macs(model, shape))  # MACs per example
            rf, more = receptive_field_bound(model, shape, probe)
        except Exception as e:  # e.g. a model that does not take float images
            macs, rf, more = f"n/a ({type(e).__name__})", None, False
        rows.append([name, spec.family, f"{count_parameters(model):,}", macs,
                     "-" if rf is None else f"{'≥' if more else ''}{rf}x{rf}", spec.description])
    try:
        write_json(cache, rows)
    except OSError:  # a read-only working folder: no cache, same table
        pass
    return rows


@app.command()
def ui(port: int = 5000, host: str = "127.0.0.1"):
    """Open the MLflow UI on the project's store (127.0.0.1 unless told otherwise)."""
    from tasks.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        typer.echo(f"MLflow UI: {uri} (the tracking server in MLFLOW_TRACKING_URI serves it)")
        raise typer.Exit(0)
    typer.echo(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl-C to stop)")
    from flows.tracking_server import server_env

    for k, v in server_env(uri).items():  # as `nnlab tracking-server`: no GenAI job consumers, no telemetry
        os.environ.setdefault(k, v)
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", host, "--port", str(port)])


@app.command("deploy")
def deploy_cmd(gpus: Annotated[Optional[int], typer.Option(help="flow runs the gpu pool runs at once "
                                                                 "(default: the GPUs torch sees, at least 1)")] = None):
    """Create the `cpu` and `gpu` work pools and deploy prefect.yaml's flows to the Prefect server at
    PREFECT_API_URL (then start a worker: `prefect worker start --pool cpu`)."""
    quiet_prefect()
    from flows.deploy import DeployError, deploy

    try:
        out = deploy(".", gpus)
    except DeployError as e:
        fail(str(e))
    typer.echo(last_lines(out["output"], 60))
    limits = ", ".join(f"{p} ({'no limit' if n is None else f'{n} at once'})" for p, n in out["pools"].items())
    typer.echo(f"\nwork pools on {out['api_url']}: {limits}\n"
               "next: prefect worker start --pool cpu      (and --pool gpu on a GPU machine)\n"
               "      prefect deployment run nnlab-experiment/nightly   (or wait for 02:00 UTC)")


def last_lines(text: str, n: int) -> str:
    """The last `n` whole lines of `text`, saying how many came before (never a cut mid-word)."""
    lines = text.strip().splitlines()
    return "\n".join(([f"... ({len(lines) - n} lines above)"] if len(lines) > n else []) + lines[-n:])


def main() -> None:
    """The `nnlab` console entry point: the command, then a quick way out. After the command has said its last
    word, the interpreter's own shutdown would spend seconds (more on a busy machine) tearing down torch, Prefect
    and MLflow object by object; nothing of that is needed. So: exit handlers (the temporary server stopped,
    Prefect's queues drained, logging flushed), stdout and stderr flushed, then os._exit. An unexpected error
    propagates as usual: its traceback is the report."""
    try:
        app()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    if code is not None and not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (| head)
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()

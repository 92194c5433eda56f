"""The store, the examples, the catalogue and deployment: `nnlab tracking-server`, `example-csv`, `example-pairs`,
`example-wav`, `example-image`, `models`, `ui` and `deploy`, registered on the one app (flows/app.py;
flows/cli.py imports this module). Heavy libraries are imported inside the commands, so `nnlab --help` stays
fast."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.app import app, fail, quiet_prefect


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


RATE = 16_000  # example-wav's WAVs: synth_speech's data.sample_rate (a served model resamples to its own anyway)
FSDD = r"(\d)_(.+)_(\d+)"  # the free-spoken-digit-dataset's <digit>_<speaker>_<n>.wav


@app.command("example-wav")
def example_wav(
        out: Annotated[Path, typer.Argument(help="WAV file to write (16-bit mono, 16 kHz)")] = Path("recording.wav"),
        digits: Annotated[Optional[str], typer.Option(help="the digits said, e.g. 314 (default: three drawn by "
                                                           "--seed; --from: one)")] = None,
        voice: Annotated[str, typer.Option(help="eSpeak NG voice <accent>+<variant>, one of synth_speech's 160")]
        = "en-us+m3",
        seed: Annotated[int, typer.Option(help="seed of the digits drawn (and of --from's file)")] = 0,
        source: Annotated[Optional[Path], typer.Option("--from", help="a Free Spoken Digit Dataset recording "
                                                       "(<digit>_<speaker>_<n>.wav) or its recordings/ folder: "
                                                       "that recording instead of eSpeak NG's")] = None):
    """Write a recording of spoken digits to try `nnlab transcribe` offline: eSpeak NG (synth_speech's voices)
    saying them, or a Free Spoken Digit Dataset recording given with --from."""
    import soundfile as sf

    from tasks.data.audio import DIGITS  # the words synth_speech's and FSDD's transcripts say

    said = spoken_digits(digits, seed, one=source is not None)
    if source is not None:
        said, how = fsdd_wav(source, said[0] if said else None, seed, out)
    else:
        how = espeak_wav(" ".join(DIGITS[d] for d in said), voice, seed, out)
    words = " ".join(DIGITS[d] for d in said)
    info = sf.info(str(out))
    typer.echo(f"{out}: {how} saying {words!r} ({''.join(map(str, said))}), {info.duration:.2f} s, 16-bit mono "
               f"at {info.samplerate} Hz")
    typer.echo(f"try: nnlab transcribe models:/nnlab-asr@champion {out}   (it should print: {words})")


def spoken_digits(digits: str | None, seed: int, one: bool) -> list[int]:
    """--digits as a list of digits (spaces and commas ignored), at most `one`; not given: three drawn by `seed`,
    or none ([]: any) for `one`."""
    if digits is None:
        import numpy as np

        return [] if one else [int(d) for d in np.random.default_rng(seed).integers(10, size=3)]
    said = [c for c in digits if c not in " ,"]
    if not said or not all(c in "0123456789" for c in said):
        fail(f"--digits: {digits!r}: give digits, e.g. 314")
    if one and len(said) > 1:
        fail(f"--digits: {digits!r}: a Free Spoken Digit Dataset recording says one digit; give one with --from")
    return [int(c) for c in said]


def espeak_wav(words: str, voice: str, seed: int, out: Path) -> str:
    """eSpeak NG saying `words` in `voice` (synth_speech's engine and voices, offline: the espeakng-loader wheel),
    at 170 words a minute and pitch 50, with noise 40 dB under it (synth_speech's quietest), into `out`."""
    import shutil
    import tempfile

    from tasks.data.espeak import EspeakMissing, Utterance, synthesise_fresh, voices
    from tasks.files import atomic_path

    try:
        known = voices()
        if voice not in known:
            fail(f"--voice: eSpeak NG has no voice {voice!r}; e.g. {', '.join(known[:4])} (<accent>+<variant>)")
        with tempfile.TemporaryDirectory() as tmp:
            synthesise_fresh([Utterance(words, voice, 170, 50, 40.0)], RATE, tmp, seed)
            with atomic_path(out) as part:
                shutil.copyfile(Path(tmp) / "00000.wav", part)
    except EspeakMissing as e:
        fail(f"{e}; or give a Free Spoken Digit Dataset recording with --from")
    return f"eSpeak NG voice {voice}"


def fsdd_wav(source: Path, digit: int | None, seed: int, out: Path) -> tuple[list[int], str]:
    """A Free Spoken Digit Dataset recording (`source`, or one in the folder `source`, of `digit` if given, drawn
    by `seed`) written to `out` as 16-bit mono at 16 kHz; ([its digit], where it came from)."""
    import re

    import numpy as np
    import soundfile as sf

    from tasks.data import DataError
    from tasks.data.audio import load_audio
    from tasks.files import atomic_path

    if source.is_dir():
        found = [p for p in sorted(source.glob("*.wav"))
                 if re.fullmatch(FSDD, p.stem) and digit in (None, int(p.stem[0]))]
        if not found:
            fail(f"--from: no <digit>_<speaker>_<n>.wav recording{'' if digit is None else f' of a {digit}'} in "
                 f"{source}")
        source = found[int(np.random.default_rng(seed).integers(len(found)))]
    m = re.fullmatch(FSDD, source.stem)
    if not source.is_file() or m is None:
        fail(f"--from: {source} is not a Free Spoken Digit Dataset recording (<digit>_<speaker>_<n>.wav) or folder")
    if digit is not None and int(m[1]) != digit:
        fail(f"--digits: {source.name} says a {m[1]}, not a {digit}")
    try:
        wave = load_audio(source, RATE)
    except DataError as e:
        fail(f"--from: {e}")
    with atomic_path(out) as part:
        sf.write(str(part), wave, RATE, subtype="PCM_16", format="WAV")
    return [int(m[1])], f"speaker {m[2]} (Free Spoken Digit Dataset {source.name})"


# example-image's inputs: what each makes of a 32x32 digit, and the runs whose translators take it
LOOKS = {"edges": ("as its Canny edge map", "pix2pix on data.source=paired (data.pairing edges)"),
         "super_resolution": ("shrunk to 8x8, bicubic back to 32x32",
                              "pix2pix on paired, data.pairing super_resolution"),
         "occlusion": ("under a grey 12x12 square", "pix2pix on paired, data.pairing occlusion"),
         "digits_mnist": ("in MNIST's 20x20 box", "cyclegan on data.source=unpaired (data.domains digits_mnist)")}


@app.command("example-image")
def example_image(
        out: Annotated[Path, typer.Argument(help="PNG to write (32x32 grey)")] = Path("edges.png"),
        domain: Annotated[str, typer.Option(help="edges | super_resolution | occlusion: an image-to-image input "
                                                 "made from an MNIST digit (paired's data.pairing); digits_mnist: a "
                                                 "scikit-learn digit (unpaired's domain A)")] = "edges",
        index: Annotated[int, typer.Option(min=0, help="which digit: its row in mnist5k (5,000) or, for "
                                                       "digits_mnist, in scikit-learn's digits (1,797)")] = 0):
    """Write an image-to-image model's input to try `nnlab sample --input` offline: a real digit from the data
    the translators train on, as their domain A (default: an MNIST digit's edge map, pix2pix's input)."""
    if domain not in LOOKS:
        fail(f"--domain: {domain!r}; one of {', '.join(LOOKS)}")
    from PIL import Image

    from tasks.data import image_pairs
    from tasks.files import atomic_path

    x, labels = image_pairs.sklearn_digits32() if domain == "digits_mnist" else image_pairs.mnist32()
    if index >= len(x):
        fail(f"--index: {index}; there are {len(x)} digits (0 to {len(x) - 1})")
    make = {"edges": image_pairs.edges, "super_resolution": image_pairs.low_resolution,
            "occlusion": lambda a: image_pairs.occluded(a, seed=index), "digits_mnist": lambda a: a}[domain]
    img = make(x[index:index + 1])[0, 0]  # (32, 32) uint8
    with atomic_path(out) as part:
        Image.fromarray(img).save(part, format="PNG")
    looks, trained = LOOKS[domain]
    digit = int(labels[index])
    typer.echo(f"{out}: a {digit} ({'scikit-learn digits' if domain == 'digits_mnist' else 'mnist5k'} #{index}) "
               f"{looks}, 32x32 grey: the input of {trained}")
    typer.echo(f"try: nnlab sample --model models:/nnlab-image-translator@champion --input {out} -o digit.png   "
               f"(it should draw a {digit})")


models_app = typer.Typer(add_completion=False)  # `nnlab models`: the catalogue; its subcommands: the registry's
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models_cmd(ctx: typer.Context, input_shape: Annotated[str, typer.Option(help="C,H,W of the input")] = "1,28,28",
               classes: Annotated[int, typer.Option(help="number of classes")] = 10):
    """List the registered architectures: family, parameters, MACs and receptive field for this input. With a
    command: a registered model's champion history (`history NAME`) or its way back (`rollback NAME --to V`)."""
    if ctx.invoked_subcommand is not None:
        return
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


MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
CATALOGUE = MODELS_DIR / "catalogue.json"  # `nnlab models`' table for the default input, shipped


def catalogue_key(shape: tuple[int, ...], classes: int) -> str:
    """What `nnlab models`' rows depend on: the input, the classes and the architectures' code (models/*.py)."""
    import hashlib

    h = hashlib.sha256(f"{shape}|{classes}".encode())
    for f in sorted(MODELS_DIR.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def model_rows(shape: tuple[int, ...], classes: int) -> list[list[str]]:
    """`nnlab models`' rows: every architecture built for `shape`, its parameters, MACs and receptive field.
    Building and probing them all takes seconds (torch, and the image-to-image generators' fields most), so the
    rows are kept under the key of what they depend on: in .nnlab/cache, and for the default input in
    models/catalogue.json, shipped (`make catalogue` writes it; a test checks it is current), so a fresh
    clone's first `nnlab models` is as quick as the next."""
    from tasks.files import write_json

    key = catalogue_key(shape, classes)
    cache = Path(".nnlab/cache") / f"models-{key}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    try:
        shipped = json.loads(CATALOGUE.read_text())
        if shipped["key"] == key:
            return shipped["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rows = compute_rows(shape, classes)
    try:
        write_json(cache, rows)
    except OSError:  # a read-only working folder: no cache, same table
        pass
    return rows


def write_catalogue(shape: tuple[int, ...] = (1, 28, 28), classes: int = 10) -> None:
    """models/catalogue.json for the default input (`make catalogue`, after changing an architecture)."""
    from tasks.files import write_json

    write_json(CATALOGUE, {"key": catalogue_key(shape, classes), "shape": list(shape), "classes": classes,
                           "rows": compute_rows(shape, classes)})


def compute_rows(shape: tuple[int, ...], classes: int) -> list[list[str]]:
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
    # what is left on the terminal are errors: no access log, no uvicorn life cycle, no deprecation warnings of
    # MLflow's own imports (MLflow's default 4 workers: with one, uvicorn's Ctrl-C ends in a lifespan traceback)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated")
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--registry-store-uri", uri, "--host", host, "--port", str(port),
                               "--uvicorn-opts", "--log-level warning --no-access-log"])


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

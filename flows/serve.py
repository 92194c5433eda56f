"""`nnlab predict`, `translate`, `transcribe` and `sample`: a logged or registered model, served. Each command
gathers its raw inputs (texts, recordings, images, nothing but noise), checks them before the model is loaded,
loads the model as its kind's `Served` (tasks/serving.py load_serving: rebuilt from the run's weights-only
checkpoint, never unpickled), checks that it takes and gives what the command serves, calls it and shows what
it gives. The commands never ask which kind of model they serve: its `Served` knows its inputs.

Registered on the one app (flows/app.py; flows/cli.py imports this module); heavy libraries are imported
inside the commands, so `nnlab --help` stays fast."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer

from flows.app import app, fail

if TYPE_CHECKING:
    from tasks.kinds import Served

ModelArg = Annotated[str, typer.Argument(help="models:/<name>@<alias>, models:/<name>/<version> or a run id")]
IMAGES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def served_model(ref: str) -> "Served":
    """serving.load_serving (rebuilt from weights, never unpickled), its errors (UnsafeCheckpoint among them) as
    exit 2."""
    from tasks.serving import load_serving

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file: noise
    try:
        return load_serving(ref)
    except (LookupError, ValueError) as e:
        fail(str(e))


def refuse(served: "Served", why: str) -> NoReturn:
    """Exit 2: `served` is not what this command serves; `why`, then what it takes and gives, and what serves it."""
    where = f"`nnlab {served.command}`" if served.command else "`mlflow models serve`"
    fail(f"{why}; it takes {served.takes} and gives {served.gives}: {where} serves it")


@contextmanager
def serving_error(prefix: str = ""):
    """ServingError (raw inputs the model cannot take) as exit 2, its message after `prefix`."""
    from tasks.kinds import ServingError

    try:
        yield
    except ServingError as e:
        fail(f"{prefix}{e}")


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


def image_files(path: Path) -> list[Path]:
    """`--input`: the image, or a folder's images (sorted); none is an error."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGES)
        if not files:
            fail(f"--input: no images (.png, .jpg, .bmp, .gif) in folder {path}")
        return files
    if path.is_file():
        return [path]
    fail(f"--input: {path}: no such image or folder")


@app.command()
def predict(model: ModelArg,
            text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="a text to classify (repeatable)")] = None,
            file: Annotated[Optional[Path], typer.Option("--file", "-f", help="texts to classify, one per line")] = None,
            top: Annotated[int, typer.Option(help="classes shown per text")] = 3):
    """Classify new text with a logged or registered text model (it carries its own vocabulary)."""
    texts = read_texts(text, file, "classify")
    served = served_model(model)
    if (served.takes, served.gives) != ("text", "classes"):
        refuse(served, f"{served.uri} is not a text classifier; predict reads text models only")
    for t, best in zip(texts, served(texts, top=top)):
        typer.echo(f"{', '.join(f'{c} {q:.3f}' for c, q in best)}\t{t[:80]}")


@app.command()
def translate(model: ModelArg = "models:/nnlab-translator@champion",
              text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="a text to translate (repeatable)")] = None,
              file: Annotated[Optional[Path], typer.Option("--file", "-f", help="texts to translate, one per line")] = None):
    """Translate new text with a logged or registered translation model (it carries both vocabularies)."""
    texts = read_texts(text, file, "translate")
    served = served_model(model)
    if (served.takes, served.gives) != ("text", "text"):
        refuse(served, f"{served.uri} is not a translation model; translate reads models trained on pairs, dates or "
                       "numbers")
    with serving_error():
        outputs = served(texts)
    for t, out in zip(texts, outputs):
        typer.echo(f"{t}\t{out}")


@app.command()
def transcribe(model: ModelArg,
               audio: Annotated[list[Path], typer.Argument(help="recordings to transcribe (WAV, FLAC or OGG)")],
               beam: Annotated[Optional[int], typer.Option(min=1, max=64, help="CTC beam width (default: the model's "
                                                           "own; 1: greedy)")] = None):
    """Transcribe recordings with a logged or registered speech model (ctc_asr, conformer): one line per file."""
    missing = [str(p) for p in audio if not p.is_file()]
    if missing:
        fail(f"no such recording: {', '.join(missing)}")
    served = served_model(model)
    if (served.takes, served.gives) != ("audio", "text"):
        refuse(served, f"{served.uri} is not a speech model (train one with `nnlab run --models ctc_asr --set "
                       "data.source=synth_speech`)")
    for path in audio:  # one line per recording as it is transcribed
        with serving_error():
            said = served([path], beam=beam)[0]
        typer.echo(f"{path}\t{said}")


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
    if not 0.0 < truncation <= 1.0:
        fail(f"--truncation: psi must be in (0, 1] (1: off, smaller: closer to the average sample); got {truncation}")
    images = image_files(input) if input is not None else None
    served = served_model(model)
    if served.takes == "image":
        if images is None:
            fail(f"{served.uri} translates images: give one with --input IMAGE (or a folder of images)")
        translate_images(served, images, out)
        return
    if images is not None:
        refuse(served, f"--input: {served.uri} is not an image-to-image model (pix2pix, cyclegan)")
    if (served.takes, served.gives) != ("noise", "samples"):
        refuse(served, f"{served.uri} is not a GAN generator (train one with e.g. `nnlab run --models dcgan`)")
    with serving_error("--truncation: "):  # a generator without a mapping network refuses psi < 1
        x = served(n, seed=seed, truncation=truncation)
    write_png(served, x, out)
    typer.echo(f"{out}: {n} samples from {served.uri}" + (f" (truncation psi {truncation})" if truncation != 1.0 else ""))


def translate_images(served: "Served", images: list[Path], out: Path) -> None:
    """`nnlab sample --input`: the images translated, one written as the output image itself, several as a grid
    of inputs (top) over outputs."""
    with serving_error("--input: "):
        translated = served(images)
    write_png(served, translated, out)
    k = len(translated.outputs)
    typer.echo(f"{out}: {k} image{'s' if k > 1 else ''} translated by {served.uri}")


def write_png(served: "Served", outputs, out: Path) -> None:
    from tasks.files import atomic_path

    with atomic_path(out) as tmp:
        served.png(outputs, tmp)

"""`nnlab predict`, `translate`, `transcribe` and `sample`: a logged or registered model, served. Each command
gathers its raw inputs (texts, recordings, images, nothing but noise) and checks them (there, readable, of the
right type) before any model is looked up, loads the model as its kind's `Served` (tasks/serving.py
load_serving: rebuilt from the run's weights-only checkpoint, never unpickled), refuses one of a kind the
command does not serve (naming its kind and the command that serves it), says on stderr which registered
version and run answer, calls it and shows what it gives. The commands never ask which kind of model they
serve: its `Served` knows its inputs and the command that serves it.

Registered on the one app (flows/app.py; flows/cli.py imports this module); heavy libraries are imported
inside the commands, so `nnlab --help` stays fast."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from flows.app import app, fail

if TYPE_CHECKING:
    from tasks.kinds import Served

ModelArg = Annotated[str, typer.Argument(help="models:/<name>@<alias>, models:/<name>/<version> or a run id")]
IMAGES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


# what each command serves, and how to train one
SERVES = {"predict": ("text classifiers", "e.g. `nnlab example-csv docstrings.csv`, then `nnlab run --models "
                                          "text_lstm --set data.source=text_csv --set data.path=docstrings.csv`"),
          "translate": ("translators", "e.g. `nnlab run --models seq2seq --set data.source=dates`"),
          "transcribe": ("speech recognisers", "e.g. `nnlab run --models ctc_asr --set data.source=synth_speech`"),
          "sample": ("GAN generators and image-to-image translators", "e.g. `nnlab run --models dcgan`, or "
                     "`nnlab run --models pix2pix --set data.source=paired`")}


def served_model(ref: str) -> "Served":
    """serving.load_serving (rebuilt from weights, never unpickled), its errors (UnsafeCheckpoint among them) as
    exit 2."""
    from tasks.serving import load_serving

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file: noise
    try:
        return load_serving(ref)
    except (LookupError, ValueError) as e:
        fail(str(e))


def accept(served: "Served", command: str) -> None:
    """Exit 2 unless `command` serves `served` (its kind's `command`; `sample` serves `sample --input` too), naming
    the model, its kind and the command that serves it; else say on stderr which registered version and run
    answer."""
    if served.command.split(" ")[0] != command:
        wanted, train = SERVES[command]
        where = (f"`nnlab {served.command}` serves" if served.command else
                 f"no nnlab command serves (it takes raw {served.takes}: `mlflow models serve` does)")
        fail(f"{served.uri} is {what(served)}, which {where}; `nnlab {command}` serves {wanted} (train one with "
             f"{train})")
    o = getattr(served, "origin", None)
    typer.echo(f"answered by {o.answered() if o else served.uri}: {what(served)}", err=True)


def what(served: "Served") -> str:
    """The served model's kind in words: "a translator (seq2seq on dates)"."""
    o = getattr(served, "origin", None)
    return o.what if o else f"a model that takes {served.takes} and gives {served.gives}"


@contextmanager
def serving_error(prefix: str = ""):
    """ServingError (raw inputs the model cannot take) as exit 2, its message after `prefix`."""
    from tasks.kinds import ServingError

    try:
        yield
    except ServingError as e:
        fail(f"{prefix}{e}")


def read_texts(text: list[str] | None, file: Path | None, verb: str) -> list[str]:
    """The texts given with --text and --file (one per line, UTF-8); none is an error."""
    texts = list(text or [])
    if file is not None:
        if not file.is_file():
            fail(f"--file: {file} is not a file")
        try:
            texts += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--file: {file} is not readable UTF-8 text ({type(e).__name__}: {e})")
    if not texts:
        fail(f"give texts to {verb} with --text or --file")
    return texts


def image_files(path: Path) -> list[Path]:
    """`--input`: the image, or a folder's images (sorted), each opened and checked; none is an error."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGES)
        if not files:
            fail(f"--input: no images (.png, .jpg, .bmp, .gif) in folder {path}")
    elif path.is_file():
        files = [path]
    else:
        fail(f"--input: {path}: no such image or folder")
    from PIL import Image, UnidentifiedImageError

    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()  # the header and the data's integrity, without decoding it
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            fail(f"--input: {f} is not an image PIL can read ({type(e).__name__}: {e}); PNG, JPEG, BMP or GIF")
    return files


def recordings(audio: list[Path]) -> None:
    """Every recording exists and soundfile can read it (WAV, FLAC, OGG): checked before any model is loaded."""
    import soundfile as sf

    missing = [str(p) for p in audio if not p.is_file()]
    if missing:
        fail(f"no such recording: {', '.join(missing)}")
    for p in audio:
        try:
            sf.info(str(p))
        except Exception as e:  # soundfile raises its own LibsndfileError, or OSError / RuntimeError
            fail(f"{p}: not a readable recording ({type(e).__name__}: {e}); WAV, FLAC or OGG is read")


@app.command()
def predict(model: ModelArg,
            text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="a text to classify (repeatable)")] = None,
            file: Annotated[Optional[Path], typer.Option("--file", "-f", help="texts to classify, one per line")] = None,
            top: Annotated[int, typer.Option(help="classes shown per text")] = 3):
    """Classify new text with a logged or registered text model (it carries its own vocabulary)."""
    texts = read_texts(text, file, "classify")
    served = served_model(model)
    accept(served, "predict")
    for t, best in zip(texts, served(texts, top=top)):
        typer.echo(f"{', '.join(f'{c} {q:.3f}' for c, q in best)}\t{t[:80]}")


@app.command()
def translate(model: ModelArg = "models:/nnlab-translator@champion",
              text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="a text to translate (repeatable)")] = None,
              file: Annotated[Optional[Path], typer.Option("--file", "-f", help="texts to translate, one per line")] = None):
    """Translate new text with a logged or registered translation model (it carries both vocabularies)."""
    texts = read_texts(text, file, "translate")
    served = served_model(model)
    accept(served, "translate")
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
    recordings(audio)
    served = served_model(model)
    accept(served, "transcribe")
    empty = []
    for path in audio:  # one line per recording as it is transcribed
        with serving_error():
            said = served([path], beam=beam)[0]
        typer.echo(f"{path}\t{said}")
        if not said.strip():
            empty.append(path)
    if empty:
        blank_hint(served, empty)


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
    images = image_files(input) if input is not None else None  # checked before any model is looked up
    served = served_model(model)
    if served.command.startswith("sample") and (served.takes == "image") != (images is not None):
        fail(f"{served.uri} is {what(served)}: " + (
            "it translates images: give one with --input IMAGE (or a folder of images)" if images is None else
            "--input: it draws from noise and translates no image (pix2pix and cyclegan do); leave --input out"))
    accept(served, "sample")
    if images is not None:
        translate_images(served, images, out)
        return
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


def blank_hint(served: "Served", empty: list[Path]) -> None:
    """On stderr: an empty transcript means the model emitted only CTC blanks, typical of a model stopped too
    early; what its run trained and scored, how to train it longer, and whether it was ever registered."""
    from tasks.serving import not_registered_why

    o = getattr(served, "origin", None)
    files = ", ".join(map(str, empty[:3])) + (", ..." if len(empty) > 3 else "")
    lines = [f"hint: empty transcript ({files}): {served.uri} emitted only CTC blanks (no character at any frame), "
             "typical of a speech model stopped too early: CTC models output blanks alone for their first epochs"]
    if o is None:
        lines.append("hint: train it longer (train.epochs)")
    else:
        scores = ", ".join(f"{k} {o.metrics[k]:.3f}" for k in ("val_cer", "test_cer", "test_wer") if k in o.metrics)
        rerun = (f"nnlab run --models {o.name or 'ctc_asr'} --set data.source={o.source or 'synth_speech'} --set "
                 f"train.epochs={max(20, 2 * (o.epochs or 0))}")
        lines.append(f"hint: run {o.run_id} trained {o.epochs if o.epochs is not None else '?'} epoch(s)"
                     + (f" ({scores})" if scores else "") + f"; train it longer, e.g. `{rerun}`")
        why = not_registered_why(o)
        lines.append(f"hint: {why}" if why else f"hint: its run is registered as {', '.join(o.registered)}")
    for line in lines:
        typer.secho(line, fg="yellow", err=True)

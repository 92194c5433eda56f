"""The serving commands with real, tiny models (each trained 1 epoch through the stages, in the session's MLflow
store): a model of another kind refused with its kind and the command that serves it, the registered version
and run that answered named on stderr, inputs checked before any model is looked up, an empty transcript
explained; and the example inputs `nnlab example-wav` and `nnlab example-image` write, taken by those commands."""
import uuid
import wave
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import validate
from tasks.data import prepare


def nnlab(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _trained(name: str, settings: dict, tag: str) -> dict:
    """Prepared, trained and evaluated through the stages: the evaluation's summary (run id, model URI, ...)."""
    from tasks.stages import evaluate_stage, train_stage

    cfg = validate(settings)
    prepare(cfg.data, 0, f"d-{tag}")
    train_stage(cfg, name, f"d-{tag}", f"out-{tag}")
    return evaluate_stage(cfg, name, f"d-{tag}", f"out-{tag}", f"m-{tag}.json", f"p-{tag}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A translator (registered by hand: 1 epoch does not beat its baseline), an image classifier (registered by
    the stages), a speech recogniser still emitting only blanks and a pix2pix generator (both by run id)."""
    from tasks.registration import register_version
    from tasks.stages import register_stage

    cpu = {"epochs": 1, "device": "cpu"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("serving-ux"))
        tag = uuid.uuid4().hex[:6]
        tr = _trained("seq2seq", {"data": {"source": "dates", "max_train": 300}, "train": cpu,
                                  "models": {"seq2seq": {"hidden": 16, "embedding_dim": 8, "attention_dim": 8}}}, "t")
        translator = f"ux-translator-{tag}"
        register_version(translator, tr["model_uri"], tr["test_bleu"], 0.0, {"nnlab.run_id": tr["run_id"]})
        digits = {"data": {"source": "digits", "max_train": 300}, "train": cpu,
                  "register": {"name": f"ux-classifier-{tag}"}, "models": {"mlp": {}}}
        clf = validate(digits)
        assert register_stage(clf, [_trained("mlp", digits, "c")], None)["alias"] == "champion"
        asr = _trained("ctc_asr", {"data": {"source": "synth_speech", "utterances": 40},
                                   "train": {**cpu, "batch_size": 8, "lr": 0.01},
                                   "models": {"ctc_asr": {"hidden": 16, "channels": 16, "lexicon": "off"}}}, "s")
        i2i = _trained("pix2pix", {"data": {"source": "paired", "pairing": "edges", "max_train": 64,
                                            "test_fraction": 0.02, "val_fraction": 0.02},
                                   "train": {**cpu, "batch_size": 16},
                                   "models": {"pix2pix": {"channels": 8, "d_channels": 8}}}, "p")
        yield SimpleNamespace(translator=f"models:/{translator}@champion", translator_run=tr["run_id"],
                              translator_name=translator, classifier=f"models:/{clf.register.name}@champion",
                              classifier_name=clf.register.name, asr=asr["run_id"], asr_result=asr, i2i=i2i["run_id"])


# ---------------------------------------------------------------- the examples

def test_example_wav_is_espeak_ng_saying_the_digits_at_16_khz(tmp_path):
    from tasks.data.audio import condition, load_audio

    out = tmp_path / "recording.wav"
    res = nnlab("example-wav", out, "--digits", "3 1 4")
    assert res.exit_code == 0, res.output
    assert "'three one four' (314)" in res.stdout and "eSpeak NG voice en-us+m3" in res.stdout
    with wave.open(str(out)) as w:  # a plain PCM WAV: the standard library reads it
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16_000, 1, 2)
        assert 0.4 < w.getnframes() / 16_000 < 4.0
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
    speech = condition(load_audio(out, 16_000), 16_000, 35.0, 60.0)  # transcribe's reader and front end
    assert len(speech) > 0.3 * 16_000 and float(np.sqrt(np.mean(speech ** 2))) > 0.05
    again = nnlab("example-wav", tmp_path / "again.wav", "--digits", "314")
    assert again.exit_code == 0 and (tmp_path / "again.wav").read_bytes() == out.read_bytes()  # deterministic
    drawn = nnlab("example-wav", tmp_path / "drawn.wav", "--seed", "3")
    assert drawn.exit_code == 0 and len(drawn.stdout.split("(")[1].split(")")[0]) == 3, drawn.output
    bad = nnlab("example-wav", tmp_path / "x.wav", "--voice", "klingon")
    assert bad.exit_code == 2 and "klingon" in bad.output and not (tmp_path / "x.wav").exists()
    assert nnlab("example-wav", tmp_path / "x.wav", "--digits", "3a").exit_code == 2


def test_example_wav_copies_a_free_spoken_digit_dataset_recording(tmp_path):
    from scipy.signal import resample_poly

    fsdd = tmp_path / "recordings"
    fsdd.mkdir()
    assert nnlab("example-wav", tmp_path / "seven.wav", "--digits", "7").exit_code == 0
    w, rate = sf.read(str(tmp_path / "seven.wav"))
    sf.write(str(fsdd / "7_theo_3.wav"), resample_poly(w, 1, 2), rate // 2, subtype="PCM_16")  # FSDD: 8 kHz
    sf.write(str(fsdd / "2_theo_0.wav"), resample_poly(w, 1, 2), rate // 2, subtype="PCM_16")
    res = nnlab("example-wav", tmp_path / "out.wav", "--from", fsdd, "--digits", "7")
    assert res.exit_code == 0, res.output
    assert "'seven' (7)" in res.stdout and "7_theo_3.wav" in res.stdout and "speaker theo" in res.stdout
    info = sf.info(str(tmp_path / "out.wav"))
    assert info.samplerate == 16_000 and abs(info.duration - len(w) / rate) < 0.01  # resampled, not cut
    one = nnlab("example-wav", tmp_path / "two.wav", "--from", fsdd / "2_theo_0.wav")
    assert one.exit_code == 0 and "'two' (2)" in one.stdout
    assert nnlab("example-wav", tmp_path / "x.wav", "--from", fsdd, "--digits", "5").exit_code == 2
    assert nnlab("example-wav", tmp_path / "x.wav", "--from", fsdd / "2_theo_0.wav", "--digits", "7").exit_code == 2
    assert not (tmp_path / "x.wav").exists()
    assert nnlab("example-wav", tmp_path / "x.wav", "--from", tmp_path / "seven.wav").exit_code == 2  # not FSDD's name


def test_example_image_is_a_real_digit_as_the_translators_input(tmp_path):
    from tasks.data.image_pairs import edges, mnist32, sklearn_digits32
    from tasks.kinds.image2image import ServedImageTranslator

    res = nnlab("example-image", tmp_path / "edges.png", "--index", "7")
    assert res.exit_code == 0, res.output
    x, labels = mnist32()
    assert f"a {labels[7]} (mnist5k #7) as its Canny edge map" in res.stdout
    with Image.open(tmp_path / "edges.png") as im:
        assert im.format == "PNG" and im.size == (32, 32) and im.mode == "L"
        pixels = np.asarray(im)
    assert np.array_equal(pixels, edges(x[7:8])[0, 0]) and set(np.unique(pixels)) == {0, 255}
    res = nnlab("example-image", tmp_path / "sk.png", "--domain", "digits_mnist", "--index", "5")
    assert res.exit_code == 0 and "a 5 (scikit-learn digits #5)" in res.stdout, res.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sk.png")), sklearn_digits32()[0][5, 0])
    reader = ServedImageTranslator(None, None, {"shape": [1, 32, 32]}, "models:/x/1")  # `sample --input`'s reader
    assert np.array_equal(reader._read(tmp_path / "edges.png")[0], pixels)
    assert nnlab("example-image", tmp_path / "x.png", "--domain", "sketch").exit_code == 2
    assert nnlab("example-image", tmp_path / "x.png", "--index", "5000").exit_code == 2


# ---------------------------------------------------------------- inputs before models

def test_inputs_are_checked_before_any_model_is_looked_up(tmp_path):
    nowhere = "models:/no-such-model-anywhere@champion"
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "notes.wav").write_text("not a recording")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    for args, said in [(["sample", "--model", nowhere, "--input", tmp_path / "edges.png"], "edges.png: no such image"),
                       (["sample", "--model", nowhere, "--input", tmp_path / "notes.png"], "not an image"),
                       (["sample", "--model", nowhere, "--input", tmp_path / "empty"], "no images"),
                       (["transcribe", nowhere, tmp_path / "gone.wav"], "no such recording"),
                       (["transcribe", nowhere, tmp_path / "notes.wav"], "not a readable recording"),
                       (["predict", nowhere, "--file", tmp_path / "latin1.txt"], "UTF-8"),
                       (["translate", nowhere, "--file", tmp_path / "gone.txt"], "not a file")]:
        res = nnlab(*args)
        assert res.exit_code == 2 and said in res.output and "no-such-model" not in res.output, (args, res.output)
    assert nnlab("example-image", tmp_path / "edges.png").exit_code == 0
    found = nnlab("sample", "--model", nowhere, "--input", tmp_path / "edges.png")  # a good input: then the model
    assert found.exit_code == 2 and "no-such-model-anywhere" in found.output, found.output


# ---------------------------------------------------------------- the models, served

def test_each_command_refuses_a_model_of_another_kind(served, tmp_path):
    assert nnlab("example-wav", tmp_path / "r.wav", "--digits", "42").exit_code == 0
    assert nnlab("example-image", tmp_path / "e.png").exit_code == 0
    cases = [(["predict", served.translator, "-t", "hello"], "a translator (seq2seq on dates)", "`nnlab translate`"),
             (["predict", served.classifier, "-t", "hello"], "an image classifier (mlp on digits)",
              "no nnlab command serves (it takes raw arrays: `mlflow models serve` does)"),
             (["translate", served.asr, "-t", "hello"], "a speech recogniser (ctc_asr on synth_speech)",
              "`nnlab transcribe`"),
             (["transcribe", served.translator, tmp_path / "r.wav"], "a translator", "`nnlab translate`"),
             (["sample", "--model", served.translator_run, "-o", tmp_path / "s.png"], "a translator",
              "`nnlab translate`"),
             (["sample", "--model", served.classifier, "--input", tmp_path / "e.png"], "an image classifier",
              "`mlflow models serve`")]
    wants = {"predict": "serves text classifiers", "translate": "serves translators",
             "transcribe": "serves speech recognisers", "sample": "serves GAN generators and image-to-image"}
    for args, kind, where in cases:
        res = nnlab(*args)
        assert res.exit_code == 2 and res.stdout == "", (args, res.output)
        assert kind in res.stderr and where in res.stderr and f"`nnlab {args[0]}` {wants[args[0]]}" in res.stderr, \
            (args, res.stderr)
    assert f"models:/{served.translator_name}/1 is a translator" in nnlab(*cases[0][0]).stderr  # the model, named
    assert not (tmp_path / "s.png").exists()
    noise = nnlab("sample", "--model", served.i2i, "-o", tmp_path / "s.png")  # a translator of images needs one
    assert noise.exit_code == 2 and "an image-to-image translator (pix2pix on paired)" in noise.stderr
    assert "--input" in noise.stderr


def test_each_command_says_which_registered_version_and_run_answered(served, tmp_path):
    res = nnlab("translate", served.translator, "-t", "7. März 2021")
    assert res.exit_code == 0, res.output
    assert f"answered by {served.translator_name} v1 (champion), run {served.translator_run}" in res.stderr
    assert len(res.stdout.splitlines()) == 1 and res.stdout.startswith("7. März 2021\t")  # stdout: the answers only
    by_run = nnlab("translate", served.translator_run, "-t", "7. März 2021")
    assert by_run.exit_code == 0 and f"answered by run {served.translator_run}: a translator" in by_run.stderr
    assert nnlab("example-image", tmp_path / "e.png").exit_code == 0
    drawn = nnlab("sample", "--model", served.i2i, "--input", tmp_path / "e.png", "-o", tmp_path / "d.png")
    assert drawn.exit_code == 0, drawn.output
    assert f"answered by run {served.i2i}: an image-to-image translator (pix2pix on paired)" in drawn.stderr
    with Image.open(tmp_path / "d.png") as im:  # example-image's PNG, taken and translated
        assert im.size == (32, 32)
    assert nnlab("example-image", tmp_path / "sk.png", "--domain", "digits_mnist").exit_code == 0
    assert nnlab("sample", "--model", served.i2i, "--input", tmp_path / "sk.png", "-o", tmp_path / "d2.png"
                 ).exit_code == 0


def test_an_empty_transcript_says_the_model_emitted_only_blanks(served, tmp_path):
    assert served.asr_result["beats_baseline"] is False  # 1 epoch: never registered
    assert nnlab("example-wav", tmp_path / "recording.wav", "--digits", "314").exit_code == 0
    res = nnlab("transcribe", served.asr, tmp_path / "recording.wav")  # example-wav's WAV, taken
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{tmp_path / 'recording.wav'}\t\n"  # an empty transcript ...
    assert f"answered by run {served.asr}: a speech recogniser" in res.stderr
    assert "emitted only CTC blanks" in res.stderr and "stopped too early" in res.stderr  # ... explained
    assert "trained 1 epoch(s)" in res.stderr and "--set train.epochs=20" in res.stderr
    assert f"run {served.asr} was never registered: it does not beat its trivial baseline" in res.stderr

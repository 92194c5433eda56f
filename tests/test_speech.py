"""Speech recognition: features, CTC models and decoding, the recording layouts, eSpeak NG data, and a CTC model
learning to transcribe voices it never heard."""
import copy
import csv
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from models.registry import create_model
from models.speech import Lexicon, LogMel, beam_search, greedy, mel_filterbank
from tasks.config import DataConfig, TrainConfig, validate
from tasks.data import DataError, load_prepared, prepare
from tasks.kinds.speech import CTCStep, SpecAugment, decoder, lexicon_words, scores
from tasks.data.audio import condition, normalise, perturb_speed, read_speech
from tasks.train import Split, Trainer, seed_everything

CPU = torch.device("cpu")


# ---------------------------------------------------------------- features, models, decoding

def test_log_mel_puts_a_tone_in_its_band():
    rate, f0 = 16_000, 1_000.0
    wave = torch.sin(2 * math.pi * f0 * torch.arange(rate) / rate)[None]  # 1 s
    lm = LogMel(rate, 40)
    mel = lm(wave)[0]
    assert mel.shape == (lm.frames(rate), 40) == (101, 40)
    fb = mel_filterbank(lm.n_fft // 2 + 1, rate, 40)
    freqs = torch.linspace(0, rate / 2, lm.n_fft // 2 + 1)
    peak = int(mel[50].argmax())
    centre = float(freqs[fb[:, peak].argmax()])
    assert abs(centre - f0) < 80, centre  # the loudest band is the one centred on the tone
    assert fb.max() <= 1.0 and (fb.sum(0) > 0).all()  # every filter covers some bins


@pytest.mark.parametrize("arch, options", [("ctc_asr", {}), ("ctc_asr", {"front": "conv2d"}), ("conformer", {})])
def test_models_give_log_probs_that_batching_does_not_change(arch, options):
    torch.manual_seed(0)
    model = create_model(arch, input_shape=(90, 40), num_classes=17, **options).eval()
    x, n = torch.randn(3, 90, 40), torch.tensor([90, 55, 23])
    out = model(x, n)
    assert out.shape == (3, 45, 17) and torch.allclose(out.exp().sum(-1), torch.ones(3, 45), atol=1e-5)
    assert model.output_lengths(n).tolist() == [45, 28, 12]
    for i in range(3):  # alone, cut at its own end: the same output steps
        alone = model(x[i:i + 1, :int(n[i])], n[i:i + 1])[0]
        assert torch.allclose(alone, out[i, :len(alone)], atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_speech_models_refuse_images_and_speech_data_refuses_classifiers():
    with pytest.raises(ValueError, match="log-mel"):
        create_model("ctc_asr", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="ctc_asr"):
        validate({"data": {"source": "synth_speech"}, "models": {"mlp": {}}})
    with pytest.raises(ValueError, match="synth_speech"):
        validate({"data": {"source": "digits"}, "models": {"ctc_asr": {}}})


def test_greedy_merges_repeats_and_beam_search_sums_paths():
    def lp(rows):  # per frame probabilities over (blank, a, b) -> (1, T, 3) log-probs
        return torch.tensor(rows, dtype=torch.float32).log()[None]

    # a a _ a b b -> "aab"
    path = lp([[.1, .8, .1], [.1, .8, .1], [.8, .1, .1], [.1, .8, .1], [.1, .1, .8], [.1, .1, .8]])
    assert greedy(path) == [[1, 1, 2]] and beam_search(path, beam=4) == [[1, 1, 2]]
    # two frames, blank 0.6 each: the best single path is "" (0.36), but "a" totals 0.16 + 0.24 + 0.24 = 0.64
    split = lp([[.6, .4, 1e-9], [.6, .4, 1e-9]])
    assert greedy(split) == [[]] and beam_search(split, beam=4) == [[1]]


def test_a_lexicon_spells_only_its_words():
    """Alphabet (blank, a, b, space): the frames say "ab a", but "ab" and "bb" are the only words."""
    def lp(rows):
        return torch.tensor(rows, dtype=torch.float32).log()[None]

    frames = lp([[.05, .8, .1, .05], [.05, .1, .8, .05], [.05, .05, .1, .8], [.05, .8, .1, .05]])
    lexicon = Lexicon([[1, 2], [2, 2]], space=3)
    assert greedy(frames) == [[1, 2, 3, 1]] and beam_search(frames, beam=8) == [[1, 2, 3, 1]]
    assert lexicon.allows((1, 2, 3), 1) and lexicon.allows((1, 2), 3) and not lexicon.allows((1,), 3)
    assert not lexicon.complete((1, 2, 3, 1)) and lexicon.complete((1, 2, 3, 2, 2)) and not lexicon.allows((2,), 1)
    assert beam_search(frames, beam=8, lexicon=lexicon) == [[1, 2]]  # the best prefix made of words only
    lone = lp([[.1, .7, .1, .1], [.1, .7, .1, .1]])  # "a" alone is no word: the best finished prefix is "ab"/"ba"
    assert beam_search(lone, beam=8, lexicon=lexicon)[0] in ([1, 2], [2, 1])
    words = lexicon_words(create_model("ctc_asr", input_shape=(50, 40), num_classes=5), ["one two", "two"])
    assert words == ["one", "two"]  # lexicon "auto": a closed vocabulary
    many = [f"w{k}" for k in range(101)]
    assert lexicon_words(create_model("ctc_asr", input_shape=(50, 40), num_classes=5), many) is None
    assert decoder(" abc", None, 1) == (None, 1, "greedy") and decoder(" abc", ["ab"], 2)[1:] == (8, "beam 8, "
                                                                                                 "lexicon of 1 training words")


def test_spec_augment_masks_whole_bands_and_spans_reproducibly():
    x = torch.ones(4, 120, 40)
    a, b = SpecAugment(2, 8, 2, 15, seed=3), SpecAugment(2, 8, 2, 15, seed=3)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)  # seeded
    zero_bands = (ya == 0).all(1)  # (B, F): a mel channel masked at every frame
    zero_spans = (ya == 0).all(2)  # (B, T): a frame masked in every channel
    assert zero_bands.any(1).all() or zero_spans.any(1).all()
    assert 0 < (ya == 0).float().mean() < 0.5
    assert torch.equal(SpecAugment(0, 8, 0, 15, seed=3)(x), x)


def test_scores_are_jiwers_error_rates():
    s = scores(["one two", "", "three"], ["one two", "four", "three four"], "v")
    assert s["v_wer"] == pytest.approx(2 / 5) and s["v_exact_match"] == pytest.approx(1 / 3)
    # characters: "four" -> "" is 4 deletions, "three four" -> "three" 5 (" four"), over 7 + 4 + 10 reference ones
    assert s["v_empty"] == pytest.approx(1 / 3) and s["v_cer"] == pytest.approx(9 / 21)
    assert normalise("  Hello, World!  It's 42_x ") == "hello world it's 42 x"


def _ctc_trainer(seed=1, epochs=1):
    seed_everything(seed)
    model = create_model("ctc_asr", input_shape=(60, 16), num_classes=5, hidden=16, channels=16, layers=1)
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, device="cpu")
    return Trainer(model, cfg, seed, CPU, CTCStep(model, cfg, CPU), SpecAugment(1, 4, 1, 8, seed))


def test_ctc_step_resumes_bit_identically_and_traces_the_blank_phase():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 60, 16, generator=g)
    y = torch.zeros(32, 5, dtype=torch.long)
    y[:, 0] = torch.randint(30, 61, (32,), generator=g)  # frames
    y[:, 1:4] = torch.randint(1, 5, (32, 3), generator=g)  # three characters each
    data = Split(x, y)
    first = _ctc_trainer(epochs=1)
    first.fit(data, data)
    state = copy.deepcopy(first.state_dict())
    first.cfg.epochs = 3
    first.fit(data, data)
    torch.manual_seed(99)
    resumed = _ctc_trainer(epochs=3)
    resumed.load_state_dict(state)
    resumed.fit(data, data)
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(first.history) and resumed.step.trace == first.step.trace
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), resumed.model.state_dict().values()))
    steps = [t[0] for t in first.step.trace]
    assert steps[0] == 1 and steps == sorted(steps) and all(0 <= t[1] <= 1 for t in first.step.trace)
    assert len(resumed.step.drain()) == len(resumed.step.trace) - len(state["step"]["trace"])  # only the new ones


# ---------------------------------------------------------------- the recording layouts

def _tone(path, seconds, rate=8_000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t), rate, subtype="PCM_16")


def _digit_folder(raw):
    """Tones in the free-spoken-digit-dataset layout: 10 digits by 4 of its speakers."""
    raw.mkdir()
    for speaker in ("jackson", "nicolas", "theo", "yweweler"):
        for d in range(10):
            _tone(raw / f"{d}_{speaker}_0.wav", 0.3 + 0.02 * d, freq=200 + 60 * d)
    return raw


def test_speech_reads_the_digit_layout_resampled_and_split_by_speaker(tmp_path):
    raw = _digit_folder(tmp_path / "fsdd")
    _tone(raw / "3_theo_1.wav", 12.0)  # over data.max_seconds: left out, counted
    cfg = DataConfig(source="speech", path=str(raw), max_seconds=5.0, speed_perturb=[0.9, 1.1])
    m = prepare(cfg, 0, tmp_path / "out")
    s = m["speech"]
    assert s["dropped"] == {"too_long": 1} and s["kept"] == 40 and s["split_by"].startswith("speaker")
    assert m["benchmark"] == "fsdd:unheard-speakers"  # its layout and speakers: the summary cites its figure
    assert s["f_max"] == 4_000  # 8 kHz recordings read at 16 kHz: nothing above 4 kHz to filter
    texts = __import__("json").loads((tmp_path / "out" / "texts.json").read_text())
    speakers = {k: {sp for _, sp, _ in v} for k, v in texts.items()}
    # 3 speakers left after the test one: all of them train, validation is a slice of their recordings
    assert len(speakers["test"]) == 1 and not (speakers["train"] & speakers["test"]) and speakers["val"] <= speakers["train"]
    originals = [f for f, _, _ in texts["train"] if "speed" not in f]
    assert len(texts["train"]) == 3 * len(originals) and not {f for f, _, _ in texts["val"]} & set(originals)
    assert {t for _, _, t in texts["train"]} <= set("zero one two three four five six seven eight nine".split())
    data = load_prepared(tmp_path / "out")
    frames = data.y_train[:len(originals), 0]
    assert data.x_train.shape[2] == 40 and frames.min() >= 0.3 * 100  # 10 ms frames of >= 0.3 s
    assert m["input_shape"] == [data.x_train.shape[1], 40] and m["num_classes"] == len(s["alphabet"]) + 1
    x = data.x_test[0, :int(data.y_test[0, 0])].astype(np.float32)  # per-utterance CMVN: each band mean 0
    assert np.abs(x.mean(0)).max() < 0.02 and np.abs(x.std(0) - 1).max() < 0.05

    named = prepare(DataConfig(source="speech", path=str(raw), max_seconds=5.0, test_speakers=["theo"],
                               val_speakers=["nicolas"], speed_perturb=[]), 0, tmp_path / "named")
    texts = __import__("json").loads((tmp_path / "named" / "texts.json").read_text())
    assert {sp for _, sp, _ in texts["test"]} == {"theo"} and {sp for _, sp, _ in texts["val"]} == {"nicolas"}
    assert named["sizes"]["train"] == 20 and named["speech"]["test_speakers"] == ["theo"]
    with pytest.raises(DataError, match="nobody.*not among the 4 speakers"):
        prepare(DataConfig(source="speech", path=str(raw), test_speakers=["nobody"]), 0, tmp_path / "x")


def test_synthetic_voices_say_what_the_training_recordings_say(tmp_path):
    """data.mix_synth: eSpeak NG utterances of the training split's transcripts, in training only."""
    raw = _digit_folder(tmp_path / "fsdd")
    for d in range(10):  # words only the test speaker says: never spoken by a synthetic voice
        _tone(raw / f"{d}_theo_1.wav", 0.4)
    words = "zero one two three four five six seven eight nine".split()
    said = {f.name: "alpha bravo" if "theo" in f.name else words[int(f.name[0])] for f in raw.glob("*.wav")}
    (raw / "transcripts.tsv").write_text("file\ttext\tspeaker\n" + "".join(
        f"{name}\t{text}\t{name.split('_')[1]}\n" for name, text in sorted(said.items())))
    m = prepare(DataConfig(source="speech", path=str(raw), test_speakers=["theo"], mix_synth=6, speed_perturb=[]), 0,
                tmp_path / "out")
    texts = __import__("json").loads((tmp_path / "out" / "texts.json").read_text())
    synth = [t for _, sp, t in texts["train"] if sp.startswith("espeak:")]
    assert len(synth) == 6 and m["speech"]["mix_synth"] == 6
    assert set(synth) <= {t for _, sp, t in texts["train"] if not sp.startswith("espeak:")} and "alpha bravo" not in synth
    assert not any(sp.startswith("espeak:") for split in ("val", "test") for _, sp, _ in texts[split])


def test_a_run_on_a_known_benchmark_puts_the_published_figure_beside_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tasks.stages import evaluate_stage, train_stage
    from tasks.tracking import client

    cfg = validate({"data": {"source": "speech", "path": str(_digit_folder(tmp_path / "fsdd")), "speed_perturb": []},
                    "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "diagnostics": {"enabled": False}},
                    "models": {"ctc_asr": {"hidden": 8, "channels": 8, "layers": 1}}})
    prepare(cfg.data, 0, tmp_path / "d")
    trained = train_stage(cfg, "ctc_asr", tmp_path / "d", tmp_path / "out")
    r = evaluate_stage(cfg, "ctc_asr", tmp_path / "d", tmp_path / "out", tmp_path / "m.json", tmp_path / "p")
    assert r["reference"]["value"] == 0.97 and r["reference"]["metric"] == "test_exact_match"
    tag = client().get_run(trained.run_id).data.tags["nnlab.reference"]
    assert tag.startswith(f"test_exact_match {r['test_exact_match']:.4g} vs published 0.97 (small CNN/RNN")


def test_front_end_trims_silence_sets_the_level_and_perturbs_speed():
    rate = 16_000
    t = np.arange(rate // 2) / rate
    tone = 0.01 * np.sin(2 * np.pi * 300 * t)  # a quiet half second ...
    wave = np.concatenate([np.zeros(rate), tone, np.zeros(rate // 2)]).astype(np.float32)  # ... amid 1.5 s of silence
    wave += np.random.default_rng(0).normal(0, 1e-5, len(wave)).astype(np.float32)  # a noise floor, -60 dB
    out = condition(wave, rate, trim_db=35.0, margin_ms=50.0)
    assert 0.55 * rate <= len(out) <= 0.66 * rate  # the tone, 50 ms either side (and up to a 25 ms frame more)
    assert np.sqrt(np.mean(out ** 2)) == pytest.approx(0.1, rel=0.05)  # -20 dBFS whatever it was recorded at
    assert len(condition(wave, rate, trim_db=0.0, margin_ms=50.0)) == len(wave)  # 0 dB: nothing trimmed
    assert len(condition(np.zeros(0, np.float32), rate, 35.0, 50.0)) == 0
    assert len(perturb_speed(out, 1.1)) == pytest.approx(len(out) / 1.1, abs=2)
    assert len(perturb_speed(out, 0.9)) == pytest.approx(len(out) / 0.9, abs=2)
    full, low = LogMel(rate, 40), LogMel(rate, 40, f_max=4_000)
    tone_5k = torch.sin(2 * np.pi * 5_000 * torch.arange(rate) / rate)[None]
    assert full(tone_5k)[0, 50].max() > 0 and low(tone_5k)[0, 50].max() < -5  # above f_max: no band hears it


def test_speech_reads_transcript_tables_and_librispeech(tmp_path):
    table = tmp_path / "table"
    (table / "clips").mkdir(parents=True)
    with open(table / "transcripts.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["file", "text", "speaker"])
        for i in range(4):
            _tone(table / "clips" / f"c{i}.wav", 0.2, rate=22_050)
            w.writerow([f"clips/c{i}.wav", f"Hello, World #{i}!", f"s{i % 2}"])
    rec = read_speech(DataConfig(source="speech", path=str(table)))
    assert rec.texts[0] == "Hello, World #0!" and rec.speakers == ["s0", "s1", "s0", "s1"]
    assert normalise(rec.texts[0]) == "hello world 0"

    libri = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    libri.mkdir(parents=True)
    for i in range(2):
        t = np.arange(3200) / 16_000
        sf.write(libri / f"84-121123-000{i}.flac", 0.2 * np.sin(2 * np.pi * 300 * t), 16_000)
    (libri / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS\n")
    rec = read_speech(DataConfig(source="speech", path=str(tmp_path / "LibriSpeech")))
    assert rec.texts == ["GO DO YOU HEAR", "BUT IN LESS"] and rec.speakers == ["84", "84"]
    assert rec.files[0].suffix == ".flac"


def test_speech_errors_name_the_file_and_the_layouts(tmp_path):
    with pytest.raises(DataError, match="transcripts.tsv.*trans.txt.*digit"):
        read_speech(DataConfig(source="speech", path=str(tmp_path)))
    (tmp_path / "transcripts.tsv").write_text("file\ttext\nmissing.wav\thello\n")
    with pytest.raises(DataError, match="line 2: .*missing.wav does not exist"):
        read_speech(DataConfig(source="speech", path=str(tmp_path)))
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    (tmp_path / "transcripts.tsv").write_text("file\ttext\nbad.wav\thello\n")
    with pytest.raises(DataError, match="bad.wav: not a readable recording"):
        prepare(DataConfig(source="speech", path=str(tmp_path)), 0, tmp_path / "out")


def test_an_undecodable_recording_is_named_and_leaves_the_prepared_folder_as_it_was(tmp_path):
    raw = tmp_path / "fsdd"
    raw.mkdir()
    for speaker in ("a", "b", "c"):
        for d in range(10):
            _tone(raw / f"{d}_{speaker}_0.wav", 0.3, freq=200 + 60 * d)
    cfg = DataConfig(source="speech", path=str(raw), speed_perturb=[])
    before = prepare(cfg, 0, tmp_path / "out")
    listing = sorted(p.name for p in (tmp_path / "out").iterdir())
    (raw / "4_c_1.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt broken")  # a WAV header cut short
    with pytest.raises(DataError, match="4_c_1.wav: not a readable recording"):
        prepare(cfg, 0, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == listing
    assert load_prepared(tmp_path / "out").manifest["data_hash"] == before["data_hash"]


def test_synth_speech_is_deterministic_and_holds_test_voices_out(tmp_path):
    cfg = DataConfig(source="synth_speech", utterances=60)
    a, b = prepare(cfg, 0, tmp_path / "a"), prepare(cfg, 0, tmp_path / "b")
    assert a["data_hash"] == b["data_hash"]  # the same samples from a fresh eSpeak NG each time
    wavs = sorted((tmp_path / "a" / "wav").glob("*.wav"))
    assert len(wavs) == 60 and sf.info(wavs[0]).samplerate == 16_000
    rows = list(csv.DictReader(open(tmp_path / "a" / "wav" / "transcripts.tsv"), delimiter="\t"))
    assert len({r["speaker"] for r in rows}) > 30 and all(set(r["text"].split()) <= set(
        "zero one two three four five six seven eight nine".split()) for r in rows)
    texts = __import__("json").loads((tmp_path / "a" / "texts.json").read_text())
    voices = {k: {sp for _, sp, _ in v} for k, v in texts.items()}
    assert voices["test"] and not (voices["test"] & voices["train"])
    commands = prepare(DataConfig(source="synth_speech", utterances=30, script="commands"), 0, tmp_path / "c")
    assert "the" in __import__("json").loads((tmp_path / "c" / "texts.json").read_text())["train"][0][2].split()
    assert commands["speech"]["script"] == "commands"


# ---------------------------------------------------------------- learning, through the stages

@pytest.mark.slow
def test_ctc_asr_transcribes_unheard_voices_and_a_new_recording(tmp_path, monkeypatch):
    """Synthesised digit strings: the test voices are never heard in training. Through prepare, train,
    evaluate and register, then `nnlab transcribe` on a recording made afterwards."""
    monkeypatch.chdir(tmp_path)
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.data.espeak import Utterance, synthesise_fresh
    from tasks.stages import evaluate_stage, register_stage, train_stage
    from tasks.tracking import client

    cfg = validate({"data": {"source": "synth_speech", "utterances": 600},
                    "train": {"epochs": 6, "batch_size": 12, "lr": 0.003, "device": "cpu"},
                    "augment": {"enabled": True}, "register": {"name": "asr-test"},
                    "models": {"ctc_asr": {"hidden": 96, "channels": 96}}})
    m = prepare(cfg.data, 0, tmp_path / "d")
    trained = train_stage(cfg, "ctc_asr", tmp_path / "d", tmp_path / "out")
    r = evaluate_stage(cfg, "ctc_asr", tmp_path / "d", tmp_path / "out", tmp_path / "m.json", tmp_path / "p")
    assert r["test_cer"] < 0.3 and r["baseline_test_cer"] > 0.6, r  # far below the most common transcript's
    assert r["test_wer"] < r["baseline_test_wer"] and 0 <= r["test_exact_match"] <= 1
    c = client()
    cer = [x.value for x in c.get_metric_history(trained.run_id, "val_cer")]
    blank = sorted(c.get_metric_history(trained.run_id, "train_blank_share"), key=lambda x: x.step)
    assert len(cer) == 6 and cer[-1] < cer[0]
    assert max(b.value for b in blank[:10]) > 0.95 and blank[-1].value < 0.9  # the blank-only phase, then its end
    arts = {a.path for a in c.list_artifacts(trained.run_id, "plots")} | {a.path for a in c.list_artifacts(trained.run_id)}
    assert {"plots/spectrogram.png", "plots/learning_curve.png", "plots/error_rates.png", "transcriptions.tsv"} <= arts
    assert register_stage(cfg, [r], None)["alias"] == "champion"

    test_voice = __import__("json").loads((tmp_path / "d" / "texts.json").read_text())["test"][0][1]
    (tmp_path / "new").mkdir()
    synthesise_fresh([Utterance("three one four", test_voice, 170, 50, 35.0)], 16_000, str(tmp_path / "new"), 7)
    wav = tmp_path / "new" / "00000.wav"
    done = CliRunner().invoke(app, ["transcribe", "models:/asr-test@champion", str(wav)])
    assert done.exit_code == 0, done.output
    said = done.output.strip().split("\t")[-1]
    assert scores([said], ["three one four"], "x")["x_cer"] < 0.5, said
    bad = CliRunner().invoke(app, ["transcribe", "models:/asr-test@champion", str(tmp_path / "no.wav")])
    assert bad.exit_code == 2 and "no.wav" in bad.output
    assert m["speech"]["speakers"]["test"] > 0

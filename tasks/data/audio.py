"""Recordings with transcripts -> log-mel frames and character ids, split by speaker (speech recognition runs).

Sources (offline):
  speech        recordings with transcripts in `data.path` (default data/raw), in one of three layouts:
                a `transcripts.tsv` / `transcripts.csv` (file, text[, speaker]; a header row naming them is
                optional); LibriSpeech's `<speaker>/<chapter>/*.trans.txt` beside its .flac files; or the
                free-spoken-digit-dataset's `<digit>_<speaker>_<n>.wav` (the transcript is the digit's word);
  synth_speech  `data.utterances` digit strings ("four two seven") or short commands spoken by eSpeak NG in 160
                voices (8 English accents x 20 variants), speeds 130-210 words a minute, pitches 25-75, with
                light noise (20-40 dB SNR); a fixed draw, the same for every seed; the WAVs are written into the
                prepared folder (`wav/`, with `transcripts.tsv`), so DVC versions them with the features.
Every recording is read as mono, resampled to `data.sample_rate`; longer than `data.max_seconds`, shorter than
0.1 s or with an empty transcript, it is left out and counted in the manifest. The front end (`condition`, also
applied when a model is served): silence trimmed at both ends (data.trim_db, data.trim_margin_ms), the level
set; log-mels up to data.f_max (default: the lowest Nyquist frequency of the recordings as recorded), each
recording normalised on its own (data.cmvn); training recordings also added at data.speed_perturb's speeds
(resampled copies, deterministic) and, for speech, data.mix_synth eSpeak NG utterances. Splits are by speaker
(a voice): the test speakers (data.test_speakers, or drawn by seed) are never heard in training; validation is
data.val_speakers, drawn speakers when 8 or more remain, else a slice of the training speakers' recordings (by
recording throughout when there are fewer than 3 speakers). A recording that cannot be decoded stops the
preparation with a DataError naming it, before anything is written.

Prepared folders: x (N, T, n_mels) float16 log-mel frames (models/speech.py LogMel), padded with log(1e-6);
y (N, 1 + U) int64: the recording's frame count, then its character ids (1..C-1; 0 pads, and is CTC's blank);
`alphabet.json` (the characters of the training transcripts, in id order from 1); `texts.json` (every split's
file, speaker and transcript: error rates are measured on the text itself); `waves.npz` (a few test
recordings as 16-bit samples: the served model's example and the spectrogram figure).
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.speech import LOG_FLOOR, LogMel, utterance_cmvn
from tasks.config import DataConfig
from tasks.data import DataError, split_groups, write_prepared
from tasks.progress import bar
from tasks.references import recognise_recordings

ALPHABET, TEXTS, WAVES, TRANSCRIPTS = "alphabet.json", "texts.json", "waves.npz", "transcripts.tsv"
AUDIO = (".wav", ".flac", ".ogg")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = (("turn on", "turn off", "open", "close", "start", "stop", "check", "dim"),
            ("lights", "door", "window", "music", "radio", "heater", "fan", "oven", "alarm", "blinds"),
            ("kitchen", "bedroom", "garage", "office", "hall", "garden"))
MIN_SECONDS = 0.1
SYNTH = "espeak:"  # speakers of data.mix_synth


@dataclass
class Recordings:
    files: list[Path]
    texts: list[str]
    speakers: list[str]
    description: str
    made: dict = field(default_factory=dict)  # synth_speech: how the recordings were made
    layout: str = ""  # the layout read: table | librispeech | fsdd | espeak


def normalise(text: str) -> str:
    """Lower case, letters, digits and apostrophes; every other character separates words."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w']+|_", " ", text).split())


def load_audio(path: str | Path, sample_rate: int, native: bool = False):
    """(L,) float32 in [-1, 1]: mono (channels averaged), resampled to `sample_rate` (polyphase filter); with
    `native`, also the rate it was recorded at."""
    import soundfile as sf
    from scipy.signal import resample_poly

    try:
        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"{path}: not a readable recording ({type(e).__name__}: {e}); WAV, FLAC or OGG is "
                        "read") from None
    if not np.isfinite(wave).all():
        raise DataError(f"{path}: holds samples that are not numbers (NaN or infinite)")
    wave = wave.mean(1)
    if rate != sample_rate:
        g = np.gcd(int(rate), sample_rate)
        wave = resample_poly(wave, sample_rate // g, int(rate) // g).astype(np.float32)
    return (wave, int(rate)) if native else wave


def condition(wave: np.ndarray, sample_rate: int, trim_db: float, margin_ms: float) -> np.ndarray:
    """The front end every recording goes through, in preparation and when served: the DC offset removed, the
    silence at both ends trimmed (25 ms frames more than `trim_db` below the loudest one; `margin_ms` kept either
    side; 0 dB: none), then the level set (the kept part's RMS to -20 dBFS, peaks at most 0.99)."""
    wave = wave - wave.mean() if len(wave) else wave
    if trim_db > 0 and len(wave):
        hop, win = max(1, sample_rate // 100), max(1, sample_rate // 40)
        padded = np.pad(wave, (0, win))
        energy = np.array([np.mean(padded[i:i + win] ** 2) for i in range(0, len(wave), hop)])
        loud = np.flatnonzero(10 * np.log10(energy + 1e-12) > 10 * np.log10(energy.max() + 1e-12) - trim_db)
        if len(loud):
            margin = int(sample_rate * margin_ms / 1000)
            wave = wave[max(0, loud[0] * hop - margin):min(len(wave), loud[-1] * hop + win + margin)]
    rms = float(np.sqrt(np.mean(wave ** 2))) if len(wave) else 0.0
    if rms > 1e-6:
        wave = wave * min(0.1 / rms, 0.99 / float(np.abs(wave).max()))
    return wave.astype(np.float32)


def perturb_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """The recording played `factor` times as fast (tempo and pitch, as a tape would): resampled by the ratio
    100 / round(100 * factor), then read at the same rate."""
    from scipy.signal import resample_poly

    down = int(round(100 * factor))
    g = np.gcd(100, down)
    return resample_poly(wave, 100 // g, down // g).astype(np.float32)


def read_speech(cfg: DataConfig, out_dir: Path | None = None) -> Recordings:
    root = Path(cfg.folder)
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder; speech reads a folder of recordings with a "
                        f"{TRANSCRIPTS} (or .csv), LibriSpeech's *.trans.txt layout, or <digit>_<speaker>_<n>.wav "
                        "files")
    for table in (root / TRANSCRIPTS, root / "transcripts.csv"):
        if table.is_file():
            return _read_table(table)
    if next(root.rglob("*.trans.txt"), None) is not None:
        return _read_librispeech(root)
    digits = [(p, m) for p in sorted(root.glob("*.wav")) if (m := re.fullmatch(r"(\d)_(.+)_(\d+)", p.stem))]
    if digits:
        return Recordings([p for p, _ in digits], [DIGITS[int(m[1])] for _, m in digits], [m[2] for _, m in digits],
                          f"spoken digits in {root} (free-spoken-digit-dataset layout)", layout="fsdd")
    raise DataError(f"data.path: {root} holds no {TRANSCRIPTS} / transcripts.csv, no *.trans.txt and no "
                    f"<digit>_<speaker>_<n>.wav files; those are the layouts speech reads")


def _read_table(table: Path) -> Recordings:
    with open(table, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t" if table.suffix == ".tsv" else ",") if any(c.strip() for c in r)]
    head = [c.strip().lower() for c in rows[0]] if rows else []
    cols = (0, 1, 2)
    if {"file", "text"} <= set(head) or {"path", "transcript"} <= set(head) or {"file", "transcript"} <= set(head):
        cols = (head.index("file" if "file" in head else "path"), head.index("text" if "text" in head else "transcript"),
                head.index("speaker") if "speaker" in head else None)
        rows = rows[1:]
    files, texts, speakers = [], [], []
    for line, row in enumerate(rows, 2 if cols != (0, 1, 2) else 1):
        if len(row) < 2:
            raise DataError(f"{table}, line {line}: {len(row)} column(s); each row names a recording and its "
                            "transcript")
        path = table.parent / row[cols[0]].strip()
        if not path.is_file():
            raise DataError(f"{table}, line {line}: {path} does not exist")
        files.append(path)
        texts.append(row[cols[1]])
        speakers.append(row[cols[2]].strip() if cols[2] is not None and len(row) > cols[2] else path.parent.name)
    if not files:
        raise DataError(f"{table}: no recordings listed")
    return Recordings(files, texts, speakers, f"recordings listed in {table}")


def _read_librispeech(root: Path) -> Recordings:
    files, texts, speakers = [], [], []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            uid, _, text = line.partition(" ")
            audio = next((trans.parent / f"{uid}{ext}" for ext in AUDIO if (trans.parent / f"{uid}{ext}").is_file()), None)
            if audio is None:
                raise DataError(f"{trans}: no recording {uid}.flac (or .wav) beside it")
            files.append(audio)
            texts.append(text)
            speakers.append(uid.split("-")[0])
    return Recordings(files, texts, speakers, f"LibriSpeech-layout recordings in {root}")


def script(cfg: DataConfig, rng: np.random.Generator) -> str:
    if cfg.script == "digits":
        return " ".join(DIGITS[d] for d in rng.integers(10, size=int(rng.integers(2, 6))))
    action, thing, room = (c[int(rng.integers(len(c)))] for c in COMMANDS)
    return f"{action} the {thing}" + (f" in the {room}" if rng.random() < 0.5 else "")


def read_synth_speech(cfg: DataConfig, out_dir: Path, said: list[str] | None = None) -> Recordings:
    """Speak `data.utterances` scripts (or transcripts drawn from `said`) with eSpeak NG (tasks/data/espeak.py)
    into `out_dir`/wav, then read them back as a `speech` folder. The draw is fixed (seed 16000): the same
    recordings for every seed."""
    from tasks.data.espeak import Utterance, synthesise_fresh, voices

    rng = np.random.default_rng(16_000)
    names = voices()
    text = (lambda: said[int(rng.integers(len(said)))]) if said else (lambda: script(cfg, rng))
    utterances = [Utterance(text(), names[int(rng.integers(len(names)))], int(rng.integers(130, 211)),
                            int(rng.integers(25, 76)), float(rng.uniform(20, 40))) for _ in range(cfg.utterances)]
    wav, partial = out_dir / "wav", out_dir / "wav.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"synth_speech: speaking {len(utterances)} utterances in {len(names)} eSpeak NG voices ...", flush=True)
    synthesise_fresh(utterances, cfg.sample_rate, str(partial), seed=16_000)
    with open(partial / TRANSCRIPTS, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["file", "text", "speaker", "rate", "pitch", "snr_db"])
        for i, u in enumerate(utterances):
            w.writerow([f"{i:05d}.wav", u.text, u.voice, u.rate, u.pitch, round(u.snr_db, 1)])
    shutil.rmtree(wav, ignore_errors=True)
    partial.rename(wav)
    rec = _read_table(wav / TRANSCRIPTS)
    rec.description = f"{cfg.script} spoken by eSpeak NG ({len(names)} voices, 130-210 wpm, pitch 25-75, noise 20-40 dB SNR)"
    rec.made = {"voices": len(names), "script": cfg.script, "engine": "eSpeak NG (espeakng-loader)"}
    return rec


def prepare_audio(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    rec = read(cfg, out_dir)
    if cfg.mix_synth and cfg.source == "speech":
        rec = _with_synth(rec, cfg, out_dir, seed)
    keep, waves, dropped, native = _usable(rec, cfg)
    texts = [normalise(rec.texts[i]) for i in keep]
    speakers = [rec.speakers[i] for i in keep]
    idx, split_by = _split(speakers, cfg, seed)
    alphabet = sorted({c for i in idx["train"] for c in texts[i]})
    ids = {c: k for k, c in enumerate(alphabet, 1)}  # 0: the blank
    f_max = min(cfg.f_max or native / 2, cfg.sample_rate / 2)
    mels = _log_mels(waves, cfg, f_max)
    names = [rec.files[i].name for i in keep]
    speeds = cfg.speed_perturb if cfg.speed_perturb is not None else [0.9, 1.1] if cfg.source == "speech" else []
    copies = [(i, f) for f in speeds if f != 1.0 for i in idx["train"] if not speakers[i].startswith(SYNTH)]
    mels += _log_mels([perturb_speed(waves[i], f) for i, f in bar(copies, "speed perturbation")], cfg, f_max)
    texts, speakers = texts + [texts[i] for i, _ in copies], speakers + [speakers[i] for i, _ in copies]
    names += [f"{names[i]} (speed {f:g})" for i, f in copies]
    idx["train"] = np.concatenate([idx["train"], len(keep) + np.arange(len(copies), dtype=int)])
    frames, chars = max(len(m) for m in mels), max(len(t) for t in texts)
    splits = {s: _encode([mels[i] for i in ix], [texts[i] for i in ix], ids, (frames, cfg.n_mels), chars, cfg.cmvn)
              for s, ix in idx.items()}
    listing = {s: [[names[i], speakers[i], texts[i]] for i in ix] for s, ix in idx.items()}
    train_frames = np.concatenate([mels[i] for i in idx["train"]])
    mean, std = train_frames.mean(0), train_frames.std(0) + 1e-5
    seconds = {s: round(sum(len(waves[i]) for i in ix if i < len(keep)) / cfg.sample_rate, 1) for s, ix in idx.items()}
    unseen = {s: sum(c not in ids for i in ix for c in texts[i]) for s, ix in idx.items() if s != "train"}
    return write_prepared(out_dir, splits, {
        "source": cfg.source, "task": "speech_recognition", "description": rec.description,
        "benchmark": recognise_recordings(rec.layout, {s for s in rec.speakers if not s.startswith(SYNTH)}, split_by),
        "input_shape": [frames, cfg.n_mels], "num_classes": len(alphabet) + 1, "classes": [],
        "normalization": {"mean": mean.tolist(), "std": std.tolist()},
        "speech": {"sample_rate": cfg.sample_rate, "n_mels": cfg.n_mels, "hop_ms": 10, "window_ms": 25,
                   "f_max": f_max, "cmvn": cfg.cmvn, "trim_db": cfg.trim_db, "trim_margin_ms": cfg.trim_margin_ms,
                   "speed_perturb": list(speeds), "speed_copies": len(copies), "mix_synth": cfg.mix_synth,
                   "max_frames": frames, "max_characters": chars, "alphabet": "".join(alphabet),
                   "recordings": len(rec.files), "kept": len(keep), "dropped": dict(dropped), "split_by": split_by,
                   "speakers": {s: len({speakers[i] for i in ix}) for s, ix in idx.items()},
                   "test_speakers": sorted({speakers[i] for i in idx["test"]})[:20],
                   "seconds": seconds, "unseen_characters": unseen, **rec.made},
    }, cfg=cfg, seed=seed, extra={ALPHABET: json.dumps(alphabet, ensure_ascii=False) + "\n",
                                  TEXTS: json.dumps(listing, ensure_ascii=False) + "\n"},
        arrays={WAVES: _examples([waves[i] for i in idx["test"][:4]])})


def _split(speakers: list[str], cfg: DataConfig, seed: int) -> tuple[dict[str, np.ndarray], str]:
    """Indices per split and how they were made. The test speakers are `data.test_speakers`, or drawn by seed
    (data.test_fraction of them, at least one); they are never heard in training. Validation is
    `data.val_speakers`, or drawn speakers when at least 8 remain, else a slice (data.val_fraction) of the
    training speakers' recordings: with 3 speakers left, a held-out speaker would leave 2 to learn from."""
    synth = np.array([s.startswith(SYNTH) for s in speakers])  # data.mix_synth's voices: training only
    if synth.any():
        out, how = _split([s for s in speakers if not s.startswith(SYNTH)], cfg, seed)
        real = np.flatnonzero(~synth)
        out = {k: real[v] for k, v in out.items()}
        return out | {"train": np.sort(np.concatenate([out["train"], np.flatnonzero(synth)]))}, how
    names = sorted(set(speakers))
    named = list(cfg.test_speakers or []) + list(cfg.val_speakers or [])
    if missing := sorted(set(named) - set(names)):
        raise DataError(f"data.test_speakers / data.val_speakers: {', '.join(missing)} not among the "
                        f"{len(names)} speakers ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
    if len(names) < 3 and not named:
        return split_groups([str(i) for i in range(len(speakers))], cfg, seed), "recording (fewer than 3 speakers)"
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    test = set(cfg.test_speakers or order[:max(1, round(len(names) * cfg.test_fraction))])
    rest = [s for s in order if s not in test]
    val = set(cfg.val_speakers or (rest[:max(1, round(len(names) * cfg.val_fraction))] if len(rest) >= 8 else []))
    if test & val or not set(rest) - val:
        raise DataError(f"data.test_speakers {sorted(test)} and data.val_speakers {sorted(val)}: a speaker in "
                        "both, or none left to train on")
    split = np.array(["test" if s in test else "val" if s in val else "train" for s in speakers])
    if not val:  # a slice of the training speakers' recordings
        pool = np.flatnonzero(split == "train")
        picked = np.random.default_rng(seed).permutation(pool)[:max(1, round(len(pool) * cfg.val_fraction))]
        split[picked] = "val"
    out = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if cfg.max_train and len(out["train"]) > cfg.max_train:
        out["train"] = np.sort(np.random.default_rng(seed).choice(out["train"], cfg.max_train, replace=False))
    how = "speaker" if val else "speaker (validation: a slice of the training speakers' recordings)"
    return out, how


def _with_synth(rec: Recordings, cfg: DataConfig, out_dir: Path, seed: int) -> Recordings:
    """`rec` and data.mix_synth utterances of eSpeak NG's voices saying what the training split's recordings say
    (TTS augmentation, as Rosenberg et al. 2019: the words and lengths of the user's data, in voices it lacks;
    never a test transcript). Their voices are named espeak:<voice> and go to training only."""
    said = sorted({normalise(rec.texts[i]) for i in _split(rec.speakers, cfg, seed)[0]["train"]} - {""})
    synth = read_synth_speech(cfg.model_copy(update={"utterances": cfg.mix_synth}), out_dir, said)
    return Recordings(rec.files + synth.files, rec.texts + synth.texts,
                      rec.speakers + [SYNTH + s for s in synth.speakers],
                      f"{rec.description}, and {cfg.mix_synth} eSpeak NG utterances in training", synth.made, rec.layout)


def _usable(rec: Recordings, cfg: DataConfig) -> tuple[list[int], list[np.ndarray], Counter, int]:
    """The recordings kept (their index in `rec`), their waves through `condition`, how many were left out, by
    reason, and the lowest rate a kept one was recorded at."""
    waves, keep, dropped, native = [], [], Counter(), cfg.sample_rate
    for i, path in enumerate(bar(rec.files, "reading recordings")):
        text, (wave, rate) = normalise(rec.texts[i]), load_audio(path, cfg.sample_rate, native=True)
        seconds = len(wave) / cfg.sample_rate
        wave = condition(wave, cfg.sample_rate, cfg.trim_db, cfg.trim_margin_ms)
        why = ("empty_transcript" if not text else "too_long" if seconds > cfg.max_seconds
               else "too_short" if len(wave) < MIN_SECONDS * cfg.sample_rate else None)
        if why:
            dropped[why] += 1
            continue
        keep.append(i)
        waves.append(wave)
        native = min(native, rate)
    if len(keep) < 30:
        raise DataError(f"{rec.description}: {len(keep)} usable recordings (dropped: {dict(dropped) or 'none'}); "
                        f"speech recognition needs at least 30 (data.max_seconds is {cfg.max_seconds})")
    return keep, waves, dropped, native


def _log_mels(waves: list[np.ndarray], cfg: DataConfig, f_max: float) -> list[np.ndarray]:
    """Each (frames, n_mels) float32: LogMel up to f_max, each recording normalised on its own with data.cmvn."""
    features = LogMel(cfg.sample_rate, cfg.n_mels, f_max=f_max)
    with torch.no_grad():
        out = [features(torch.from_numpy(w)[None])[0] for w in bar(waves, "log-mel features")] if waves else []
        return [(utterance_cmvn(m) if cfg.cmvn else m).numpy() for m in out]


def _encode(mels: list[np.ndarray], texts: list[str], ids: dict[str, int], shape: tuple[int, int], chars: int,
            cmvn: bool = False):
    """One split: x (N, frames, n_mels) float16 log-mels padded with log(LOG_FLOOR) (0 with data.cmvn); y (N,
    1 + chars): the frame count, then the character ids, 0-padded."""
    x = np.full((len(mels), *shape), 0.0 if cmvn else np.log(LOG_FLOOR), dtype=np.float16)
    y = np.zeros((len(mels), 1 + chars), dtype=np.int64)
    for row, (mel, text) in enumerate(zip(mels, texts)):
        x[row, :len(mel)] = mel
        y[row, 0] = len(mel)
        coded = [ids[c] for c in text if c in ids]  # a character never seen in training cannot be output
        y[row, 1:1 + len(coded)] = coded
    return x, y


def _examples(waves: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A few recordings as 16-bit samples, zero-padded to the longest (waves.npz)."""
    pcm = np.zeros((len(waves), max(len(w) for w in waves)), dtype=np.int16)
    for row, w in enumerate(waves):
        pcm[row, :len(w)] = np.clip(w * 32768.0, -32768, 32767).astype(np.int16)
    return {"pcm": pcm, "lengths": np.array([len(w) for w in waves])}

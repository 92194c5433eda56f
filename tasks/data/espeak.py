"""Speech synthesised offline with eSpeak NG: the `synth_speech` source's recordings.

The library and its voices come from the `espeakng-loader` wheel (a system `libespeak-ng` is used only when the
wheel is missing). eSpeak NG keeps state between utterances (its pitch flutter runs on across calls) and its
breathy variants draw noise from the C library's rand(), so the same utterances come out bit-identical only
from a fresh library, in the same order, with rand() seeded per utterance: `synthesise_fresh` runs it in a new
process each time, which also keeps a crash in the C library away from the caller. Nothing here imports
torch, so that process starts in a second.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt2", "klatt3",
            "Andy", "Annie", "Michael", "steph", "linda", "edward")
RATE, PITCH = 1, 3  # espeak_PARAMETER ids: words per minute, base pitch 0-100
SYNCHRONOUS, UTF8 = 2, 1  # AUDIO_OUTPUT_SYNCHRONOUS; espeakCHARS_UTF8


class EspeakMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Utterance:
    text: str  # what is spoken, and its transcript
    voice: str  # "<accent>+<variant>"
    rate: int  # words per minute
    pitch: int  # 0-100
    snr_db: float  # white noise added at this signal-to-noise ratio


def library() -> tuple[str, str | None]:
    """(the shared library, its data folder or None for the system's default)."""
    try:
        import espeakng_loader

        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except ImportError:
        found = ctypes.util.find_library("espeak-ng")
        if found is None:
            raise EspeakMissing("synth_speech needs eSpeak NG: `make install` brings it (the espeakng-loader "
                                "package), or install the system's espeak-ng") from None
        return found, None


def voices() -> list[str]:
    """Every accent x variant this eSpeak NG has (a variant file missing from its data is left out)."""
    _, data = library()
    have = set(os.listdir(Path(data) / "voices" / "!v")) if data else set(VARIANTS)
    return [f"{a}+{v}" for a in ACCENTS for v in VARIANTS if v in have]


def synthesise(utterances: list[Utterance], sample_rate: int, folder: str, seed: int) -> list[float]:
    """Speak each utterance into `folder`/<i>.wav (16-bit mono at `sample_rate`); returns their durations in s.
    Call through `synthesise_fresh` for deterministic output."""
    import soundfile as sf
    from scipy.signal import resample_poly

    path, data = library()
    lib = ctypes.CDLL(path)
    native = lib.espeak_Initialize(SYNCHRONOUS, 0, data.encode() if data else None, 0)
    if native <= 0:
        raise EspeakMissing(f"eSpeak NG failed to start ({path}, data {data})")
    chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def collect(wav, n, events):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # continue

    callback = callback_type(collect)  # kept referenced while the library may call it
    lib.espeak_SetSynthCallback(callback)
    libc = ctypes.CDLL(None)  # breathy variants draw their noise from the C library's rand()
    rng = np.random.default_rng(seed)
    g = np.gcd(sample_rate, native)
    durations = []
    for i, u in enumerate(utterances):
        if lib.espeak_SetVoiceByName(u.voice.encode()) != 0:
            raise EspeakMissing(f"eSpeak NG has no voice {u.voice!r}")
        lib.espeak_SetParameter(RATE, u.rate, 0)
        lib.espeak_SetParameter(PITCH, u.pitch, 0)
        chunks.clear()
        libc.srand(seed + i)
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            lib.espeak_ng_SetRandSeed(seed + i)
        text = u.text.encode()
        lib.espeak_Synth(text, len(text) + 1, 0, 1, 0, UTF8, None, None)
        lib.espeak_Synchronize()
        wave = np.concatenate(chunks).astype(np.float64) / 32768.0 if chunks else np.zeros(1)
        wave = resample_poly(wave, sample_rate // g, native // g)
        power = float(np.mean(wave ** 2)) or 1e-8
        wave = wave + rng.normal(0.0, np.sqrt(power / 10 ** (u.snr_db / 10)), len(wave))
        sf.write(Path(folder) / f"{i:05d}.wav", np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16")
        durations.append(len(wave) / sample_rate)
    lib.espeak_Terminate()
    return durations


def synthesise_fresh(utterances: list[Utterance], sample_rate: int, folder: str, seed: int) -> list[float]:
    """`synthesise` in a new process: a fresh library, so the same inputs give the same samples."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    library()  # a missing eSpeak NG fails here, in one line
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(synthesise, utterances, sample_rate, folder, seed).result()

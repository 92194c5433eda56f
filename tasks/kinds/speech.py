"""Speech recognition runs: the CTC step, SpecAugment, character and word error rates, the speech kind.

The data (recordings and their transcripts, prepared as log-mel frames split by speaker) is tasks/data/audio.py.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.registry import beam_size
from models.speech import Lexicon, Transcriber, beam_search, decode, greedy
from tasks import quick
from tasks.data.audio import ALPHABET, TEXTS, WAVES
from tasks.kinds import Evaluation, Job, Served, ServingError, register_kind
from tasks.kinds.supervised import Supervised, SupervisedStep
from tasks.figures import pyplot



# ---------------------------------------------------------------- augmentation

class SpecAugment:
    """Park et al. 2019's masking on normalised log-mel batches (B, T, n_mels): per utterance `freq_masks` bands
    of 0..freq_width mel channels and `time_masks` spans of 0..time_width frames set to 0 (the training mean)."""

    def __init__(self, freq_masks: int, freq_width: int, time_masks: int, time_width: int, seed: int):
        self.masks = ((freq_masks, freq_width, 2), (time_masks, time_width, 1))
        self.generator = torch.Generator().manual_seed(seed + 7919)  # apart from the init/dropout stream

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(x.shape, dtype=torch.bool)
        for count, width, dim in self.masks:
            size = x.shape[dim]
            if not count or not width:
                continue
            w = torch.randint(0, min(width, size) + 1, (x.shape[0], count), generator=self.generator)
            start = (torch.rand(x.shape[0], count, generator=self.generator) * (size - w + 1)).long()
            pos = torch.arange(size)[None, None, :]  # (1, 1, size)
            hit = ((pos >= start[..., None]) & (pos < (start + w)[..., None])).any(1)  # (B, size)
            keep &= hit.logical_not().unsqueeze(3 - dim)  # (B, 1, F) bands or (B, T, 1) spans
        return x * keep.to(x.device, x.dtype)


class SpeechAugment:
    """Each training batch of normalised log-mels (B, T, n_mels): a vocal tract length warp (Jaitly and Hinton
    2013), the mel axis of each utterance stretched or squeezed by a factor drawn from [1 - warp, 1 + warp] (a
    voice's formants move with its speaker's vocal tract: unheard speakers are the ones this makes up), then
    SpecAugment's masks unless augment.enabled is false. Lengths never change; one seeded stream."""

    def __init__(self, warp: float, masks: SpecAugment | None, seed: int):
        self.warp, self.masks = warp, masks
        self.generator = masks.generator if masks is not None else torch.Generator().manual_seed(seed + 7919)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.warp > 0:
            b, t, f = x.shape
            alpha = 1 + (torch.rand(b, generator=self.generator) * 2 - 1) * self.warp
            src = (torch.arange(f)[None, :] * alpha[:, None]).clamp(0, f - 1).to(x.device)  # (B, F) source bands
            lo = src.floor().long()
            hi, w = (lo + 1).clamp(max=f - 1), (src - lo).to(x.dtype)[:, None, :]
            x = x.gather(2, lo[:, None, :].expand(b, t, f)) * (1 - w) + x.gather(2, hi[:, None, :].expand(b, t, f)) * w
        return self.masks(x) if self.masks is not None else x


# ---------------------------------------------------------------- measuring

def scores(hyp: list[str], refs: list[str], prefix: str) -> dict:
    """Character and word error rates over the whole split (jiwer: edit distance / reference length), the share
    of exact transcripts and of empty ones (the blank-only phase of CTC training outputs nothing)."""
    import jiwer

    return {f"{prefix}_cer": float(jiwer.cer(refs, hyp)), f"{prefix}_wer": float(jiwer.wer(refs, hyp)),
            f"{prefix}_exact_match": float(np.mean([h == r for h, r in zip(hyp, refs)])),
            f"{prefix}_empty": float(np.mean([not h for h in hyp]))}


def as_text(alphabet: str | list[str], ids: list[list[int]]) -> list[str]:
    return ["".join(alphabet[i - 1] for i in row) for row in ids]


def lexicon_words(model, transcripts: list[str]) -> list[str] | None:
    """The words decoding may spell (the model's `lexicon` option over the training transcripts), or None."""
    words = sorted({w for t in transcripts for w in t.split()})
    choice = getattr(getattr(model, "o", None), "lexicon", "off")
    return words if choice == "on" or choice == "auto" and len(words) <= LEXICON_AUTO else None


def decoder(alphabet: str | list[str], words: list[str] | None, beam: int) -> tuple[Lexicon | None, int, str]:
    """The lexicon of `words` over `alphabet`, the beam width (8 at least with a lexicon) and how it decodes."""
    if not words:
        return None, beam, f"beam {beam}" if beam > 1 else "greedy"
    ids = {c: i + 1 for i, c in enumerate(alphabet)}
    spelt = [[ids[c] for c in w] for w in words if all(c in ids for c in w)]
    width = max(beam, 8)
    return Lexicon(spelt, ids.get(" ", -1)), width, f"beam {width}, lexicon of {len(spelt)} training words"


def _texts(data_dir: Path) -> dict:
    return json.loads((Path(data_dir) / TEXTS).read_text(encoding="utf-8"))


def _frames(y: torch.Tensor) -> torch.Tensor:
    return y[:, 0]


LEXICON_AUTO = 100  # lexicon "auto": on for training transcripts of at most this many distinct words


# ---------------------------------------------------------------- the step and the kind

class CTCStep(SupervisedStep):
    """One batch: the frames up to the batch's longest recording through the model, CTC loss against the
    character ids (per character, averaged over utterances; an alignment that cannot exist counts 0).

    Every `trace_every` steps it also notes, on the device, the share of output steps whose most likely label
    is the blank and the share of utterances that would decode to nothing: CTC's blank-only phase and its end."""

    trace_every = 5

    def __init__(self, model, cfg, device):
        super().__init__(model, cfg, device, classify=False)
        self.trace: list[tuple[int, float, float]] = []  # (optimizer step, blank share, empty share)
        self.logged = 0  # entries of `trace` already handed out by `drain`
        self.step_no, self.pending = 0, []

    def __call__(self, i, step, xb, yb):
        self.step_no = step
        super().__call__(i, step, xb, yb)

    def lengths(self, data):
        return _frames(data.y)  # a batch runs to its longest recording

    def outputs(self, xb, yb):
        frames = _frames(yb)
        lp = self.net(xb[:, :int(frames.max())], frames)  # (B, T', C)
        steps = self.model.output_lengths(frames).clamp(1, lp.shape[1])
        if self.model.training and (self.step_no == 1 or self.step_no % self.trace_every == 0):
            with torch.no_grad():
                valid = torch.arange(lp.shape[1], device=lp.device)[None, :] < steps[:, None]  # (B, T')
                blank = (lp.argmax(-1) == 0) & valid
                self.pending.append((self.step_no, blank.sum() / valid.sum(),
                                     (blank.sum(1) == steps).float().mean()))
        return (lp, steps), yb

    def loss(self, out, y, reduction: str = "mean"):
        lp, steps = out
        targets = y[:, 1:]
        lengths = (targets != 0).sum(1)
        per = F.ctc_loss(lp.float().transpose(0, 1), targets, steps, lengths, blank=0, reduction="none",
                         zero_infinity=True) / lengths.clamp(min=1)
        return per.mean() if reduction == "mean" else per.sum()

    def end_epoch(self, epoch: int) -> dict:
        self.trace += [(s, float(b), float(e)) for s, b, e in self.pending]  # one sync per epoch
        self.pending = []
        return super().end_epoch(epoch)

    def drain(self) -> list[tuple[int, dict]]:
        out = [(s, {"train_blank_share": b, "train_empty_share": e}) for s, b, e in self.trace[self.logged:]]
        self.logged = len(self.trace)
        return out

    @torch.no_grad()
    def evaluate(self, data, prefix: str = "val", batch_size: int = 256) -> dict:
        self.model.eval()
        total = 0.0
        for i in range(0, len(data.y), batch_size):
            out, y = self.outputs(data.x[i:i + batch_size], data.y[i:i + batch_size])
            total += float(self.loss(out, y, reduction="sum"))
        return {f"{prefix}_loss": total / len(data.y)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "trace": list(self.trace)}

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict(s)
        self.trace = list(s["trace"])
        self.logged = len(self.trace)  # a checkpoint is written after its epoch's trace was logged


# ---------------------------------------------------------------- served

class ServedTranscriber(Served):
    """A speech model: recordings (WAV, FLAC or OGG files), read at its sample rate and put through the front end
    its training data had (tasks/data/audio.py `condition`: silence trimmed, level set) -> their transcripts, by
    CTC beam search of width `beam` (default: the model's own; 1: greedy)."""

    takes, gives, command = "audio", "text", "transcribe"

    def __call__(self, recordings: list[Path], beam: int | None = None) -> list[str]:
        from tasks.data import DataError
        from tasks.data.audio import condition, load_audio

        lexicon, width, _ = decoder(self.meta["alphabet"], self.meta.get("lexicon"),
                                    beam or int(self.meta.get("beam_size", 1)))
        out = []
        for path in recordings:
            try:
                wave = load_audio(path, int(self.meta["sample_rate"]))
            except DataError as e:
                raise ServingError(str(e)) from None
            wave = condition(wave, int(self.meta["sample_rate"]), float(self.meta.get("trim_db", 0.0)),
                             float(self.meta.get("trim_margin_ms", 0.0)))
            if not len(wave):
                raise ServingError(f"{path}: holds no samples")
            pcm = torch.as_tensor(np.clip(wave * 32768.0, -32768, 32767).astype(np.int16))[None]
            with torch.no_grad():
                lp = self.module(pcm)
            ids = greedy(lp)[0] if width == 1 else beam_search(lp, beam=width, lexicon=lexicon)[0]
            out.append(as_text(self.meta["alphabet"], [ids])[0])
        return out


@register_kind
class SpeechRecognition(Supervised):
    name, metric, registry = "speech_recognition", "test_wer", "nnlab-asr"
    lower_is_better = ("test_wer", "test_cer", "test_loss", "baseline_test_wer", "baseline_test_cer")
    channels_last = False
    summary_columns = ("test_cer", "test_exact_match")
    baselines = {"test_wer": "baseline_test_wer", "test_cer": "baseline_test_cer"}
    val_limit = 500  # validation recordings decoded after each epoch

    def augmenter(self, cfg, manifest):
        a, warp = cfg.augment, getattr(cfg.data, "vtlp", 0.0)
        masks = SpecAugment(*_masks(a), cfg.seed) if a.enabled is not False else None  # auto: on
        return SpeechAugment(warp, masks, cfg.seed) if warp > 0 else masks

    def step(self, model, cfg, seed, device):
        return CTCStep(model, cfg, device)

    def on_epoch(self, job: Job, epoch: int, metrics: dict, trainer) -> None:
        """Greedy transcripts of (the first `val_limit` of) the validation recordings: CER, WER, exact and empty."""
        refs = [t for _, _, t in _texts(job.data_dir)["val"][:quick.at_most(self.val_limit)]]
        hyp = self._transcribe(job.model, job.data.x_val[:len(refs)], job.data.y_val[:len(refs)], job.mean, job.std,
                               job.data.manifest, beam_size=1)
        metrics |= scores(hyp, refs, "val")
        job.run.log_series(trainer.step.drain())

    @staticmethod
    def _transcribe(model, x, y, mean, std, manifest, beam_size: int, lexicon: Lexicon | None = None) -> list[str]:
        from tasks.train import to_device

        dev = next(model.parameters()).device
        split = to_device(x, y, mean, std, dev, channels_last=False)
        ids = decode(model, split.x, _frames(split.y), beam_size, lexicon=lexicon)
        return as_text(manifest["speech"]["alphabet"], ids)

    def after_fit(self, job: Job, result) -> None:
        m = job.data.manifest
        job.run.log_figure(error_curves_figure(result.history, f"{job.name} on {m['source']}",
                                               job.trainer.step.trace), "plots/learning_curve.png")
        job.run.log_figure(self._spectrogram(job), "plots/spectrogram.png")

    def _spectrogram(self, job: Job):
        m = job.data.manifest
        with np.load(Path(job.data_dir) / WAVES) as z:
            pcm = z["pcm"][0, :int(z["lengths"][0])]
        served = self._served(job)
        with torch.no_grad():
            wave = torch.as_tensor(pcm)[None]
            mel = served.log_mel(wave)[0]
            lp = served(wave)[0]
        masked = None
        if job.cfg.augment.enabled is not False:
            x = (mel - served.mean) / served.std
            masked = SpecAugment(*_masks(job.cfg.augment), job.cfg.seed)(x[None])[0]
        text = as_text(m["speech"]["alphabet"], greedy(lp[None]))[0]
        ref = _texts(job.data_dir)["test"][0][2]
        return spectrogram_figure(mel.numpy(), None if masked is None else masked.numpy(), lp.exp().numpy(),
                                  m["speech"]["alphabet"], f"{job.name}: reference {ref!r}\noutput {text!r}")

    def _served(self, job: Job) -> Transcriber:
        return self.wrap(copy.deepcopy(job.model).float().cpu(), job.data.manifest, job.mean, job.std)

    def wrap(self, net, manifest, mean, std):
        s = manifest["speech"]
        return Transcriber(net.eval(), s["sample_rate"], s["n_mels"], mean, std, s.get("f_max"),
                           bool(s.get("cmvn", False))).eval()

    def serving(self, module, vocab, meta, uri) -> Served:
        return ServedTranscriber(module, vocab, meta, uri)

    def served(self, job: Job):
        s = job.data.manifest["speech"]
        with np.load(Path(job.data_dir) / WAVES) as z:
            example = z["pcm"][:1, :int(z["lengths"][0])]
        job.run.log_file(Path(job.data_dir) / ALPHABET, "data")
        meta = {"task": self.name, "nnlab.kind": "transcriber", "alphabet": s["alphabet"],
                "sample_rate": s["sample_rate"], "beam_size": beam_size(job.model),
                "lexicon": lexicon_words(job.model, [t for _, _, t in _texts(job.data_dir)["train"]]),
                "trim_db": s.get("trim_db", 0.0), "trim_margin_ms": s.get("trim_margin_ms", 0.0)}
        return self._served(job), example, meta, [Path(job.data_dir) / ALPHABET]

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        listing = _texts(data_dir)
        m, norm = data.manifest, final["normalization"]
        lexicon, beam, how = decoder(m["speech"]["alphabet"],
                                     lexicon_words(model, [t for _, _, t in listing["train"]]), beam_size(model))
        step = CTCStep(model, cfg.train, device)
        metrics = step.evaluate(self.test_split(final, data, device), "test")
        refs = [t for _, _, t in listing["test"]]
        hyp = self._transcribe(model, data.x_test, data.y_test, norm["mean"], norm["std"], m, beam, lexicon)
        metrics |= scores(hyp, refs, "test")
        common = Counter(t for _, _, t in listing["train"]).most_common(1)[0][0]
        base = scores([common] * len(refs), refs, "baseline_test")
        metrics |= {k: v for k, v in base.items() if not k.endswith("_empty")}
        print(f"{name}: test CER {metrics['test_cer']:.4f}, WER {metrics['test_wer']:.4f}, exact match "
              f"{metrics['test_exact_match']:.4f} over {len(refs)} recordings of {m['speech']['speakers']['test']} "
              f"unheard speaker{'s' * (m['speech']['speakers']['test'] != 1)} ({how}); the most common training "
              f"transcript {common!r} for all: CER {base['baseline_test_cer']:.4f}, WER {base['baseline_test_wer']:.4f}",
              flush=True)
        for (_, _, r), h in list(zip(listing["test"], hyp))[:3]:
            print(f"  {r!r} -> {h!r}", flush=True)
        table = "file\tspeaker\treference\toutput\tcorrect\n" + "".join(
            f"{f}\t{s}\t{r}\t{h}\t{str(h == r).lower()}\n" for (f, s, r), h in list(zip(listing["test"], hyp))[:100])
        fig = error_curves_figure(final["history"], f"{name}: test CER {metrics['test_cer']:.3f}, WER "
                                  f"{metrics['test_wer']:.3f} (most common transcript: {base['baseline_test_cer']:.2f}, "
                                  f"{base['baseline_test_wer']:.2f})")
        return Evaluation(metrics, fig, "plots/error_rates.png", {"nnlab.decoder": how},
                          texts={"transcriptions.tsv": table})


def _masks(a) -> tuple[int, int, int, int]:
    return a.freq_masks, a.freq_width, a.time_masks, a.time_width


# ---------------------------------------------------------------- figures

def error_curves_figure(history: list[dict], title: str, trace: list[tuple[int, float, float]] | None = None):
    """CTC loss (train, validation) and validation CER, WER, exact and empty outputs per epoch; with the step's
    trace, the blank-only phase by optimizer step: CTC first learns to output blanks only (every transcript
    empty, CER 1), then characters."""
    plt = pyplot()

    epochs = range(1, len(history) + 1)
    fig, axes = plt.subplots(1, 3 if trace else 2, figsize=(15 if trace else 10, 3.6), dpi=110)
    for split in ("train", "val"):
        axes[0].plot(epochs, [h[f"{split}_loss"] for h in history], marker=".", label=split)
    axes[0].set_ylabel("CTC loss per character")
    for key, label in (("val_cer", "CER"), ("val_wer", "WER"), ("val_empty", "empty outputs"),
                       ("val_exact_match", "exact match")):
        if key in history[0]:
            axes[1].plot(epochs, [h[key] for h in history], marker=".", label=label)
    axes[1].set_ylabel("validation, share")
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
    if trace:
        steps = [t[0] for t in trace]
        axes[2].plot(steps, [t[1] for t in trace], label="output steps labelled blank")
        axes[2].plot(steps, [t[2] for t in trace], label="utterances decoding to nothing")
        axes[2].set_xlabel("optimizer step")
        axes[2].set_ylabel("training batches, share")
        axes[2].set_title("the blank-only phase", fontsize=9)
    for ax in axes[1:]:
        ax.set_ylim(0, 1.05)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def spectrogram_figure(mel: np.ndarray, masked: np.ndarray | None, probs: np.ndarray, alphabet: str, title: str):
    """One test recording: its log-mel spectrogram, the same with SpecAugment's masks (when training used them)
    and the trained model's per-step character probabilities (blank row first)."""
    plt = pyplot()

    rows = [("log-mel", mel.T)] + ([("SpecAugment (normalised)", masked.T)] if masked is not None else [])
    rows.append(("CTC output", probs.T))
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.2 * len(rows)), dpi=110, squeeze=False)
    for ax, (label, img) in zip(axes[:, 0], rows):
        ax.imshow(img, aspect="auto", origin="lower" if label != "CTC output" else "upper", cmap="magma",
                  interpolation="nearest")
        ax.set_ylabel(label, fontsize=8)
    out = axes[-1, 0]
    labels = ["_"] + [c if c != " " else "␣" for c in alphabet]
    out.set_yticks(range(len(labels)), labels, fontsize=5)
    out.set_xlabel("output step (20 ms)" if probs.shape[0] * 2 <= mel.shape[0] + 2 else "output step")
    axes[0, 0].set_xlabel("frame (10 ms)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig

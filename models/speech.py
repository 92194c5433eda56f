"""Speech recognition: log-mel features, CTC acoustic models (`ctc_asr`, `conformer`) and CTC decoding.

Every model reads a padded batch of normalised log-mel frames (B, T, n_mels) and their lengths (B,) (None: all
frames are real) and returns per-frame log-probabilities (B, T', C) over the blank (id 0) and the characters,
T' = `output_lengths(T)` after the convolutional front end's time subsampling. Training's loss is CTC
(Graves et al. 2006); `greedy` and `beam_search` turn the frames into character ids.

`LogMel` is the one feature extractor: data preparation computes the stored features with it, and the served
`Transcriber` carries it, so a new WAV meets exactly the features the model was trained on. torchaudio would
give the same transform, but its releases pin one torch version each and none matches the project's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.options import ConformerOptions, CTCOptions
from models.registry import register_model
from models.sequence import sinusoidal

BLANK = 0
LOG_FLOOR = 1e-6  # log(power + floor): silence and padding read log(1e-6) = -13.8


def mel_filterbank(n_freqs: int, sample_rate: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters equally spaced on the HTK mel scale, mel = 2595 log10(1 + f/700),
    from f_min to f_max (None: the Nyquist frequency)."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    top = min(f_max or sample_rate / 2, sample_rate / 2)
    m = torch.linspace(mel(f_min), mel(top), n_mels + 2, dtype=torch.float64)
    f_pts = 700.0 * (10 ** (m / 2595.0) - 1.0)  # the filters' edges and centres in Hz
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    slopes = f_pts[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    widths = f_pts[1:] - f_pts[:-1]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMel(nn.Module):
    """Waveform (B, L) in [-1, 1] -> log-mel spectrogram (B, T, n_mels): 25 ms Hann windows every 10 ms, power
    spectrum, mel filters up to `f_max` (None: the Nyquist frequency; 8 kHz recordings read at 16 kHz hold
    nothing above 4 kHz), log. T = L // hop + 1 (windows centred on every hop)."""

    def __init__(self, sample_rate: int, n_mels: int = 40, window_ms: float = 25.0, hop_ms: float = 10.0,
                 f_max: float | None = None):
        super().__init__()
        self.sample_rate, self.n_mels, self.f_max = sample_rate, n_mels, f_max
        self.win = int(sample_rate * window_ms / 1000)
        self.hop = int(sample_rate * hop_ms / 1000)
        self.n_fft = 1 << (self.win - 1).bit_length()  # the next power of two
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        self.register_buffer("filters", mel_filterbank(self.n_fft // 2 + 1, sample_rate, n_mels, f_max=f_max),
                             persistent=False)

    def frames(self, samples: int) -> int:
        return samples // self.hop + 1

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave.float(), self.n_fft, self.hop, self.win, self.window, center=True,
                          return_complex=True).abs().pow(2)  # (B, n_fft/2 + 1, T)
        return torch.log(spec.transpose(1, 2) @ self.filters + LOG_FLOOR)  # (B, T, n_mels)


def utterance_cmvn(mel: torch.Tensor) -> torch.Tensor:
    """Per-utterance cepstral mean and variance normalisation of log-mel frames (..., T, n_mels): each band of
    each recording to mean 0 and standard deviation 1 over its own frames. A recording's level and its
    microphone's colouring (a constant gain per band) are then gone before the model sees it."""
    return (mel - mel.mean(-2, keepdim=True)) / (mel.std(-2, keepdim=True, unbiased=False) + 1e-3)


# ---------------------------------------------------------------- the acoustic models

class FrontEnd(nn.Module):
    """Two 1-D convolutions over time (mel bands as channels) with batch norm and ReLU: local spectral patterns,
    and `subsample` x fewer frames for the layers above (stride 2 in the first, in both for 4)."""

    def __init__(self, n_mels: int, channels: int, subsample: int, dropout: float):
        super().__init__()
        strides = {1: (1, 1), 2: (2, 1), 4: (2, 2)}[subsample]
        self.convs = nn.ModuleList([nn.Conv1d(n_mels, channels, 5, strides[0], 2),
                                    nn.Conv1d(channels, channels, 3, strides[1], 1)])
        self.norms = nn.ModuleList([nn.BatchNorm1d(channels) for _ in self.convs])
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, n_mels) -> (B, T', channels). With `lengths`, every layer reads zeros past each recording's end,
        as a recording alone would: batching never changes a transcript."""
        x = x.transpose(1, 2)
        for conv, norm in zip(self.convs, self.norms):
            if lengths is not None:
                x = x * (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]).unsqueeze(1)
                lengths = _conv_lengths(conv, lengths)
            x = self.drop(F.relu(norm(conv(x))))
        return x.transpose(1, 2)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            lengths = _conv_lengths(conv, lengths)
        return lengths


class FrontEnd2d(nn.Module):
    """Two 2-D convolutions over (time, mel band) with batch norm and ReLU, each halving the bands (and time as
    `subsample` asks), then a linear layer from bands x maps to `channels` (ESPnet's Conv2dSubsampling). The same
    filters slide along the mel axis: a formant pattern shifted by a longer or shorter vocal tract is still met by
    the same filter, which a 1-D front end (a weight per band) cannot do for a speaker it never heard."""

    maps = 32

    def __init__(self, n_mels: int, channels: int, subsample: int, dropout: float):
        super().__init__()
        strides = {1: (1, 1), 2: (2, 1), 4: (2, 2)}[subsample]
        self.convs = nn.ModuleList([nn.Conv2d(1, self.maps, 3, (strides[0], 2), 1),
                                    nn.Conv2d(self.maps, self.maps, 3, (strides[1], 2), 1)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(self.maps) for _ in self.convs])
        bands = (((n_mels - 1) // 2 + 1) - 1) // 2 + 1
        self.proj = nn.Linear(self.maps * bands, channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, n_mels) -> (B, T', channels); zeros past each recording's end at every layer, as FrontEnd."""
        x = x.unsqueeze(1)  # (B, 1, T, F)
        for conv, norm in zip(self.convs, self.norms):
            if lengths is not None:
                x = x * (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None])[:, None, :, None]
                lengths = _conv_lengths(conv, lengths)
            x = F.relu(norm(conv(x)))
        b, c, t, f = x.shape
        return self.drop(self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f)))

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            lengths = _conv_lengths(conv, lengths)
        return lengths


def _conv_lengths(conv: nn.Conv1d | nn.Conv2d, lengths: torch.Tensor) -> torch.Tensor:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1


class CTCRecognizer(nn.Module):
    """Conv front end -> stacked (bi)GRU/LSTM over the subsampled frames -> linear over blank + characters."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: CTCOptions):
        super().__init__()
        _check(input_shape, "ctc_asr")
        self.o = o
        self.front = (FrontEnd2d if o.front == "conv2d" else FrontEnd)(input_shape[1], o.channels, o.subsample, o.dropout)
        cell = nn.GRU if o.cell == "gru" else nn.LSTM
        self.rnn = cell(o.channels, o.hidden, num_layers=o.layers, batch_first=True, bidirectional=o.bidirectional,
                        dropout=o.dropout if o.layers > 1 else 0.0)
        self.drop = nn.Dropout(o.dropout)
        self.out = nn.Linear(o.hidden * (2 if o.bidirectional else 1), num_classes)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.front.output_lengths(lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.front(x, lengths)  # (B, T', channels)
        if lengths is None:
            h, _ = self.rnn(h)
        else:
            n = self.output_lengths(lengths).clamp(1, h.shape[1])
            packed = pack_padded_sequence(h, n.cpu(), batch_first=True, enforce_sorted=False)
            h, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=h.shape[1])
        return F.log_softmax(self.out(self.drop(h)).float(), dim=-1)  # (B, T', C)


class ConformerBlock(nn.Module):
    """Gulati et al. 2020: half-step feed-forward, self-attention, convolution module, half-step feed-forward,
    each a residual branch with its own pre-norm; a final LayerNorm."""

    def __init__(self, d: int, heads: int, kernel: int, ff_mult: int, dropout: float):
        super().__init__()
        ff = lambda: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, ff_mult * d), nn.SiLU(), nn.Dropout(dropout),  # noqa: E731
                                   nn.Linear(ff_mult * d, d), nn.Dropout(dropout))
        self.ff1, self.ff2 = ff(), ff()
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.conv_norm = nn.LayerNorm(d)
        self.pointwise_in = nn.Conv1d(d, 2 * d, 1)  # then GLU: d channels, gated
        self.depthwise = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.conv_bn = nn.BatchNorm1d(d)
        self.pointwise_out = nn.Conv1d(d, d, 1)
        self.drop = nn.Dropout(dropout)
        self.final = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:  # (B, T, d), pad (B, T) True
        x = x + 0.5 * self.ff1(x)
        a = self.attn_norm(x)
        x = x + self.drop(self.attn(a, a, a, key_padding_mask=pad, need_weights=False)[0])
        c = F.glu(self.pointwise_in(self.conv_norm(x).transpose(1, 2)), dim=1)  # (B, d, T)
        if pad is not None:
            c = c.masked_fill(pad.unsqueeze(1), 0.0)  # padding never leaks into real steps through the kernel
        c = self.pointwise_out(F.silu(self.conv_bn(self.depthwise(c))))
        x = x + self.drop(c.transpose(1, 2))
        return self.final(x + 0.5 * self.ff2(x))


class Conformer(nn.Module):
    """Conv front end -> linear to d_model + sinusoidal positions -> Conformer blocks -> linear over characters."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: ConformerOptions):
        super().__init__()
        _check(input_shape, "conformer")
        if o.d_model % o.heads:
            raise ValueError(f"conformer: heads ({o.heads}) must divide d_model ({o.d_model})")
        if o.kernel_size % 2 == 0:
            raise ValueError(f"conformer: kernel_size must be odd (it is centred on each step); got {o.kernel_size}")
        self.o = o
        self.front = FrontEnd(input_shape[1], o.channels, o.subsample, o.dropout)
        self.proj = nn.Linear(o.channels, o.d_model)
        self.blocks = nn.ModuleList([ConformerBlock(o.d_model, o.heads, o.kernel_size, o.ff_mult, o.dropout)
                                     for _ in range(o.layers)])
        self.out = nn.Linear(o.d_model, num_classes)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.front.output_lengths(lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(self.front(x, lengths))  # (B, T', d)
        h = h + sinusoidal(h.shape[1], h.shape[2], h.device).to(h.dtype)
        pad = None
        if lengths is not None:
            n = self.output_lengths(lengths).clamp(1, h.shape[1])
            pad = torch.arange(h.shape[1], device=h.device)[None, :] >= n[:, None]  # (B, T') True on padding
        for block in self.blocks:
            h = block(h, pad)
        return F.log_softmax(self.out(h).float(), dim=-1)


def _check(input_shape: tuple[int, ...], name: str) -> None:
    if len(input_shape) != 2:
        raise ValueError(f"{name} reads log-mel frames (T, n_mels) from speech data (data.source speech or "
                         f"synth_speech); got inputs of shape {tuple(input_shape)}")


@register_model("ctc_asr", family="speech")
def ctc_asr(*, input_shape, num_classes, options: CTCOptions) -> nn.Module:
    return CTCRecognizer(input_shape, num_classes, options)


@register_model("conformer", family="speech")
def conformer(*, input_shape, num_classes, options: ConformerOptions) -> nn.Module:
    return Conformer(input_shape, num_classes, options)


# ---------------------------------------------------------------- decoding

def greedy(log_probs: torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
    """Best path: the most likely id per frame, repeats merged, blanks dropped. (B, T', C) -> ids per utterance."""
    best = log_probs.argmax(-1).cpu()
    n = lengths.cpu().tolist() if lengths is not None else [best.shape[1]] * len(best)
    out = []
    for row, k in zip(best.tolist(), n):
        ids, prev = [], BLANK
        for t in row[:k]:
            if t != prev and t != BLANK:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


class Lexicon:
    """The words a closed-vocabulary recogniser may say (digits, commands), as character ids: a label prefix is
    allowed while every finished word is one of them and the unfinished one begins one. CTC beam search with a
    lexicon is how the field decodes such tasks (e.g. flashlight's lexicon decoder): a misspelt "zeero" cannot
    come out, the most probable word does."""

    def __init__(self, words: list[list[int]], space: int):
        self.words = {tuple(w) for w in words if w}
        self.starts = {tuple(w[:i]) for w in self.words for i in range(len(w) + 1)}
        self.space = space

    def _last(self, prefix: tuple) -> tuple:
        cut = max((i for i, c in enumerate(prefix) if c == self.space), default=-1)
        return prefix[cut + 1:]

    def allows(self, prefix: tuple, c: int) -> bool:
        last = self._last(prefix)
        return last in self.words if c == self.space else last + (c,) in self.starts

    def complete(self, prefix: tuple) -> bool:
        return self._last(prefix) in self.words


def beam_search(log_probs: torch.Tensor, lengths: torch.Tensor | None = None, beam: int = 8,
                prune: float = -12.0, lexicon: Lexicon | None = None) -> list[list[int]]:
    """CTC prefix beam search (Hannun et al. 2014, without a language model): the `beam` most likely label
    prefixes, each scored by the total probability of every frame path that collapses to it (ending in blank,
    or not). Characters with a frame log-probability below `prune` are not tried at that frame. With a
    `lexicon`, only its words are spelt (the best finished prefix wins; none finished: the best prefix)."""
    lp = log_probs.float().cpu()
    n = lengths.cpu().tolist() if lengths is not None else [lp.shape[1]] * len(lp)
    out = []
    for frames, k in zip(lp, n):
        beams = {(): (0.0, -math.inf)}  # prefix -> (log P ending in blank, log P ending in its last label)
        for t in range(k):
            beams = _extend(beams, frames[t], beam, prune, lexicon)
        ranked = sorted(beams.items(), key=lambda kv: _logadd(*kv[1]), reverse=True)
        done = [p for p, _ in ranked if lexicon is None or lexicon.complete(p)]
        out.append(list(done[0] if done else ranked[0][0]))
    return out


def _extend(beams: dict, row: torch.Tensor, beam: int, prune: float, lexicon: Lexicon | None) -> dict:
    """One frame of the prefix beam search: every prefix stays (a blank, or its last label again) or grows."""
    cands = [c for c in torch.nonzero(row > prune).flatten().tolist() if c != BLANK]
    blank = float(row[BLANK])
    nxt: dict[tuple, list[float]] = {}
    for prefix, (pb, pnb) in beams.items():
        entry = nxt.setdefault(prefix, [-math.inf, -math.inf])
        entry[0] = _logadd(entry[0], _logadd(pb, pnb) + blank)  # stay: a blank frame
        if prefix:  # stay: the last label repeated without a blank between
            entry[1] = _logadd(entry[1], pnb + float(row[prefix[-1]]))
        for c in cands:
            if lexicon is not None and not lexicon.allows(prefix, c):
                continue
            p = float(row[c])
            longer = nxt.setdefault(prefix + (c,), [-math.inf, -math.inf])
            # a repeated label needs a blank between: only paths ending in blank extend with it
            longer[1] = _logadd(longer[1], (pb if prefix and prefix[-1] == c else _logadd(pb, pnb)) + p)
    best = sorted(nxt.items(), key=lambda kv: _logadd(*kv[1]), reverse=True)[:beam]
    return {p: tuple(v) for p, v in best}


def _logadd(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def decode(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor, beam_size: int = 1,
           batch_size: int = 256, lexicon: Lexicon | None = None) -> list[list[int]]:
    """Character ids for each utterance of a normalised feature batch: greedy, or beam search for beam_size > 1
    or a lexicon."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            n = lengths[i:i + batch_size]
            xb = x[i:i + batch_size, :int(n.max())]
            lp = model(xb, n)
            steps = model.output_lengths(n).clamp(1, lp.shape[1])
            out += greedy(lp, steps) if beam_size == 1 and lexicon is None else \
                beam_search(lp, steps, beam_size, lexicon=lexicon)
    return out


class Transcriber(nn.Module):
    """What gets logged and served: 16-bit PCM samples (B, L) at the training sample rate -> log-mel ->
    the training split's normalisation -> the network -> log-probabilities (B, T', C) per output step (id 0 the
    CTC blank; the metadata's `alphabet` names the rest). Greedy decoding: argmax, merge repeats, drop blanks.
    With `cmvn`, each recording's frames are normalised on their own first (`utterance_cmvn`), as in training;
    a batch then holds one recording, or recordings of the same length."""

    def __init__(self, net: nn.Module, sample_rate: int, n_mels: int, mean: list[float], std: list[float],
                 f_max: float | None = None, cmvn: bool = False):
        super().__init__()
        self.net, self.features, self.cmvn = net, LogMel(sample_rate, n_mels, f_max=f_max), cmvn
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def log_mel(self, pcm: torch.Tensor) -> torch.Tensor:
        """16-bit PCM (B, L) -> the features the network was trained on, before the training split's scaling."""
        mel = self.features(pcm.float() / 32768.0)
        return utterance_cmvn(mel) if self.cmvn else mel

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        return self.net((self.log_mel(pcm) - self.mean) / self.std)

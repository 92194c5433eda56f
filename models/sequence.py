"""Sequence models: recurrent `rnn` (tanh Elman), `lstm`, `gru`; `attention` (an LSTM/GRU encoder with attention
pooling over time); `transformer` (a transformer-encoder classifier/regressor).

Every model takes three kinds of input through one adapter, `SequenceInput`, chosen from `input_shape`:
  images    (B, C, H, W) float: read row by row, each of the H rows a time step of C*W features (sequential MNIST);
  numbers   (B, T, F) float: e.g. forecasting windows;
  token ids (B, T) integers, padding id 0 at the end: embedded. Lengths = number of non-zero tokens (>= 1).
Padding never changes a prediction: the recurrent models run packed sequences, attention and the transformer
mask padded steps out of their softmax and pooling. The head is a plain Linear to `num_classes` outputs
(classes, or the forecast horizon of a regressor: the loss is chosen elsewhere).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.options import AttentionOptions, RecurrentBase, RecurrentOptions, TransformerOptions, WordLMOptions
from models.registry import register_model

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


# ---------------------------------------------------------------- input adapter

class SequenceInput(nn.Module):
    """Images, numeric sequences or token ids -> (B, T, features) floats and (B,) lengths (None: all full)."""

    def __init__(self, name: str, input_shape: tuple[int, ...], vocab_size: int | None, embedding_dim: int,
                 project: int | None = None):
        super().__init__()
        self.tokens = len(input_shape) == 1
        if self.tokens:
            if vocab_size is None:
                raise ValueError(f"{name}: token inputs of shape {tuple(input_shape)} need the option vocab_size "
                                 f"(number of token ids, padding id 0 included)")
            dim = project or embedding_dim
            self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)  # padding embeds to zeros
            self.features = dim
        elif len(input_shape) in (2, 3):
            raw = input_shape[-1] if len(input_shape) == 2 else input_shape[0] * input_shape[2]  # F, or C*W per row
            self.proj = nn.Linear(raw, project) if project else nn.Identity()
            self.features = project or raw
        else:
            raise ValueError(f"{name} needs images (C, H, W), sequences (T, F) or token ids (T,); "
                             f"got shape {tuple(input_shape)}")

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.tokens:  # (B, T) ids; may arrive as floats from a float data pipeline
            ids = x.long()
            lengths = (ids != 0).sum(1).clamp(min=1)  # right-padded: the first `length` steps are the tokens
            return self.embed(ids), lengths  # (B, T, E), (B,)
        if x.dim() == 4:  # (B, C, H, W) -> (B, H, C*W): one row per step
            x = x.permute(0, 2, 1, 3).flatten(2)
        return self.proj(x), None  # (B, T, F)


def valid_mask(lengths: torch.Tensor | None, steps: int, device) -> torch.Tensor | None:
    """(B, T) True on the steps within each sequence's length; None when every step is valid."""
    if lengths is None:
        return None
    return torch.arange(steps, device=device)[None, :] < lengths.to(device)[:, None]


def masked_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) -> (B, D): the mean over valid steps."""
    if mask is None:
        return h.mean(1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


# ---------------------------------------------------------------- recurrent: rnn, lstm, gru

class Recurrent(nn.Module):
    """input adapter -> stacked RNN/LSTM/GRU -> pooling over time -> Linear head."""

    def __init__(self, cell: str, input_shape: tuple[int, ...], num_classes: int, o: RecurrentBase, pooling: str,
                 name: str | None = None):
        super().__init__()
        self.adapter = SequenceInput(name or cell, input_shape, o.vocab_size, o.embedding_dim)
        self.rnn = CELLS[cell](self.adapter.features, o.hidden, num_layers=o.layers, batch_first=True,
                               bidirectional=o.bidirectional, dropout=o.dropout if o.layers > 1 else 0.0)
        self.pooling = pooling
        self.state_size = o.hidden * (2 if o.bidirectional else 1)  # what the pooling hands the head
        self.head = nn.Linear(self.state_size, num_classes)

    def encode(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-step outputs (B, T, D) (zero beyond each length), final state (B, D), valid mask (B, T) or None."""
        seq, lengths = self.adapter(x)
        steps = seq.shape[1]
        # The recurrence runs in fp32 even under bf16 autocast: on sequential mnist5k (H200) bf16 dropped a
        # bidirectional Elman RNN from 0.957 to 0.786 test accuracy, and the cuDNN layers ran slower in it.
        with torch.autocast(seq.device.type, enabled=False):
            if lengths is None:
                out, h = self.rnn(seq.float())
            else:  # packed: padded steps are never fed to the cell, so they cannot change the state
                packed = pack_padded_sequence(seq.float(), lengths.cpu(), batch_first=True, enforce_sorted=False)
                out, h = self.rnn(packed)
                out, _ = pad_packed_sequence(out, batch_first=True, total_length=steps)
        h = h[0] if isinstance(h, tuple) else h  # LSTM: (h_n, c_n); h_n (layers * directions, B, H)
        final = torch.cat([h[-2], h[-1]], 1) if self.rnn.bidirectional else h[-1]  # last layer's directions
        return out, final, valid_mask(lengths, steps, seq.device)

    def pool(self, out, final, mask) -> torch.Tensor:
        return final if self.pooling == "last" else masked_mean(out, mask)

    def forward(self, x):  # (B, C, H, W) | (B, T, F) | (B, T) ids -> (B, classes)
        return self.head(self.pool(*self.encode(x)))


@register_model("rnn", family="rnn")
def rnn(*, input_shape, num_classes, options: RecurrentOptions) -> nn.Module:
    return Recurrent("rnn", input_shape, num_classes, options, options.pooling)


@register_model("lstm", family="rnn")
def lstm(*, input_shape, num_classes, options: RecurrentOptions) -> nn.Module:
    return Recurrent("lstm", input_shape, num_classes, options, options.pooling)


@register_model("gru", family="rnn")
def gru(*, input_shape, num_classes, options: RecurrentOptions) -> nn.Module:
    return Recurrent("gru", input_shape, num_classes, options, options.pooling)


# ---------------------------------------------------------------- attention

class AttentionRNN(Recurrent):
    """Recurrent encoder; the final state queries every step, the head reads the attention-weighted context."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: AttentionOptions):
        super().__init__(o.cell, input_shape, num_classes, o, "attention", name="attention")
        d = self.state_size
        self.score = o.score
        if o.score == "additive":
            self.w_query = nn.Linear(d, o.attention_dim, bias=False)
            self.w_key = nn.Linear(d, o.attention_dim)
            self.v = nn.Linear(o.attention_dim, 1, bias=False)
        self.last_attention: torch.Tensor | None = None  # (B, T) weights of the last forward, 0 on padding

    def pool(self, out, final, mask) -> torch.Tensor:
        if self.score == "additive":  # (B, T, A) -> (B, T)
            scores = self.v(torch.tanh(self.w_query(final).unsqueeze(1) + self.w_key(out))).squeeze(-1)
        else:
            scores = (out @ final.unsqueeze(-1)).squeeze(-1) / math.sqrt(out.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=1).to(out.dtype)  # (B, T), sums to 1 over valid steps
        self.last_attention = weights.detach()
        return (weights.unsqueeze(-1) * out).sum(1)  # (B, D) context

    @torch.no_grad()
    def attention_weights(self, x) -> torch.Tensor:
        """(B, T) attention over the time steps of `x` (image rows, sequence steps or tokens)."""
        self(x)
        return self.last_attention


@register_model("attention", family="rnn")
def attention(*, input_shape, num_classes, options: AttentionOptions) -> nn.Module:
    return AttentionRNN(input_shape, num_classes, options)


# ---------------------------------------------------------------- transformer

def sinusoidal(steps: int, dim: int, device) -> torch.Tensor:
    """(T, D) positional encoding of Vaswani et al. 2017: sin on even features, cos on odd ones."""
    pos = torch.arange(steps, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(steps, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[:dim // 2])
    return pe


class Transformer(nn.Module):
    """input projection (or embedding) + sinusoidal positions -> pre-norm TransformerEncoder -> pooling -> Linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: TransformerOptions):
        super().__init__()
        self.adapter = SequenceInput("transformer", input_shape, o.vocab_size, o.d_model, project=o.d_model)
        self.drop = nn.Dropout(o.dropout)
        self.cls = nn.Parameter(torch.zeros(1, 1, o.d_model)) if o.pooling == "cls" else None
        layer = nn.TransformerEncoderLayer(o.d_model, o.heads, o.ff, o.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)  # pre-norm: trains without warm-up
        self.encoder = nn.TransformerEncoder(layer, o.layers, norm=nn.LayerNorm(o.d_model),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(o.d_model, num_classes)

    def forward(self, x):  # (B, C, H, W) | (B, T, F) | (B, T) ids -> (B, classes)
        seq, lengths = self.adapter(x)  # (B, T, D)
        b, steps, _ = seq.shape
        h = self.drop(seq + sinusoidal(steps, seq.shape[-1], seq.device).to(seq.dtype))
        mask = valid_mask(lengths, steps, seq.device)
        if self.cls is not None:  # the [CLS] token goes first and is never padding
            h = torch.cat([self.cls.expand(b, -1, -1).to(h.dtype), h], 1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        h = self.encoder(h, src_key_padding_mask=None if mask is None else ~mask)  # (B, T(+1), D)
        pooled = h[:, 0] if self.cls is not None else masked_mean(h, mask)
        return self.head(pooled)


@register_model("transformer", family="transformer")
def transformer(*, input_shape, num_classes, options: TransformerOptions) -> nn.Module:
    return Transformer(input_shape, num_classes, options)


# ---------------------------------------------------------------- word-level language model

class WordLM(nn.Module):
    """pytorch/examples' word_language_model RNNModel: embedding -> dropout -> stacked LSTM/GRU -> dropout ->
    Linear to the vocabulary, a prediction at every position: (B, T) ids -> (B, T, V) logits. With `tied`,
    the last layer's width is the embedding's (as there) and the decoder's weight is the embedding table."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: WordLMOptions):
        super().__init__()
        if len(input_shape) != 1 or o.vocab_size is None:
            raise ValueError(f"word_lm reads token ids (T,) with the option vocab_size; got shape {tuple(input_shape)}")
        self.embed = nn.Embedding(o.vocab_size, o.embedding_dim)
        top = o.embedding_dim if o.tied else o.hidden
        cell = CELLS[o.cell]
        # the stack: layers-1 of `hidden` units, then the last at `top` (the embedding's width when tied)
        self.rnn = nn.ModuleList(cell(o.embedding_dim if i == 0 else o.hidden, o.hidden if i < o.layers - 1 else top,
                                      batch_first=True) for i in range(o.layers))
        self.drop = nn.Dropout(o.dropout)
        self.decoder = nn.Linear(top, num_classes)
        if o.tied:
            if num_classes != o.vocab_size:
                raise ValueError(f"word_lm: tied embeddings need as many outputs ({num_classes}) as input ids "
                                 f"({o.vocab_size})")
            self.decoder.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.embed(x.long()))
        with torch.autocast(h.device.type, enabled=False):  # the recurrence in fp32, as the other RNNs
            h = h.float()
            for layer in self.rnn:
                h, _ = layer(h)
                h = self.drop(h)
        return self.decoder(h)


@register_model("word_lm", family="rnn")
def word_lm(*, input_shape, num_classes, options: WordLMOptions) -> nn.Module:
    return WordLM(input_shape, num_classes, options)

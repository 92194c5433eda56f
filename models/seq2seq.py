"""Encoder-decoder models for translation: `seq2seq` (an RNN encoder and an RNN decoder, attention none, additive
or dot) and `transformer_seq2seq` (nn.Transformer).

Both read source ids (B, S), right-padded with 0, and target ids (B, T) that start with BOS and end with EOS
(then padding). `forward(src, tgt_in)` -> logits (B, T, V) is training's teacher-forced pass. Decoding, greedy
or beam search, is written once (`decode`) over two methods every translation model has:
  start(src) -> state                       (a dict of tensors, batch first: what the encoder computed)
  advance(state, tokens) -> logits, state, attention   (tokens (B, t) so far -> the next token's logits (B, V),
                                                         and where it looked in the source (B, S))
`num_classes` is the target vocabulary's size; the option `vocab_size` the source's (the data fills both).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.options import Seq2SeqOptions, TransformerSeq2SeqOptions
from models.registry import register_model
from models.sequence import sinusoidal

PAD, UNK, BOS, EOS = 0, 1, 2, 3  # the first four ids of every target vocabulary (sources use 0 and 1 only)


# ---------------------------------------------------------------- RNN encoder-decoder

class Seq2Seq(nn.Module):
    """Embedding -> (bi)GRU/LSTM encoder; a GRU/LSTM cell decoder fed [previous token; context], the context an
    attention-weighted sum of the encoder's states (or their summary), output from [state; context; token]."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: Seq2SeqOptions):
        super().__init__()
        if len(input_shape) != 1 or o.vocab_size is None:
            raise ValueError(f"seq2seq reads token ids (T,) with the option vocab_size; got shape {tuple(input_shape)}")
        self.o, self.vocab = o, num_classes
        cell = nn.GRU if o.cell == "gru" else nn.LSTM
        self.src_embed = nn.Embedding(o.vocab_size, o.embedding_dim, padding_idx=PAD)
        self.encoder = cell(o.embedding_dim, o.hidden, num_layers=o.layers, batch_first=True,
                            bidirectional=o.bidirectional, dropout=o.dropout if o.layers > 1 else 0.0)
        d = o.hidden * (2 if o.bidirectional else 1)  # width of each encoder state and of the context
        self.bridge = nn.Linear(d, o.hidden)  # encoder summary -> the decoder's first state
        self.tgt_embed = nn.Embedding(num_classes, o.embedding_dim, padding_idx=PAD)
        self.cell = (nn.GRUCell if o.cell == "gru" else nn.LSTMCell)(o.embedding_dim + d, o.hidden)
        if o.attention == "additive":
            self.w_query = nn.Linear(o.hidden, o.attention_dim, bias=False)
            self.w_key = nn.Linear(d, o.attention_dim)
            self.v = nn.Linear(o.attention_dim, 1, bias=False)
        elif o.attention == "dot":
            self.w_query = nn.Linear(o.hidden, d, bias=False)
        self.drop = nn.Dropout(o.dropout)
        self.out = nn.Linear(o.hidden + d + o.embedding_dim, num_classes)
        self.last_attention: torch.Tensor | None = None  # (B, T, S) of the last forward

    def start(self, src: torch.Tensor) -> dict:
        lengths = (src != PAD).sum(1).clamp(min=1)
        emb = self.drop(self.src_embed(src))
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # (B, S, d), 0 on padding
        h = h[0] if isinstance(h, tuple) else h  # LSTM: (h_n, c_n)
        summary = torch.cat([h[-2], h[-1]], 1) if self.o.bidirectional else h[-1]  # last layer, both directions
        s0 = torch.tanh(self.bridge(summary))
        state = {"enc": out, "mask": src != PAD, "summary": summary, "h": s0}
        if self.o.cell == "lstm":
            state["c"] = torch.zeros_like(s0)
        if self.o.attention == "additive":
            state["keys"] = self.w_key(out)  # (B, S, A), once per source
        return state

    def attend(self, s: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context (B, d) and weights (B, S) for decoder state `s` (B, H)."""
        if self.o.attention == "none":
            return state["summary"], None
        enc = state["enc"]
        if self.o.attention == "additive":
            scores = self.v(torch.tanh(self.w_query(s).unsqueeze(1) + state["keys"])).squeeze(-1)
        else:
            scores = (enc @ self.w_query(s).unsqueeze(-1)).squeeze(-1) / math.sqrt(enc.shape[-1])
        weights = torch.softmax(scores.masked_fill(~state["mask"], float("-inf")), dim=1)
        return (weights.unsqueeze(1) @ enc).squeeze(1), weights

    def advance(self, state: dict, tokens: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        emb = self.drop(self.tgt_embed(tokens[:, -1]))
        ctx, weights = self.attend(state["h"], state)  # Bahdanau: the previous state asks where to look
        x = torch.cat([emb, ctx], 1)
        state = dict(state)
        if self.o.cell == "lstm":
            state["h"], state["c"] = self.cell(x, (state["h"], state["c"]))
        else:
            state["h"] = self.cell(x, state["h"])
        logits = self.out(self.drop(torch.cat([state["h"], ctx, emb], 1)))
        return logits, state, weights

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for target inputs `tgt_in` (BOS first). In training, with
        teacher_forcing < 1, each step is fed the model's own previous prediction with that probability's
        complement (one draw per step for the batch)."""
        state = self.start(src)
        logits, weights = [], []
        prev = tgt_in[:, :1]
        free = self.training and self.o.teacher_forcing < 1.0
        for t in range(tgt_in.shape[1]):
            if t and (not free or float(torch.rand(())) < self.o.teacher_forcing):
                prev = tgt_in[:, t:t + 1]
            step, state, w = self.advance(state, prev)
            logits.append(step)
            if w is not None:
                weights.append(w)
            if free:
                prev = step.argmax(-1, keepdim=True)
        self.last_attention = torch.stack(weights, 1).detach() if weights else None
        return torch.stack(logits, 1)


@register_model("seq2seq", family="seq2seq")
def seq2seq(*, input_shape, num_classes, options: Seq2SeqOptions) -> nn.Module:
    return Seq2Seq(input_shape, num_classes, options)


# ---------------------------------------------------------------- transformer encoder-decoder

class TransformerSeq2Seq(nn.Module):
    """nn.Transformer (pre-norm) over scaled embeddings + sinusoidal positions; source padding masked in the
    encoder and in cross-attention, target padding and the future masked in the decoder. Always teacher-forced
    in training (every position at once)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: TransformerSeq2SeqOptions):
        super().__init__()
        if len(input_shape) != 1 or o.vocab_size is None:
            raise ValueError(f"transformer_seq2seq reads token ids (T,) with the option vocab_size; "
                             f"got shape {tuple(input_shape)}")
        self.o, self.vocab = o, num_classes
        self.src_embed = nn.Embedding(o.vocab_size, o.d_model, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(num_classes, o.d_model, padding_idx=PAD)
        # N(0, 1/d), as Vaswani et al. 2017 and fairseq: times sqrt(d) in _embed, a token weighs as much as its
        # position; PyTorch's N(0, 1) would drown the positions 16 to 1 at d 256 and slow learning
        for table in (self.src_embed, self.tgt_embed):
            nn.init.normal_(table.weight, 0.0, o.d_model ** -0.5)
            nn.init.zeros_(table.weight[PAD])
        with warnings.catch_warnings():  # pre-norm layers cannot use the nested-tensor fast path: expected
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(o.d_model, o.heads, o.encoder_layers, o.decoder_layers, o.ff, o.dropout,
                                              activation="gelu", batch_first=True, norm_first=True)
        self.drop = nn.Dropout(o.dropout)
        self.out = nn.Linear(o.d_model, num_classes)

    def _embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        x = table(ids) * math.sqrt(self.o.d_model)
        return self.drop(x + sinusoidal(ids.shape[1], self.o.d_model, ids.device).to(x.dtype))

    def start(self, src: torch.Tensor) -> dict:
        mask = src != PAD
        memory = self.transformer.encoder(self._embed(self.src_embed, src), src_key_padding_mask=~mask)
        return {"memory": memory, "mask": mask}

    def _decode(self, state: dict, tokens: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device,
                                                                dtype=torch.bool)
        return self.transformer.decoder(self._embed(self.tgt_embed, tokens), state["memory"], tgt_mask=causal,
                                        tgt_key_padding_mask=tokens == PAD, memory_key_padding_mask=~state["mask"],
                                        tgt_is_causal=True)

    def advance(self, state: dict, tokens: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """One decoding step with a key/value cache: only the newest token goes through the decoder, its
        self-attention reading the earlier positions' cached layer inputs (`cache<i>` in the state, reordered with
        the beams). Causal masking means an earlier position never depends on a later one, so this gives what
        decoding the whole prefix again gives, at the cost of one position instead of all of them."""
        pos, d = tokens.shape[1] - 1, self.o.d_model
        x = self.drop(self.tgt_embed(tokens[:, -1:]) * math.sqrt(d) + sinusoidal(pos + 1, d, tokens.device)[pos:])
        pad, state = tokens == PAD, dict(state)
        with self.cross_attention() as seen:
            for i, layer in enumerate(self.transformer.decoder.layers):
                y = layer.norm1(x)
                past = state[f"cache{i}"] = torch.cat([state[f"cache{i}"], y], 1) if pos else y
                x = x + layer.dropout1(layer.self_attn(y, past, past, key_padding_mask=pad, need_weights=False)[0])
                x = x + layer._mha_block(layer.norm2(x), state["memory"], None, ~state["mask"])
                x = x + layer._ff_block(layer.norm3(x))
        x = self.transformer.decoder.norm(x) if self.transformer.decoder.norm is not None else x
        return self.out(x[:, -1]), state, seen[-1][:, -1] if seen else None

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.out(self._decode(self.start(src), tgt_in))

    def cross_attention(self):
        """A context that records the last decoder layer's cross-attention weights (B, T, S), averaged over
        heads, for the attention heat map (nn.TransformerDecoderLayer asks for none)."""
        return _Recorder(self.transformer.decoder.layers[-1].multihead_attn)


class _Recorder:
    def __init__(self, mha: nn.MultiheadAttention):
        self.mha, self.seen = mha, []

    def __enter__(self) -> list:
        original = type(self.mha).forward

        def forward(*args, **kwargs):
            kwargs.update(need_weights=True, average_attn_weights=True)
            out, w = original(self.mha, *args, **kwargs)
            self.seen.append(w.detach())
            return out, w

        self.mha.forward = forward  # the instance's, for the duration of the context
        return self.seen

    def __exit__(self, *exc) -> None:
        del self.mha.forward


@register_model("transformer_seq2seq", family="seq2seq")
def transformer_seq2seq(*, input_shape, num_classes, options: TransformerSeq2SeqOptions) -> nn.Module:
    return TransformerSeq2Seq(input_shape, num_classes, options)


# ---------------------------------------------------------------- decoding

@torch.no_grad()
def decode(model: nn.Module, src: torch.Tensor, max_len: int, beam_size: int = 1,
           batch_size: int = 512) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Target ids for each source (EOS and what follows cut off) and the attention of each output step over the
    source (L, S) (empty where the model has none): greedy with beam_size 1, else beam search, at most
    `max_len` tokens."""
    model.eval()
    ids, attention = [], []
    for i in range(0, len(src), batch_size):
        run = _greedy if beam_size == 1 else lambda m, s, n: _beam(m, s, n, beam_size)
        out, att = run(model, trim(src[i:i + batch_size]), max_len)
        for row, a in zip(out.tolist(), att):
            n = row.index(EOS) if EOS in row else len(row)
            ids.append(row[:n])
            attention.append(a[:n + 1])  # the EOS step included
    return ids, attention


def trim(ids: torch.Tensor, least: int = 1) -> torch.Tensor:
    """Right-padded ids (B, T) without the columns that are padding in every row (the data pads to its longest
    text: Multi30k's subword batches are ~1/3 real tokens); nothing a model computes for real tokens changes."""
    return ids[:, :max(least, int((ids != PAD).sum(1).max()))] if ids.numel() else ids


def _greedy(model, src, max_len):
    state = model.start(src)
    tokens = torch.full((len(src), 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    weights = []
    for _ in range(max_len):
        logits, state, w = model.advance(state, tokens)
        nxt = logits.argmax(-1).masked_fill(done, PAD)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        if w is not None:
            weights.append(w.float().cpu())
        done |= nxt == EOS
        if bool(done.all()):
            break
    att = torch.stack(weights, 1) if weights else torch.zeros(len(src), 0, src.shape[1])
    return tokens[:, 1:], att


def _beam(model, src, max_len, k: int, alpha: float = 1.0):
    """Beam search, all sources at once ((B * k) rows); finished beams keep their score; the best of the k final
    beams by log-probability / length^alpha (length normalisation, so short outputs are not favoured)."""
    b, dev = len(src), src.device
    state = {n: v.repeat_interleave(k, 0) for n, v in model.start(src).items()}
    tokens = torch.full((b * k, 1), BOS, dtype=torch.long, device=dev)
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # one live beam to start with
    done = torch.zeros(b * k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b * k, device=dev)
    weights = torch.zeros(b * k, 0, src.shape[1])
    for _ in range(max_len):
        logits, state, w = model.advance(state, tokens)
        logp = torch.log_softmax(logits.float(), -1)  # (b*k, V)
        v = logp.shape[1]
        finished = torch.full_like(logp, float("-inf"))
        finished[:, PAD] = 0.0  # a finished beam continues with padding at no cost
        logp = torch.where(done[:, None], finished, logp)
        top, idx = (scores.view(-1, 1) + logp).view(b, k * v).topk(k, dim=1)
        beam, tok = idx // v, idx % v
        rows = (torch.arange(b, device=dev)[:, None] * k + beam).view(-1)
        state = {n: t.index_select(0, rows) for n, t in state.items()}
        tokens = torch.cat([tokens.index_select(0, rows), tok.view(-1, 1)], 1)
        done, lengths = done.index_select(0, rows), lengths.index_select(0, rows)
        lengths = lengths + (~done).float()
        if w is not None:
            weights = torch.cat([weights.index_select(0, rows.cpu()), w.float().cpu().index_select(0, rows.cpu())[:, None]], 1)
        done = done | (tok.view(-1) == EOS)
        scores = top
        if bool(done.all()):
            break
    best = (scores / lengths.view(b, k).clamp(min=1) ** alpha).argmax(1)
    pick = torch.arange(b, device=dev) * k + best
    return tokens[pick, 1:], weights[pick.cpu()]


class Translator(nn.Module):
    """What gets logged and served: source ids (B, S) -> target ids (B, L), padded with 0 after EOS (greedy or
    the model's beam search); the vocabularies travel beside it (vocab.json, target_vocab.json)."""

    def __init__(self, net: nn.Module, max_len: int, beam_size: int = 1):
        super().__init__()
        self.net, self.max_len, self.beam_size = net, max_len, beam_size

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        ids, _ = decode(self.net, src.long(), self.max_len, self.beam_size)
        out = torch.zeros(len(ids), self.max_len, dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out

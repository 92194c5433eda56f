"""Parallel text: a user's corpus, or dates and numbers written out, -> source and target ids (translation runs).

Sources (all offline):
  pairs    a user's parallel corpus in `data.path`: Tatoeba's layout `source<TAB>target[<TAB>attribution]`
           without a header (what manythings.org's deu.txt, fra.txt... hold), or a CSV/TSV with a header and the
           columns `data.source_column` / `data.target_column`;
  dates    real calendar dates (1950-2049) written as people write them, in eight locales and many styles
           (Babel's CLDR locale data: "Sonntag, 7. März 2021", "7 de marzo de 2021", "3/7/21" is left out as
           ambiguous) -> ISO 8601 "2021-03-07"; the test split's dates are never seen in training;
  numbers  integers 0..data.number_max -> their words in data.language (num2words: German "siebenundneunzig",
           a grammar that reorders digits); test numbers are never seen in training.
Prepared folders: x (N, S) source ids right-padded with 0; y (N, T) target ids BOS ... EOS then 0; `vocab.json`
(source) and `target_vocab.json` (ids 2 and 3 are <s> and </s>), both fitted on the training split only;
`texts.json`, the validation and test pairs as text (BLEU's references: the target as the tokenizer sees it,
out-of-vocabulary words included, so the score is against the real reference).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.seq2seq import BOS, EOS
from tasks.config import DataConfig
from tasks.data import DataError, split_groups, write_prepared
from tasks.data.text import PAD as PAD_TOKEN, UNK as UNK_TOKEN, VOCAB, Vocab, tokenize

TARGET_VOCAB, TEXTS = "target_vocab.json", "texts.json"
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
DEFAULT_LENGTH = {"pairs": 50, "dates": 64, "numbers": 120}  # the longest side kept, in tokens


DATE_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "nl_NL")


# day-first short forms with four-digit years, and a few written styles; en_US's "3/7/21" and es/it's "7/3/21"
# would read the same string two ways
DATE_SHORT = ("en_GB", "de_DE", "fr_FR", "pt_BR", "nl_NL")


DATE_PATTERNS = (("en", "d MMM yy"), ("en", "MMM d y"), ("de", "EEE d.M.y"), ("fr", "EEE d MMM y"),
                 ("en", "EEEE, MMMM d, y"), ("es", "d/M/y"), ("it", "d MMMM y"))


@dataclass
class Corpus:
    pairs: list[tuple[str, str]]
    groups: list[str]  # pairs of one group never straddle splits (a date, a number, a source sentence)
    tokenizer: str  # the source's default
    description: str
    ambiguous: int = 0  # generated sources that read two ways, left out


def read_pairs(cfg: DataConfig) -> Corpus:
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file; pairs reads a TSV (source<TAB>target[<TAB>attribution], "
                        f"Tatoeba's layout) or a CSV/TSV with data.source_column and data.target_column")
    tab = path.suffix.lower() != ".csv"
    pairs = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tab else csv.reader(f)
        if cfg.source_column is not None:
            header = next(rows, [])
            missing = [c for c in (cfg.source_column, cfg.target_column) if c not in header]
            if missing:
                raise DataError(f"data.source_column/target_column: no column {missing[0]!r} in {path}; its header "
                                f"is: {', '.join(header) or '(empty)'}")
            cols = header.index(cfg.source_column), header.index(cfg.target_column)
        else:
            cols = 0, 1
        for line, row in enumerate(rows, 2 if cfg.source_column else 1):
            if not any(c.strip() for c in row):
                continue
            if len(row) <= max(cols):
                raise DataError(f"{path}, line {line}: {len(row)} column(s); a pair needs a source and a target "
                                f"({'tab' if tab else 'comma'}-separated)")
            src, tgt = row[cols[0]].strip(), row[cols[1]].strip()
            if src and tgt:
                pairs.append((src, tgt))
    if len(pairs) < 20:
        raise DataError(f"{path}: {len(pairs)} pair(s); a translation corpus needs at least 20")
    return Corpus(pairs, [s for s, _ in pairs], "word", str(path))


def _date_formats():
    out = [(loc, style) for loc in DATE_LOCALES for style in ("full", "long", "medium")]
    return out + [(loc, "short") for loc in DATE_SHORT] + list(DATE_PATTERNS)


def read_dates(cfg: DataConfig, n: int = 15_000) -> Corpus:
    """`n` distinct days of 1950-2049 (a fixed draw: the data is the same for every seed), each written once
    in a format drawn from `_date_formats()`; a string two dates could produce is dropped."""
    import datetime as dt

    from babel.dates import format_date

    rng = np.random.default_rng(20_210_307)
    first = dt.date(1950, 1, 1)
    days = rng.choice((dt.date(2049, 12, 31) - first).days + 1, size=n, replace=False)
    formats = _date_formats()
    picks = rng.integers(len(formats), size=n)
    pairs = []
    for d, f in zip(days, picks):
        date = first + dt.timedelta(days=int(d))
        loc, style = formats[f]
        pairs.append((format_date(date, style, locale=loc), date.isoformat()))
    readings: dict[str, set] = {}
    for s, t in pairs:
        readings.setdefault(s, set()).add(t)
    kept = [(s, t) for s, t in pairs if len(readings[s]) == 1]
    return Corpus(kept, [t for _, t in kept], "char", f"dates 1950-2049 in {len(formats)} formats of "
                  f"{len(DATE_LOCALES)} locales (Babel/CLDR) -> ISO 8601", ambiguous=len(pairs) - len(kept))


def read_numbers(cfg: DataConfig, most: int = 20_000) -> Corpus:
    from num2words import CONVERTER_CLASSES, num2words

    if cfg.language not in CONVERTER_CLASSES:
        raise DataError(f"data.language: {cfg.language!r} is not a num2words language; allowed: "
                        f"{', '.join(sorted(CONVERTER_CLASSES))}")
    count = cfg.number_max + 1
    numbers = (np.arange(count) if count <= most else
               np.sort(np.random.default_rng(97).choice(count, size=most, replace=False)))
    pairs = [(str(int(k)), num2words(int(k), lang=cfg.language)) for k in numbers]
    return Corpus(pairs, [s for s, _ in pairs], "char",
                  f"integers 0..{cfg.number_max} -> words in {cfg.language!r} (num2words)")


def example_pairs(path: str | Path, n: int = 3_000) -> int:
    """Write a small bilingual corpus in Tatoeba's layout to try `pairs` offline: English dates as an English
    writer puts them -> the same dates as a German one does ("Sunday, March 7, 2021" -> "Sonntag, 7. März
    2021"), made here from Babel's CLDR locale data (Unicode licence), so the file is ours to ship. Real word
    order changes (month and day swap) and vocabulary (month and day names) at the word level."""
    import datetime as dt

    from babel.dates import format_date

    from tasks.files import atomic_path

    rng = np.random.default_rng(7)
    first = dt.date(1950, 1, 1)
    days = rng.choice(36_524, size=n, replace=False)
    styles = rng.choice(["full", "long", "medium"], size=n)
    lines = []
    for d, style in zip(days, styles):
        date = first + dt.timedelta(days=int(d))
        lines.append(f"{format_date(date, style, locale='en_US')}\t{format_date(date, style, locale='de_DE')}\t"
                     "made by nnlab from CLDR locale data (Babel)\n")
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(lines), encoding="utf-8")
    return n


def target_vocab(texts, tokenizer: str, length: int, min_freq: int, max_size: int) -> Vocab:
    fitted = Vocab.fit(texts, tokenizer, length, min_freq, max_size - 2)
    return Vocab([PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, *fitted.tokens[2:]], tokenizer, length)


def encode_targets(vocab: Vocab, token_lists: list[list[str]], length: int) -> np.ndarray:
    """(N, length) ids: BOS, the tokens, EOS, then padding."""
    out = np.zeros((len(token_lists), length), dtype=np.int64)
    for i, toks in enumerate(token_lists):
        ids = [BOS, *(vocab.index.get(t, 1) for t in toks), EOS]
        out[i, :len(ids)] = ids
    return out


def prepare_pairs(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    corpus = read(cfg)
    tok = cfg.tokenizer or corpus.tokenizer
    cap = cfg.max_length or DEFAULT_LENGTH[cfg.source]
    tokens = [(tokenize(s, tok), tokenize(t, tok)) for s, t in corpus.pairs]
    keep = [i for i, (s, t) in enumerate(tokens) if s and t and len(s) <= cap and len(t) <= cap]
    too_long = sum(1 for s, t in tokens if len(s) > cap or len(t) > cap)
    if len(keep) < 20:
        raise DataError(f"{corpus.description}: {len(keep)} pairs within data.max_length={cap} tokens a side "
                        f"({too_long} longer); raise data.max_length")
    idx = split_groups([corpus.groups[i] for i in keep], cfg, seed)
    idx = {s: [keep[i] for i in ix] for s, ix in idx.items()}
    src_len = max(len(tokens[i][0]) for i in keep)
    tgt_len = max(len(tokens[i][1]) for i in keep) + 2  # BOS ... EOS
    train_src = [corpus.pairs[i][0] for i in idx["train"]]
    src_vocab = Vocab.fit(train_src, tok, src_len, cfg.min_freq, cfg.max_vocab)  # training split only
    tgt_vocab = target_vocab([corpus.pairs[i][1] for i in idx["train"]], tok, tgt_len, cfg.min_freq, cfg.max_vocab)
    join = "" if tok == "char" else " "
    splits, texts, oov = {}, {}, {}
    for s, ix in idx.items():
        splits[s] = (src_vocab.encode([corpus.pairs[i][0] for i in ix]),
                     encode_targets(tgt_vocab, [tokens[i][1] for i in ix], tgt_len))
        if s != "train":
            texts[s] = [[corpus.pairs[i][0], join.join(tokens[i][1])] for i in ix]
            words = [t for i in ix for t in tokens[i][1]]
            oov[s] = round(sum(t not in tgt_vocab.index for t in words) / max(len(words), 1), 4)
    return write_prepared(out_dir, splits, {
        "source": cfg.source, "task": "translation", "description": corpus.description,
        "input_shape": [src_len], "num_classes": len(tgt_vocab), "classes": [], "vocab_size": len(src_vocab),
        "normalization": {"mean": [0.0], "std": [1.0]},
        "text": {"tokenizer": tok, "source_length": src_len, "target_length": tgt_len,
                 "source_vocab_size": len(src_vocab), "target_vocab_size": len(tgt_vocab), "pairs": len(corpus.pairs),
                 "kept": len(keep), "dropped_too_long": too_long, "dropped_ambiguous": corpus.ambiguous,
                 "max_length": cap, "target_oov_rate": oov},
    }, cfg=cfg, seed=seed, extra={VOCAB: json.dumps(src_vocab.to_dict(), ensure_ascii=False) + "\n",
                                  TARGET_VOCAB: json.dumps(tgt_vocab.to_dict(), ensure_ascii=False) + "\n",
                                  TEXTS: json.dumps(texts, ensure_ascii=False) + "\n"})

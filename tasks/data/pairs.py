"""Parallel text: a user's corpus, or dates and numbers written out, -> source and target ids (translation runs).

Sources (all offline):
  pairs    a user's parallel corpus in `data.path`: Tatoeba's layout `source<TAB>target[<TAB>attribution]`
           without a header (what manythings.org's deu.txt, fra.txt... hold), or a CSV/TSV with a header and the
           columns `data.source_column` / `data.target_column`; or a folder of line-aligned files
           `train.<lang>`, `val.<lang>`, `test*.<lang>` (Multi30k, WMT-style), `data.source_lang` ->
           `data.target_lang`, whose official splits are kept (never re-split; too-long pairs leave training only);
  dates    real calendar dates (1950-2049) written as people write them, in eight locales and many styles
           (Babel's CLDR locale data: "Sonntag, 7. März 2021", "7 de marzo de 2021", "3/7/21" is left out as
           ambiguous) -> ISO 8601 "2021-03-07"; the test split's dates are never seen in training;
  numbers  integers 0..data.number_max -> their words in data.language (num2words: German "siebenundneunzig",
           a grammar that reorders digits); test numbers are never seen in training.
Prepared folders: x (N, S) source ids right-padded with 0; y (N, T) target ids BOS ... EOS then 0; `vocab.json`
(source) and `target_vocab.json` (ids 2 and 3 are <s> and </s>), both fitted on the training split only
(subword, a user's corpus's default: one sentencepiece model per side, carried inside each vocabulary file, so a
word never seen in training is spelt in pieces instead of <unk>; `data.tokenizer: word` for whole words);
`texts.json`, the validation and test pairs as raw text (BLEU's references, untouched by any tokenizer).
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
from tasks.data.text import PAD as PAD_TOKEN, UNK as UNK_TOKEN, VOCAB, Vocab
from tasks.references import recognise_corpus

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
    splits: dict[str, list[int]] | None = None  # official splits (a folder's files), kept as given
    empty: int = 0  # line pairs with an empty side, left out
    benchmark: str | None = None  # the public benchmark it is (tasks/references.py), if nnlab knows it


def _lines(path: Path) -> list[str]:
    """A file's lines split on "\n" only (str.splitlines would also split on U+2028 etc., breaking alignment)."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    return [line.strip() for line in (lines[:-1] if lines and lines[-1] == "" else lines)]


def _split_files(root: Path, src: str, tgt: str, test_set: str | None) -> dict[str, tuple[Path, Path]]:
    langs = sorted({p.suffix[1:] for p in root.glob("train.*")})
    for key, lang in (("source_lang", src), ("target_lang", tgt)):
        if lang is None or lang not in langs:
            raise DataError(f"data.{key}: {'unset' if lang is None else repr(lang)}; {root} holds line-aligned files "
                            f"train.<lang>, val.<lang>, test*.<lang> for the languages: {', '.join(langs) or 'none'}")
    tests = sorted(p.name[:-len(src) - 1] for p in root.glob(f"test*.{src}"))
    if test_set is not None and test_set not in tests:
        raise DataError(f"data.test_set: {test_set!r} is not a test set of {root}; its test*.{src} files name: "
                        f"{', '.join(tests) or 'none'}")
    if test_set is None and len(tests) != 1:
        raise DataError(f"{root}: {len(tests)} test files test*.{src} ({', '.join(tests) or 'none'}); set "
                        "data.test_set to the one to score")
    tests = [test_set or tests[0]]
    out = {s: (root / f"{n}.{src}", root / f"{n}.{tgt}") for s, n in (("train", "train"), ("val", "val"),
                                                                     ("test", tests[0]))}
    for f in (f for pair in out.values() for f in pair):
        if not f.is_file():
            raise DataError(f"{f}: missing; a folder of line-aligned files needs train, val and test for both sides")
    return out


def read_folder(cfg: DataConfig, root: Path) -> Corpus:
    """Line-aligned files, one sentence a line: line k of train.de translates line k of train.en. A line pair
    with an empty side is left out and counted (one blank line need not stop a corpus of 30,000)."""
    pairs, splits, empty, lines = [], {}, 0, {}
    files = _split_files(root, cfg.source_lang, cfg.target_lang, cfg.test_set)
    for split, (fs, ft) in files.items():
        src, tgt = _lines(fs), _lines(ft)
        for f, side in ((fs, src), (ft, tgt)):
            if not any(side):
                raise DataError(f"{f}: empty; every split needs sentences on both sides")
        if len(src) != len(tgt):
            raise DataError(f"{fs} has {len(src)} lines and {ft} has {len(tgt)}; line-aligned files need the same "
                            "number of lines (line k of one translates line k of the other)")
        kept = [(s, t) for s, t in zip(src, tgt) if s and t]
        empty += len(src) - len(kept)
        lines[split] = len(src)
        splits[split] = list(range(len(pairs), len(pairs) + len(kept)))
        pairs += kept
    known = recognise_corpus(files["test"][0].name[:-len(cfg.source_lang) - 1], lines["train"],
                             cfg.source_lang, cfg.target_lang)
    return Corpus(pairs, [s for s, _ in pairs], "subword", f"{root} ({cfg.source_lang} -> {cfg.target_lang})",
                  splits=splits, empty=empty, benchmark=known)


def read_pairs(cfg: DataConfig) -> Corpus:
    path = Path(cfg.path)
    if path.is_dir():
        return read_folder(cfg, path)
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file or folder; pairs reads a TSV (source<TAB>target"
                        f"[<TAB>attribution], Tatoeba's layout), a CSV/TSV with data.source_column and "
                        f"data.target_column, or a folder of line-aligned train/val/test.<lang> files")
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
    return Corpus(pairs, [s for s, _ in pairs], "subword", str(path))


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


def subword_size(cfg: DataConfig, n_train: int) -> int:
    """data.subword_vocab, or by default a quarter of the training pairs' count within 256..8000 (Multi30k's
    29,000 pairs: 7,250 pieces a side; 5,000 Tatoeba pairs: 1,250); sentencepiece stops sooner on a small text."""
    return cfg.subword_vocab or min(8000, max(256, n_train // 4))


def fit_vocabs(cfg: DataConfig, tok: str, train: list[tuple[str, str]]) -> tuple[Vocab, Vocab]:
    """The source and target vocabularies, from the training pairs only; max_length set by the caller."""
    if tok == "subword":  # one model a side: encoder and decoder have their own embeddings
        size = subword_size(cfg, len(train))
        return tuple(Vocab.fit_subword([p[k] for p in train], size, 0) for k in (0, 1))
    src = Vocab.fit([s for s, _ in train], tok, 0, cfg.min_freq, cfg.max_vocab)
    fitted = Vocab.fit([t for _, t in train], tok, 0, cfg.min_freq, cfg.max_vocab - 2)
    return src, Vocab([PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, *fitted.tokens[2:]], tok, 0)


def encode_targets(id_lists: list[list[int]], length: int) -> np.ndarray:
    """(N, length) ids: BOS, the tokens, EOS, then padding."""
    out = np.zeros((len(id_lists), length), dtype=np.int64)
    for i, ids in enumerate(id_lists):
        ids = [BOS, *ids, EOS]
        out[i, :len(ids)] = ids
    return out


def _splits(corpus: Corpus, cfg: DataConfig, seed: int) -> dict[str, list[int]]:
    """The official splits as given, or whole groups drawn at random; training cut to data.max_train."""
    if corpus.splits is None:
        return {s: ix.tolist() for s, ix in split_groups(corpus.groups, cfg, seed).items()}
    idx = dict(corpus.splits)
    if cfg.max_train and len(idx["train"]) > cfg.max_train:
        idx["train"] = np.sort(np.random.default_rng(seed).choice(idx["train"], cfg.max_train, replace=False)).tolist()
    return idx


def prepare_pairs(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    corpus = read(cfg)
    tok = cfg.tokenizer or corpus.tokenizer
    cap = cfg.max_length or DEFAULT_LENGTH[cfg.source]
    idx = _splits(corpus, cfg, seed)
    src_vocab, tgt_vocab = fit_vocabs(cfg, tok, [corpus.pairs[i] for i in idx["train"]])
    ids = {i: (src_vocab.ids(corpus.pairs[i][0]), tgt_vocab.ids(corpus.pairs[i][1])) for ix in idx.values() for i in ix}
    fits = {i: bool(s) and bool(t) and len(s) <= cap and len(t) <= cap for i, (s, t) in ids.items()}
    keep = {s: [i for i in ix if fits[i] or corpus.splits is not None and s != "train" and ids[i][0] and ids[i][1]]
            for s, ix in idx.items()}  # an official val/test set is scored whole
    too_long = sum(1 for s, ix in idx.items() for i in set(ix) - set(keep[s]) if max(map(len, ids[i])) > cap)
    kept = sum(len(ix) for ix in keep.values())
    if kept < 20 or not keep["train"]:
        raise DataError(f"{corpus.description}: {kept} pairs within data.max_length={cap} tokens a side "
                        f"({too_long} longer); raise data.max_length")
    src_vocab.max_length = src_len = max(len(ids[i][0]) for ix in keep.values() for i in ix)
    tgt_vocab.max_length = tgt_len = max(len(ids[i][1]) for ix in keep.values() for i in ix) + 2  # BOS ... EOS
    splits, texts, oov = {}, {}, {}
    for s, ix in keep.items():
        splits[s] = (src_vocab.encode([corpus.pairs[i][0] for i in ix]),
                     encode_targets([ids[i][1] for i in ix], tgt_len))
        if s != "train":
            texts[s] = [list(corpus.pairs[i]) for i in ix]  # raw: the references as written
            oov[s] = round(float(np.mean([t == 1 for i in ix for t in ids[i][1]])), 4)
    return write_prepared(out_dir, splits, {
        "source": cfg.source, "task": "translation", "description": corpus.description, "benchmark": corpus.benchmark,
        "input_shape": [src_len], "num_classes": len(tgt_vocab), "classes": [], "vocab_size": len(src_vocab),
        "normalization": {"mean": [0.0], "std": [1.0]},
        "text": {"tokenizer": tok, "source_length": src_len, "target_length": tgt_len,
                 "source_vocab_size": len(src_vocab), "target_vocab_size": len(tgt_vocab), "pairs": len(corpus.pairs),
                 "kept": kept, "dropped_too_long": too_long, "dropped_ambiguous": corpus.ambiguous,
                 "skipped_empty_side": corpus.empty, "official_splits": corpus.splits is not None,
                 "max_length": cap, "target_oov_rate": oov},
    }, cfg=cfg, seed=seed, extra={VOCAB: json.dumps(src_vocab.to_dict(), ensure_ascii=False) + "\n",
                                  TARGET_VOCAB: json.dumps(tgt_vocab.to_dict(), ensure_ascii=False) + "\n",
                                  TEXTS: json.dumps(texts, ensure_ascii=False) + "\n"})

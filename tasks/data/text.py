"""Text -> token ids: a tokenizer, a vocabulary fitted on the training split only, fixed-length right-padded ids.

Sources:
  text_csv  a user's CSV/TSV (`data.path`) with a text and a label column; labels may be strings or integers;
  imdb      the IMDB reviews archive (aclImdb/{train,test}/{neg,pos}/*.txt), read from `data.path`;
  charlm    next-character prediction on a text file, by default the standard library's documentation text
            (`pydoc_data.topics`, ~465k characters of English that every Python ships);
  wordlm    the same text word by word: next-word prediction at every position of 35-word windows.
Prepared folders have the layout `prepare` writes for images, plus `vocab.json` (a DVC output beside the
splits, logged to MLflow with the model so new text can be encoded the same way):
x (N, T) int64 token ids, 0 = padding (always at the end), 1 = out of vocabulary; y (N,) int64 (wordlm: (N, T),
the next word at every position). Translation pairs are tasks/data/pairs.py's; the language models' count baselines and
sampling are tasks/kinds/language.py's.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.config import DataConfig
from tasks.data import DOWNLOAD_HINT, DataError, keep_classes, stratified_split, write_prepared

PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1
BOS, EOS = "<s>", "</s>"  # ids 2 and 3 of a target vocabulary (and of every subword vocabulary)
VOCAB = "vocab.json"
DEFAULT_LENGTH = {"text_csv": 200, "imdb": 200, "charlm": 64, "wordlm": 35}  # tokens per example; LMs: context
# lowercased words of letters and digits in any script (with 's, n't), each other mark alone
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[^\w\s]|_")
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_ARCHIVE = "aclImdb_v1.tar.gz"


# a word tokenizer's output back to text: no space before closing marks, none after opening ones
GLUE_BEFORE, GLUE_AFTER = re.compile(r" ([.,!?;:%)\]}»…])"), re.compile(r"([(\[{«¿¡]) ")


def tokenize(text: str, kind: str = "word") -> list[str]:
    if kind == "char":
        return list(text)
    if kind == "subword":
        raise DataError("data.tokenizer: subword pieces come from a model fitted on translation pairs (pairs, "
                        "dates, numbers: Vocab.split); use word or char here")
    return WORD.findall(text.replace("<br />", " ").lower())  # IMDB marks line breaks with <br />


def detokenize(tokens: list[str], kind: str = "word") -> str:
    """Tokens -> text as a writer puts it: characters joined; words spaced, punctuation glued to its word and the
    first letter capitalized (the word tokenizer lowercased it; other capitals are lost)."""
    if kind == "char":
        return "".join(tokens)
    text = GLUE_AFTER.sub(r"\1", GLUE_BEFORE.sub(r"\1", " ".join(tokens)))
    return text[:1].upper() + text[1:]


def fit_subword(texts, size: int) -> bytes:
    """A sentencepiece unigram model of `texts` (serialized), at most `size` pieces (fewer when the texts hold
    fewer), every character seen kept, ids 0-3 = <pad> <unk> <s> </s> so piece ids are vocabulary ids.
    Deterministic: one thread, the texts in their order, sentencepiece's generator seeded."""
    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=size, model_type="unigram",
            character_coverage=1.0, hard_vocab_limit=False, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=PAD, unk_piece=UNK,
            bos_piece=BOS, eos_piece=EOS, logstream=quiet)
    return model.getvalue()


@dataclass
class Vocab:
    tokens: list[str]  # id -> token; 0 padding, 1 out of vocabulary
    tokenizer: str = "word"
    max_length: int = 200  # encode() cuts longer texts and pads shorter ones to this many ids
    model: bytes | None = None  # subword: the serialized sentencepiece model (its pieces are `tokens`)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self._sp = None
        if self.model is not None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=self.model)

    @classmethod
    def fit_subword(cls, texts, size: int, max_length: int) -> "Vocab":
        model = fit_subword(texts, size)
        return cls.from_model(model, max_length)

    @classmethod
    def from_model(cls, model: bytes, max_length: int) -> "Vocab":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=model)
        return cls([sp.id_to_piece(i) for i in range(sp.get_piece_size())], "subword", max_length, model)

    def split(self, text: str) -> list[str]:
        """The tokens of `text`: subword pieces (rare words spelled out in pieces), words or characters."""
        return self._sp.encode(text, out_type=str) if self._sp else tokenize(text, self.tokenizer)

    def detokenize(self, tokens: list[str]) -> str:
        return self._sp.decode_pieces(tokens) if self._sp else detokenize(tokens, self.tokenizer)

    @classmethod
    def fit(cls, texts, tokenizer: str, max_length: int, min_freq: int = 1, max_size: int | None = None) -> "Vocab":
        """The most frequent tokens of `texts` seen at least `min_freq` times, at most `max_size` ids in all
        (padding and out-of-vocabulary included); ties broken alphabetically so the ids are reproducible."""
        counts = Counter(tok for t in texts for tok in tokenize(t, tokenizer))
        keep = sorted((t for t, c in counts.items() if c >= min_freq and t not in (PAD, UNK)),
                      key=lambda t: (-counts[t], t))
        if max_size is not None:
            keep = keep[:max_size - 2]
        return cls([PAD, UNK, *keep], tokenizer, max_length)

    def __len__(self) -> int:
        return len(self.tokens)

    def ids(self, text: str) -> list[int]:
        return self._sp.encode(text) if self._sp else [self.index.get(t, 1) for t in tokenize(text, self.tokenizer)]

    def encode(self, texts) -> np.ndarray:
        """(N,) texts -> (N, max_length) int64 ids, cut at max_length, right-padded with 0."""
        out = np.zeros((len(texts), self.max_length), dtype=np.int64)
        for i, t in enumerate(texts):
            ids = self.ids(t)[:self.max_length]
            out[i, :len(ids)] = ids
        return out

    def decode(self, ids) -> str:
        toks = [self.tokens[int(i)] for i in ids if int(i) != 0]
        return self._sp.decode_pieces(toks) if self._sp else ("" if self.tokenizer == "char" else " ").join(toks)

    def to_dict(self) -> dict:
        out = {"tokenizer": self.tokenizer, "max_length": self.max_length, "pad_id": 0, "unk_id": 1,
               "size": len(self.tokens), "tokens": self.tokens}
        if self.model is not None:  # travels with the logged model: `nnlab translate` needs no prepared folder
            out["sentencepiece_model"] = base64.b64encode(self.model).decode("ascii")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        model = d.get("sentencepiece_model")
        return cls(d["tokens"], d["tokenizer"], d["max_length"], base64.b64decode(model) if model else None)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- sources: (texts, labels, test, classes)

def class_names(labels) -> tuple[np.ndarray, list[str]]:
    """Labels as strings or integers -> (class index per example, class names); integer labels sort as numbers."""
    names = sorted({str(v).strip() for v in labels})
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        names = sorted(names, key=int)
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v).strip()] for v in labels], dtype=np.int64), names


MISSING_LABELS = ("", "nan", "-nan", "na", "n/a", "#n/a", "<na>", "null", "none")  # what spreadsheets write for none


def read_text_csv(cfg: DataConfig):
    import pandas as pd

    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file; text_csv reads a CSV or TSV file with columns "
                        f"{cfg.text_column!r} and {cfg.label_column!r}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:  # malformed quoting, binary file, ...
        raise DataError(f"data.path: cannot read {path} as {'TSV' if sep == chr(9) else 'CSV'}: {e}") from e
    for key, col in (("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)):
        if col not in df.columns:
            raise DataError(f"{key}: no column {col!r} in {path}; its columns are: {', '.join(map(str, df.columns))}")
    missing = df[cfg.label_column].str.strip().str.lower().isin(MISSING_LABELS)
    if missing.any() and not cfg.drop_missing_labels:
        lines = ", ".join(str(i + 2) for i in np.flatnonzero(missing.to_numpy())[:5])  # + header, 1-based
        raise DataError(f"{path}: {int(missing.sum())} of {len(df)} rows have no label in column "
                        f"{cfg.label_column!r} (empty, NaN, NA, null, ...; lines {lines}"
                        f"{', ...' if missing.sum() > 5 else ''}); fill them in, "
                        "or set data.drop_missing_labels: true to leave those rows out")
    df = df[~missing]  # rows without a label cannot be learned from
    y, classes = class_names(df[cfg.label_column])
    if len(classes) < 2:
        raise DataError(f"{path}: column {cfg.label_column!r} holds {len(classes)} distinct label(s); "
                        "classification needs at least 2")
    return df[cfg.text_column].to_numpy(dtype=object), y, None, classes


def imdb_folder(cfg: DataConfig) -> Path:
    """The aclImdb folder under data.path: extracted from aclImdb_v1.tar.gz there if needed, downloaded into it
    first only when data.download is true."""
    root = Path(cfg.path)
    for cand in (root / "aclImdb", root):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    archive = root / IMDB_ARCHIVE
    if not archive.is_file():
        if not cfg.download:
            raise DataError(f"IMDB reviews not found in {root} (expected {root / 'aclImdb'}/train/pos/*.txt ... or "
                            f"{archive}); {DOWNLOAD_HINT} (84 MB from {IMDB_URL})")
        _download(IMDB_URL, archive)
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:  # extract, then rename: never half there
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("aclImdb/") and "/unsup/" not in m.name]
            tar.extractall(tmp, members=members, filter="data")
        (Path(tmp) / "aclImdb").rename(root / "aclImdb")
    return root / "aclImdb"


def _download(url: str, dest: Path) -> None:
    import urllib.request

    from tasks.files import atomic_path

    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {dest}", flush=True)
    with urllib.request.urlopen(url) as r, atomic_path(dest) as tmp, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)


def read_imdb(cfg: DataConfig):
    from tasks.progress import bar

    folder = imdb_folder(cfg)
    classes = ["neg", "pos"]

    def read(split: str):
        files = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / split / c).glob("*.txt"))]
        if not files or len({i for _, i in files}) < 2:
            raise DataError(f"{folder / split}: expected review files in both neg/ and pos/")
        texts = [p.read_text(encoding="utf-8", errors="replace")
                 for p, _ in bar(files, f"reading {len(files)} {split} reviews")]
        return np.array(texts, dtype=object), np.array([i for _, i in files], dtype=np.int64)

    x, y = read("train")
    return x, y, read("test"), classes


def corpus(cfg: DataConfig) -> tuple[str, str]:
    """charlm's text and a description: data.path, or the standard library's pydoc topics."""
    if cfg.path is not None:
        path = Path(cfg.path)
        if not path.is_file():
            raise DataError(f"data.path: {path} is not a text file (charlm reads one; leave data.path unset for the "
                            "bundled corpus)")
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), "Python's documentation topics (pydoc_data.topics)"


# ---------------------------------------------------------------- prepare

def prepare_texts(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    x, y, test, classes = read(cfg)
    if cfg.classes:
        x, y, test, classes = keep_classes(x, y, test, classes, cfg.classes)
    splits = stratified_split(x, y, test, cfg, seed)
    train_texts = splits["train"][0]
    tokenizer = cfg.tokenizer or "word"
    lengths = np.array([len(tokenize(t, tokenizer)) for t in train_texts])
    cap = cfg.max_length or DEFAULT_LENGTH[cfg.source]
    steps = int(min(cap, max(lengths.max(initial=1), 1)))  # no longer than the longest training text
    vocab = Vocab.fit(train_texts, tokenizer, steps, cfg.min_freq, cfg.max_vocab)  # training split only
    encoded = {s: (vocab.encode(t), lab) for s, (t, lab) in splits.items()}
    val_tokens = [tok for t in splits["val"][0] for tok in tokenize(t, tokenizer)]
    oov = sum(tok not in vocab.index for tok in val_tokens) / max(len(val_tokens), 1)
    return write_prepared(out_dir, encoded, {
        "source": cfg.source, "task": "classification",
        "input_shape": [steps], "num_classes": len(classes), "classes": classes, "vocab_size": len(vocab),
        "counts": {s: {c: int(n) for c, n in zip(classes, np.bincount(lab, minlength=len(classes)))}
                   for s, (_, lab) in encoded.items()},
        "normalization": {"mean": [0.0], "std": [1.0]},  # token ids are indices, never scaled
        "text": {"tokenizer": tokenizer, "max_length": steps, "vocab_size": len(vocab),
                 "mean_tokens": round(float(lengths.mean()), 1), "truncated": round(float((lengths > steps).mean()), 4),
                 "val_oov_rate": round(oov, 4)},
    }, cfg=cfg, seed=seed, extra={VOCAB: json.dumps(vocab.to_dict(), ensure_ascii=False) + "\n"})


def char_windows(ids: np.ndarray, steps: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `steps` ids and the id that follows each, evenly spaced to at most `limit` of them:
    x (N, steps), y (N,)."""
    n = len(ids) - steps
    if n < 1:
        return np.zeros((0, steps), np.int64), np.zeros(0, np.int64)
    starts = np.arange(0, n, max(1, -(-n // limit)))
    return np.stack([ids[s:s + steps] for s in starts]), ids[starts + steps]


def in_order(seq, cfg: DataConfig, steps: int, what: str, unit: str) -> dict:
    """A text (characters or words) split by position: train, then val, then test — never shuffled."""
    n = len(seq)
    n_test, n_val = int(n * cfg.test_fraction), int(n * cfg.val_fraction)
    parts = {"train": seq[:n - n_val - n_test], "val": seq[n - n_val - n_test:n - n_test], "test": seq[n - n_test:]}
    if min(len(p) for p in parts.values()) <= steps + 1:
        raise DataError(f"{what} leave too few for {steps}-{unit} windows in every split; use a longer text or a "
                        "smaller data.max_length")
    return parts


def prepare_characters(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    text, description = read(cfg)
    steps = cfg.max_length or DEFAULT_LENGTH[cfg.source]
    n, parts = len(text), in_order(text, cfg, steps, f"{description}: {len(text)} characters", "character")
    vocab = Vocab.fit([parts["train"]], "char", steps, min_freq=1, max_size=cfg.max_vocab)  # chronological split
    limit = cfg.max_train or 50_000  # windows per epoch; val/test in proportion
    splits = {}
    for s, part in parts.items():
        ids = np.array(vocab.ids(part), dtype=np.int64)
        splits[s] = char_windows(ids, steps, limit if s == "train" else max(limit // 5, 100))
    return write_prepared(out_dir, splits, {
        "source": cfg.source, "task": "language_model", "description": description,
        "input_shape": [steps], "num_classes": len(vocab), "classes": [], "vocab_size": len(vocab),
        "normalization": {"mean": [0.0], "std": [1.0]},
        "text": {"tokenizer": "char", "max_length": steps, "vocab_size": len(vocab), "characters": n,
                 "split_characters": {s: len(p) for s, p in parts.items()}},
    }, cfg=cfg, seed=seed, extra={VOCAB: json.dumps(vocab.to_dict(), ensure_ascii=False) + "\n"})


def prepare_words(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    """Word-level language modelling (pytorch/examples' word_language_model): the text's words in order, split
    by position (train, val, test), a vocabulary from the training part (min_freq, max_vocab; the rest is
    <unk>), cut into consecutive windows of `steps` words; y is x shifted by one word, so every position is a
    prediction and every word of a split is predicted exactly once."""
    text, description = read(cfg)
    steps = cfg.max_length or DEFAULT_LENGTH[cfg.source]
    words = tokenize(text, "word")
    n, parts = len(words), in_order(words, cfg, steps, f"{description}: {len(words)} words", "word")
    vocab = Vocab.fit([" ".join(parts["train"])], "word", steps, cfg.min_freq, cfg.max_vocab)
    splits = {}
    for s, part in parts.items():
        ids = np.array([vocab.index.get(w, 1) for w in part], dtype=np.int64)
        m = (len(ids) - 1) // steps  # windows; the tail shorter than one window is left out
        if s == "train" and cfg.max_train:
            m = min(m, cfg.max_train)
        splits[s] = (ids[:m * steps].reshape(m, steps), ids[1:m * steps + 1].reshape(m, steps))
    unk = {s: round(float((y == 1).mean()), 4) for s, (_, y) in splits.items()}
    return write_prepared(out_dir, splits, {
        "source": cfg.source, "task": "word_language_model", "description": description,
        "input_shape": [steps], "num_classes": len(vocab), "classes": [], "vocab_size": len(vocab),
        "normalization": {"mean": [0.0], "std": [1.0]},
        "text": {"tokenizer": "word", "max_length": steps, "vocab_size": len(vocab), "words": n,
                 "split_words": {s: len(p) for s, p in parts.items()}, "unk_rate": unk},
    }, cfg=cfg, seed=seed, extra={VOCAB: json.dumps(vocab.to_dict(), ensure_ascii=False) + "\n"})


# ---------------------------------------------------------------- a real text CSV every Python ships

DOC_MODULES = ("os", "socket", "statistics", "decimal", "datetime", "math", "random", "pathlib", "collections", "time")


def docstrings_csv(path: str | Path, modules=DOC_MODULES) -> int:
    """Write a text_csv demo file: the docstrings of the public functions, classes and methods of a few
    standard-library modules (text), labelled by module (label). Real English with a real signal (which API
    is this text about?), offline. Returns the number of rows."""
    import csv
    import importlib
    import inspect

    from tasks.files import atomic_path

    rows, seen = [], set()
    for name in modules:
        mod = importlib.import_module(name)
        objs = [o for k, o in sorted(vars(mod).items()) if not k.startswith("_") and callable(o)]
        objs += [f for o in objs if inspect.isclass(o) for k, f in sorted(vars(o).items()) if not k.startswith("_")]
        for o in objs:
            doc = inspect.getdoc(o)
            if doc and len(doc) > 20 and doc not in seen:  # inherited or shared docstrings once only
                seen.add(doc)
                rows.append({"text": " ".join(doc.split()), "label": name})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return len(rows)

"""Translation runs: parallel text -> source and target ids, the teacher-forced step, decoding, BLEU.

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

import copy
import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.registry import beam_size
from models.seq2seq import BOS, EOS, PAD, Translator, decode
from tasks.config import DataConfig
from tasks.kinds import Evaluation, Job, register_kind
from tasks.supervised import Supervised, SupervisedStep
from tasks.text import PAD as PAD_TOKEN, UNK as UNK_TOKEN, VOCAB, Vocab, tokenize

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


def _error(msg: str):
    from tasks.data import DataError

    return DataError(msg)


# ---------------------------------------------------------------- sources

def read_pairs(cfg: DataConfig) -> Corpus:
    path = Path(cfg.path)
    if not path.is_file():
        raise _error(f"data.path: {path} is not a file; pairs reads a TSV (source<TAB>target[<TAB>attribution], "
                     f"Tatoeba's layout) or a CSV/TSV with data.source_column and data.target_column")
    tab = path.suffix.lower() != ".csv"
    pairs = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tab else csv.reader(f)
        if cfg.source_column is not None:
            header = next(rows, [])
            missing = [c for c in (cfg.source_column, cfg.target_column) if c not in header]
            if missing:
                raise _error(f"data.source_column/target_column: no column {missing[0]!r} in {path}; its header "
                             f"is: {', '.join(header) or '(empty)'}")
            cols = header.index(cfg.source_column), header.index(cfg.target_column)
        else:
            cols = 0, 1
        for line, row in enumerate(rows, 2 if cfg.source_column else 1):
            if not any(c.strip() for c in row):
                continue
            if len(row) <= max(cols):
                raise _error(f"{path}, line {line}: {len(row)} column(s); a pair needs a source and a target "
                             f"({'tab' if tab else 'comma'}-separated)")
            src, tgt = row[cols[0]].strip(), row[cols[1]].strip()
            if src and tgt:
                pairs.append((src, tgt))
    if len(pairs) < 20:
        raise _error(f"{path}: {len(pairs)} pair(s); a translation corpus needs at least 20")
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
        raise _error(f"data.language: {cfg.language!r} is not a num2words language; allowed: "
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


# ---------------------------------------------------------------- prepare

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
    from tasks.data import split_groups, write_prepared

    corpus = read(cfg)
    tok = cfg.tokenizer or corpus.tokenizer
    cap = cfg.max_length or DEFAULT_LENGTH[cfg.source]
    tokens = [(tokenize(s, tok), tokenize(t, tok)) for s, t in corpus.pairs]
    keep = [i for i, (s, t) in enumerate(tokens) if s and t and len(s) <= cap and len(t) <= cap]
    too_long = sum(1 for s, t in tokens if len(s) > cap or len(t) > cap)
    if len(keep) < 20:
        raise _error(f"{corpus.description}: {len(keep)} pairs within data.max_length={cap} tokens a side "
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
        "sizes": {s: len(ix) for s, ix in idx.items()},
        "normalization": {"mean": [0.0], "std": [1.0]},
        "text": {"tokenizer": tok, "source_length": src_len, "target_length": tgt_len,
                 "source_vocab_size": len(src_vocab), "target_vocab_size": len(tgt_vocab), "pairs": len(corpus.pairs),
                 "kept": len(keep), "dropped_too_long": too_long, "dropped_ambiguous": corpus.ambiguous,
                 "max_length": cap, "target_oov_rate": oov},
        "config": cfg.model_dump(), "seed": seed,
    }, extra={VOCAB: json.dumps(src_vocab.to_dict(), ensure_ascii=False) + "\n",
              TARGET_VOCAB: json.dumps(tgt_vocab.to_dict(), ensure_ascii=False) + "\n",
              TEXTS: json.dumps(texts, ensure_ascii=False) + "\n"})


# ---------------------------------------------------------------- measuring

def outputs_as_text(vocab: Vocab, ids: list[list[int]]) -> list[str]:
    join = "" if vocab.tokenizer == "char" else " "
    return [join.join(vocab.tokens[i] for i in row if i > EOS or i == 1) for row in ids]


def scores(hyp: list[str], refs: list[str], prefix: str) -> dict:
    """Exact match, corpus BLEU and chrF (sacrebleu, its default 13a tokenization) of outputs against references."""
    import sacrebleu

    return {f"{prefix}_exact_match": float(np.mean([h == r for h, r in zip(hyp, refs)])),
            f"{prefix}_bleu": sacrebleu.corpus_bleu(hyp, [refs]).score,
            f"{prefix}_chrf": sacrebleu.corpus_chrf(hyp, [refs]).score}


def _texts(data_dir: Path) -> dict:
    return json.loads((Path(data_dir) / TEXTS).read_text())



# ---------------------------------------------------------------- the step and the kind

class TranslationStep(SupervisedStep):
    """Teacher forcing: the decoder reads the target shifted right (BOS first) and predicts it shifted left;
    cross-entropy and accuracy over the real target tokens (padding ignored)."""

    def __init__(self, model, cfg, device):
        super().__init__(model, cfg, device, classify=True)

    def begin_fit(self, train, val) -> None:
        pass  # no dead-unit probe: its forward would need targets

    def outputs(self, xb, yb):
        return self.model(xb, yb[:, :-1]).flatten(0, 1), yb[:, 1:].flatten()

    def loss(self, out, y, reduction: str = "mean"):
        return F.cross_entropy(out, y, ignore_index=PAD, reduction=reduction)

    def count(self, y):
        return (y != PAD).sum()

    def hits(self, out, y):
        return ((out.argmax(1) == y) & (y != PAD)).sum()


@register_kind
class Translation(Supervised):
    name, metric, registry = "translation", "test_bleu", "nnlab-translator"
    channels_last = False
    summary_columns = ("test_exact_match", "test_chrf")
    baselines = {"test_bleu": "baseline_test_bleu", "test_exact_match": "baseline_test_exact_match"}
    val_limit = 1_000  # validation pairs decoded after each epoch

    def metric_for(self, source: str) -> str:
        # numbers: a German number is one word, so BLEU's 2- to 4-grams do not exist and it reads 0 for every
        # model; exact match ranks them
        return "test_exact_match" if source == "numbers" else self.metric

    def step(self, model, cfg, seed, device):  # only encoder-decoders get here: config validation's misfit
        return TranslationStep(model, cfg, device)

    def on_epoch(self, job: Job, epoch: int, metrics: dict, trainer) -> None:
        """Greedy decoding of (the first `val_limit` of) the validation pairs: exact match, BLEU and chrF curves."""
        val = _texts(job.data_dir)["val"][:self.val_limit]
        m = job.data.manifest
        dev = next(job.model.parameters()).device
        ids, _ = decode(job.model, torch.as_tensor(job.data.x_val[:len(val)], device=dev), m["text"]["target_length"])
        hyp = outputs_as_text(Vocab.load(job.data_dir / TARGET_VOCAB), ids)
        metrics |= scores(hyp, [r for _, r in val], "val")

    def served(self, job: Job):
        m = job.data.manifest
        files = [job.data_dir / VOCAB, job.data_dir / TARGET_VOCAB]
        for f in files:
            job.run.log_file(f, "data")
        meta = {"task": self.name, "tokenizer": m["text"]["tokenizer"]}
        return self.wrap(copy.deepcopy(job.model).float().cpu(), m, job.mean, job.std), job.data.x_test[:4], meta, files

    def wrap(self, net, manifest, mean, std):
        return Translator(net, manifest["text"]["target_length"], beam_size(net))

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        m = data.manifest
        test_pairs = _texts(data_dir)["test"]
        tgt_vocab = Vocab.load(Path(data_dir) / TARGET_VOCAB)
        src = torch.as_tensor(data.x_test, device=device)
        step = TranslationStep(model, cfg.train, device)
        forced = step.evaluate(self.test_split(final, data, device), "test")  # teacher-forced loss and accuracy
        beam = beam_size(model)
        ids, attention = decode(model, src, m["text"]["target_length"], beam)
        hyp = outputs_as_text(tgt_vocab, ids)
        refs = [r for _, r in test_pairs]
        metrics = {"test_loss": forced["test_loss"], "test_token_accuracy": forced["test_accuracy"]}
        metrics |= scores(hyp, refs, "test")
        train_targets = outputs_as_text(tgt_vocab, [[int(i) for i in row] for row in data.y_train])
        common = Counter(train_targets).most_common(1)[0][0]
        base = scores([common] * len(refs), refs, "baseline_test")  # the most common training target, for all
        metrics |= {k: base[k] for k in ("baseline_test_bleu", "baseline_test_exact_match")}
        lengths = (data.x_test != 0).sum(1)
        long = lengths >= np.quantile(lengths, 2 / 3)  # the longest third of the sources
        metrics["test_exact_match_long"] = float(np.mean([hyp[i] == refs[i] for i in np.flatnonzero(long)]))
        metrics["test_exact_match_short"] = float(np.mean([hyp[i] == refs[i] for i in np.flatnonzero(~long)]))
        print(f"{name}: test exact match {metrics['test_exact_match']:.4f} (longest third of the sources "
              f"{metrics['test_exact_match_long']:.4f}), BLEU {metrics['test_bleu']:.2f}, chrF {metrics['test_chrf']:.2f}"
              f" over {len(refs)} held-out pairs ({'beam ' + str(beam) if beam > 1 else 'greedy'})",
              flush=True)
        for (s, r), h in list(zip(test_pairs, hyp))[:3]:
            print(f"  {s!r} -> {h!r}" + ("" if h == r else f"   (reference {r!r})"), flush=True)
        table = "source\treference\toutput\tcorrect\n" + "".join(
            f"{s}\t{r}\t{h}\t{str(h == r).lower()}\n" for (s, r), h in list(zip(test_pairs, hyp))[:50])
        src_vocab = Vocab.load(Path(data_dir) / VOCAB)
        fig = attention_figure([(test_pairs[i][0], hyp[i], attention[i], src_vocab.tokenizer) for i in range(4)
                                if i < len(hyp) and attention[i].numel()],
                               f"{name}: test BLEU {metrics['test_bleu']:.1f}, exact match {metrics['test_exact_match']:.3f}")
        return Evaluation(metrics, fig, "plots/attention.png", texts={"translations.tsv": table})


def attention_figure(examples: list[tuple[str, str, torch.Tensor, str]], title: str):
    """One heat map per example: output tokens (rows) over source tokens (columns). Without attention (the
    no-attention twin) a note says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not examples:
        fig, ax = plt.subplots(figsize=(5, 1.4), dpi=110)
        ax.axis("off")
        ax.text(0.5, 0.5, "this model has no attention (attention: none):\nevery output step reads one summary",
                ha="center", va="center", fontsize=9)
        ax.set_title(title, fontsize=9)
        return fig
    fig, axes = plt.subplots(1, len(examples), figsize=(4.2 * len(examples), 4.2), dpi=110, squeeze=False)
    for ax, (src, out, w, tok) in zip(axes[0], examples):
        src_t, out_t = tokenize(src, tok), (list(out) if tok == "char" else out.split()) + [EOS_TOKEN]
        w = w[:len(out_t), :len(src_t)].numpy()
        ax.imshow(w, aspect="auto", cmap="magma", vmin=0)
        ax.set_xticks(range(len(src_t)), src_t, fontsize=7, rotation=90)
        ax.set_yticks(range(len(out_t[:len(w)])), out_t[:len(w)], fontsize=7)
        ax.set_xlabel("source")
    axes[0, 0].set_ylabel("output")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig

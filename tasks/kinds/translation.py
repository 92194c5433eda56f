"""Translation runs: the teacher-forced step, decoding, exact match, BLEU and chrF, the translation kind.

The data (pairs, dates, numbers; the prepared ids, vocabularies and reference texts) is tasks/data/pairs.py.
"""
from __future__ import annotations

import copy
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.registry import beam_size
from models.seq2seq import EOS, PAD, Translator, decode, trim
from tasks import quick
from tasks.kinds import Evaluation, Job, Served, ServingError, register_kind
from tasks.data.pairs import EOS_TOKEN, TARGET_VOCAB, TEXTS
from tasks.data.text import VOCAB, Vocab, tokenize
from tasks.kinds.supervised import Supervised, SupervisedStep
from tasks.figures import pyplot



# ---------------------------------------------------------------- measuring

def outputs_as_text(vocab: Vocab, ids: list[list[int]]) -> list[str]:
    """Target ids -> text as written: subword pieces decoded by their model, characters joined, words spaced
    with punctuation glued (tasks/data/text.py detokenize)."""
    return [vocab.detokenize([vocab.tokens[i] for i in row if i > EOS or i == 1]) for row in ids]


def matches(hyp: str, refs: list[str]) -> bool:
    """Exact match: the same words and punctuation as one of the references, case and spacing aside."""
    return tokenize(hyp) in [tokenize(r) for r in refs]


def scores(hyp: list[str], refs: list, prefix: str) -> dict:
    """Exact match, corpus BLEU and chrF of detokenized outputs against raw references, as the field reports them
    (sacreBLEU's defaults: its 13a tokenization, cased). `refs`: one reference per output, or a list of them
    (every translation of that source: sacreBLEU's reference streams, None where an output has fewer)."""
    import sacrebleu

    refs = [[r] if isinstance(r, str) else list(r) for r in refs]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(map(len, refs), default=1))]
    return {f"{prefix}_exact_match": float(np.mean([matches(h, r) for h, r in zip(hyp, refs)])),
            f"{prefix}_bleu": sacrebleu.corpus_bleu(hyp, streams).score,
            f"{prefix}_chrf": sacrebleu.corpus_chrf(hyp, streams).score}


def grouped(pairs: list[list[str]], hyp: list[str]) -> tuple[list[str], list[list[str]], list[int]]:
    """One output per distinct source sentence, scored against all its references (a source translated several
    ways in the data): (outputs, references, the index of each source's first pair)."""
    refs: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for i, (s, r) in enumerate(pairs):
        refs.setdefault(s, []).append(r)
        first.setdefault(s, i)
    return [hyp[i] for i in first.values()], list(refs.values()), list(first.values())


def baseline_scores(vocab: Vocab, y_train: np.ndarray, refs: list[list[str]]) -> dict:
    """The most common training target, output for every test source."""
    common = Counter(outputs_as_text(vocab, [[int(i) for i in row] for row in y_train])).most_common(1)[0][0]
    base = scores([common] * len(refs), refs, "baseline_test")
    return {k: base[k] for k in ("baseline_test_bleu", "baseline_test_exact_match")}


def _texts(data_dir: Path) -> dict:
    return json.loads((Path(data_dir) / TEXTS).read_text())


# ---------------------------------------------------------------- the step and the kind

class TranslationStep(SupervisedStep):
    """Teacher forcing: the decoder reads the target shifted right (BOS first) and predicts it shifted left;
    cross-entropy and accuracy over the real target tokens (padding ignored)."""

    def __init__(self, model, cfg, device):
        super().__init__(model, cfg, device, classify=True)
        self.smoothing = cfg.label_smoothing  # the training loss's (train_loss is smoothed); held-out: plain

    def begin_fit(self, train, val) -> None:
        pass  # no dead-unit probe: its forward would need targets

    def lengths(self, data):
        return torch.maximum((data.x != PAD).sum(1), (data.y != PAD).sum(1))  # a batch runs to its longest side

    def outputs(self, xb, yb):
        xb, yb = trim(xb), trim(yb, 2)  # the batch's own longest source and target (one host sync a batch)
        return self.net(xb, yb[:, :-1]).flatten(0, 1), yb[:, 1:].flatten()

    def loss(self, out, y, reduction: str = "mean"):
        return F.cross_entropy(out, y, ignore_index=PAD, reduction=reduction, label_smoothing=self.smoothing)

    def evaluate(self, data, prefix: str = "val", batch_size: int = 1024) -> dict:
        """Held-out loss (plain cross-entropy, comparable across label smoothings) and token accuracy."""
        smoothing, self.smoothing = self.smoothing, 0.0
        try:
            return super().evaluate(data, prefix, batch_size)
        finally:
            self.smoothing = smoothing

    def count(self, y):
        return (y != PAD).sum()

    def hits(self, out, y):
        return ((out.argmax(1) == y) & (y != PAD)).sum()


# ---------------------------------------------------------------- served

class ServedTranslator(Served):
    """A translation model: texts, encoded with its source vocabulary (extra_files/vocab.json; never cut) ->
    their translations, decoded with its target vocabulary (extra_files/target_vocab.json) into text as written
    (a subword model's sentencepiece models travel inside those two files)."""

    takes, gives, command = "text", "text", "translate"

    def __call__(self, texts: list[str]) -> list[str]:
        from tasks.registration import extra_file

        target = extra_file(self.uri, TARGET_VOCAB) if self.vocab is not None else None
        if self.vocab is None or target is None:
            raise ServingError(f"{self.uri} has no extra_files/{VOCAB if self.vocab is None else TARGET_VOCAB}: "
                               "its vocabularies were not logged beside it; train it again to serve it")
        source = Vocab.from_dict(self.vocab)
        source.max_length = max(source.max_length, max(len(source.ids(t)) for t in texts))  # encode without cutting
        with torch.no_grad():
            ids = self.module(torch.as_tensor(source.encode(texts)))
        return outputs_as_text(Vocab.from_dict(target), ids.tolist())


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
        """Greedy decoding of (the first `val_limit` of) the validation pairs: exact match, BLEU and chrF curves
        (what train.early_stopping.monitor val_bleu selects the weights on), and the seconds it took."""
        t0 = time.perf_counter()
        val = _texts(job.data_dir)["val"][:quick.at_most(self.val_limit)]
        m = job.data.manifest
        dev = next(job.model.parameters()).device
        ids, _ = decode(job.model, torch.as_tensor(job.data.x_val[:len(val)], device=dev), m["text"]["target_length"])
        hyp = outputs_as_text(Vocab.load(job.data_dir / TARGET_VOCAB), ids)
        metrics |= scores(hyp, [r for _, r in val], "val")
        metrics["val_decode_seconds"] = time.perf_counter() - t0

    def served(self, job: Job):
        m = job.data.manifest
        files = [job.data_dir / VOCAB, job.data_dir / TARGET_VOCAB]
        for f in files:
            job.run.log_file(f, "data")
        meta = {"task": self.name, "tokenizer": m["text"]["tokenizer"]}
        return self.wrap(copy.deepcopy(job.model).float().cpu(), m, job.mean, job.std), job.data.x_test[:4], meta, files

    def wrap(self, net, manifest, mean, std):
        return Translator(net, manifest["text"]["target_length"], beam_size(net))

    def serving(self, module, vocab, meta, uri) -> Served:
        return ServedTranslator(module, vocab, meta, uri)

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        m = data.manifest
        pairs = _texts(data_dir)["test"]
        src_vocab, tgt_vocab = (Vocab.load(Path(data_dir) / f) for f in (VOCAB, TARGET_VOCAB))
        step = TranslationStep(model, cfg.train, device)
        forced = step.evaluate(self.test_split(final, data, device), "test")  # teacher-forced loss and accuracy
        beam = beam_size(model)
        ids, attention = decode(model, torch.as_tensor(data.x_test, device=device), m["text"]["target_length"], beam)
        hyp, refs, first = grouped(pairs, outputs_as_text(tgt_vocab, ids))  # one output per distinct source
        metrics = {"test_loss": forced["test_loss"], "test_token_accuracy": forced["test_accuracy"]}
        metrics |= scores(hyp, refs, "test") | baseline_scores(tgt_vocab, data.y_train, refs)
        lengths = (data.x_test[first] != 0).sum(1)
        long = lengths >= np.quantile(lengths, 2 / 3)  # the longest third of the sources
        right = np.array([matches(h, r) for h, r in zip(hyp, refs)])
        metrics["test_exact_match_long"] = float(right[long].mean())
        metrics["test_exact_match_short"] = float(right[~long].mean()) if (~long).any() else float("nan")
        metrics["test_sources"], metrics["test_references"] = len(refs), len(pairs)
        print(f"{name}: test exact match {metrics['test_exact_match']:.4f} (longest third of the sources "
              f"{metrics['test_exact_match_long']:.4f}), BLEU {metrics['test_bleu']:.2f}, chrF {metrics['test_chrf']:.2f}"
              f" over {len(refs)} held-out sources, {len(pairs)} references "
              f"({'beam ' + str(beam) if beam > 1 else 'greedy'})", flush=True)
        rows = [(pairs[i][0], r, h, ok) for i, r, h, ok in zip(first, refs, hyp, right)]
        for s, r, h, ok in rows[:3]:
            print(f"  {s!r} -> {h!r}" + ("" if ok else f"   (reference {' | '.join(r)!r})"), flush=True)
        table = "source\treference\toutput\tcorrect\n" + "".join(
            f"{s}\t{' | '.join(r)}\t{h}\t{str(ok).lower()}\n" for s, r, h, ok in rows[:50])
        fig = attention_figure([(src_vocab.split(pairs[i][0]), [tgt_vocab.tokens[t] for t in ids[i]] + [EOS_TOKEN],
                                 attention[i]) for i in first[:4] if attention[i].numel()],
                               f"{name}: test BLEU {metrics['test_bleu']:.1f}, exact match {metrics['test_exact_match']:.3f}")
        return Evaluation(metrics, fig, "plots/attention.png", texts={"translations.tsv": table})


def attention_figure(examples: list[tuple[list[str], list[str], torch.Tensor]], title: str):
    """One heat map per example: output tokens (rows) over source tokens (columns). Without attention (the
    no-attention twin) a note says so."""
    plt = pyplot()

    if not examples:
        fig, ax = plt.subplots(figsize=(5, 1.4), dpi=110)
        ax.axis("off")
        ax.text(0.5, 0.5, "this model has no attention (attention: none):\nevery output step reads one summary",
                ha="center", va="center", fontsize=9)
        ax.set_title(title, fontsize=9)
        return fig
    fig, axes = plt.subplots(1, len(examples), figsize=(4.2 * len(examples), 4.2), dpi=110, squeeze=False)
    for ax, (src_t, out_t, w) in zip(axes[0], examples):
        w = w[:len(out_t), :len(src_t)].numpy()
        ax.imshow(w, aspect="auto", cmap="magma", vmin=0)
        ax.set_xticks(range(len(src_t)), src_t, fontsize=7, rotation=90)
        ax.set_yticks(range(len(out_t[:len(w)])), out_t[:len(w)], fontsize=7)
        ax.set_xlabel("source")
    axes[0, 0].set_ylabel("output")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig

"""Language-model runs (next character, next word): perplexity beside the unigram and add-k bigram count
baselines, and text sampled at several temperatures. Their windows and vocabularies are tasks/data/text.py's;
the step and the served model are the supervised ones (tasks/kinds/supervised.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from tasks.data.text import Vocab
from tasks.kinds import Evaluation, Job, register_kind
from tasks.kinds.supervised import Supervised


def ngram_baselines(train_y: np.ndarray, val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                    vocab_size: int, ks=(1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)) -> dict:
    """Perplexities of the count baselines on the same targets as the network: a unigram model (add-one) and an
    add-k bigram model, k chosen on the validation split. `train_y` is every training target in order; val
    and test are (x, y) windows (the previous word of y[:, t] is x[:, t])."""
    ids = train_y.ravel()
    prev = np.concatenate([[1], ids[:-1]])  # the word before the first target is unknown: counted as <unk>
    uni = np.bincount(ids, minlength=vocab_size).astype(np.float64)
    keys, counts = np.unique(prev * vocab_size + ids, return_counts=True)  # the bigrams seen, sparse
    row = np.bincount(prev, minlength=vocab_size).astype(np.float64)

    def seen(x, y):
        q = x * vocab_size + y
        at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[at] == q, counts[at], 0).astype(np.float64)

    def unigram(y):
        p = (uni[y] + 1.0) / (uni.sum() + vocab_size)
        return float(np.exp(-np.log(p).mean()))

    def bigram(x, y, k):
        p = (seen(x, y) + k) / (row[x] + k * vocab_size)
        return float(np.exp(-np.log(p).mean()))

    vx, vy = val[0].ravel(), val[1].ravel()
    k = min(ks, key=lambda k: bigram(vx, vy, k))
    tx, ty = test[0].ravel(), test[1].ravel()
    return {"unigram_test_perplexity": unigram(ty), "bigram_test_perplexity": bigram(tx, ty, k), "bigram_k": k}


def sample_text(model, vocab: Vocab, prompt: str, length: int, temperatures: list[float], seed: int = 0) -> dict:
    """Tokens (characters or words) drawn one at a time from a language model, one stream per temperature (batched):
    each step feeds the last `vocab.max_length` ids. Lower temperature: safer, more repetitive text."""
    import torch

    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    start = vocab.ids(prompt)[-vocab.max_length:] or [1]
    ids = torch.tensor([start] * len(temperatures), device=dev)  # (K, t)
    temps = torch.tensor(temperatures, device=dev, dtype=torch.float32)[:, None]
    model.eval()
    with torch.no_grad():
        for _ in range(length):
            logits = model(ids[:, -vocab.max_length:]).float()  # (K, V), or (K, t, V) predicting at every position
            logits = logits[:, -1] if logits.dim() == 3 else logits
            logits[:, 0] = -torch.inf  # never padding
            nxt = torch.multinomial(torch.softmax(logits / temps, 1), 1, generator=gen)
            ids = torch.cat([ids, nxt], 1)
    return {t: prompt + vocab.decode(row[len(start):].tolist()) for t, row in zip(temperatures, ids.cpu())}


@register_kind
class LanguageModel(Supervised):
    name, metric, perplexity, registry = "language_model", "test_perplexity", True, "nnlab-language-model"
    lower_is_better = ("test_perplexity", "test_loss", "test_perplexity_vs_bigram", "unigram_test_perplexity")
    baselines = {"test_perplexity": "unigram_test_perplexity"}

    def after_fit(self, job: Job, result) -> None:
        super().after_fit(job, result)
        from tasks.data.text import VOCAB, Vocab

        _log_samples(job, Vocab.load(Path(job.data_dir) / VOCAB))

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        """Next-character accuracy and perplexity (exp of the mean cross-entropy) on the held-out end of the text."""
        from tasks.figures import perplexity_figure
        from tasks.kinds.supervised import predict

        test = self.test_split(final, data, device)
        logits = predict(model, test.x)
        ce = float(F.cross_entropy(logits.float(), test.y))
        metrics = {"test_accuracy": float((logits.argmax(1) == test.y).float().mean()), "test_loss": ce,
                   "test_perplexity": math.exp(ce)}
        counts = np.bincount(np.asarray(data.y_train).ravel(), minlength=final["num_classes"]) + 1.0  # add-one
        p = counts[np.asarray(data.y_test).ravel()] / counts.sum()
        metrics["unigram_test_perplexity"] = float(np.exp(-np.log(p).mean()))
        print(f"{name}: test perplexity {metrics['test_perplexity']:.3f} over {final['num_classes']} characters "
              f"(uniform guessing: {final['num_classes']}), next-character accuracy {metrics['test_accuracy']:.4f}",
              flush=True)
        fig = perplexity_figure(final["history"], f"{name}: test perplexity {metrics['test_perplexity']:.3f}")
        return Evaluation(metrics, fig, "plots/perplexity.png")


@register_kind
class WordLanguageModel(LanguageModel):
    """Next word at every position (wordlm), judged against count baselines on the same targets."""

    name, registry = "word_language_model", "nnlab-word-language-model"

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        """Perplexity per word on the held-out end of the text, beside a unigram and an add-k bigram model
        counted on the same training words and scored on the same test words."""
        from tasks.figures import perplexity_figure
        from tasks.kinds.supervised import predict
        from tasks.kinds.language import ngram_baselines

        test = self.test_split(final, data, device)
        logits = predict(model, test.x).flatten(0, 1)
        y = test.y.flatten()
        ce = float(F.cross_entropy(logits.float(), y))
        metrics = {"test_accuracy": float((logits.argmax(1) == y).float().mean()), "test_loss": ce,
                   "test_perplexity": math.exp(ce)}
        metrics |= ngram_baselines(data.y_train, (data.x_val, data.y_val), (data.x_test, data.y_test),
                                   final["num_classes"])
        metrics["test_perplexity_vs_bigram"] = metrics["test_perplexity"] / metrics["bigram_test_perplexity"]
        beats = metrics["test_perplexity"] < metrics["bigram_test_perplexity"]
        print(f"{name}: test perplexity {metrics['test_perplexity']:.1f} per word over {final['num_classes']} words "
              f"{'beats' if beats else 'does NOT beat'} the bigram's {metrics['bigram_test_perplexity']:.1f} "
              f"(add-k, k={metrics['bigram_k']}) and the unigram's {metrics['unigram_test_perplexity']:.1f}; "
              f"next-word accuracy {metrics['test_accuracy']:.4f}", flush=True)
        fig = perplexity_figure(final["history"], f"{name}: test perplexity {metrics['test_perplexity']:.1f} "
                                f"(bigram {metrics['bigram_test_perplexity']:.1f})")
        return Evaluation(metrics, fig, "plots/perplexity.png", {"nnlab.beats_bigram": str(beats).lower()})


def _log_samples(job: Job, vocab, temperatures=(0.5, 0.8, 1.2), length: int = 300, prompt: str = "The ") -> None:
    """Language models: text drawn from the trained model at a few temperatures (samples.txt)."""
    from tasks.kinds.language import sample_text

    samples = sample_text(job.model, vocab, prompt, length, list(temperatures), job.cfg.seed)
    text = "".join(f"--- temperature {t} ---\n{s}\n\n" for t, s in samples.items())
    job.run.log_text(text, "samples.txt")
    print(f"{job.name}: sample at temperature {temperatures[1]}: {samples[temperatures[1]][:160]!r}", flush=True)

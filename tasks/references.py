"""Public benchmarks nnlab recognises in a user's data, and the figures published for them.

Data preparation names the benchmark its data is (`benchmark` in the manifest: `recognise_corpus`,
`recognise_recordings`); evaluation puts the published figure for the run's architecture and score beside the run's own
(`published`): in the summary, the console and the MLflow run's tags. A run then says how far it is from what the
method reaches, not only whether it beats the trivial baseline. Loads without torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Published:
    benchmark: str  # what the figure was measured on
    metric: str  # nnlab's name of the score
    value: float
    model: str  # the kind of model that reached it
    source: str  # who reports it
    archs: tuple[str, ...] = ()  # nnlab architectures it is compared with; empty: any
    note: str = ""  # how it differs from nnlab's measure


_BENTREVETT = "public PyTorch implementations (bentrevett/pytorch-seq2seq and its reproductions)"
_TOKENIZED = "BLEU on spaCy-tokenized words; nnlab's is sacreBLEU on detokenized text (usually a little lower)"
PUBLISHED: dict[str, list[Published]] = {
    "multi30k:de-en": [
        Published("Multi30k task 1 De->En, test 2016 Flickr", "test_bleu", 35.7, "small Transformer (3+3 layers, "
                  "d 256)", _BENTREVETT, ("transformer_seq2seq",), _TOKENIZED),
        Published("Multi30k task 1 De->En, test 2016 Flickr", "test_bleu", 28.2, "GRU encoder-decoder with attention",
                  _BENTREVETT, ("seq2seq",), _TOKENIZED),
    ],
    "fsdd:unheard-speakers": [
        Published("Free Spoken Digit Dataset", "test_exact_match", 0.97, "small CNN/RNN classifiers",
                  "the dataset's usual split (recordings 0-4 of every speaker held out)", (),
                  "speakers heard in training there; here the test speakers are never heard, which is harder"),
    ],
}


def recognise_corpus(test_set: str, train_lines: int, source_lang: str, target_lang: str) -> str | None:
    """Multi30k task 1 (29,000 training lines, scored on test_2016_flickr) in the direction asked."""
    if test_set == "test_2016_flickr" and train_lines == 29_000:
        return f"multi30k:{source_lang}-{target_lang}"
    return None


def recognise_recordings(layout: str, speakers: set[str], split_by: str) -> str | None:
    """The Free Spoken Digit Dataset (its layout and speakers), split by speaker."""
    fsdd = {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}
    if layout == "fsdd" and speakers and speakers <= fsdd and split_by.startswith("speaker"):
        return "fsdd:unheard-speakers"
    return None


def published(benchmark: str | None, arch: str, measured) -> dict | None:
    """The published figure on `benchmark` for a model like `arch`, in a score the run `measured` (names), as a
    dict, or None."""
    rows = [p for p in PUBLISHED.get(benchmark or "", []) if p.metric in measured]
    mine = [p for p in rows if arch in p.archs] or [p for p in rows if not p.archs]
    return asdict(mine[0]) if mine else None


def beside(ref: dict, metrics: dict) -> str:
    """One line: the run's score beside the published one."""
    return (f"{ref['metric']} {metrics[ref['metric']]:.4g} vs published {ref['value']:g} ({ref['model']}, {ref['benchmark']}; "
            f"{ref['source']}{'; ' + ref['note'] if ref['note'] else ''})")

"""Translation (pairs, dates, numbers; seq2seq with and without attention, transformer_seq2seq; greedy and beam
decoding; BLEU) and word-level language modelling (wordlm, word_lm against count baselines)."""
import json
import uuid

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from models.registry import create_model
from models.seq2seq import BOS, EOS, Translator, decode
from tasks.config import ConfigError, DataConfig, validate
from tasks.data import DataError, load_prepared, prepare
from tasks.kinds.language import ngram_baselines
from tasks.data.pairs import TARGET_VOCAB, TEXTS, read_dates, read_numbers
from tasks.kinds.translation import ServedTranslator, grouped, outputs_as_text, scores
from tasks.data.text import VOCAB, Vocab


def tatoeba(path, rows):
    path.write_text("".join(f"{s}\t{t}\tCC-BY 2.0 (France) Attribution: tatoeba.org #{i}\n"
                            for i, (s, t) in enumerate(rows)), encoding="utf-8")
    return path


# ---------------------------------------------------------------- data

def test_dates_are_real_calendar_dates_in_many_languages_with_unseen_test_dates(tmp_path):
    corpus = read_dates(DataConfig(source="dates"))
    assert corpus.ambiguous == 0 and len(corpus.pairs) == 15_000
    assert read_dates(DataConfig(source="dates")).pairs[:50] == corpus.pairs[:50]  # the same data every time
    sources = [s for s, _ in corpus.pairs]
    assert any("März" in s for s in sources) and any("de marzo" in s for s in sources)  # German, Spanish ...
    readings = {}
    for s, t in corpus.pairs:
        readings.setdefault(s, set()).add(t)
    assert all(len(v) == 1 for v in readings.values())  # no source reads two ways
    m = prepare(DataConfig(source="dates", max_train=2000), 0, tmp_path / "d")
    texts = json.loads((tmp_path / "d" / TEXTS).read_text())
    d = load_prepared(tmp_path / "d")
    assert m["task"] == "translation" and m["text"]["tokenizer"] == "char" and m["sizes"]["train"] == 2000
    assert (d.y_train[:, 0] == BOS).all() and ((d.y_train == EOS).sum(1) == 1).all()
    target = json.loads((tmp_path / "d" / TARGET_VOCAB).read_text())["tokens"]
    train_dates = {"".join(target[i] for i in row if i > EOS) for row in d.y_train}
    assert train_dates.isdisjoint(r for _, r in texts["test"])  # held-out dates never seen in training
    assert all(len(r) == 10 and r[4] == "-" for _, r in texts["test"])


def test_numbers_are_written_in_words_and_a_bad_language_is_named():
    pairs = dict(read_numbers(DataConfig(source="numbers", number_max=100)).pairs)
    assert pairs["97"] == "siebenundneunzig" and len(pairs) == 101
    assert dict(read_numbers(DataConfig(source="numbers", language="fr", number_max=100)).pairs)["97"] == \
        "quatre-vingt-dix-sept"
    with pytest.raises(DataError, match=r"data.language: 'xx'.*allowed:.*\bde\b"):
        read_numbers(DataConfig(source="numbers", language="xx"))


def test_pairs_read_tatoebas_layout_drop_long_pairs_and_fit_vocabularies_on_training_only(tmp_path):
    rows = [(f"I see {k} cats .", f"Ich sehe {k} Katzen .") for k in range(60)]
    rows += [("word " * 60, "Wort " * 60)]  # longer than max_length: dropped and counted
    rows += [('He said "hi".', 'Er sagte "hallo".')]  # quotes are text in a TSV, not CSV quoting
    path = tatoeba(tmp_path / "deu.txt", rows)
    m = prepare(DataConfig(source="pairs", path=str(path), min_freq=1, tokenizer="word"), 0, tmp_path / "d")
    assert m["text"]["dropped_too_long"] == 1 and m["text"]["kept"] == 61 and m["text"]["tokenizer"] == "word"
    texts = json.loads((tmp_path / "d" / TEXTS).read_text())
    target = json.loads((tmp_path / "d" / TARGET_VOCAB).read_text())["tokens"]
    assert target[:4] == ["<pad>", "<unk>", "<s>", "</s>"] and "katzen" in target
    test_numbers = {r.split()[2] for _, r in texts["test"] if r.startswith("Ich sehe")}  # raw references
    assert test_numbers and not test_numbers & set(target)  # a number seen only in test is out of vocabulary

    csv_path = tmp_path / "p.csv"
    csv_path.write_text("en,de\n" + "".join(f"cat {k},Katze {k}\n" for k in range(30)))
    m = prepare(DataConfig(source="pairs", path=str(csv_path), source_column="en", target_column="de"), 0, tmp_path / "c")
    assert m["text"]["kept"] == 30
    with pytest.raises(DataError, match=r"no column 'fr'.*header is: en, de"):
        prepare(DataConfig(source="pairs", path=str(csv_path), source_column="en", target_column="fr"), 0, tmp_path / "e")
    (tmp_path / "bad.txt").write_text("one\ttwo\nonly one column\n")
    with pytest.raises(DataError, match=r"bad.txt, line 2: 1 column"):
        prepare(DataConfig(source="pairs", path=str(tmp_path / "bad.txt")), 0, tmp_path / "b")
    with pytest.raises(ConfigError, match="data.path: pairs needs"):
        validate({"data": {"source": "pairs"}, "models": {"seq2seq": {}}})


ANIMALS = ["Hund", "Katze", "Maus", "Vogel", "Pferd", "Kuh", "Ziege", "Fisch"]
ENGLISH = dict(zip(ANIMALS, ["dog", "cat", "mouse", "bird", "horse", "cow", "goat", "fish"]))


def parallel_folder(root, n_train=48, test="test_2016"):
    """Line-aligned German/English files as Multi30k lays them out; a blank German line in train, a test source
    translated two ways."""
    root.mkdir()
    rows = [(f"Der {a} sieht {k} Bäume.", f"The {ENGLISH[a]} sees {k} trees.") for k in range(12) for a in ANIMALS]
    parts = {"train": rows[:n_train], "val": rows[60:68],
             test: rows[80:86] + [(rows[80][0], "The dog looks at 10 trees."),
                                  ("Der Ziegenhund schläft.", "The goat dog sleeps.")]}
    parts["train"][5] = ("", "A line whose German side is empty.")
    for name, part in parts.items():
        for k, lang in enumerate(("de", "en")):
            (root / f"{name}.{lang}").write_text("".join(p[k] + "\n" for p in part), encoding="utf-8")
    return root


def test_a_folder_of_line_aligned_files_keeps_its_splits_and_subwords_are_deterministic(tmp_path):
    folder = parallel_folder(tmp_path / "corpus")
    cfg = DataConfig(source="pairs", path=str(folder), source_lang="de", target_lang="en", subword_vocab=120)
    m = prepare(cfg, 0, tmp_path / "a")
    t = m["text"]
    assert m["sizes"] == {"train": 47, "val": 8, "test": 8} and t["official_splits"] and t["skipped_empty_side"] == 1
    texts = json.loads((tmp_path / "a" / TEXTS).read_text())
    assert texts["test"][-1] == ["Der Ziegenhund schläft.", "The goat dog sleeps."]  # raw, as written
    src = Vocab.load(tmp_path / "a" / VOCAB)
    tgt = Vocab.load(tmp_path / "a" / TARGET_VOCAB)
    assert src.tokenizer == "subword" and tgt.tokens[:4] == ["<pad>", "<unk>", "<s>", "</s>"] and len(tgt) <= 120
    pieces = src.split("Ziegenhund")  # never seen in training: spelled out in pieces, not <unk>
    assert len(pieces) > 1 and 1 not in src.ids("Ziegenhund") and src.detokenize(pieces) == "Ziegenhund"
    assert tgt.detokenize(tgt.split("The cow sees 7 trees.")) == "The cow sees 7 trees."
    d = load_prepared(tmp_path / "a")
    assert outputs_as_text(tgt, [[int(i) for i in d.y_test[0] if i]]) == [texts["test"][0][1]]
    prepare(cfg, 0, tmp_path / "b")  # same data and seed: byte-identical prepared files
    assert {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()} == \
        {f.name: f.read_bytes() for f in (tmp_path / "b").iterdir()}
    m = prepare(cfg.model_copy(update={"max_train": 20}), 0, tmp_path / "c")
    assert m["sizes"] == {"train": 20, "val": 8, "test": 8}  # the official val and test stay whole
    assert m["benchmark"] is None  # not a corpus nnlab knows the published figures of
    (folder / "test_2017.de").write_text("Der Hund schläft.\n")
    (folder / "test_2017.en").write_text("The dog sleeps.\n")
    m = prepare(cfg.model_copy(update={"test_set": "test_2017"}), 0, tmp_path / "d")
    assert m["sizes"]["test"] == 1  # data.test_set picks one of several


def test_a_known_benchmark_gets_its_published_figure():
    from tasks.references import beside, published, recognise_corpus

    known = recognise_corpus("test_2016_flickr", 29_000, "de", "en")
    assert known == "multi30k:de-en" and recognise_corpus("test_2016_flickr", 28_000, "de", "en") is None
    gru, tf = published(known, "seq2seq", {"test_bleu"}), published(known, "transformer_seq2seq", {"test_bleu"})
    assert gru["value"] < tf["value"] and "attention" in gru["model"] and "Transformer" in tf["model"]
    assert published(known, "seq2seq", {"test_chrf"}) is None
    assert published("multi30k:en-fr", "seq2seq", {"test_bleu"}) is None
    assert beside(tf, {"test_bleu": 31.25}).startswith("test_bleu 31.25 vs published 35.7 (small Transformer")


def test_a_bad_parallel_folder_names_the_file_and_writes_nothing(tmp_path):
    folder = parallel_folder(tmp_path / "corpus")
    cfg = DataConfig(source="pairs", path=str(folder), source_lang="de", target_lang="en")
    out = tmp_path / "out"

    def fails(pattern, **change):
        with pytest.raises(DataError, match=pattern):
            prepare(cfg.model_copy(update=change), 0, out)
        assert not out.exists()

    fails(r"data.target_lang: 'fr'.*languages: de, en", target_lang="fr")
    fails(r"data.source_lang: unset.*languages: de, en", source_lang=None)
    (folder / "val.en").write_text("one\ntwo\n")
    fails(r"val.de has 8 lines and .*val.en has 2")
    (folder / "val.en").write_text("\n\n")
    fails(r"val.en: empty")
    (folder / "val.en").unlink()
    fails(r"val.en: missing")
    (folder / "test_2017.de").write_text("x\n")
    fails(r"2 test files test\*.de \(test_2016, test_2017\)")
    fails(r"data.test_set: 'test_2018' is not a test set of .*test_2016, test_2017", test_set="test_2018")
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"text {k},{k % 2}\n" for k in range(20)))
    with pytest.raises(DataError, match="subword pieces come from a model fitted on translation pairs"):
        prepare(DataConfig(source="text_csv", tokenizer="subword", path=str(tmp_path / "t.csv")), 0, out)


def test_scores_are_detokenized_against_raw_and_several_references(caplog):
    import sacrebleu

    words = Vocab(["<pad>", "<unk>", "<s>", "</s>", "ich", "sehe", "katzen", ".", ",", "ja"], "word")
    assert outputs_as_text(words, [[4, 5, 6, 7], [9, 8, 4, 5, 1]]) == ["Ich sehe katzen.", "Ja, ich sehe <unk>"]
    pairs = [["Er läuft.", "He runs."], ["Er läuft.", "He is running."], ["Sie liest.", "She reads a book."]]
    hyp, refs, first = grouped(pairs, ["He is running.", "He is running.", "She reads."])
    assert hyp == ["He is running.", "She reads."] and refs == [["He runs.", "He is running."], ["She reads a book."]]
    assert first == [0, 2]
    streams = [["He runs.", "She reads a book."], ["He is running.", None]]  # sacreBLEU's reference streams
    s = scores(hyp, refs, "test")
    assert s["test_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp, streams).score)
    assert s["test_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyp, streams).score)
    one = scores(hyp, [r[0] for r in refs], "test")  # against the first reference only: lower
    assert s["test_exact_match"] == 0.5 and one["test_exact_match"] == 0 and one["test_bleu"] < s["test_bleu"]
    with caplog.at_level("WARNING"):  # 150 outputs ending in a period: detokenized, so no "forgot to detokenize"
        hyp = outputs_as_text(words, [[4, 5, 6, 7]] * 150)
        scores(hyp, ["Ich sehe Katzen."] * 150, "test")
        scores(["ich sehe katzen ."] * 150, ["Ich sehe Katzen."] * 150, "test")  # what the warning looks like
    warned = [r for r in caplog.records if "forgot to detokenize" in r.getMessage()]
    assert len(warned) == 1  # the tokenized outputs only
    assert scores(["ich sehe katzen ."], ["Ich sehe Katzen."], "t")["t_exact_match"] == 1.0  # case, spacing aside


def test_evaluation_scores_each_distinct_source_against_all_its_references(tmp_path):
    from tasks.kinds import get_kind

    cfg = validate({"data": {"source": "pairs", "path": str(parallel_folder(tmp_path / "corpus")), "source_lang": "de",
                             "target_lang": "en", "tokenizer": "subword"}, "models": {"seq2seq": {}}})
    m = prepare(cfg.data, 0, tmp_path / "d")
    torch.manual_seed(0)
    model = create_model("seq2seq", input_shape=tuple(m["input_shape"]), num_classes=m["num_classes"],
                         vocab_size=m["vocab_size"], hidden=8, embedding_dim=8).eval()
    ev = get_kind("translation").evaluate(cfg, "s2s", model, {"normalization": m["normalization"]},
                                          load_prepared(tmp_path / "d"), tmp_path / "d", torch.device("cpu"))
    assert ev.metrics["test_sources"] == 7 and ev.metrics["test_references"] == 8
    table = ev.texts["translations.tsv"].splitlines()
    assert len(table) == 8 and "The dog sees 10 trees. | The dog looks at 10 trees." in table[1]
    assert "▁" not in ev.texts["translations.tsv"]  # outputs decoded from their pieces


def test_a_subword_translator_serves_from_its_vocabularies_alone(tmp_path, monkeypatch):
    """`nnlab translate`'s served model: the source encoded and the output decoded by the sentencepiece models
    carried in its vocabulary files (no prepared folder), printed as text."""
    prepare(DataConfig(source="pairs", path=str(parallel_folder(tmp_path / "corpus")), source_lang="de",
                       target_lang="en", tokenizer="subword"), 0, tmp_path / "d")
    src, tgt = (json.loads((tmp_path / "d" / f).read_text()) for f in (VOCAB, TARGET_VOCAB))
    assert src["tokenizer"] == "subword" and "sentencepiece_model" in tgt
    seen = []
    answer = Vocab.from_dict(tgt).ids("The dwarf cow sees 3 trees.")

    def module(x):
        seen.append(x.tolist())
        return torch.tensor([answer + [EOS, 0]] * len(x))

    import tasks.registration

    monkeypatch.setattr(tasks.registration, "extra_file", lambda uri, name: tgt if name == TARGET_VOCAB else src)
    served = ServedTranslator(module, src, {}, "runs:/x/model")
    assert served(["Der Ziegenhund sieht 3 Bäume."]) == ["The dwarf cow sees 3 trees."]
    assert seen[0][0] == Vocab.from_dict(src).ids("Der Ziegenhund sieht 3 Bäume.")


def test_translation_data_takes_encoder_decoders_only():
    with pytest.raises((ConfigError, ValueError), match="seq2seq, transformer_seq2seq"):
        validate({"data": {"source": "dates"}, "models": {"lstm": {}}})
    with pytest.raises((ConfigError, ValueError), match="translation"):
        validate({"data": {"source": "digits"}, "models": {"seq2seq": {}}})
    with pytest.raises(ConfigError, match="wordlm data makes word_language_model runs, which train: word_lm"):
        validate({"data": {"source": "wordlm"}, "models": {"lstm": {}}})
    with pytest.raises(ConfigError, match="word_lm makes word_language_model runs, from wordlm data"):
        validate({"data": {"source": "charlm"}, "models": {"word_lm": {}}})
    # params.yaml's `run` (mlp, simple_cnn) need not fit dates when --models names the runs
    from tasks.config import load_config
    from conftest import ROOT

    assert list(load_config(ROOT / "params.yaml", ["data.source=dates"], ["seq2seq"]).models) == ["seq2seq"]


# ---------------------------------------------------------------- models and decoding

@pytest.mark.parametrize("arch,options", [
    ("seq2seq", {"attention": "additive"}), ("seq2seq", {"attention": "dot", "cell": "lstm", "layers": 2}),
    ("seq2seq", {"attention": "none", "bidirectional": False}), ("transformer_seq2seq", {}),
])
def test_encoder_decoders_ignore_padding_and_decode_greedy_or_beam(arch, options):
    torch.manual_seed(0)
    m = create_model(arch, input_shape=(9,), num_classes=12, vocab_size=20, **options).eval()
    src = torch.randint(2, 20, (3, 9))
    src[0, 6:] = 0
    tgt = torch.randint(4, 12, (3, 5))
    tgt[:, 0] = BOS
    out = m(src, tgt)
    assert out.shape == (3, 5, 12) and torch.isfinite(out).all()
    wider = torch.cat([src, torch.zeros(3, 4, dtype=torch.long)], 1)  # more padding changes nothing
    assert torch.allclose(m(wider, tgt), out, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "embed" not in n)
    greedy, att = decode(m, src, 7)
    beam1, _ = decode(m, src, 7, beam_size=1)
    beam4, _ = decode(m, src, 7, beam_size=4)
    assert greedy == beam1 and len(beam4) == 3 and all(len(r) <= 7 and EOS not in r for r in beam4)
    if options.get("attention", "x") != "none":
        assert att[0].shape[1] == 9 and torch.allclose(att[0].sum(1), torch.ones(len(att[0])), atol=1e-4)
        assert att[0][:, 6:].abs().max() < 1e-6  # no weight on padding
    served = Translator(m, 7, 4)(src)
    assert served.shape == (3, 7) and [r[:len(b)] for r, b in zip(served.tolist(), beam4)] == beam4


def test_the_transformer_decodes_step_by_step_as_it_reads_the_whole_prefix():
    """The key/value cache: step t of incremental decoding gives the logits and cross-attention that the whole
    teacher-forced prefix gives at position t, padding (finished beams) included."""
    torch.manual_seed(0)
    m = create_model("transformer_seq2seq", input_shape=(9,), num_classes=12, vocab_size=20, decoder_layers=2).eval()
    src = torch.randint(2, 20, (3, 9))
    src[1, 5:] = 0
    tgt = torch.randint(4, 12, (3, 6))
    tgt[:, 0], tgt[2, 4:] = BOS, 0
    with torch.no_grad(), m.cross_attention() as seen:
        full = m(src, tgt)
    state = m.start(src)
    for t in range(1, 7):
        with torch.no_grad():
            logits, state, w = m.advance(state, tgt[:, :t])
        assert torch.allclose(logits, full[:, t - 1], atol=1e-5), t
        assert torch.allclose(w, seen[-1][:, t - 1], atol=1e-5)


def test_beam_search_finds_a_likelier_sequence_than_greedy():
    """A 2-step toy model where the greedy first choice leads to a poor second step: beam search (k=2) keeps the
    runner-up and wins on the whole sequence's probability."""
    class Toy(torch.nn.Module):
        def start(self, src):
            return {"n": torch.zeros(len(src), 1)}

        def advance(self, state, tokens):
            logits = torch.full((len(tokens), 6), -9.0)
            if tokens.shape[1] == 1:  # first token: 4 (p .55) or 5 (p .45)
                logits[:, 4], logits[:, 5] = np.log(0.55), np.log(0.45)
            elif tokens.shape[1] == 2:  # after 4: EOS .3 or 4 .35 or 5 .35 ; after 5: EOS .95
                first = tokens[:, 1]
                logits[first == 4, EOS], logits[first == 4, 4], logits[first == 4, 5] = np.log(.3), np.log(.35), np.log(.35)
                logits[first == 5, EOS] = np.log(0.95)
            else:
                logits[:, EOS] = 0.0
            return logits, state, None

    src = torch.ones(1, 3, dtype=torch.long)
    assert decode(Toy(), src, 4)[0] == [[4, 4]]
    assert decode(Toy(), src, 4, beam_size=2)[0] == [[5]]


def test_scores_use_sacrebleu():
    s = scores(["2021-03-07", "1999-12-31"], ["2021-03-07", "1999-12-30"], "test")
    assert s["test_exact_match"] == 0.5 and 0 < s["test_bleu"] < 100 and 0 < s["test_chrf"] < 100


def test_ngram_baselines_are_perplexities_over_the_same_targets():
    rng = np.random.default_rng(0)
    ids = np.tile([2, 3, 4, 5], 200)  # a deterministic cycle: a bigram model nearly knows the next word
    ids[rng.integers(0, len(ids), 20)] = 6
    win = lambda a: (a[:-1].reshape(-1, 7)[:, :7], a[1:].reshape(-1, 7))  # noqa: E731
    x, y = win(ids[:799 - 799 % 7 + 1])
    b = ngram_baselines(y[:80], (x[80:100], y[80:100]), (x[100:], y[100:]), 7)
    assert 1.0 < b["bigram_test_perplexity"] < 1.5 < b["unigram_test_perplexity"] <= 7


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_dates_seq2seq_learns_registers_and_translates(tmp_path, monkeypatch):
    """Attention seq2seq on held-out dates: >= 0.95 exact match in a short CPU run, BLEU/exact-match curves,
    sample translations and the attention heat map in its MLflow run, registered as a translator and used by
    `nnlab translate`; its no-attention twin, same data, decoder and budget, measurably worse on the longest
    sources."""
    monkeypatch.chdir(tmp_path)
    from flows.cli import app
    from tasks.stages import evaluate_stage, register_stage, train_stage
    from tasks.tracking import client, metric_history

    name = f"translator-{uuid.uuid4().hex[:6]}"
    cfg = validate({"data": {"source": "dates", "max_train": 6000},
                    "train": {"epochs": 4, "lr": 0.003, "batch_size": 128, "grad_clip": 1.0, "device": "cpu"},
                    "register": {"name": name}, "models": {"seq2seq": {"attention": "additive"},
                                                           "plain": {"arch": "seq2seq", "attention": "none"}}})
    prepare(cfg.data, 0, "d")
    trained = train_stage(cfg, "seq2seq", "d", "out")
    r = evaluate_stage(cfg, "seq2seq", "d", "out", "m.json", "p")
    assert r["test_exact_match"] >= 0.95 and r["test_bleu"] > 90, r
    em = [v for _, v in sorted(metric_history(trained.run_id, "val_exact_match"))]
    assert len(em) == 4 and em[-1] > em[0]
    arts = {a.path for a in client().list_artifacts(trained.run_id)} | \
        {a.path for a in client().list_artifacts(trained.run_id, "plots")}
    assert {"translations.tsv", "plots/attention.png"} <= arts
    out = register_stage(cfg, [r], None)
    assert out["alias"] == "champion" and out["test_bleu"] == r["test_bleu"]  # ranked on BLEU
    res = CliRunner().invoke(app, ["translate", f"models:/{name}@champion", "-t", "Sonntag, 7. März 2021",
                                   "-t", "December 24, 1999"])
    assert res.exit_code == 0, res.output
    assert [line.split("\t")[1] for line in res.output.splitlines() if "\t" in line] == ["2021-03-07", "1999-12-24"], res.output

    train_stage(cfg, "plain", "d", "out-plain")
    twin = evaluate_stage(cfg, "plain", "d", "out-plain", "m2.json", "p2")
    assert twin["test_exact_match_long"] < r["test_exact_match_long"] - 0.1, (twin, r)


@pytest.mark.slow
def test_word_lm_beats_the_bigram_baseline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tasks.stages import evaluate_stage, train_stage

    cfg = validate({"data": {"source": "wordlm"}, "train": {"epochs": 3, "lr": 0.003, "grad_clip": 0.25,
                                                            "device": "cpu"},
                    "models": {"word_lm": {"hidden": 128, "embedding_dim": 128, "tied": True}}})
    m = prepare(cfg.data, 0, "d")
    assert m["task"] == "word_language_model" and m["text"]["words"] > 50_000
    train_stage(cfg, "word_lm", "d", "out")
    r = evaluate_stage(cfg, "word_lm", "d", "out", "m.json", "p")
    assert r["test_perplexity"] < r["bigram_test_perplexity"] < r["unigram_test_perplexity"], r


# ---------------------------------------------------------------- training for real data (issue 29)

def test_label_smoothing_is_the_training_losss_only_padding_is_never_scored_or_computed():
    """train.label_smoothing smooths the teacher-forced training loss; the held-out loss stays plain
    cross-entropy; padding is ignored by both, and batches and decoding drop all-padding columns."""
    from models.seq2seq import trim
    from tasks.config import TrainConfig
    from tasks.kinds.translation import TranslationStep
    from tasks.train import Split

    torch.manual_seed(0)
    model = create_model("seq2seq", input_shape=(12,), num_classes=9, vocab_size=11, hidden=8, embedding_dim=8,
                         attention_dim=8, dropout=0.0)
    src = torch.randint(2, 11, (6, 12))
    src[:, 7:] = 0
    tgt = torch.cat([torch.full((6, 1), BOS), torch.randint(4, 9, (6, 5)), torch.full((6, 1), EOS),
                     torch.zeros(6, 3, dtype=torch.long)], 1)
    cpu = torch.device("cpu")
    plain, smooth = (TranslationStep(model, TrainConfig(label_smoothing=ls, device="cpu"), cpu) for ls in (0.0, 0.2))
    with torch.no_grad():
        out, y = plain.outputs(src, tgt)
        assert out.shape[0] == 6 * 6 and int((y != 0).sum()) == 6 * 6  # (B, 7 - 1): padding columns gone
        assert float(smooth.loss(out, y)) > float(plain.loss(out, y))
        wider = plain.outputs(torch.cat([src, torch.zeros(6, 4, dtype=torch.long)], 1), tgt)[0]
        assert torch.allclose(wider, out, atol=1e-6)
    data = Split(src, tgt)
    assert smooth.evaluate(data) == plain.evaluate(data)  # held out: plain cross-entropy for both
    assert smooth.smoothing == 0.2  # and back for training
    assert trim(src).shape == (6, 7) and trim(torch.zeros(2, 5, dtype=torch.long), 2).shape == (2, 2)
    assert decode(model, src, 8)[0] == decode(model, torch.cat([src, torch.zeros(6, 9, dtype=torch.long)], 1), 8)[0]

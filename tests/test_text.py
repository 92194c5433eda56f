"""Text sources (text_csv, imdb, charlm): tokenizer, vocabulary from the training split only, padding, the
vocabulary as a DVC output and MLflow artifact, and text classification / language modelling end to end."""
import csv
import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config import ConfigError, DataConfig, validate
from tasks.data import DataError, load_prepared, prepare
from tasks.data.text import VOCAB, Vocab, char_windows, class_names, tokenize

NNLAB = str(Path(sys.executable).parent / "nnlab")
POSITIVE = ["great", "excellent", "superb", "love", "wonderful"]
NEGATIVE = ["awful", "terrible", "boring", "hate", "dreadful"]


def write_reviews(path, n=600, seed=0, sep=","):
    """Reviews of 4-30 filler words with one or two cue words at random places; the cues decide the label
    (strings pos/neg). Filler words are drawn from 300, so many are rare: min_freq and OOV get exercised."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = [f"w{int(k)}" for k in rng.zipf(1.3, rng.integers(4, 31)) % 300]
        for _ in range(rng.integers(1, 3)):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE if label == "pos" else NEGATIVE)))
        rows.append({"review": " ".join(words).capitalize() + ".", "sentiment": label})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "sentiment"], delimiter=sep)
        w.writeheader()
        w.writerows(rows)
    return path


def text_cfg(path, **kw) -> DataConfig:
    return DataConfig(source="text_csv", path=str(path), text_column="review", label_column="sentiment", **kw)


# ---------------------------------------------------------------- tokenizer and vocabulary

def test_tokenizer_lowercases_and_splits_punctuation_and_imdb_breaks():
    assert tokenize("Don't STOP!<br />Great film, 10/10") == ["don't", "stop", "!", "great", "film", ",", "10", "/", "10"]
    assert tokenize("ab c", "char") == ["a", "b", " ", "c"]


def test_vocab_min_freq_size_cap_oov_padding_and_truncation():
    texts = ["a a a b b c", "a b d"]  # counts: a 4, b 3, c 1, d 1
    v = Vocab.fit(texts, "word", max_length=4, min_freq=2)
    assert v.tokens == ["<pad>", "<unk>", "a", "b"]
    assert Vocab.fit(texts, "word", 4, min_freq=1, max_size=4).tokens == ["<pad>", "<unk>", "a", "b"]  # cap
    assert Vocab.fit(texts, "word", 4, min_freq=1).tokens[2:] == ["a", "b", "c", "d"]  # ties: alphabetical
    ids = v.encode(["b zzz", "a a a a a a"])
    assert ids.dtype == np.int64 and ids.tolist() == [[3, 1, 0, 0], [2, 2, 2, 2]]  # OOV 1, pad 0, cut at 4
    assert v.decode(ids[0]) == "b <unk>"
    assert Vocab.from_dict(json.loads(json.dumps(v.to_dict()))).encode(["b zzz"]).tolist() == ids[:1].tolist()


def test_labels_may_be_strings_or_integers():
    assert class_names(["pos", "neg", "pos"])[1] == ["neg", "pos"]
    y, names = class_names(["10", "2", "2", "-1"])
    assert names == ["-1", "2", "10"] and y.tolist() == [2, 1, 1, 0]  # integers sort as numbers


# ---------------------------------------------------------------- text_csv

def test_text_csv_prepare_writes_ids_and_a_vocabulary_fitted_on_training_texts(tmp_path):
    csv_path = write_reviews(tmp_path / "reviews.csv")
    m = prepare(text_cfg(csv_path, max_length=16, min_freq=2), 0, tmp_path / "d")
    d = load_prepared(tmp_path / "d")
    assert m["classes"] == ["neg", "pos"] and m["input_shape"] == [16] and m["task"] == "classification"
    assert d.x_train.dtype == np.int64 and d.x_train.shape[1] == 16 and d.x_train.max() < m["vocab_size"]
    vocab = Vocab.load(tmp_path / "d" / VOCAB)
    assert len(vocab) == m["vocab_size"] and VOCAB in m["files"]  # hashed with the splits: part of the data hash
    # padding only at the end of each row, and every row holds at least one token
    nz = d.x_train != 0
    assert nz[:, 0].all() and (np.diff(nz.astype(int), axis=1) <= 0).all()
    assert 0 < m["text"]["val_oov_rate"] < 0.5 and 0 < m["text"]["truncated"] < 1


def test_vocabulary_comes_from_the_training_split_only(tmp_path):
    path = tmp_path / "t.csv"
    rows = [{"text": f"common word{'' if i < 190 else ' onlyheldout onlyheldout'}", "label": i % 2} for i in range(200)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    prepare(DataConfig(source="text_csv", path=str(path), min_freq=1, test_fraction=0.2), 0, tmp_path / "d")
    d = load_prepared(tmp_path / "d")
    vocab = Vocab.load(tmp_path / "d" / VOCAB)
    train_words = {w for row in d.x_train for w in vocab.decode(row).split()}
    assert ("onlyheldout" in vocab.index) == ("onlyheldout" in train_words)  # only if a training text had it


def test_tsv_with_integer_labels(tmp_path):
    path = write_reviews(tmp_path / "r.tsv", n=100, sep="\t")
    text = path.read_text().replace("\tpos", "\t1").replace("\tneg", "\t0")
    path.write_text(text)
    m = prepare(text_cfg(path), 0, tmp_path / "d")
    assert m["classes"] == ["0", "1"] and m["sizes"]["train"] + m["sizes"]["val"] + m["sizes"]["test"] == 100


def test_text_csv_errors_name_the_culprit(tmp_path):
    with pytest.raises(ConfigError, match="data.path: text_csv needs"):
        validate({"data": {"source": "text_csv"}})
    with pytest.raises(DataError, match="is not a file"):
        prepare(text_cfg(tmp_path / "missing.csv"), 0, tmp_path / "d")
    path = write_reviews(tmp_path / "r.csv", n=20)
    with pytest.raises(DataError, match=r"data.text_column: no column 'body'.*review, sentiment"):
        prepare(DataConfig(source="text_csv", path=str(path), text_column="body", label_column="sentiment"), 0,
                tmp_path / "d")
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_missing_or_single_labels_are_data_errors_unless_dropped(tmp_path):
    path = write_reviews(tmp_path / "r.csv", n=40)
    rows = path.read_text().splitlines()
    rows[3] = rows[3].rsplit(",", 1)[0] + ",NaN"  # a spreadsheet's empty cell; it used to become class "NaN"
    rows[7] = rows[7].rsplit(",", 1)[0] + ","
    path.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(source="text_csv", path=str(path), text_column="review", label_column="sentiment")
    with pytest.raises(DataError, match=r"r.csv: 2 of 40 rows have no label in column 'sentiment'.*lines 4, 8.*"
                                        r"data.drop_missing_labels"):
        prepare(cfg, 0, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    m = prepare(cfg.model_copy(update={"drop_missing_labels": True}), 0, tmp_path / "d")
    assert m["classes"] == ["neg", "pos"] and sum(m["sizes"].values()) == 38
    one = tmp_path / "one.csv"
    one.write_text("review,sentiment\n" + "".join(f"text {i},pos\n" for i in range(30)))
    with pytest.raises(DataError, match="'sentiment' holds 1 distinct label"):
        prepare(DataConfig(source="text_csv", path=str(one), text_column="review", label_column="sentiment"), 0,
                tmp_path / "e")


def test_only_sequence_models_take_token_ids(tmp_path):
    from tasks.networks import build

    prepare(text_cfg(write_reviews(tmp_path / "r.csv", n=60), max_length=8), 0, tmp_path / "d")
    m = load_prepared(tmp_path / "d").manifest
    with pytest.raises(ValueError, match=r"'simple_cnn' does not read token ids.*lstm.*transformer"):
        build("simple_cnn", {}, m)
    model = build("lstm", {"hidden": 8}, m)
    assert model.adapter.embed.num_embeddings == m["vocab_size"]  # vocab_size from the manifest


# ---------------------------------------------------------------- imdb

def write_imdb(root, per_class=6):
    """A tiny aclImdb/ in the archive's layout: {train,test}/{pos,neg}/<id>_<rating>.txt (+ unsup/, ignored)."""
    for split in ("train", "test"):
        for label, word, rating in (("pos", "brilliant", 9), ("neg", "dull", 2)):
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}_{rating}.txt").write_text(f"A {word} movie.<br /><br />Number {i} of {split}.")
    (root / "aclImdb" / "train" / "unsup").mkdir()
    (root / "aclImdb" / "train" / "unsup" / "0_0.txt").write_text("no label")
    return root


def test_imdb_reads_the_standard_folder_layout_with_its_official_test_split(tmp_path):
    write_imdb(tmp_path / "raw")
    m = prepare(DataConfig(source="imdb", path=str(tmp_path / "raw"), min_freq=1, val_fraction=0.34), 0,
                tmp_path / "d")
    assert m["classes"] == ["neg", "pos"] and m["sizes"]["test"] == 12 and m["sizes"]["train"] + m["sizes"]["val"] == 12
    vocab = Vocab.load(tmp_path / "d" / VOCAB)
    assert "brilliant" in vocab.index and "br" not in vocab.index  # <br /> is a line break, not a word


def test_imdb_extracts_the_archive_and_asks_before_downloading(tmp_path):
    with pytest.raises(DataError, match="data.download: true"):
        prepare(DataConfig(source="imdb", path=str(tmp_path)), 0, tmp_path / "d")
    write_imdb(tmp_path / "src", per_class=3)
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "aclImdb_v1.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "aclImdb", arcname="aclImdb")
    m = prepare(DataConfig(source="imdb", path=str(raw), min_freq=1, val_fraction=0.34), 0, tmp_path / "d")
    assert m["sizes"]["test"] == 6 and (raw / "aclImdb" / "train" / "pos" / "0_9.txt").is_file()
    assert not list(raw.glob(".extract-*"))


# ---------------------------------------------------------------- charlm

def test_char_windows_predict_the_next_character():
    ids = np.arange(1, 21)
    x, y = char_windows(ids, 5, limit=100)
    assert x.shape == (15, 5) and (y == x[:, -1] + 1).all()
    x, y = char_windows(ids, 5, limit=4)
    assert len(x) <= 4 and (y == x[:, -1] + 1).all()


def test_charlm_defaults_to_the_bundled_corpus_split_in_order(tmp_path):
    m = prepare(DataConfig(source="charlm", max_length=32, max_train=2000), 0, tmp_path / "d")
    d = load_prepared(tmp_path / "d")
    assert m["task"] == "language_model" and "pydoc_data" in m["description"] and m["text"]["characters"] > 400_000
    assert d.x_train.shape == (len(d.y_train), 32) and len(d.y_train) <= 2000 and m["num_classes"] == m["vocab_size"]
    vocab = Vocab.load(tmp_path / "d" / VOCAB)
    assert vocab.tokenizer == "char" and 60 < len(vocab) < 300 and (d.x_train > 0).all()


def test_charlm_reads_a_users_text_file(tmp_path):
    (tmp_path / "book.txt").write_text("abcdefgh" * 200)
    m = prepare(DataConfig(source="charlm", path=str(tmp_path / "book.txt"), max_length=8), 0, tmp_path / "d")
    assert m["vocab_size"] == 10  # pad, unk and 8 letters
    with pytest.raises(DataError, match="is not a text file"):
        prepare(DataConfig(source="charlm", path=str(tmp_path / "nope.txt")), 0, tmp_path / "e")


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
@pytest.mark.parametrize("arch,options", [
    ("lstm", {"hidden": 32, "embedding_dim": 32, "pooling": "mean"}),
    ("transformer", {"d_model": 32, "heads": 2, "layers": 1, "ff": 64, "dropout": 0.1}),
])
def test_lstm_and_transformer_learn_a_text_csv_task(arch, options, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tasks.stages import evaluate_stage, register_stage, train_stage
    from tasks.tracking import client

    path = write_reviews(tmp_path / "reviews.csv", n=800)
    cfg = validate({"data": {"source": "text_csv", "path": str(path), "text_column": "review",
                             "label_column": "sentiment", "max_length": 40},
                    "train": {"epochs": 8, "lr": 0.003, "device": "cpu"},
                    "register": {"name": f"text-{uuid.uuid4().hex[:6]}"}, "models": {arch: options}})
    prepare(cfg.data, 0, "d")
    trained = train_stage(cfg, arch, "d", "out")
    r = evaluate_stage(cfg, arch, "d", "out", "m.json", "p")
    assert r["test_accuracy"] >= 0.9, r
    arts = {a.path for a in client().list_artifacts(trained.run_id, "data")}
    assert "data/vocab.json" in arts  # the run records the vocabulary it was trained with

    # the registered model plus its own copy of the vocabulary classify new text
    import mlflow

    out = register_stage(cfg, [r], None)
    uri = f"models:/{cfg.register.name}/{out['version']}"
    vocab = Vocab.load(mlflow.artifacts.download_artifacts(f"{uri}/extra_files/vocab.json", dst_path=str(tmp_path / "v")))
    model = mlflow.pytorch.load_model(uri)
    probs = model(torch.as_tensor(vocab.encode(["what a wonderful superb film", "boring and dreadful stuff"])))
    assert probs.argmax(1).tolist() == [1, 0]  # classes ["neg", "pos"]
    if arch == "lstm":  # the CLI does the same from every form of reference, in the project's store
        # a user's project: no MLFLOW_TRACKING_URI, the store is ./mlruns (here: the session's store, linked)
        proj = tmp_path / "proj"
        proj.mkdir()
        (proj / "mlruns").symlink_to(Path(os.environ["MLFLOW_TRACKING_URI"][len("sqlite:///"):]).parent)
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        refs = [f"models:/{cfg.register.name}@champion", uri, f"runs:/{trained.run_id}/model", trained.run_id]
        procs = [subprocess.Popen([NNLAB, "predict", ref, "-t", "Superb, I love it", "-t", "I hate this"], cwd=proj,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for ref in refs]
        for ref, p in zip(refs, procs):
            stdout, stderr = p.communicate(timeout=180)
            assert p.returncode == 0, f"{ref}: {stderr[-2000:]}"
            assert [line.split()[0] for line in stdout.splitlines()] == ["pos", "neg"], ref
        assert not (proj / "mlflow.db").exists()  # MLflow's default store was never touched
        bad = subprocess.run([NNLAB, "predict", f"models:/{cfg.register.name}/99", "-t", "x"], cwd=proj, env=env,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "no version 99" in bad.stderr, bad.stderr


@pytest.mark.slow
def test_charlm_logs_perplexity_per_epoch_and_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tasks.stages import evaluate_stage, train_stage
    from tasks.tracking import client, metric_history

    cfg = validate({"data": {"source": "charlm", "max_length": 32, "max_train": 3000},
                    "train": {"epochs": 2, "lr": 0.003, "device": "cpu"},
                    "models": {"gru": {"hidden": 64, "embedding_dim": 16}}})
    m = prepare(cfg.data, 0, "d")
    trained = train_stage(cfg, "gru", "d", "out")
    r = evaluate_stage(cfg, "gru", "d", "out", "m.json", "p")
    ppl = [v for _, v in sorted(metric_history(trained.run_id, "val_perplexity"))]
    assert len(ppl) == 2 and ppl[1] < ppl[0] < m["vocab_size"]  # learning, and better than uniform guessing
    assert r["test_perplexity"] < m["vocab_size"] and r["test_perplexity"] == pytest.approx(np.exp(r["test_loss"]))
    text = client().download_artifacts(trained.run_id, "samples.txt", str(tmp_path))
    samples = open(text).read()
    assert samples.count("--- temperature") == 3 and len(samples) > 900


def test_example_csv_is_real_text_labelled_by_module(tmp_path):
    out = subprocess.run([NNLAB, "example-csv", str(tmp_path / "docs.csv")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    m = prepare(DataConfig(source="text_csv", path=str(tmp_path / "docs.csv")), 0, tmp_path / "d")
    assert len(m["classes"]) == 10 and "os" in m["classes"] and sum(m["sizes"].values()) > 500
    assert "directory" in Vocab.load(tmp_path / "d" / VOCAB).index  # the os docstrings' words

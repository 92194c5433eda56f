"""Translation on real data: Multi30k (task 1, text only) De->En and En->De with the GRU encoder-decoder with
additive attention (`seq2seq`) and the transformer (`transformer_seq2seq`), trained and evaluated through the
pipeline's own stages (prepare_stage, train_stage, evaluate_stage: the kind's step, per-epoch validation BLEU,
selection of the best epoch, MLflow run, checkpoint), test BLEU/chrF (sacrebleu) beside the published figures.

    .venv/bin/python benchmarks/translation_multi30k.py [--data ../shared/data/multi30k] [--pairs de-en,en-de]
        [--models gru,transformer] [--epochs N] [--max-train N] [--beam 5] [--work DIR] [--out FILE] [--dry-run]
        [--set key=value ...]

Data: `data.source: pairs` on the folder (train.<lang>, val.<lang>, test_2016_flickr.<lang>: the official
splits; `data.source_lang`/`data.target_lang`), sentencepiece subwords per side (`data.tokenizer: subword`,
`data.subword_vocab`). The settings (RECIPES) are set beforehand, not tuned: label smoothing 0.1, the transformer
on the warm-up / inverse-square-root schedule; the one choice made on data is the epoch whose weights are kept,
by validation BLEU (greedy; `train.early_stopping.monitor: val_bleu`, restore_best); test (beam search) is read once.
Sized for 60 minutes a run on 2 CPU cores. Batches hold sentences of like length (`train.length_pool`, the
trainer's bucketing): on 6,000 pairs, one transformer epoch (d 256, 3+3 layers, 2 threads) took 42 s against 87 s
in plain shuffled batches, whose padding the model computes too. --epochs scales it, and the table prints seconds
per epoch.

Everything it writes goes to --work (default /tmp/nnlab-multi30k): the prepared data, its own MLflow store
(sqlite), checkpoints. Run the same command again after a kill and each unfinished run resumes from its last
epoch (train_stage's checkpoint); finished runs train again (a new MLflow run). --dry-run prints the commands
and the resolved params of each run and trains nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Model sizes, batch, lr and epochs per model. 29,000 pairs in batches of 128: 227 optimizer steps an epoch.
RECIPES = {
    "gru": {  # Bahdanau et al. 2015, narrowed to fit (256/256 wide: 19.3 CPU-minutes an epoch at 7,250 subwords)
        "model": {"arch": "seq2seq", "cell": "gru", "attention": "additive", "bidirectional": True,
                  "embedding_dim": 128, "hidden": 192, "attention_dim": 128, "dropout": 0.3},
        "train": {"epochs": 8, "batch_size": 128, "lr": 1e-3, "grad_clip": 1.0, "label_smoothing": 0.1},
    },
    "transformer": {  # the small Transformer of the public Multi30k results: 3+3 layers of 256, feed-forward 512
        "model": {"arch": "transformer_seq2seq", "d_model": 256, "heads": 4, "encoder_layers": 3,
                  "decoder_layers": 3, "ff": 512, "dropout": 0.1},
        "train": {"epochs": 12, "batch_size": 128, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 1e-4,
                  "grad_clip": 1.0, "label_smoothing": 0.1, "schedule": "warmup", "warmup_steps": 300},
    },
}
SELECTION = {"enabled": True, "monitor": "val_bleu", "patience": 100, "restore_best": True}  # selection only


def run_config(data: Path, src: str, tgt: str, model: str, args) -> dict:
    """The params of one run, as `nnlab run` would read them (a params file's sections)."""
    recipe = RECIPES[model]
    train = {**recipe["train"], "early_stopping": SELECTION, "device": args.device}
    if args.epochs:
        train["epochs"] = args.epochs
    data_cfg = {"source": "pairs", "path": str(data), "source_lang": src, "target_lang": tgt,
                "tokenizer": "subword", "subword_vocab": args.subword_vocab}
    if args.max_train:
        data_cfg["max_train"] = args.max_train
    name = f"{model}_{src}{tgt}"
    from tasks.config import apply_sets

    sets = [s.replace("models.MODEL.", f"models.{name}.") for s in args.sets]
    return {"name": name, **apply_sets({"data": data_cfg, "train": train,
                                        "models": {name: {**recipe["model"], "beam_size": args.beam}},
                                        "register": {"enabled": False}, "seed": args.seed}, sets)}


def nnlab_command(p: dict) -> str:
    """The equivalent `nnlab run` (the Prefect flow, DVC-tracked data and registration on top)."""
    def flat(prefix: str, d: dict) -> list[str]:
        return [s for k, v in d.items() if v is not None
                for s in (flat(f"{prefix}.{k}", v) if isinstance(v, dict)
                          else [f"{prefix}.{k}={json.dumps(v).strip(chr(34))}"])]

    sets = flat("data", p["data"]) + flat("train", p["train"]) + flat(f"models.{p['name']}", p["models"][p["name"]])
    return f"nnlab run --models {p['name']} --set seed={p['seed']} --set register.enabled=false" + \
        "".join(f" --set {shlex.quote(s)}" for s in sets)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    p.add_argument("--pairs", default="de-en,en-de")
    p.add_argument("--models", default="gru,transformer")
    p.add_argument("--epochs", type=int, default=None, help="override each recipe's epochs")
    p.add_argument("--max-train", type=int, default=None, help="a subset of the training pairs (timing)")
    p.add_argument("--subword-vocab", type=int, default=4000, help="sentencepiece pieces per side")
    p.add_argument("--beam", type=int, default=5, help="test decoding (validation selection is greedy)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/nnlab-multi30k"))
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="params override, as nnlab --set (models.MODEL.<option> for each run's model)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    data, out = args.data.resolve(), args.out.resolve() if args.out else None
    if not (data / "train.de").is_file():
        sys.exit(f"{data}: no Multi30k here (train.de, train.en, val.*, test_2016_flickr.*); pass --data")
    command = " ".join([".venv/bin/python", "benchmarks/translation_multi30k.py", *map(shlex.quote, sys.argv[1:])])
    print(f"command: {command}", flush=True)
    runs = [run_config(data, *pair.split("-"), model, args)
            for pair in args.pairs.split(",") for model in args.models.split(",")]
    if args.dry_run:
        from tasks.config import validate

        for r in runs:
            validate({k: v for k, v in r.items() if k != "name"})  # what the run would refuse, refused now
            print(f"\n{r['name']}: {nnlab_command(r)}\n{json.dumps(r, indent=1)}")
        return []
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.work.resolve() / 'mlflow.db'}")
    os.chdir(args.work)  # checkpoints, data/, metrics/, plots/ of the stages: here, never the project's
    rows = [train_and_evaluate(r) for r in runs]
    print_table(rows, command)
    from benchmarks.real_data import record

    for r in rows if not args.max_train else []:  # a subset is a timing, not the benchmark
        record(" ".join(["translation", r["run"], *args.sets]), [docs_row(r, command)])
    if out:
        out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def train_and_evaluate(params: dict) -> dict:
    from tasks.config import validate
    from tasks.stages import evaluate_stage, prepare_stage, train_stage

    name, d = params["name"], params["data"]
    cfg = validate({k: v for k, v in params.items() if k != "name"})
    key = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]  # other data: another folder
    data_dir = Path(f"data/{d['source_lang']}{d['target_lang']}-{key}")
    print(f"\n{name}: {nnlab_command(params)}", flush=True)
    if not (data_dir / "manifest.json").is_file():
        prepare_stage(cfg, data_dir)
    t0 = time.perf_counter()
    trained = train_stage(cfg, name, data_dir, f"out/{name}")
    minutes = (time.perf_counter() - t0) / 60
    r = evaluate_stage(cfg, name, data_dir, f"out/{name}", f"metrics/{name}.json", f"plots/{name}",
                       f"evaluate/{name}.json")
    from tasks.tracking import client, metric_history

    seconds = json.loads(Path(f"out/{name}/run.json").read_text())["seconds"]  # the epochs' own, no decoding
    val_bleu = dict(metric_history(trained.run_id, "val_bleu"))
    best_epoch = int(client().get_run(trained.run_id).data.metrics["best_epoch"])
    return {"run": name, "model": params["models"][name]["arch"], "source": d["source_lang"],
            "target": d["target_lang"], "test_bleu": round(r["test_bleu"], 2), "test_chrf": round(r["test_chrf"], 2),
            "epochs": trained.epochs, "best_epoch": best_epoch, "best_val_bleu": val_bleu.get(best_epoch),
            "train_minutes": round(minutes, 1), "seconds_per_epoch": round(seconds / max(1, trained.epochs), 1),
            "run_id": trained.run_id, "train_pairs": json.loads((data_dir / "manifest.json").read_text())["sizes"]["train"],
            "published": published(r.get("reference"))}


def published(ref: dict | None) -> str:
    """The figure tasks/references.py knows for this benchmark and model (what the run's summary holds)."""
    return f"{ref['value']:g} ({ref['model']}; {ref['source']})" if ref else "none published"


def docs_row(r: dict, command: str) -> dict:
    family = {"seq2seq": "GRU encoder-decoder, attention", "transformer_seq2seq": "Transformer"}[r["model"]]
    return {"family": family, "data": f"Multi30k {r['source']}->{r['target']}, test 2016 Flickr "
                                      f"({r['train_pairs']:,} training pairs)",
            "nnlab": f"BLEU {r['test_bleu']:.1f}, chrF {r['test_chrf']:.1f}", "published": r["published"],
            "training": f"{r['train_minutes']:.0f} min, {r['epochs']} epochs", "command": f"`{command}`"}


def print_table(rows: list[dict], command: str) -> None:
    print(f"\nMulti30k test 2016 (1,000 sentences), sacrebleu 13a; {command}")
    print(f"{'run':16s} {'BLEU':>6s} {'chrF':>6s} {'epochs':>6s} {'best':>4s} {'val BLEU':>8s} {'minutes':>7s} "
          f"{'s/epoch':>7s}  published test BLEU")
    for r in rows:
        print(f"{r['run']:16s} {r['test_bleu']:6.2f} {r['test_chrf']:6.2f} {r['epochs']:6d} {r['best_epoch']:4d} "
              f"{r['best_val_bleu'] or 0:8.2f} {r['train_minutes']:7.1f} {r['seconds_per_epoch']:7.1f}  "
              f"{r['published']}")


if __name__ == "__main__":
    main()

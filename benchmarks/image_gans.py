"""Image GANs a person would keep: CycleGAN between scikit-learn's digits and MNIST (does the digit survive the
translation?) and StyleGAN on colour_digits beside DCGAN on the same data (do the samples read as digits?), each
trained and evaluated through the pipeline's own stages with params.yaml's shipped settings.

    .venv/bin/python benchmarks/image_gans.py cyclegan [--set key=value ...] [--keep DIR] [--out FILE]
    .venv/bin/python benchmarks/image_gans.py stylegan [--models stylegan,dcgan] [--set ...]

cyclegan: `data.source=unpaired` (data.domains digits_mnist: 8x8 sklearn digits upscaled <-> MNIST); the figure
is `class_agreement`, the share of translated sklearn test digits in which a classifier trained only on MNIST reads
the source digit (goal 0.85), and `class_agreement_ba`, the reverse direction read by a classifier of sklearn
digits; beside both, the same classifier on the untranslated images. `--set models.cyclegan.lambda_semantic=1`
is CyCADA's semantic consistency (a frozen classifier of the sklearn digits) for the with/without comparison.
stylegan: `data.source=colour_digits`; `confident_share` (samples the data's own classifier gives >= 0.9 to one
class; goal 0.8), `classifier_fid` (goal: within 2x DCGAN's on the same data), and StyleGAN's mixing metrics
(class follows the coarse source >= 0.8, colour the fine source >= 0.9).

Everything goes to --keep (or a temporary folder): prepared data, the MLflow store, checkpoints. Rows are
recorded in benchmarks/real_data.json and docs/models.md (benchmarks/real_data.py) unless --no-record.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCES = {"cyclegan": "unpaired", "stylegan": "colour_digits"}
GOALS = {"cyclegan": {"class_agreement": 0.85, "train_minutes": 10},
         "stylegan": {"confident_share": 0.8, "fid_ratio_to_dcgan": 2.0, "mixing_class_follows_coarse": 0.8,
                      "mixing_colour_follows_fine": 0.9, "train_minutes": 20}}
SHOWN = {"cyclegan": ("class_agreement", "untranslated_agreement", "target_accuracy", "class_agreement_ba",
                      "untranslated_agreement_ba", "source_accuracy", "classifier_fid", "cycle_l1_a"),
         "stylegan": ("confident_share", "classifier_fid", "class_coverage", "mixing_class_follows_coarse",
                      "mixing_colour_follows_fine")}


def one_run(model: str, source: str, sets: list[str], work: Path) -> dict:
    """prepare -> train_stage -> evaluate_stage with params.yaml's settings for `model` and the overrides."""
    from tasks.config import load_config
    from tasks.data import prepare
    from tasks.stages import evaluate_stage, train_stage

    cfg = load_config(ROOT / "params.yaml", [f"data.source={source}", "register.enabled=false", *sets], [model])
    data = work / f"data-{source}"
    if not (data / "manifest.json").is_file():
        prepare(cfg.data, cfg.seed, data)
    t0 = time.perf_counter()
    trained = train_stage(cfg, model, data, work / f"out-{model}")
    minutes = (time.perf_counter() - t0) / 60
    r = evaluate_stage(cfg, model, data, work / f"out-{model}", work / f"metrics-{model}.json",
                       work / f"plots-{model}", work / f"evaluate-{model}.json")
    return {"model": model, "source": source, "epochs": trained.epochs, "train_minutes": round(minutes, 1),
            "run_id": trained.run_id, "plots": str(work / f"plots-{model}"),
            **{k: round(float(v), 4) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}


def docs_rows(bench: str, rows: list[dict], command: str) -> list[dict]:
    if bench == "cyclegan":
        r = rows[0]
        return [{"family": "CycleGAN", "data": "scikit-learn digits (8x8, upscaled) <-> MNIST (mnist5k), unpaired",
                 "nnlab": f"MNIST classifier reads the source digit in {r['class_agreement']:.1%} of translations "
                          f"(untranslated {r['untranslated_agreement']:.1%}); reverse {r['class_agreement_ba']:.1%} "
                          f"(untranslated {r['untranslated_agreement_ba']:.1%})",
                 "published": "none on this pair (goal here 85%)",
                 "training": f"{r['train_minutes']:.0f} min, {int(r['epochs'])} epochs", "command": f"`{command}`"}]
    dcgan = next((r for r in rows if r["model"] == "dcgan"), None)
    out = []
    for r in rows:
        ratio = f", {r['classifier_fid'] / dcgan['classifier_fid']:.1f}x DCGAN's" if dcgan and r is not dcgan else ""
        mixing = (f"; class follows the coarse source {r['mixing_class_follows_coarse']:.0%}, colour the fine "
                  f"{r['mixing_colour_follows_fine']:.0%}" if "mixing_class_follows_coarse" in r else "")
        out.append({"family": r["model"], "data": "colour_digits (MNIST digits inked in 6 colours by nnlab)",
                    "nnlab": f"{r['confident_share']:.0%} of samples read as a digit (p >= 0.9), classifier FID "
                             f"{r['classifier_fid']:.1f}{ratio}{mixing}",
                    "published": "none (goal here: 80% read, FID within 2x DCGAN)",
                    "training": f"{r['train_minutes']:.0f} min, {int(r['epochs'])} epochs", "command": f"`{command}`"})
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", choices=sorted(SOURCES))
    p.add_argument("--models", default=None, help="default: cyclegan; stylegan,dcgan")
    p.add_argument("--set", dest="sets", action="append", default=[], help="params override, as nnlab --set")
    p.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--no-record", action="store_true", help="leave benchmarks/real_data.json and the docs alone")
    args = p.parse_args(argv)
    models = (args.models or {"cyclegan": "cyclegan", "stylegan": "stylegan,dcgan"}[args.bench]).split(",")
    command = " ".join([".venv/bin/python", "benchmarks/image_gans.py", *sys.argv[1:]])
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.keep.resolve())) if args.keep else
          tempfile.TemporaryDirectory(prefix="nnlab-gans-")) as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.chdir(tmp)
        import torch

        print(f"{args.bench}: {', '.join(models)}; torch threads {torch.get_num_threads()}; overrides: "
              f"{' '.join(args.sets) or 'none'}", flush=True)
        rows = [one_run(m, SOURCES[args.bench], args.sets, Path(tmp)) for m in models]
    print(f"\n{command}\ngoal: {GOALS[args.bench]}")
    for r in rows:
        print(f"{r['model']:10s} " + "  ".join(f"{k} {r[k]:.4g}" for k in SHOWN[args.bench] if k in r)
              + f"  training {r['train_minutes']} min, {r['epochs']} epochs")
    if not args.no_record:
        from benchmarks.real_data import record

        record(" ".join(["gan", args.bench, *args.sets]), docs_rows(args.bench, rows, command))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

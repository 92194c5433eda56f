"""Speaker-independent digit recognition on real recordings: leave-one-speaker-out over the Free Spoken Digit
Dataset, through the pipeline (issue 29).

    .venv/bin/python benchmarks/speech_fsdd.py [FOLDER] [--speakers george,jackson] [--set key=value ...]
        [--models ctc_asr] [--sim-to-real] [--out FILE]

FOLDER (default ../shared/data/fsdd) holds `<digit>_<speaker>_<n>.wav`. Each fold is what
`nnlab run --models ctc_asr --set data.source=speech --set data.path=FOLDER --set data.test_speakers=[S]` does:
params.yaml's settings, `prepare`, `train_stage` and `evaluate_stage` (the stages `nnlab run` calls), in a
temporary folder with a temporary MLflow store. Speaker S is the test split, never heard; the others train
(validation: a slice of their recordings). Printed per fold and over the folds (mean, worst): exact match (the
share of recordings transcribed exactly: here the digit's word), CER, WER and training seconds.

--sim-to-real trains once on synthetic voices only (data.source=synth_speech, params.yaml's settings, no real
recording) and transcribes every real recording with it, through the served model (`nnlab transcribe`'s path).
`--set data.mix_synth=N` adds N eSpeak NG utterances (synth_speech's digit strings) to each fold's training
split. Run it with OMP_NUM_THREADS=1 on a shared 2-core machine (a second thread there only spins).

The reference: the issue's goal is a mean exact match >= 0.95 with at most 10 minutes of training per fold on 2
cores; the usual FSDD split (recordings 0-4 of every speaker as test, the speakers heard in training) gives
> 97% with small CNN/RNN models.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL = {"mean_exact_match": 0.95, "train_seconds_per_fold": 600}


def fold(folder: Path, speaker: str, sets: list[str], model: str, tmp: Path) -> dict:
    """One leave-one-speaker-out fold through prepare, train_stage and evaluate_stage."""
    from tasks.config import load_config
    from tasks.data import prepare
    from tasks.stages import evaluate_stage, train_stage

    cfg = load_config(ROOT / "params.yaml", ["data.source=speech", f"data.path={folder}",
                                             f"data.test_speakers=[{speaker}]", "register.enabled=false",
                                             *sets], [model])
    work = tmp / speaker
    t0 = time.perf_counter()
    m = prepare(cfg.data, cfg.seed, work / "data")
    prepared = time.perf_counter() - t0
    t0 = time.perf_counter()
    trained = train_stage(cfg, model, work / "data", work / "train")
    train_s = time.perf_counter() - t0
    r = evaluate_stage(cfg, model, work / "data", work / "train", work / "m.json", work / "plots", work / "s.json")
    return {"speaker": speaker, "exact_match": r["test_exact_match"], "cer": r["test_cer"], "wer": r["test_wer"],
            "baseline_wer": r["baseline_test_wer"], "train_seconds": round(train_s, 1), "epochs": trained.epochs,
            "prepare_seconds": round(prepared, 1), "train_recordings": m["sizes"]["train"],
            "test_recordings": m["sizes"]["test"]}


def sim_to_real(folder: Path, sets: list[str], model: str, tmp: Path) -> dict:
    """Trained on synth_speech (params.yaml's settings) only; every real recording transcribed by the served
    model, as `nnlab transcribe` would."""
    from tasks.config import load_config
    from tasks.data import prepare
    from tasks.kinds.speech import scores
    from tasks.serving import load_serving
    from tasks.stages import train_stage
    from tasks.data.audio import DIGITS

    cfg = load_config(ROOT / "params.yaml", ["data.source=synth_speech", "register.enabled=false", *sets], [model])
    prepare(cfg.data, cfg.seed, tmp / "synth")
    t0 = time.perf_counter()
    trained = train_stage(cfg, model, tmp / "synth", tmp / "synth_train")
    train_s = time.perf_counter() - t0
    served = load_serving(trained.run_id)
    files = sorted(folder.glob("*.wav"))
    refs = [DIGITS[int(re.match(r"(\d)_", f.name)[1])] for f in files]
    hyp = served(files, beam=1)
    s = scores(hyp, refs, "real")
    return {"exact_match": s["real_exact_match"], "cer": s["real_cer"], "wer": s["real_wer"],
            "train_seconds": round(train_s, 1), "recordings": len(files)}


def docs_row(out: dict, model: str, command: str) -> dict:
    rows = out["folds"]
    each = ", ".join(f"{r['speaker']} {r['exact_match']:.2f}" for r in rows)
    return {"family": f"CTC ({model})", "data": f"FSDD, leave one speaker out ({len(rows)} folds, "
                                               f"{rows[0]['train_recordings']:,} training recordings a fold)",
            "nnlab": f"exact match {out['mean_exact_match']:.3f} mean, {out['worst_exact_match']:.3f} worst ({each})",
            "published": "0.97+ with the speakers heard (the usual split); goal here 0.95",
            "training": f"{out['max_train_seconds'] / 60:.0f} min a fold at most", "command": f"`{command}`"}


def _fresh(folder: Path) -> Path:
    folder = folder.resolve()
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"--keep {folder}: not empty; name a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd")
    p.add_argument("--speakers", default=None, help="folds to run (default: every speaker)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="params override, as nnlab --set")
    p.add_argument("--models", default="ctc_asr")
    p.add_argument("--sim-to-real", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (prepared data, models, "
                   "the MLflow store); default: a temporary folder, removed")
    args = p.parse_args(argv)
    folder = args.folder.resolve()
    speakers = args.speakers.split(",") if args.speakers else sorted(
        {m[1] for f in folder.glob("*.wav") if (m := re.fullmatch(r"\d_(.+)_\d+", f.stem))})
    out: dict = {"folder": str(folder), "sets": args.sets, "goal": GOAL}
    with (contextlib.nullcontext(str(_fresh(args.keep))) if args.keep else
          tempfile.TemporaryDirectory(prefix="nnlab-fsdd-")) as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.chdir(tmp)  # the stages' default paths (data/, metrics/) land in the temporary folder
        import torch

        print(f"{folder}: leave-one-speaker-out over {', '.join(speakers)}; {args.models}; torch threads "
              f"{torch.get_num_threads()}; overrides: {' '.join(args.sets) or 'none'}", flush=True)
        if args.sim_to_real:
            out["sim_to_real"] = r = sim_to_real(folder, args.sets, args.models, Path(tmp))
            print(f"sim-to-real (synth_speech only -> {r['recordings']} real recordings): exact match "
                  f"{r['exact_match']:.3f}, CER {r['cer']:.3f}, WER {r['wer']:.3f}, training {r['train_seconds']} s",
                  flush=True)
        else:
            out["folds"] = rows = []
            for speaker in speakers:
                rows.append(fold(folder, speaker, args.sets, args.models, Path(tmp)))
                r = rows[-1]
                print(f"fold {speaker:10s} exact match {r['exact_match']:.3f}  CER {r['cer']:.3f}  WER {r['wer']:.3f}"
                      f"  (most common word: WER {r['baseline_wer']:.3f})  training {r['train_seconds']:.0f} s, "
                      f"{r['epochs']} epochs, {r['train_recordings']} training recordings", flush=True)
            em = [r["exact_match"] for r in rows]
            out["mean_exact_match"], out["worst_exact_match"] = statistics.mean(em), min(em)
            out["mean_cer"] = statistics.mean(r["cer"] for r in rows)
            out["mean_wer"] = statistics.mean(r["wer"] for r in rows)
            out["max_train_seconds"] = max(r["train_seconds"] for r in rows)
            print(f"mean exact match {out['mean_exact_match']:.3f} (worst {out['worst_exact_match']:.3f}), CER "
                  f"{out['mean_cer']:.3f}, WER {out['mean_wer']:.3f}; training at most {out['max_train_seconds']:.0f} "
                  f"s a fold. Goal: mean exact match >= {GOAL['mean_exact_match']}, <= {GOAL['train_seconds_per_fold']}"
                  " s a fold on 2 cores; heard speakers (the usual split): > 0.97", flush=True)
    command = " ".join([".venv/bin/python", "benchmarks/speech_fsdd.py", *sys.argv[1:]])
    if "folds" in out and not args.speakers:  # every speaker held out once: the docs' row
        from benchmarks.real_data import record

        record(" ".join(["speech fsdd", args.models, *args.sets]), [docs_row(out, args.models, command)])
    elif "sim_to_real" in out:
        from benchmarks.real_data import record

        r = out["sim_to_real"]
        record(" ".join(["speech fsdd", args.models, "sim-to-real", *args.sets]), [{
            "family": f"CTC ({args.models}), trained on eSpeak NG voices only",
            "data": f"FSDD, all {r['recordings']:,} real recordings", "nnlab": f"exact match {r['exact_match']:.3f}, "
            f"CER {r['cer']:.3f}", "published": "none (sim-to-real transfer)",
            "training": f"{r['train_seconds'] / 60:.0f} min", "command": f"`{command}`"}])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()

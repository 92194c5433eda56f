"""The experiment flow: prepare -> train each architecture -> evaluate -> register.

Thin Prefect wrappers around tasks.stages; the same functions `dvc repro` runs stage by stage.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.config import Config, load_config, select_models
from tasks.data import PROCESSED
from tasks.descriptions import overrides_tag
from tasks.dvc import commit, ensure_data
from tasks.files import StoreWriteError, atomic_path, write_json
from tasks.phases import mark
from tasks.stages import evaluate_stage, publish_for_dvc, register_stage, train_stage

RUNS = Path(".nnlab/runs")  # the flow's train/evaluate outputs; DVC's own live under data/train and metrics/


class ExperimentFailed(RuntimeError):
    def __init__(self, summary: dict):
        failed = ", ".join(f"{f['name']} ({f['error']})" for f in summary["failed"])
        super().__init__(f"{len(summary['failed'])} architecture(s) failed: {failed}")
        self.summary = summary


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(cfg: Config) -> tuple[str, dict]:
    path, facts = ensure_data(cfg)
    return str(path), facts


@task(name="train", cache_policy=NO_CACHE, task_run_name="train-{name}")
def train(cfg: Config, name: str, data_dir: str, tags: dict) -> dict:
    trained = train_stage(cfg, name, data_dir, RUNS / name / "train", extra_tags={**tags, **prefect_ids()})
    link_mlflow_run(trained.run_id, name)
    return vars(trained)


def prefect_ids() -> dict[str, str]:
    """Tags that lead from an MLflow run back to the Prefect flow run and task run that trained it."""
    from prefect.runtime import flow_run, task_run

    return {k: str(v) for k, v in {"nnlab.prefect_flow_run_id": flow_run.id, "nnlab.prefect_task_run_id": task_run.id,
                                   "nnlab.prefect_flow_run": flow_run.name}.items() if v}


def link_mlflow_run(run_id: str, name: str) -> None:
    """A link artifact on this Prefect task run to its MLflow run (the Prefect UI's Artifacts tab), in the MLflow UI
    that serves the store: a tracking server's own, else `nnlab ui`'s."""
    from prefect.artifacts import create_link_artifact

    from tasks.tracking import client, tracking_uri

    uri = tracking_uri()
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else nnlab_ui_address()
    try:
        experiment = client().get_run(run_id).info.experiment_id
        create_link_artifact(f"{ui}/#/experiments/{experiment}/runs/{run_id}", link_text=f"MLflow run {run_id}",
                             description=f"{name}'s MLflow run (metrics, model, figures); open with `nnlab ui`")
    except Exception as e:  # the link is a convenience: never fail a trained run over it
        print(f"{name}: no Prefect link to MLflow run {run_id} ({type(e).__name__})", flush=True)


def nnlab_ui_address() -> str:
    """http://HOST:PORT of `nnlab ui` as it starts without options: its own defaults, read off the command."""
    import inspect

    from flows.admin import ui

    options = inspect.signature(ui).parameters
    return f"http://{options['host'].default}:{options['port'].default}"


@task(name="evaluate", cache_policy=NO_CACHE, task_run_name="evaluate-{name}")
def evaluate(cfg: Config, name: str, data_dir: str, publish: bool = False) -> dict:
    d = RUNS / name
    summary = evaluate_stage(cfg, name, data_dir, d / "train", d / "metrics.json", d / "plots", d / "evaluation.json")
    if publish:
        publish_for_dvc(name, d)
    return summary


@task(name="register", cache_policy=NO_CACHE)
def register(cfg: Config, results: list[dict]) -> dict:
    return register_stage(cfg, results, out_path=None)


def dvc_stage_runs(params: str, sets: list[str] | None, facts: dict) -> list[str]:
    """The runs whose train and evaluate stages this flow computes as `dvc repro` would (dvc.yaml's foreach over
    params.yaml's `run`): all of them for params.yaml as it is on DVC's data, else none."""
    if sets or facts.get("nnlab.data_source") != "dvc" or Path(params).resolve() != Path("params.yaml").resolve():
        return []
    return load_config(params).runs()


@task(name="record-in-dvc", cache_policy=NO_CACHE)
def record_in_dvc(runs: list[str], results: list[dict], registered: dict | None) -> list[str]:
    """The stages' outputs where dvc.yaml declares them (data/train/<name>, data/evaluate/<name>.json, and with
    every run of `runs` trained and registered, data/register.json; `evaluate` published metrics and plots), then
    `dvc commit` records them in dvc.lock: `dvc status` is clean and `dvc repro` re-runs nothing. Returns the
    stages recorded."""
    import shutil
    import sys

    names = [r["name"] for r in results if r["name"] in runs]
    for name in names:
        dst, tmp = Path("data/train") / name, Path("data/train") / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(RUNS / name / "train", tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
        with atomic_path(Path("data/evaluate") / f"{name}.json") as out:  # the whole summary register reads
            shutil.copyfile(RUNS / name / "evaluation.json", out)
    stages = [f"{stage}@{name}" for name in names for stage in ("train", "evaluate")]
    if registered is not None and {r["name"] for r in results} == set(runs):
        write_json("data/register.json", registered)  # what `nnlab stage register` writes
        stages.append("register")
    try:
        commit(*stages)
    except RuntimeError as e:  # DVC failed or its lock stayed taken (DvcLockTimeout): the runs are tracked anyway
        print(f"dvc.lock not updated ({e}); record the outputs with `dvc commit -f {' '.join(stages)}`",
              file=sys.stderr, flush=True)
        return []
    return stages


def _flow_run_name() -> str:
    """`nnlab run · mlp, simple_cnn · train.epochs=3`: what this flow run trains, told apart in Prefect's UI."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return " · ".join(["nnlab run", ", ".join(p.get("models") or []) or "params.yaml's run", *(p.get("sets") or [])])


@flow(name="nnlab-experiment", log_prints=False, flow_run_name=_flow_run_name)
def experiment(params: str = "params.yaml", sets: list[str] | None = None, models: list[str] | None = None) -> dict:
    mark("flow started")
    cfg = load_config(params, sets or [], models)
    cfg = cfg if models else select_models(cfg, cfg.runs())  # params.yaml's `run` unless told which
    data_dir, facts = prepare_data(cfg)
    run_tags = {**facts, **overrides_tag(sets)}  # the --set overrides: what the MLflow run names show
    # params.yaml as it is, on DVC's data: this flow computes what `dvc repro` would, and records it in dvc.lock
    dvc_runs = dvc_stage_runs(params, sets, facts)
    stage_cfg = load_config(params) if dvc_runs else cfg  # as `nnlab stage` reads it: the same params, outputs
    results, failed = [], []
    for name in cfg.models:  # one after another: two trainings would fight over 2 cores and the global RNG
        try:
            results.append(train_and_evaluate(stage_cfg if name in dvc_runs else cfg, name, data_dir, run_tags,
                                              name in dvc_runs))
        except StoreWriteError:  # a full or read-only disk fails every architecture alike: stop, say it once
            raise
        except Exception as e:  # one failing architecture never loses the others
            failed.append({"name": name, "error": str(e)})
    registered = register(cfg, results) if results and cfg.register.enabled else None
    if dvc_runs and results:
        record_in_dvc(dvc_runs, results, None if failed else registered)
    summary = {"results": results, "failed": failed, "registered": registered, "data_dir": data_dir, **facts}
    if failed:
        raise ExperimentFailed(summary)
    return summary


def train_and_evaluate(cfg: Config, name: str, data_dir: str, facts: dict, as_stage: bool) -> dict:
    """One run trained and evaluated; `as_stage`: as dvc.yaml's stages do it (evaluated on data/processed, metrics
    and plots where DVC shows them)."""
    trained = train(cfg, name, data_dir, facts)
    summary = evaluate(cfg, name, str(PROCESSED) if as_stage else data_dir, as_stage)
    return {**summary, "seconds": round(trained["seconds"], 2), "resumed": trained["resumed"]}

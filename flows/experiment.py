"""The experiment flow: prepare -> train each architecture -> evaluate -> register.

Thin Prefect wrappers around tasks.stages; the same functions `dvc repro` runs stage by stage.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.config import Config, load_config, select_models
from tasks.dvc import ensure_data
from tasks.files import StoreWriteError
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
    """A link artifact on this Prefect task run to its MLflow run (the Prefect UI's Artifacts tab): the MLflow UI
    of a tracking server, else `nnlab ui`'s address."""
    from prefect.artifacts import create_link_artifact

    from tasks.tracking import client, tracking_uri

    uri = tracking_uri()
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    try:
        experiment = client().get_run(run_id).info.experiment_id
        create_link_artifact(f"{ui}/#/experiments/{experiment}/runs/{run_id}", link_text=f"MLflow run {run_id}",
                             description=f"{name}'s MLflow run (metrics, model, figures); open with `nnlab ui`")
    except Exception as e:  # the link is a convenience: never fail a trained run over it
        print(f"{name}: no Prefect link to MLflow run {run_id} ({type(e).__name__})", flush=True)


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
    # params.yaml as it is, on DVC's data: this flow computes what `dvc repro` would, and shows in DVC's metrics
    dvc_view = (not sets and facts.get("nnlab.data_source") == "dvc"
                and Path(params).resolve() == Path("params.yaml").resolve())
    results, failed = [], []
    for name in cfg.models:  # one after another: two trainings would fight over 2 cores and the global RNG
        try:
            trained = train(cfg, name, data_dir, facts)
            results.append({**evaluate(cfg, name, data_dir, dvc_view and name in cfg.runs()),
                            "seconds": round(trained["seconds"], 2),
                            "resumed": trained["resumed"]})
        except StoreWriteError:  # a full or read-only disk fails every architecture alike: stop, say it once
            raise
        except Exception as e:  # one failing architecture never loses the others
            failed.append({"name": name, "error": str(e)})
    registered = register(cfg, results) if results and cfg.register.enabled else None
    summary = {"results": results, "failed": failed, "registered": registered, "data_dir": data_dir, **facts}
    if failed:
        raise ExperimentFailed(summary)
    return summary

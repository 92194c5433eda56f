"""How a run used the machine (tasks/machine.py): every run trained through the stages has MLflow's CPU and memory
series (one sample at least, however short the run), the hardware tags and its throughput and peak memory;
tracking.system_metrics: false turns the series off and keeps the tags."""
import pytest
from mlflow.tracking import MlflowClient

from tasks.config import validate
from tasks.data import prepare
from tasks.tracking import tracking_uri


@pytest.mark.parametrize("series", [True, False], ids=["on", "off"])
def test_a_run_records_its_machine(tmp_path, monkeypatch, series):
    from tasks.stages import train_stage

    monkeypatch.chdir(tmp_path)
    cfg = validate({"data": {"source": "digits", "max_train": 200}, "train": {"epochs": 1, "device": "cpu"},
                    "models": {"mlp": {"hidden": [16]}},
                    "tracking": {"system_metrics": series, "system_metrics_interval": 0.5}})
    prepare(cfg.data, 0, "d")
    run = MlflowClient(tracking_uri()).get_run(train_stage(cfg, "mlp", "d", "out").run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["nnlab.device"] == "cpu" and int(tags["nnlab.cores"]) >= 1 and int(tags["nnlab.torch_threads"]) >= 1
    assert tags["nnlab.host"] and tags["nnlab.cpu"] and tags["nnlab.torch"].startswith("2.")
    assert metrics["train_samples_per_second"] > 0 and metrics["peak_rss_megabytes"] > 50
    system = {k for k in metrics if k.startswith("system/")}
    if series:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    else:
        assert system == set()


def test_gpu_series_follow_only_the_device_the_run_trains_on():
    import torch

    from tasks.machine import runs_gpus

    host = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]  # NVML's UUIDs, in NVML's order (no GPU on the CI machine)
    assert runs_gpus(host, torch.device("cuda", 0), "bbbb") == [1]  # torch's cuda:0 is NVML's 1 (CUDA_VISIBLE)
    assert runs_gpus(host, torch.device("cuda", 1), "GPU-cccc") == [2]
    assert runs_gpus(host, torch.device("cpu"), None) == []  # a CPU run logs no GPU of the host
    assert runs_gpus(host, torch.device("cuda", 0), "dddd") == []  # not found: none rather than a wrong one

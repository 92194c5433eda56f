"""How a run used the machine: MLflow's own system metrics (CPU, memory, disk, network and, with pynvml, GPU
series under `system/`, one sample every `tracking.system_metrics_interval` seconds and one at the end, so a
short run has its series too), a hardware fingerprint as tags (host, CPU and cores, torch threads, torch and
CUDA versions, the device used and, on a GPU, its name and memory), throughput and peak memory as metrics.
`tracking.system_metrics: false` turns the series off; the tags are always written."""
from __future__ import annotations

import logging
import os
import platform
import resource
import socket

import torch


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_metrics_library() -> str | None:
    """None when GPU series can be logged (pynvml importable), else why not."""
    try:
        import pynvml  # noqa: F401  (nvidia-ml-py: what MLflow's GPU monitor reads)
    except ImportError:
        return "off: pynvml (pip install nvidia-ml-py) is not installed, so no system/gpu_* series"
    return None


def hardware_tags(device: torch.device) -> dict[str, str]:
    tags = {"nnlab.host": socket.gethostname(), "nnlab.cpu": _cpu_model(), "nnlab.cores": str(os.cpu_count()),
            "nnlab.torch_threads": str(torch.get_num_threads()), "nnlab.torch": torch.__version__,
            "nnlab.cuda": torch.version.cuda or "none", "nnlab.device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        tags["nnlab.gpu"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB"
        if visible := os.environ.get("CUDA_VISIBLE_DEVICES"):  # which of the host's GPUs cuda:0.. are
            tags["nnlab.cuda_visible_devices"] = visible
        tags["nnlab.gpu_metrics"] = gpu_metrics_library() or "on"
    return tags


def runs_gpus(uuids: list[str], device: torch.device, device_uuid: str | None) -> list[int]:
    """Which of the host's GPUs (NVML's order, by UUID) the run's series should follow: only the one it trains
    on, none for a run on the CPU (MLflow's monitor would log every GPU of the host: mlflow#13398)."""
    if device.type != "cuda" or not device_uuid:
        return []
    want = device_uuid.removeprefix("GPU-")
    return [i for i, u in enumerate(uuids) if u.removeprefix("GPU-") == want]


def _follow_the_runs_gpu(monitor, device: torch.device) -> None:
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    for m in [m for m in monitor.monitors if isinstance(m, GPUMonitor)]:
        import pynvml

        uuid = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
        uuids = [str(pynvml.nvmlDeviceGetUUID(h)) for h in m.gpu_handles]
        m.gpu_handles = [m.gpu_handles[i] for i in runs_gpus(uuids, device, uuid)]
        if not m.gpu_handles:
            monitor.monitors.remove(m)


def start_monitor(run_id: str, interval: float, device: torch.device):
    """MLflow's system-metrics monitor on `run_id` (GPU series of the run's own device only), started;
    `.finish()` it when the training ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from tasks.tracking import tracking_uri

    class RunMonitor(SystemMetricsMonitor):
        def finish(self):
            super().finish()
            if self._logging_step == 0:  # ended before its first interval: one sample of the whole run
                try:
                    self.collect_metrics()
                    self.publish_metrics(self.aggregate_metrics())
                    self.mlflow_logger.flush()
                except Exception as e:  # descriptive: never fails the run
                    print(f"MLflow run {run_id}: system metrics not logged ({type(e).__name__})", flush=True)

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "Started monitoring" lines
    monitor = RunMonitor(run_id, sampling_interval=interval, resume_logging=True, tracking_uri=tracking_uri())
    _follow_the_runs_gpu(monitor, device)
    monitor.start()
    return monitor


def samples_in(split) -> int:
    x = getattr(split, "x", None)
    return len(x) if x is not None else 0


def usage_metrics(device: torch.device, samples: int, seconds: float) -> dict[str, float]:
    """Throughput of this process's training and its peak memory (RSS; on a GPU, the device's allocations)."""
    out = {"peak_rss_megabytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if seconds > 0 and samples:
        out["train_samples_per_second"] = samples / seconds
    if device.type == "cuda":
        out["peak_gpu_memory_megabytes"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out

"""Loading ahead: what a flow's first training run (or a sweep's first cell) would otherwise import and open
once the Prefect server is up, done while it boots (the server is its own process, on the other core).

Measured with benchmarks/phases.py: moving this work ahead of the server's readiness is what takes a 5-epoch
run's time to first epoch down; `gc.freeze()` afterwards keeps the collector from scanning it all again.
"""
from __future__ import annotations

import gc
import importlib


def preload(runs) -> None:
    """`runs`: (arch, data source) pairs this process will train (none: a sweep's parent). Imports the training
    stack (torch._dynamo included: torch.optim's first optimizer pulls it in), each run's model family and kind,
    matplotlib's figures and Prefect's engines; opens the MLflow store (schema checked once: every run of this
    process reuses the connection). Model logging's own warm-up starts with training (tasks/stages.py): here it
    would only compete with these imports."""
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401

    import tasks.kinds.supervised  # noqa: F401
    import tasks.stages  # noqa: F401
    from models.registry import get_spec
    from tasks.kinds import kind_of
    from tasks.tracking import client

    if runs:
        import torch._dynamo  # noqa: F401  (a run's first optimizer imports it: ~2 s)
    for arch, source in runs:
        kind_of(arch, source)
        importlib.import_module(get_spec(arch).module)
    client().search_experiments(max_results=1)
    gc.freeze()

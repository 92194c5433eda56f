"""Gradient health, measured while training: every `every` steps, cheaply, logged in batches.

Per diagnostic step (global step s):
  layers/grad_norm.<layer>     L2 norm of the gradient of each weight matrix / kernel (before clipping)
  health/grad_norm             the norm over all of them
  health/grad_ratio_first_last first layer's gradient norm / last layer's (tiny -> gradients vanish on the way down)
  layers/update_ratio.<layer>  ||w_after - w_before|| / ||w_before|| of that step (~1e-3 is the classic healthy value)
  health/update_ratio          the median of the above over layers
  health/dead_units            share of ReLU units that output 0 for every example of a fixed probe batch

MLflow's charts group metrics by the prefix before "/": the per-layer series in a `layers` section, the overall
ones (and the run's summary: health/max_grad_norm, ...) in a `health` section, so the run page opens on the
headline curves (loss, accuracy, learning rate) and the test metrics.

Health rules (tags `nnlab.health.*`, set when training ends; documented in the README):
  vanishing   the median of grad_ratio_first_last over the run is below 1e-3
  exploding   the total gradient norm ever exceeded 1e3, or the loss went non-finite
  dead_units  the last probe found more than half of the ReLU units dead
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

VANISHING_RATIO = 1e-3
EXPLODING_NORM = 1e3
DEAD_FRACTION = 0.5


@dataclass
class Diagnostics:
    model: nn.Module
    every: int  # steps between measurements
    probe: torch.Tensor | None = None  # fixed batch of inputs for the dead-unit count
    records: list[tuple[int, dict]] = field(default_factory=list)  # (global step, metrics) not yet logged
    ratios: list[float] = field(default_factory=list)
    max_norm: float = 0.0
    dead: float | None = None
    non_finite: bool = False

    def __post_init__(self):
        self.layers = [(n, p) for n, p in self.model.named_parameters() if p.dim() > 1 and p.requires_grad]
        self._before: list[torch.Tensor] | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """After backward, before the optimizer step: gradient norms and a copy of the weights."""
        norms = torch.stack([p.grad.norm() if p.grad is not None else torch.zeros((), device=p.device)
                             for _, p in self.layers]).float().cpu()
        rec = {f"layers/grad_norm.{n}": float(v) for (n, _), v in zip(self.layers, norms)}
        total = float(norms.norm())
        rec["health/grad_norm"] = total
        if norms[-1] > 0:
            rec["health/grad_ratio_first_last"] = float(norms[0] / norms[-1])
            self.ratios.append(rec["health/grad_ratio_first_last"])
        self.max_norm = max(self.max_norm, total) if total == total else float("inf")  # NaN counts as exploding
        self._before = [p.detach().clone() for _, p in self.layers]
        self.records.append((step, rec))

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        rec = self.records[-1][1]
        ratios = []
        for (n, p), w0 in zip(self.layers, self._before):
            r = float((p - w0).norm() / w0.norm().clamp_min(1e-12))
            rec[f"layers/update_ratio.{n}"] = r
            ratios.append(r)
        rec["health/update_ratio"] = statistics.median(ratios)
        self._before = None
        if self.probe is not None:
            rec["health/dead_units"] = self.dead = dead_fraction(self.model, self.probe)

    def drain(self) -> list[tuple[int, dict]]:
        out, self.records = self.records, []
        return out

    def health(self) -> dict[str, bool]:
        return {
            "vanishing": bool(self.ratios) and statistics.median(self.ratios) < VANISHING_RATIO,
            "exploding": self.non_finite or self.max_norm > EXPLODING_NORM,
            "dead_units": self.dead is not None and self.dead > DEAD_FRACTION,
        }

    def summary(self) -> dict[str, float]:
        out = {"health/max_grad_norm": self.max_norm}
        if self.ratios:
            out["health/median_grad_ratio_first_last"] = statistics.median(self.ratios)
        if self.dead is not None:
            out["health/final_dead_units"] = self.dead
        return out

    def state_dict(self) -> dict:
        return {"ratios": self.ratios, "max_norm": self.max_norm, "dead": self.dead}

    def load_state_dict(self, s: dict) -> None:
        self.ratios, self.max_norm, self.dead = s["ratios"], s["max_norm"], s["dead"]


@torch.no_grad()
def dead_fraction(model: nn.Module, probe: torch.Tensor) -> float:
    """Share of ReLU units (features, or channels for conv maps) that are 0 for every probe example."""
    dead, total = [], []

    def hook(_m, _inp, out):
        alive = (out > 0).flatten(2).any(2) if out.dim() > 2 else (out > 0)  # (B, units)
        alive = alive.any(0)  # a unit lives if any example activates it anywhere
        dead.append(int((~alive).sum()))
        total.append(alive.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    was_training = model.training
    model.eval()
    try:
        model(probe)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sum(dead) / sum(total) if total else 0.0


def log_health(run, trainer) -> list[str]:
    """Tags nnlab.health.* by the rules above; returns the names of those that fired."""
    d = trainer.diagnostics
    if d is None:
        return []
    if d.records:
        run.log_series(d.drain())
    health = d.health()
    run.set_tags({f"nnlab.health.{k}": str(v).lower() for k, v in health.items()})
    run.log_metrics(d.summary())
    fired = [k for k, v in health.items() if v]
    for k in fired:
        print(f"{run.run_id}: health warning: {k.replace('_', ' ')} (see nnlab.health.{k})", flush=True)
    return fired

"""Progress on long work: a live bar on a terminal, one plain line per epoch otherwise (logs, CI)."""
from __future__ import annotations

import sys
import time

QUIET_LINE_SECONDS = 30.0  # off a terminal: at most one line this often within an epoch


def _fmt(metrics: dict) -> str:
    keys = ("train_loss", "val_loss", "val_accuracy", "val_perplexity", "d_loss", "g_loss", "d_real", "d_fake",
            "critic_gap", "modes_covered", "val_cer", "val_wer", "val_exact_match", "val_bleu")
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def bar(items, label: str):
    """`items`, with a live bar while they are worked through on a terminal; quiet in pipes, CI and DVC logs."""
    if not sys.stdout.isatty():
        return items
    from rich.progress import track

    return track(items, description=label)


class EpochProgress:
    def __init__(self, label: str, epochs: int, start_epoch: int = 0, live: bool | None = None):
        self.label, self.epochs, self.epoch = label, epochs, start_epoch
        self._epoch_start = time.monotonic()
        self.live = sys.stdout.isatty() if live is None else live
        self._last = 0.0
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("steps"), TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(f"{label} epoch {start_epoch + 1}/{epochs}", total=None)

    def step(self, i: int, steps: int) -> None:
        # Called every batch; redraw at most 10 times a second so the bar costs nothing measurable. Off a terminal
        # (a log, CI, `dvc repro`), a plain line every QUIET_LINE_SECONDS within a long epoch: alive, and how far.
        now = time.monotonic()
        if not self.live:
            if i == 1:
                self._epoch_start = self._last = now
            elif now - self._last >= QUIET_LINE_SECONDS and i < steps:
                self._last = now
                print(f"{self.label} epoch {self.epoch + 1}/{self.epochs}  step {i}/{steps}  "
                      f"{now - self._epoch_start:.0f}s", flush=True)
            return
        if now - self._last > 0.1 or i == steps:
            self._last = now
            self.bar.update(self.task, completed=i, total=steps)

    def epoch_end(self, epoch: int, metrics: dict) -> None:
        self.epoch = epoch
        line = f"{self.label} epoch {epoch}/{self.epochs}  {_fmt(metrics)}  {metrics.get('epoch_seconds', 0):.2f}s"
        if self.live:  # a lasting line per epoch above the bar, the bar restarts for the next epoch
            self.bar.console.print(line, highlight=False)
            self.bar.update(self.task, description=f"{self.label} epoch {min(epoch + 1, self.epochs)}/{self.epochs}",
                            completed=0)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.live:
            self.bar.stop()

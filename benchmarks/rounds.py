"""The alternating-rounds comparison the overhead benchmarks share: ours and a hand-written loop in turns, in one
process after a warm-up, so load on the machine hits both alike."""
from __future__ import annotations

import statistics
from typing import Callable


def compare(arch: str, ours: Callable[[], float], by_hand: Callable[[], float], rounds: int) -> float:
    """Print and return the median over `rounds` of hand-written / ours epoch times (1.0: no cost; below 1:
    ours is slower). Each callable trains one epoch and returns its seconds."""
    ours(), by_hand()  # warm-up
    times = [(ours(), by_hand()) for _ in range(rounds)]
    ratio = statistics.median(hand / own for own, hand in times)
    print(f"{arch}: hand-written / ours = {ratio:.3f} (median of {rounds} rounds; "
          f"epoch s ours {statistics.median(t for t, _ in times):.2f}, "
          f"hand-written {statistics.median(t for _, t in times):.2f})")
    return ratio

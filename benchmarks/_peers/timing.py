"""Timing shared by the benchmarks: CPU wake-up, per-step samples, interleaved rounds.

The machines these run on are small shared VMs: after idling they run slow for a second or
two, and whatever else runs weighs on whichever variant is being timed at that moment. So:
spin the CPU before timing, take a few untimed steps, then interleave the variants in rounds
(each round runs ``reps`` steps of every variant, the starting variant rotating) and report
medians over all rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

#: run k steps and return each step's duration in seconds
Runner = Callable[[int], list[float]]

#: repetitions per round, by N (a round of 5 at 1e7 is about a second per system)
REPS_PER_ROUND = {1_000: 40, 10_000: 30, 100_000: 12, 1_000_000: 5, 10_000_000: 3}
WARMUP_STEPS = 3


def reps_for(n: int) -> int:
    """Steps per round for N parameters (the nearest tabulated N at or above n)."""
    for size, reps in sorted(REPS_PER_ROUND.items()):
        if n <= size:
            return reps
    return 2


def spin(seconds: float) -> None:
    """Wake the CPU up (the VM runs slow for a while after sitting idle)."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def timed(fn: Callable[[], object]) -> Runner:
    """A runner that calls ``fn`` k times and times each call."""

    def run(k: int) -> list[float]:
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    return run


def interleaved(
    runners: Mapping[str, Runner],
    rounds: int,
    reps: int | Mapping[str, int],
    warmup: int = 0,
) -> dict[str, list[float]]:
    """Every runner's step times over ``rounds`` rounds of ``reps`` steps each (per runner when
    a mapping), round-robin, the first runner of round r being the r-th (mod the count).
    ``warmup`` untimed steps per runner first, in the same order."""
    names = list(runners)
    per = {name: reps if isinstance(reps, int) else reps[name] for name in names}
    if warmup:
        for name in names:
            runners[name](warmup)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            samples[name].extend(runners[name](per[name]))
    return samples


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def quantile_ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def pin_torch_threads(threads: int = 1) -> int:
    """``torch.set_num_threads`` in this thread; returns what torch reports afterwards."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()

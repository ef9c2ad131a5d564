"""Repeated, interleaved measurements for the benches: warm-up, A B A B ..., median and spread.

    from samples import interleave, seconds, ratio, goal

    results = interleave({"raw": run_raw, "client": run_client}, samples=5, warmup=1)
    print(results["raw"].format("msg/s"))                    # 874 msg/s (min-max 850-900, IQR 860-890, n=5)
    share = ratio(results["client"], results["raw"])         # per-round client/raw, paired
    print(goal("client >= 80% of raw", share, 0.80))         # goal: client >= 80% of raw — MISSED: 72% (...)

A callable returns its own sample (a rate, a latency, seconds): `seconds(fn)` turns one that returns nothing
into one that returns how long it took. `interleave` takes sync callables, `interleave_async` coroutine
functions. Benches import this module by name: a script's own directory is on sys.path (python bench/x.py).
On a shared 2-core machine a figure alone drifts with the load; one measured side by side with its baseline
in the same rounds does not, so compare with `ratio`, which pairs the samples of one round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Samples:
    """The samples of one measurement, in the order they were taken (warm-up excluded)."""

    name: str
    values: Sequence[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max): with a handful of samples the whole range says more than an IQR."""
        return self.min, self.max

    @property
    def iqr(self) -> tuple[float, float]:
        """(25th, 75th percentile), inclusive method; equals (min, max) with fewer than 3 samples."""
        if len(self.values) < 3:
            return self.spread
        q1, _, q3 = statistics.quantiles(self.values, n=4, method="inclusive")
        return q1, q3

    def format(self, unit: str = "", number: str = "{:,.0f}") -> str:
        """'874 msg/s (min-max 850-900, IQR 860-890, n=5)', the IQR from 5 samples on; `number` formats one
        value, e.g. '{:.0%}'."""
        suffix = f" {unit}" if unit else ""
        f = number.format
        if len(self.values) == 1:
            return f"{f(self.median)}{suffix} (n=1)"
        spread = f"min-max {f(self.min)}-{f(self.max)}"
        if len(self.values) >= 5:  # below that the quartiles are (nearly) the extremes
            low, high = self.iqr
            spread += f", IQR {f(low)}-{f(high)}"
        return f"{f(self.median)}{suffix} ({spread}, n={len(self.values)})"


def interleave(named_callables: Mapping[str, Callable[[], float]], samples: int, warmup: int = 1) -> dict[str, Samples]:
    """Run every callable in turn (A, B, C, A, B, C ...): `warmup` rounds discarded, then `samples` rounds."""
    values: dict[str, list[float]] = {name: [] for name in named_callables}
    for round_ in range(warmup + samples):
        for name, measure in named_callables.items():
            value = measure()
            if round_ >= warmup:
                values[name].append(value)
    return {name: Samples(name, taken) for name, taken in values.items()}


async def interleave_async(
    named_callables: Mapping[str, Callable[[], Awaitable[float]]], samples: int, warmup: int = 1
) -> dict[str, Samples]:
    """`interleave` for coroutine functions, awaited one at a time."""
    values: dict[str, list[float]] = {name: [] for name in named_callables}
    for round_ in range(warmup + samples):
        for name, measure in named_callables.items():
            value = await measure()
            if round_ >= warmup:
                values[name].append(value)
    return {name: Samples(name, taken) for name, taken in values.items()}


def seconds(work: Callable[[], object]) -> Callable[[], float]:
    """A callable that runs `work` and returns how long it took, in seconds."""

    def measure() -> float:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started

    return measure


def seconds_async(work: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[float]]:
    """`seconds` for a coroutine function."""

    async def measure() -> float:
        started = time.perf_counter()
        await work()
        return time.perf_counter() - started

    return measure


def ratio(numerator: Samples, denominator: Samples, name: str = "") -> Samples:
    """Per-round numerator / denominator: the samples of one round were taken side by side."""
    if len(numerator.values) != len(denominator.values):
        raise ValueError(f"{numerator.name} and {denominator.name} have different sample counts")
    values = [a / b for a, b in zip(numerator.values, denominator.values, strict=True)]
    return Samples(name or f"{numerator.name} / {denominator.name}", values)


def goal(label: str, measured: Samples, target: float, at_least: bool = True, number: str = "{:.0%}") -> str:
    """'goal: <label> — met: 97% (min-max ...)' or '— MISSED: 72% (...)', judged on the median."""
    met = measured.median >= target if at_least else measured.median <= target
    return f"goal: {label} — {'met' if met else 'MISSED'}: {measured.format(number=number)}"

"""Interleaved (round-robin) timing of blocking step closures, with the process's CPU
time and page faults per step: a background load slows every step alike."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any, NamedTuple


class Timings(NamedTuple):
    """What :func:`time_interleaved` measured, by step name: per repetition the wall
    seconds (``times``), the process's CPU seconds (``cpu``: user + sys), the kernel's share
    of them (``sys``) and the minor page faults (``faults``: first touches of fresh
    memory); and the first call's wall seconds (``first``: compile + run)."""

    times: dict[str, list[float]]
    first: dict[str, float]
    cpu: dict[str, list[float]]
    sys: dict[str, list[float]]
    faults: dict[str, list[int]]


def time_interleaved(steps: dict[str, Callable[[], Any]], *, reps: int, warmup: int) -> Timings:
    """Round-robin timing: ``steps[name]()`` runs one blocking step; after ``warmup`` calls
    of each, every repetition runs each step once, in turn.

    Example:
        >>> t = time_interleaved({"a": lambda: None, "b": lambda: None}, reps=2, warmup=1)
        >>> [len(t.times[n]) for n in "ab"], sorted(t.first)
        ([2, 2], ['a', 'b'])
    """
    first: dict[str, float] = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        first[name] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    usage: dict[str, list[_Usage]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            u0 = _usage()
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            usage[name].append(_usage() - u0)
    return Timings(
        times,
        first,
        cpu={n: [u.user + u.sys for u in us] for n, us in usage.items()},
        sys={n: [u.sys for u in us] for n, us in usage.items()},
        faults={n: [u.faults for u in us] for n, us in usage.items()},
    )


class _Usage(NamedTuple):
    user: float
    sys: float
    faults: int

    def __sub__(self, other: _Usage) -> _Usage:
        return _Usage(self.user - other.user, self.sys - other.sys, self.faults - other.faults)


def _usage() -> _Usage:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return _Usage(usage.ru_utime, usage.ru_stime, usage.ru_minflt)

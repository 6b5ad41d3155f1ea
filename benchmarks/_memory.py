"""Host and device memory of a benchmark's own process.

:func:`rss_bytes` (now), :func:`maxrss_bytes` (the high-water mark), :class:`PeakSampler`
(the peak of the resident set over a block, sampled by a thread; ``tracemalloc`` sees no
XLA buffer), and on an accelerator its allocator's counters (:func:`device_memory`,
:func:`device_fields`).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Any


def rss_bytes() -> int:
    """The resident set of this process now, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover - psutil is installed in the project venv
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    """The high-water mark of this process's resident set (``ru_maxrss``), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class PeakSampler:
    """Samples the resident set every ``interval`` seconds in a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def device_memory() -> dict[str, int] | None:
    """The accelerator allocator's counters (``None`` on CPU, whose buffers are in the RSS)."""
    import jax

    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return None
    return device.memory_stats()


def device_fields(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, Any]:
    """Device memory in use before the merges and the allocator's peak after them.

    The peak counter cannot be reset, so it also covers building the inputs; the merge's
    own share is at most ``peak - in_use_before``.
    """
    if not before or not after:
        return {}
    return {
        "device_in_use_before_bytes": before.get("bytes_in_use"),
        "device_peak_bytes": after.get("peak_bytes_in_use"),
        "device_peak_over_inputs_bytes": after.get("peak_bytes_in_use", 0)
        - before.get("bytes_in_use", 0),
    }

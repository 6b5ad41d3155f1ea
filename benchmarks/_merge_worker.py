"""One merge method's time and memory, measured in a worker process of
:mod:`benchmarks.merge_time` (``--worker METHOD``).

The worker builds its synthetic inputs (a GPT-2-shaped base, fine-tuned-like experts, UMTAM
statistics or Fisher diagonals where the method needs them), then times the merge twice and
samples the resident set during the calls (:func:`worker`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks._common import gpt2_params
from benchmarks._memory import (
    PeakSampler,
    device_fields,
    device_memory,
    maxrss_bytes,
    rss_bytes,
)

EXPERTS = 4
DENSITY = 0.2
RANK = 32
METHODS = (
    "task_arithmetic",
    "ties",
    "ties_global",
    "dare",
    "dare_ties",
    "fisher",
    "ota",
    "prune",
    "umtam",
    "umtam_final_saliency",
    "umtam_global",
)


# ----------------------------------------------------------------------------- inputs


def _uniform(rng, shape, scale=1.0, offset=0.0):
    import numpy as np

    return (rng.random(shape, dtype=np.float32) * (2 * scale) - scale + offset).astype(np.float32)


def _experts(base: dict, seed: int) -> list:
    """Fine-tuned-like experts: base + a dense small delta with a few large entries."""
    import jax
    import numpy as np

    out = []
    for t in range(EXPERTS):
        rng = np.random.default_rng(seed + 1000 * t)

        def perturb(b, rng=rng):
            delta = _uniform(rng, b.shape, 1e-3)
            spikes = rng.random(b.shape, dtype=np.float32) < 0.01
            return b + np.where(spikes, 50 * delta, delta)

        out.append(jax.tree.map(perturb, base))
    return out


def _statistics(base: dict, experts: list, *, tracked: bool, seed: int) -> list:
    """Synthetic UMTAM statistics (the merge cost does not depend on their values)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from umtam_jax import DenseStatistics, FactoredStatistics

    stats = []
    for t, expert in enumerate(experts):
        rng = np.random.default_rng(seed + 7 + 1000 * t)

        def node(b, e, rng=rng):
            row_pos = lambda n: np.abs(_uniform(rng, (n,), 1.0)) + 1e-6  # noqa: E731
            saliency = None
            if tracked:
                saliency = jnp.asarray(np.square(e - b) * np.abs(_uniform(rng, b.shape, 1.0)))
            if b.ndim == 2 and min(b.shape) >= 128:
                m, n = b.shape
                return FactoredStatistics(
                    u=jnp.asarray(_uniform(rng, (m, RANK), 0.05)),
                    sigma=jnp.diag(jnp.asarray(np.sort(row_pos(RANK))[::-1].copy())),
                    v=jnp.asarray(_uniform(rng, (n, RANK), 0.05)),
                    row=jnp.asarray(row_pos(m)),
                    col=jnp.asarray(row_pos(n)),
                    saliency=saliency,
                )
            return DenseStatistics(
                mu=jnp.asarray(_uniform(rng, b.shape, 1e-3)),
                nu=jnp.asarray(np.abs(_uniform(rng, b.shape, 1e-6)) + 1e-12),
                saliency=saliency,
            )

        stats.append(jax.tree.map(node, base, expert))
    return stats


def _fishers(base: dict, seed: int) -> list:
    import jax
    import numpy as np

    out = []
    for t in range(EXPERTS):
        rng = np.random.default_rng(seed + 13 + 1000 * t)
        out.append(jax.tree.map(lambda b, rng=rng: np.abs(_uniform(rng, b.shape, 1e-4)), base))
    return out


def worker(method: str, blocks: int, seed: int = 0) -> dict[str, Any]:
    """Runs one method in this process and returns its measurements."""
    import jax
    import jax.numpy as jnp

    from benchmarks._common import tree_bytes, tree_size
    from umtam_jax import merging

    t_build = time.perf_counter()
    base = gpt2_params(blocks, seed=seed)
    experts = _experts(base, seed)
    extra: dict[str, Any] = {}
    if method.startswith("umtam") or method in ("ota", "prune"):
        extra["stats"] = _statistics(
            base, experts, tracked=method != "umtam_final_saliency", seed=seed
        )
    if method == "fisher":
        extra["fishers"] = _fishers(base, seed)
    base = jax.tree.map(jnp.asarray, base)
    experts = [jax.tree.map(jnp.asarray, e) for e in experts]
    extra = jax.tree.map(jnp.asarray, extra)
    jax.block_until_ready((base, experts, extra))
    build_s = time.perf_counter() - t_build
    key = jax.random.key(seed)
    stats, fishers = extra.get("stats"), extra.get("fishers")
    calls = {
        "task_arithmetic": lambda: merging.task_arithmetic(base, experts, scaling=1 / EXPERTS),
        "ties": lambda: merging.ties(base, experts, density=DENSITY),
        "ties_global": lambda: merging.ties(base, experts, density=DENSITY, scope="global"),
        "dare": lambda: merging.dare(base, experts, density=DENSITY, key=key),
        "dare_ties": lambda: merging.dare_ties(base, experts, density=DENSITY, key=key),
        "fisher": lambda: merging.fisher(base, experts, fishers),
        "ota": lambda: merging.ota(base, experts, stats),
        "prune": lambda: merging.prune(base, experts[0], stats[0], density=DENSITY),
        "umtam": lambda: merging.umtam(base, experts, stats, density=DENSITY),
        "umtam_final_saliency": lambda: merging.umtam(base, experts, stats, density=DENSITY),
        "umtam_global": lambda: merging.umtam(
            base, experts, stats, density=DENSITY, scope="global"
        ),
    }
    call = calls[method]
    input_bytes = tree_bytes((base, experts, extra))
    rss_before, maxrss_before = rss_bytes(), maxrss_bytes()
    device_before = device_memory()
    times = []
    with PeakSampler() as sampler:
        for _ in range(2):
            t0 = time.perf_counter()
            merged = call()
            jax.block_until_ready(merged)
            times.append(time.perf_counter() - t0)
            del merged
    n = tree_size(base)
    return {
        "method": method,
        "param_count": n,
        "experts": EXPERTS,
        "density": DENSITY,
        "input_bytes": input_bytes,
        "build_s": round(build_s, 2),
        "first_call_s": round(times[0], 3),
        "second_call_s": round(times[1], 3),
        "params_per_s": n / times[1],
        "rss_before_bytes": rss_before,
        "peak_rss_sampled_bytes": sampler.peak,
        "peak_over_inputs_bytes": sampler.peak - rss_before,
        "maxrss_before_bytes": maxrss_before,
        "maxrss_end_bytes": maxrss_bytes(),
        "loadavg": list(os.getloadavg()),
        **device_fields(device_before, device_memory()),
    }

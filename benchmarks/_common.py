"""Shared helpers of the benchmarks: synthetic pytrees, the environment record, the
Student-t interval over seeds (:func:`t_interval`) and the one results writer
(:func:`write_results`), which every benchmark uses for its JSON file.

Run the benchmarks as modules from the repository root, e.g.
``python -m benchmarks.step_time --quick``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: The repository root (the folder holding ``benchmarks/``).
ROOT = Path(__file__).resolve().parent.parent
#: Default output folder of :func:`write_results` (``benchmarks/results``).
RESULTS_DIR = ROOT / "benchmarks" / "results"

#: Lean UMTAM (``umtam_jax.umtam`` options): no m×n momentum buffer, saliency computed
#: from the final state; the low-memory setting every benchmark compares.
LEAN_UMTAM: dict[str, Any] = {"error_decay": 0.0, "saliency": "final"}

_PACKAGES = ("umtam-jax", "jax", "jaxlib", "optax", "flax", "orbax-checkpoint", "numpy")


def gpt2_params(blocks: int, d: int = 768, *, seed: int = 0, dtype=np.float32) -> dict[str, Any]:
    """GPT-2-shaped transformer blocks (no embeddings) as a nested dict of NumPy arrays.

    Per block: ``ln_1``/``ln_2`` (scale, bias), ``attn.c_attn`` (d, 3d) + bias, ``attn.c_proj``
    (d, d) + bias, ``mlp.c_fc`` (d, 4d) + bias, ``mlp.c_proj`` (4d, d) + bias; plus a final
    ``ln_f``. At d = 768 a block has 7,087,872 parameters: 4 blocks ≈ 28.4M (the reference
    pytree of the update-time targets in ``docs/performance.md``), 12 blocks ≈ 85.1M (GPT-2
    small without its embeddings).
    Kernels are (fan-in, fan-out), as Flax ``Dense`` stores them.
    """
    rng = np.random.default_rng(seed)

    def dense(fan_in, fan_out):
        return {
            "kernel": (rng.standard_normal((fan_in, fan_out), np.float32) * 0.02).astype(dtype),
            "bias": np.zeros(fan_out, dtype),
        }

    def norm():
        return {"scale": np.ones(d, dtype), "bias": np.zeros(d, dtype)}

    params: dict[str, Any] = {}
    for i in range(blocks):
        params[f"h{i}"] = {
            "ln_1": norm(),
            "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
            "ln_2": norm(),
            "mlp": {"c_fc": dense(d, 4 * d), "c_proj": dense(4 * d, d)},
        }
    params["ln_f"] = norm()
    return params


def like(params: Any, *, seed: int, scale: float = 1e-3) -> Any:
    """A pytree of Gaussian arrays shaped like ``params`` (synthetic gradients, deltas)."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: (rng.standard_normal(p.shape, np.float32) * scale).astype(p.dtype), params
    )


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of a pytree (``None`` and Python scalars count 0)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        nbytes = getattr(leaf, "nbytes", None)
        if nbytes is not None:
            total += int(nbytes)
    return total


def tree_size(tree: Any) -> int:
    import jax

    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def t_interval(xs: list[float | None]) -> dict[str, float | int | None]:
    """Mean of ``xs`` with its 95 % Student-t interval (n − 1 degrees of freedom).

    ``None`` and non-finite values are dropped. With one value the interval's ends are
    None; with none the estimate is None too.

    Returns:
        ``{"estimate", "low", "high", "n"}``.
    """
    from umtam_jax.experiments import intervals  # here: see _atomic_write

    x = [v for v in xs if v is not None and math.isfinite(v)]
    if len(x) < 2:
        mean = float(x[0]) if x else None
        return {"estimate": mean, "low": None, "high": None, "n": len(x)}
    c = intervals.student_t(x)
    return {"estimate": c.estimate, "low": c.low, "high": c.high, "n": len(x)}


def format_interval(c: dict[str, Any], f: str = "{:.3f}") -> str:
    """A :func:`t_interval` as ``mean [low, high]`` with format ``f`` (the mean alone for
    one value, ``–`` for none).

    Example:
        >>> format_interval({"estimate": 1.0, "low": 0.5, "high": 1.5, "n": 3}, "{:+.1f}")
        '+1.0 [+0.5, +1.5]'
    """
    if c["estimate"] is None:
        return "–"
    if c["low"] is None:
        return f.format(c["estimate"])
    return f"{f.format(c['estimate'])} [{f.format(c['low'])}, {f.format(c['high'])}]"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- provenance


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
    }


def command() -> str:
    """This process's command line as it is run from the repository root:
    ``python -m benchmarks.<name> ARGS`` for a benchmark run as a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    args = sys.argv[1:]
    if spec is not None and spec.name:
        head = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        script = sys.argv[0] if sys.argv else ""
        if script and Path(script).is_absolute():
            with contextlib.suppress(ValueError):
                script = str(Path(script).relative_to(ROOT))
        head = ["python", script] if script else ["python"]
    return " ".join(head + [shlex.quote(a) for a in args])


def git_commit() -> dict[str, Any]:
    """The checkout's commit, and whether tracked files differ from it (``None`` outside a
    git checkout)."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if head else None
    return {"commit": head, "dirty": None if status is None else bool(status)}


def _versions() -> dict[str, str | None]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """What a result depends on: machine and device, package versions, load at the start.

    A benchmark may call it at its start (to use or extend the record) and hand it to
    :func:`write_results`; otherwise the writer calls it.
    """
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": _versions(),
        "cpu": cpu_info(),
        "loadavg_start": list(os.getloadavg()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import jax

        env["backend"] = jax.default_backend()
        env["devices"] = [str(d) for d in jax.devices()]
        env["device_kind"] = jax.devices()[0].device_kind
    except Exception as e:  # pragma: no cover - provenance only
        env["backend"] = f"unavailable ({type(e).__name__})"
    return env


def _jsonable(x: Any) -> Any:
    """NumPy/JAX scalars and arrays to lists and numbers, paths to strings; non-finite
    floats become None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, str | bytes):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _atomic_write(path: Path, text: str) -> None:
    # Imported here: importing umtam_jax loads JAX, which scripts that only read results
    # (and the memory probes' parents) do not need.
    from umtam_jax.experiments import store

    store.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------- the writer


def write_results(
    name: str,
    result: dict[str, Any],
    markdown: str,
    *,
    title: str | None = None,
    results_dir: str | os.PathLike | None = None,
    env: dict[str, Any] | None = None,
    command_line: str | None = None,
    replace_damaged: bool = False,
) -> Path:
    """Writes ``<results_dir>/<name>.json`` atomically (temporary file + ``os.replace``).

    The record holds ``name``, ``title``, ``command`` (this process's, as run from the
    repository root), ``date`` (UTC), ``git`` (commit, and whether tracked files differed
    from it), ``environment`` (machine, device, package versions, load average at the start
    and at the end), ``markdown`` (the human-readable summary) and ``result`` (the data;
    NumPy values converted, non-finite floats as null). When ``results_dir`` is a folder
    named ``results`` (``benchmarks/results`` by default), ``RESULTS.md`` beside it is
    regenerated from all of its JSON files.

    Args:
        name: File stem and section name.
        result: The benchmark's data.
        markdown: Markdown body of its ``RESULTS.md`` section (links relative to
            ``RESULTS.md``).
        title: Section heading (default ``name``).
        results_dir: Output folder (default ``benchmarks/results``).
        env: An :func:`environment` record taken at the benchmark's start (default: taken
            now), possibly extended by the benchmark.
        command_line: The command to record (default: :func:`command`).
        replace_damaged: Whether a file at the record's path that is not JSON (a damaged
            record) may be replaced; any other file that is not a record never is.

    Returns:
        The path of the JSON file.
    """
    rdir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    env = dict(env) if env is not None else environment()
    env["loadavg_end"] = list(os.getloadavg())
    record = {
        "name": name,
        "title": title or name,
        "command": command_line or command(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "environment": env,
        "markdown": markdown,
        "result": result,
    }
    path = rdir / f"{name}.json"
    _check_own_record(path, replace_damaged)
    _atomic_write(path, json.dumps(_jsonable(record), indent=1, allow_nan=False) + "\n")
    if rdir.resolve().name == "results" and _is_generated(rdir.parent / "RESULTS.md"):
        regenerate_results_md(rdir)
    return path


def _check_own_record(path: Path, replace_damaged: bool = False) -> None:
    """Refuses to replace a file at ``path`` that is not a benchmark record (with
    ``replace_damaged``, one that is not JSON at all may be: a damaged record)."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = path.is_file() and _is_record(json.loads(path.read_text(encoding="utf-8")))
    except ValueError:
        ours = replace_damaged and path.is_file() and not path.is_symlink()
    except OSError:
        ours = False
    if not ours:
        raise FileExistsError(f"{path} exists and is not a benchmark record; not replaced")


def _is_record(data: Any) -> bool:
    return isinstance(data, dict) and {"name", "markdown"} <= data.keys()


_GENERATED = "# Benchmark results\n\nGenerated by `benchmarks/_common.py`"


def _is_generated(md: Path) -> bool:
    """Whether ``md`` is absent or a ``RESULTS.md`` this module wrote (never a user's)."""
    if not md.exists() and not md.is_symlink():
        return True
    try:
        return md.is_file() and md.read_text(encoding="utf-8").startswith(_GENERATED)
    except OSError:
        return False


# ----------------------------------------------------------------------------- journals


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines journal of finished runs ([] when there is none).

    A last line cut off by a killed append (no newline, not JSON) is dropped from the
    file, so the run is done again; any other damage is a ``ValueError`` naming the file
    and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    records = []
    for number, line in enumerate(complete, start=1):
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise ValueError(f"{path}, line {number}, is damaged: {err}") from None
    if torn:
        print(f"[journal] {path}: dropping a cut-off last line (a killed write)", flush=True)
        _atomic_write(path, "".join(f"{line}\n" for line in complete))
    return records


def append_journal(path: Path, record: dict[str, Any]) -> None:
    """Appends ``record`` as one line of ``path`` and flushes it to the disk."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- RESULTS.md


def _section(record: dict[str, Any], stem: str) -> str:
    env = record.get("environment") or {}
    lines = [f"## {record.get('title') or record.get('name') or stem}", ""]
    if record.get("command"):
        lines += [f"Command: `{record['command']}`", ""]
    meta = []
    date = record.get("date") or env.get("date")
    if date:
        meta.append(f"date {date}")
    commit = (record.get("git") or {}).get("commit")
    if commit:
        dirty = (record.get("git") or {}).get("dirty")
        meta.append(f"commit {commit[:10]}" + (" with local changes" if dirty else ""))
    parts = (record.get("result") or {}).get("part_commits") or []
    if len(parts) > 1:
        meta.append("its parts measured at commits " + ", ".join(c[:10] for c in parts))
    versions = env.get("packages") or env
    names = ("jax", "optax", "flax")
    if any(versions.get(k) for k in names):
        meta.append(", ".join(f"{k} {versions[k]}" for k in names if versions.get(k)))
    cpu = env.get("cpu")
    if isinstance(cpu, dict):
        meta.append(f"CPU {cpu.get('model')} × {cpu.get('affinity')}")
    elif cpu:
        meta.append(f"CPU {cpu} × {env.get('cpu_count')}")
    if env.get("backend") not in (None, "cpu"):
        meta.append(f"device {env.get('device_kind')}")
    if env.get("loadavg_1_5_15min") is not None:
        meta.append(f"load avg at write {env['loadavg_1_5_15min']}")
    elif env.get("loadavg_end") is not None:
        meta.append(f"load avg at end {[round(x, 2) for x in env['loadavg_end']]}")
    if meta:
        lines += ["_" + "; ".join(meta) + "_", ""]
    body = record.get("markdown")
    lines.append(body.strip() if body else f"(no markdown summary; see `results/{stem}.json`)")
    lines.append("")
    return "\n".join(lines)


def regenerate_results_md(results_dir: str | os.PathLike | None = None) -> Path:
    """Rebuilds ``RESULTS.md`` (next to ``results_dir``) from every ``results_dir/*.json``,
    one section per file, each with the command that produced it. A ``RESULTS.md`` this
    module did not write is never replaced (``FileExistsError``)."""
    rdir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    if not _is_generated(rdir.parent / "RESULTS.md"):
        raise FileExistsError(f"{rdir.parent / 'RESULTS.md'} was not generated here")
    parts = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/_common.py` from `benchmarks/results/*.json`; do not edit "
        "by hand — rerun the command shown in a section (from the repository root) to "
        "refresh it. What the numbers mean: `docs/performance.md`.",
        "",
        "The paper's headline claims beside these measurements, with verdicts: "
        "[results/claims.md](results/claims.md) (`python -m umtam_jax.experiments.claims "
        "--out benchmarks/results/claims.md`, from the results below).",
        "",
    ]
    for path in sorted(rdir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            parts.append(f"## {path.stem}\n\n(unreadable: {e})\n")
            continue
        if _is_record(record):  # other JSON files in the folder are not sections
            parts.append(_section(record, path.stem))
    out = rdir.parent / "RESULTS.md"
    _atomic_write(out, "\n".join(parts).rstrip() + "\n")
    return out


def recorded_run(
    label: str,
    signature: dict[str, Any],
    path: Path,
    fresh: bool,
    run: Callable[[], dict[str, Any]],
    *,
    title: str,
    env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One part of a benchmark (a seed, a repeat) recorded on its own, so that an
    interrupted benchmark resumes: read back from ``path`` when it was recorded with the
    same ``signature`` (and ``fresh`` is false), else ``run()``, written to ``path`` by
    :func:`write_results` as soon as it ends.

    Args:
        label: How progress lines name the part (``"[spectrum] seed 1"``).
        signature: The settings the record must match (stored in it).
        path: The record's JSON file.
        fresh: Run again even if a matching record exists.
        run: Computes the part's result (a dict).
        title: The record's title.
        env: The environment record (default: measured now).

    Returns:
        The part's result, ``signature`` included.
    """
    if path.exists() and not fresh:
        try:
            record = json.loads(path.read_text())
            rec = record["result"]
        except ValueError as err:
            print(f"{label}: {path} is damaged ({err}); running the part again", flush=True)
            rec = None
        except (OSError, KeyError, TypeError):
            rec = None
        if isinstance(rec, dict) and rec.get("signature") == signature:
            print(f"{label}: read back {path}", flush=True)
            return {**rec, "git": record.get("git")}  # the code that measured it
    rec = {"signature": signature, **run()}
    write_results(path.stem, rec, "", results_dir=path.parent, title=title, env=env,
                  replace_damaged=True)  # fmt: skip
    return {**rec, "git": git_commit()}


def commits_of(parts: list[dict[str, Any]]) -> list[str]:
    """The commits the parts returned by :func:`recorded_run` were measured at (a
    benchmark resumed after the code changed combines several; its summary says so)."""
    found = {(p.get("git") or {}).get("commit") for p in parts}
    return sorted(c for c in found if c)

"""Shared result writer for the benchmark scripts.

Every experiment script ends with::

    from _report import write_result   # benchmarks/ is on sys.path when run as a script
    write_result("training", payload, markdown_table)

which writes ``benchmarks/results/<name>.json`` (the payload plus the command line, date,
library versions, CPU and load average) and regenerates ``benchmarks/RESULTS.md`` from
*all* ``results/*.json`` files, one section per file, each with the command that produced
it. The markdown of a section is stored inside its JSON (key ``"markdown"``), so any
script's run rebuilds every section identically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_DIR", "environment", "regenerate_results_md", "write_result"]

#: Default output directory (``benchmarks/results``).
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", None)


def environment() -> dict[str, Any]:
    """Versions, CPU and load of the current machine (for provenance)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15min": load,
    }
    for mod in ("jax", "jaxlib", "optax", "flax", "numpy"):
        env[mod] = _version(mod)
    try:
        import jax

        env["jax_backend"] = jax.default_backend()
    except Exception:  # pragma: no cover - provenance only
        pass
    return env


def _jsonable(x: Any) -> Any:
    """Converts NumPy/JAX scalars and arrays; non-finite floats become None (strict JSON)."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        with contextlib.suppress(ValueError):
            argv[0] = os.path.relpath(argv[0], RESULTS_DIR.parent.parent)
    return "python " + shlex.join(argv)


def write_result(
    name: str,
    payload: dict[str, Any],
    markdown_table: str,
    *,
    results_dir: str | os.PathLike | None = None,
    command: str | None = None,
    title: str | None = None,
) -> Path:
    """Writes ``<results_dir>/<name>.json`` and regenerates ``<results_dir>/../RESULTS.md``.

    Args:
        name: Experiment name (file stem and section title).
        payload: JSON-serialisable result (NumPy scalars/arrays are converted).
        markdown_table: Markdown body of the section (tables, notes, image links relative
            to ``RESULTS.md``).
        results_dir: Output directory (default ``benchmarks/results``).
        command: Command line to record (default: this process's ``sys.argv``).
        title: Section heading (default ``name``).

    Returns:
        Path of the JSON file.
    """
    rdir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    record = {
        "name": name,
        "title": title or name,
        "command": command or _command(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "environment": environment(),
        "markdown": markdown_table,
        "result": _jsonable(payload),
    }
    path = rdir / f"{name}.json"
    _atomic_write(path, json.dumps(record, indent=1, allow_nan=False) + "\n")
    regenerate_results_md(rdir)
    return path


def _section(record: dict[str, Any], stem: str) -> str:
    env = record.get("environment") or {}
    lines = [f"## {record.get('title') or record.get('name') or stem}", ""]
    if record.get("command"):
        lines += [f"Command: `{record['command']}`", ""]
    meta = []
    if record.get("date"):
        meta.append(f"date {record['date']}")
    if env:
        meta.append(
            ", ".join(f"{k} {env[k]}" for k in ("jax", "optax", "flax") if env.get(k) is not None)
        )
        cpu = env.get("cpu")
        if isinstance(cpu, dict):  # benchmarks/_common.environment()
            meta.append(f"CPU {cpu.get('model')} × {cpu.get('affinity')}")
            if env.get("backend") not in (None, "cpu"):
                meta.append(f"device {env.get('device_kind')}")
        elif cpu:
            meta.append(f"CPU {cpu} × {env.get('cpu_count')}")
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
    """Rebuilds ``RESULTS.md`` (next to ``results_dir``) from every ``results_dir/*.json``."""
    rdir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    parts = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/_report.py` from `benchmarks/results/*.json`; do not edit "
        "by hand — rerun the command shown in a section to refresh it.",
        "",
    ]
    for path in sorted(rdir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            parts.append(f"## {path.stem}\n\n(unreadable: {e})\n")
            continue
        if not isinstance(record, dict):
            continue
        parts.append(_section(record, path.stem))
    out = rdir.parent / "RESULTS.md"
    _atomic_write(out, "\n".join(parts).rstrip() + "\n")
    return out

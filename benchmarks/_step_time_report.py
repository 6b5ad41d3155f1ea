"""The targets and the Markdown report of :mod:`benchmarks.step_time`, from its results."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import markdown_table
from benchmarks._records import reword_record

TARGETS = {
    # name: (max ratio of update time to AdamW, max state bytes / parameter bytes)
    "umtam default": (2.5, None),
    "umtam lean": (1.2, 0.15),
}


def check_targets(result: dict) -> dict[str, dict[str, Any]]:
    """Per targeted optimizer: its time and state ratios, their bounds and whether they hold."""
    verdicts = {}
    for name, (max_time, max_state) in TARGETS.items():
        row = result["results"].get(name)
        if row is None or row.get("ratio_to_adamw") is None:
            continue
        ok_time = row["ratio_to_adamw"] <= max_time
        ok_state = max_state is None or row["state_ratio"] <= max_state
        verdicts[name] = {
            "time_target": max_time,
            "time_ratio": round(row["ratio_to_adamw"], 3),
            "time_met": ok_time,
            "state_target": max_state,
            "state_ratio": round(row["state_ratio"], 4),
            "state_met": ok_state,
        }
    return verdicts


def table(result: dict) -> str:
    """One run's Markdown table: times, ratios to AdamW, launches and state size."""
    rows = []
    for name, row in result["results"].items():
        if "median_ms" not in row:
            continue
        ratio = row["ratio_to_adamw"]
        rows.append(
            [
                name,
                f"{row['median_ms']:.1f}",
                f"{row['min_ms']:.1f}–{row['max_ms']:.1f}",
                "—" if ratio is None else f"{ratio:.2f}×",
                f"{row['cpu_median_ms']:.0f}",
                "—" if row["cpu_ratio_to_adamw"] is None else f"{row['cpu_ratio_to_adamw']:.2f}×",
                f"{row['sys_median_ms']:.0f}" if "sys_median_ms" in row else "—",
                f"{row['page_faults_median']:.0f}" if "page_faults_median" in row else "—",
                f"{row['kernels']} / {row['loops']} / {row['conditionals']}"
                if "kernels" in row
                else "—",
                f"{row['state_ratio']:.3f}",
            ]
        )
    header = (
        f"{result['blocks']} blocks"
        + (" (scanned: [L, ...] leaves)" if result.get("scanned") else "")
        + f", {result['param_count'] / 1e6:.1f}M parameters, median of {result['reps']}"
    )
    return (
        header
        + "\n\n"
        + markdown_table(
            [
                "optimizer",
                "ms / update",
                "range (ms)",
                "× AdamW",
                "CPU ms",
                "CPU × AdamW",
                "of it kernel ms",
                "page faults",
                "kernels / loops / conds",
                "state ÷ params",
            ],
            rows,
        )
    )


def report_lines(result: dict) -> list[str]:
    """The markdown table of one run and a line per target. A time ratio is one run's, with
    no interval, so the line says on which side of its bound it fell, not that the target
    is met; the state ratio is exact (met or MISSED)."""
    lines = [table(result)]
    for name, v in result["targets"].items():
        state = (
            ""
            if v["state_target"] is None
            else (
                f", state {v['state_ratio']} (≤ {v['state_target']}: "
                f"{'met' if v['state_met'] else 'MISSED'})"
            )
        )
        lines.append(_time_line(name, v["time_ratio"], v["time_target"], v["time_met"]) + state)
    return lines


def _time_line(name: str, ratio: Any, target: Any, below: bool) -> str:
    """A time target's line: one run's ratio, with no interval, on one side of it."""
    side = "below it" if below else "above it"
    return f"- target {name}: {ratio}× AdamW (target ≤ {target}; one run, no interval: {side})"


#: A target line as reports before the current wording wrote it: "met" from one median.
_ONE_MEDIAN_VERDICT = re.compile(
    r"^- target (.+?): ([0-9.]+)× AdamW \(≤ ([0-9.]+): (?:met|MISSED)\)", re.M
)


def reword_one_median_verdicts(markdown: str) -> str:
    """Rewrites the target lines of an older report, which called a time target met or
    missed from one run's median, as :func:`report_lines` words them now."""

    def line(m: re.Match[str]) -> str:
        return _time_line(m[1], m[2], m[3], float(m[2]) <= float(m[3]))

    return _ONE_MEDIAN_VERDICT.sub(line, markdown)


def main(paths: list[str]) -> None:
    """Rewords the target lines of the step-time records at ``paths``.

    Example: ``python -m benchmarks._step_time_report benchmarks/results/step_time*.json``
    """
    for path in map(Path, paths):
        markdown = json.loads(path.read_text(encoding="utf-8"))["markdown"]
        reword_record(
            path,
            reword_one_median_verdicts(markdown),
            "a time target's line says on which side of it one run's median fell "
            "(it said met/MISSED)",
        )


if __name__ == "__main__":
    main(sys.argv[1:])

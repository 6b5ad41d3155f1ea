"""The ``benchmarks`` package itself (run as ``python -m benchmarks.X``): every product
benchmark imports as a module of the package and parses its options; the scripts
(``scripts/protocol.sh``, ``scripts/gpu_checks.sh``) and the merging benchmark hand their
stages options they accept; the results writer (``_records``) records provenance, keeps a
journal, reads matching records back and never replaces a user's files."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import _common, _records

ROOT = Path(__file__).resolve().parents[2]


#: Every benchmark whose results the README or docs/performance.md report.
PRODUCT_BENCHMARKS = (
    "checkpoint_integrity",
    "cold_start",
    "conflict_intensity",
    "conflict_rates",
    "efficiency",
    "gpu_plan",
    "merge_memory",
    "merge_overhead",
    "merge_time",
    "merge_vs_mergekit",
    "merging",
    "pruning",
    "spectrum",
    "step_time",
    "train_throughput",
    "training",
    "training_seeds",
    "update_ablation",
    "update_memory",
    "update_profile",
)


def test_benchmarks_folder_holds_exactly_the_product_benchmarks():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(PRODUCT_BENCHMARKS)
    for path in (ROOT / "benchmarks").glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"


@pytest.mark.parametrize("name", PRODUCT_BENCHMARKS)
def test_benchmark_imports_as_a_module_and_parses_its_options(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out or name == "update_memory"
    assert f"python -m benchmarks.{name}" in module.__doc__


def test_benchmark_runs_as_a_module_from_the_repository_root():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.merge_vs_mergekit", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--mergekit-python" in proc.stdout


def test_merging_runs_the_adamw_pipeline_with_the_chosen_methods(tmp_path, monkeypatch):
    """``--adamw-methods`` reaches the AdamW evaluation as its methods (not its tasks);
    ``--memory-modes`` evaluates each mode's experts in its own work directory."""
    from benchmarks import merging

    class Stop(Exception):
        pass

    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        if len(calls) == 3:
            raise Stop

    monkeypatch.setattr(merging, "enable_compilation_cache", lambda path: None)
    monkeypatch.setattr(merging, "evaluate_merges", record)
    with pytest.raises(Stop):
        merging.main(["--quick", "--workdir", str(tmp_path / "u"),
                      "--adamw-workdir", str(tmp_path / "a"), "--adamw-methods", "ties",
                      "fisher", "--memory-modes", "umtam_lean"])  # fmt: skip
    umtam, adamw, lean = calls
    assert "methods" not in umtam and umtam["workdir"] == tmp_path / "u"
    assert adamw["methods"] == ["ties", "fisher"] and "tasks" not in adamw
    assert adamw["experts_by"] == "adamw" and adamw["workdir"] == tmp_path / "a"
    assert lean["experts_by"] == "umtam_lean" and lean["workdir"] == tmp_path / "u-umtam_lean"
    assert lean["methods"] == merging.MEMORY_METHODS


def test_protocol_script_runs_every_stage_in_order(tmp_path):
    """scripts/protocol.sh with a stand-in interpreter that records its arguments."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(stub), "ADAMW_METHODS": "ties fisher"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "protocol.sh"), "full", "W"],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        "-m benchmarks.merging --size full --workdir W --adamw-workdir W-adamw "
        "--adamw-methods ties fisher --conflict --conflict-tasks wn_defmatch kjv_section "
        "fortune_topic wn_supersense py_package --memory-modes umtam_lean umtam_bf16",
        "-m benchmarks.pruning --size full --workdir W",
        "-m umtam_jax.experiments.claims --out benchmarks/results/claims.md",
    ]
    # Each stage's options parse: stop each benchmark where its work would begin.
    from benchmarks import merging, pruning

    class Parsed(Exception):
        pass

    def stop(*args, **kwargs):
        raise Parsed

    calls = log.read_text().splitlines()
    for module, line, heavy in ((merging, calls[0], "evaluate_merges"),
                                (pruning, calls[1], "enable_compilation_cache")):  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, "enable_compilation_cache", stop)
            mp.setattr(module, heavy, stop)
            with pytest.raises(Parsed):
                module.main(line.split()[2:])


def test_gpu_checks_script_names_its_parts(tmp_path):
    """scripts/gpu_checks.sh (the prepared GPU run) refuses an unknown part by name; its
    parts were dry-run on this CPU with ``--quick`` (they call the benchmarks above)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_checks.sh", "bogus"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "unknown part 'bogus'" in proc.stderr
    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    assert "benchmarks.train_throughput --repeats" in script
    assert "benchmarks.update_ablation" in script
    assert "benchmarks.update_profile" in script and "xla_gpu_enable_command_buffer=" in script
    assert "    diagnose)" in script
    assert "benchmarks.step_time --apply --scanned --blocks 12" in script


# ----------------------------------------------------------------------------- records


def test_write_results_records_provenance_and_regenerates_all_sections(tmp_path):
    rdir = tmp_path / "results"
    path = _records.write_results(
        "alpha",
        {"x": float("nan"), "y": [1, 2]},
        "| a |\n|---|\n| 1 |",
        results_dir=rdir,
        command_line="python -m benchmarks.alpha --quick",
    )
    _records.write_results("beta", {"z": 3}, "beta body", results_dir=rdir, title="Beta")
    assert path == rdir / "alpha.json"
    assert sorted(p.name for p in rdir.iterdir()) == ["alpha.json", "beta.json"]  # no temp files
    rec = json.loads(path.read_text())
    assert rec["result"] == {"x": None, "y": [1, 2]}
    assert rec["command"] == "python -m benchmarks.alpha --quick"
    assert rec["date"].endswith("+00:00")
    assert {"commit", "dirty"} <= set(rec["git"])
    env = rec["environment"]
    assert ("git_at_write" in rec) == (_common.git_commit() != _common.CODE_GIT)
    assert {"jax", "jaxlib", "optax", "numpy"} <= set(env["packages"])
    assert {"cpu", "backend", "device_kind", "loadavg_start", "loadavg_end"} <= set(env)
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.index("## alpha") < md.index("## Beta")
    assert "Command: `python -m benchmarks.alpha --quick`" in md and "beta body" in md
    # Written elsewhere than a ``results`` folder, a file touches nothing else.
    _records.write_results("gamma", {}, "", results_dir=tmp_path / "other")
    assert "gamma" not in (tmp_path / "RESULTS.md").read_text()


def test_the_benchmarks_own_outputs_do_not_make_the_code_dirty(tmp_path, monkeypatch):
    """A run writes its figure before its record: that is no change to the code."""
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    files = [tmp_path / "code.py", results / "fig.png", tmp_path / "benchmarks" / "RESULTS.md"]
    for f in files:
        f.write_text("a")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    monkeypatch.setattr(_common, "ROOT", tmp_path)
    monkeypatch.setattr(_common, "RESULTS_DIR", results)
    files[1].write_text("b")
    files[2].write_text("b")
    assert _common.git_commit()["dirty"] is False
    files[0].write_text("b")
    assert _common.git_commit()["dirty"] is True


def test_a_record_names_the_commit_of_the_code_that_ran(tmp_path, monkeypatch):
    """A long run's checkout may change before it writes: the record keeps the commit
    the process loaded, and says the checkout changed."""
    later = {"commit": "f" * 40, "dirty": False}
    monkeypatch.setattr(_records, "git_commit", lambda: later)
    path = _records.write_results("alpha", {}, "body", results_dir=tmp_path / "results")
    rec = json.loads(path.read_text())
    assert rec["git"] == _common.CODE_GIT and rec["git_at_write"] == later
    assert "the checkout changed while it ran" in (tmp_path / "RESULTS.md").read_text()


def test_write_results_never_replaces_a_users_files(tmp_path):
    """A hand-written RESULTS.md beside a ``results`` folder, a JSON file of the user's at
    a record's name, and other JSON files in the folder stay as they are."""
    rdir = tmp_path / "results"
    rdir.mkdir()
    (tmp_path / "RESULTS.md").write_text("# My notes\n")
    (rdir / "mine.json").write_text('{"name": "mine"}')
    (rdir / "alpha.json").write_text('{"my": "data"}')
    # A record of the earlier writer (no "result") is still a record and a section.
    (rdir / "old.json").write_text('{"name": "old", "markdown": "old body"}')
    with pytest.raises(FileExistsError, match="alpha.json exists and is not a benchmark record"):
        _records.write_results("alpha", {}, "", results_dir=rdir)
    _records.write_results("beta", {}, "beta body", results_dir=rdir)
    assert (tmp_path / "RESULTS.md").read_text() == "# My notes\n"
    assert (rdir / "alpha.json").read_text() == '{"my": "data"}'
    with pytest.raises(FileExistsError, match="RESULTS.md was not generated here"):
        _records.regenerate_results_md(rdir)
    (tmp_path / "RESULTS.md").unlink()
    md = _records.regenerate_results_md(rdir).read_text()
    assert "beta body" in md and "mine" not in md and "alpha" not in md and "old body" in md
    _records.write_results("old", {}, "new body", results_dir=rdir)  # replaced: a record
    # A RESULTS.md generated by the earlier writer (benchmarks/_common.py) is rebuilt.
    earlier = md.replace("benchmarks/_records.py", "benchmarks/_common.py", 1)
    assert earlier != md
    (tmp_path / "RESULTS.md").write_text(earlier)
    assert "new body" in _records.regenerate_results_md(rdir).read_text()


def test_a_journal_drops_a_cut_off_last_line_and_names_other_damage(tmp_path):
    path = tmp_path / "t.runs.jsonl"
    assert _records.read_journal(path) == []
    _records.append_journal(path, {"a": 1})
    _records.append_journal(path, {"b": float("nan")})
    with path.open("a") as f:
        f.write('{"c": 3, "hal')  # a killed append
    got = _records.read_journal(path)
    assert got[0] == {"a": 1} and np.isnan(got[1]["b"]) and len(got) == 2
    _records.append_journal(path, {"c": 3})  # starts on its own line
    assert [list(r) for r in _records.read_journal(path)] == [["a"], ["b"], ["c"]]
    path.write_text('{"a": 1}\n{damaged\n{"c": 3}\n')
    with pytest.raises(ValueError, match="t.runs.jsonl, line 2, is damaged"):
        _records.read_journal(path)


def test_recorded_run_reads_a_matching_record_back_and_reruns_otherwise(tmp_path):
    calls = []

    def run():
        calls.append(1)
        return {"value": len(calls)}

    path = tmp_path / "parts" / "x_seed0.json"
    first = _records.recorded_run("[x] seed 0", {"seed": 0}, path, False, run, title="x", env={})
    assert {k: v for k, v in first.items() if k != "git"} == {"signature": {"seed": 0}, "value": 1}
    assert first["git"] == _common.CODE_GIT and path.exists()
    again = _records.recorded_run("[x] seed 0", {"seed": 0}, path, False, run, title="x", env={})
    assert again == first and len(calls) == 1  # read back, not run
    # A part read back names the commit that measured it, and a summary every commit.
    record = json.loads(path.read_text())
    record["git"] = {"commit": "0" * 40, "dirty": False}
    del record["checksum"]  # edited by hand: accepted without its (now wrong) checksum
    path.write_text(json.dumps(record))
    older = _records.recorded_run("[x] seed 0", {"seed": 0}, path, False, run, title="x", env={})
    assert older["git"]["commit"] == "0" * 40
    if first["git"]["commit"]:  # a git checkout
        assert _records.commits_of([older, first]) == sorted(["0" * 40, first["git"]["commit"]])
    section = _records._section({"result": {"part_commits": ["a" * 40, "b" * 40]}}, "x")
    assert "its parts measured at commits aaaaaaaaaa, bbbbbbbbbb" in section
    other = _records.recorded_run("[x] seed 0", {"seed": 1}, path, False, run, title="x", env={})
    assert other["value"] == 2  # another signature: run again
    fresh = _records.recorded_run("[x] seed 0", {"seed": 1}, path, True, run, title="x", env={})
    assert fresh["value"] == 3
    path.write_text("{not json")
    assert (
        _records.recorded_run("[x]", {"seed": 1}, path, False, run, title="x", env={})["value"] == 4
    )


def test_rewording_a_record_keeps_its_measurement_and_words_one_median_as_a_side(tmp_path):
    """An older step-time summary called a time target "met" from one run's median: the
    rewording says on which side of the bound it fell, and keeps the record's data."""
    from benchmarks import _step_time_report

    rdir = tmp_path / "results"
    old = (
        "| table |\n- target umtam default: 2.369× AdamW (≤ 2.5: met)\n"
        "- target umtam lean: 1.578× AdamW (≤ 1.2: MISSED), state 0.0607 (≤ 0.15: met)\n"
    )
    path = _records.write_results("step_time", {"runs": [1, 2]}, old, results_dir=rdir)
    before = json.loads(path.read_text())
    _step_time_report.main([str(path)])
    after = json.loads(path.read_text())
    assert after["markdown"] == (
        "| table |\n"
        "- target umtam default: 2.369× AdamW (target ≤ 2.5; one run, no interval: below it)\n"
        "- target umtam lean: 1.578× AdamW (target ≤ 1.2; one run, no interval: above it), "
        "state 0.0607 (≤ 0.15: met)\n"
    )
    # The checksum changes with the markdown: everything else stays.
    assert {k: v for k, v in after.items() if k not in ("markdown", "reworded", "checksum")} == {
        k: v for k, v in before.items() if k not in ("markdown", "checksum")
    }
    assert "one run, no interval: below it" in (tmp_path / "RESULTS.md").read_text()
    assert "summary reworded" in (tmp_path / "RESULTS.md").read_text()
    (tmp_path / "user.json").write_text("[1, 2]")  # not a record: never rewritten
    with pytest.raises(FileExistsError, match="not a benchmark record"):
        _records.reword_record(tmp_path / "user.json", "x", "why")


def test_a_fresh_run_with_fewer_repeats_sets_the_earlier_runs_further_repeats_aside(tmp_path):
    """Otherwise a later run with more repeats would read the earlier run's back."""
    from benchmarks.efficiency import recorded_repeats

    folder = tmp_path / "x_repeats"
    folder.mkdir()
    calls: list[int] = []

    def run(i):
        calls.append(i)
        return {"value": i}

    recorded_repeats("x", folder, "x", 3, {"a": 1}, False, run, {})
    recorded_repeats("x", folder, "x", 2, {"a": 1}, True, run, {})  # fresh, fewer
    assert sorted(p.name for p in folder.glob("*.json")) == ["x_repeat0.json", "x_repeat1.json"]
    assert [p.name for p in (folder / "superseded").iterdir()] == ["x_repeat2.json"]
    recorded_repeats("x", folder, "x", 3, {"a": 1}, False, run, {})
    assert calls == [0, 1, 2, 0, 1, 2]  # repeat 2 measured again, not read back

"""What ``umtam-merge`` refuses about its inputs and output on real Orbax checkpoints:
dry runs, overwriting (never an input or a training checkpoint), shape mismatches,
names a safetensors output cannot hold, bad densities and missing statistics."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests import trees
from tests.cli.cli_merge_helpers import TOL, _write, save_ckpts
from umtam_jax import merging
from umtam_jax.cli.merge import main

checkpoint = pytest.importorskip("umtam_jax.checkpoint")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A base, two experts with UMTAM statistics, one without, and two Fisher checkpoints."""
    return save_ckpts(tmp_path_factory.mktemp("ckpts"))


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_scanned_scope_naming_no_leaf_is_refused(ckpts, tmp_path, capsys, in_memory):
    """A misspelt name merged every leaf per tensor, silently."""
    p = ckpts["paths"]
    out = tmp_path / "merged"
    cfg = _write(
        tmp_path,
        f"""
        method: ties
        base: {p["base"]}
        experts: [{p["e0"]}, {p["e1"]}]
        parameters: {{density: 0.3, scope: {{scanned: [cnov]}}}}
        output: {out}
        """,
    )
    assert main([cfg, "--no-progress", *(["--in-memory"] if in_memory else [])]) == 2
    err = capsys.readouterr().err
    assert "scope=scanned('cnov', batch=1, axis=0): no leaf's key path contains 'cnov'" in err
    assert not out.exists()


def test_dry_run_and_overwrite(ckpts, tmp_path, capsys):
    p = ckpts["paths"]
    out = tmp_path / "out"
    args = [
        "--method",
        "task_arithmetic",
        "--base",
        p["base"],
        "--expert",
        p["e0"],
        "--no-progress",
        "-o",
        str(out),
    ]
    assert main([*args, "--dry-run"]) == 0
    assert "dry run OK" in capsys.readouterr().out
    assert not out.exists()
    assert main(args) == 0
    assert out.exists()
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--param", "scaling=0.5", "--force"]) == 0
    trees.assert_trees_close_typed(
        checkpoint.restore_params(str(out)),
        merging.task_arithmetic(ckpts["base"], ckpts["experts"][:1], scaling=0.5),
        **TOL,
    )
    # The output may never be an input, even with --force.
    assert (
        main(
            [
                "--method",
                "task_arithmetic",
                "--base",
                p["base"],
                "--expert",
                p["e0"],
                "-o",
                p["e0"],
                "--force",
            ]
        )
        == 2
    )
    assert "is expert 0" in capsys.readouterr().err
    # A training checkpoint (statistics or an optimizer state) is never replaced.
    opt_state = {"count": np.zeros((), np.int32)}
    for held, kwargs in (("statistics", {"statistics": ckpts["stats"][0]}),
                         ("opt_state", {"opt_state": opt_state})):  # fmt: skip
        trained = tmp_path / f"trained_{held}"
        checkpoint.save_checkpoint(trained, ckpts["experts"][0], **kwargs)
        before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
        assert main([*args[:-1], str(trained), "--force"]) == 2
        assert f"it is a training checkpoint (it holds {held}" in capsys.readouterr().err
        assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before
    # Nor is a model saved by save_checkpoint or save_safetensors: only a merge's output.
    saved = {"orbax": tmp_path / "my_model", "safetensors": tmp_path / "my_model_st"}
    checkpoint.save_checkpoint(saved["orbax"], ckpts["experts"][0])
    checkpoint.save_safetensors(saved["safetensors"], ckpts["experts"][0])
    for fmt, folder in saved.items():
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        assert main([*args[:-1], str(folder), "--output-format", fmt, "--force"]) == 2
        assert "it is a umtam_jax output that records no writer" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_dry_run_reports_shape_mismatch(ckpts, tmp_path, capsys):
    bad = jax.tree.map(lambda x: x, ckpts["experts"][0])
    bad["attn"]["kernel"] = np.zeros((5, 6), np.float32)
    checkpoint.save_checkpoint(str(tmp_path / "bad"), bad)
    rc = main(
        [
            "--method",
            "ties",
            "--base",
            ckpts["paths"]["base"],
            "--expert",
            str(tmp_path / "bad"),
            "--param",
            "density=0.5",
            "--dry-run",
        ]
    )
    assert rc == 2
    assert "['attn']['kernel']" in capsys.readouterr().err


def test_dry_run_refuses_a_leaf_a_safetensors_output_cannot_name(tmp_path, capsys):
    """A key holding '.' has no safetensors tensor name: the dry run says so, as the run."""
    for name, value in (("base", 0.0), ("a", 1.0)):
        checkpoint.save_checkpoint(tmp_path / name, {"a.b": np.full(3, value, np.float32)})
    out = str(tmp_path / "out")
    argv = ["--method", "task_arithmetic", "--base", str(tmp_path / "base"), "--expert",
            str(tmp_path / "a"), "-o", out, "--output-format", "safetensors"]  # fmt: skip
    for extra in (["--dry-run"], ["--no-progress"]):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert "cannot write the safetensors output" in err and "['a.b'] has no tensor name" in err
        assert not (tmp_path / "out").exists()


def test_a_density_every_expert_gives_is_named_by_its_key(ckpts, tmp_path, capsys):
    """The same bad density in every entry was reported as a bare 'density'; the one
    density of 'parameters' is named by its key before anything is read."""
    p = ckpts["paths"]
    for experts, key, value in (
        (f"[{{path: {p['e0']}, density: 2}}]", "experts[0].density", 2),
        (f"[{{path: {p['e0']}, density: 2}}, {{path: {p['e1']}, density: 2}}]",
         "experts[0].density", 2),
        (f"[{p['e0']}, {p['e1']}]\nparameters: {{density: 2}}", "error: parameters.density", 2),
        # The default every expert replaces is not read.
        (f"[{{path: {p['e0']}, density: 3}}]\nparameters: {{density: 2}}",
         "experts[0].density", 3),
    ):  # fmt: skip
        config = _write(tmp_path, f"method: ties\nbase: {p['base']}\nexperts: {experts}\n")
        assert main([config, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"{key} must lie in (0, 1], got {value}" in err, err


def test_missing_statistics_and_checkpoint(ckpts, tmp_path, capsys):
    p = ckpts["paths"]
    assert (
        main(["--method", "umtam", "--base", p["base"], "--expert", p["plain"], "--dry-run"]) == 2
    )
    assert "has none" in capsys.readouterr().err
    assert (
        main(
            [
                "--method",
                "ties",
                "--base",
                str(tmp_path / "nope"),
                "--expert",
                p["e0"],
                "--param",
                "density=0.5",
                "--dry-run",
            ]
        )
        == 2
    )
    assert "cannot read the base" in capsys.readouterr().err


def test_a_refusal_of_a_mergekit_file_under_method_names_the_flag(ckpts, tmp_path, capsys):
    """``--method linear`` on a task_arithmetic file with a base_model: linear would merge
    the base as one more model, which needs its weight; the refusal named a merge_method
    'linear' the file does not hold."""
    p = ckpts["paths"]
    cfg = _write(
        tmp_path,
        f"""
        merge_method: task_arithmetic
        base_model: {p["base"]}
        models: [{{model: {p["e0"]}, parameters: {{weight: 0.5}}}}]
        """,
    )
    out = tmp_path / "merged"
    assert main([cfg, "--method", "linear", "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "merge_method 'linear' from --method; the file names 'task_arithmetic'" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_experts_statistics_or_fisher_of_other_parameters_names_its_path(
    ckpts, tmp_path, capsys
):
    """The library's ``statistics[1]`` / ``fishers[0]`` reached the user without the path
    they were read from."""
    p = ckpts["paths"]
    first = next(iter(ckpts["base"]))  # statistics lacking one of the base's leaves
    other = {k: v for k, v in ckpts["stats"][1].items() if k != first}
    checkpoint.save_checkpoint(tmp_path / "e1", ckpts["experts"][1], statistics=other)
    args = ["--base", p["base"], "--expert", p["e0"], "--no-progress", "--dry-run"]
    assert main(["--method", "umtam", *args, "--expert", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    want = "experts[1]'s statistics does not have the tree structure of base: it lacks"
    assert f"{want} base's leaf ['{first}']" in err
    assert f"(experts[1] is {tmp_path / 'e1'})" in err and "statistics[1]" not in err
    fisher = {k: v for k, v in ckpts["fishers"][0].items() if k != first}
    checkpoint.save_checkpoint(tmp_path / "f0", fisher)
    args = ["--base", p["base"], "--expert", f"{p['e0']},fisher={tmp_path / 'f0'}", "--expert",
            f"{p['e1']},fisher={p['f1']}", "--no-progress", "--dry-run"]  # fmt: skip
    assert main(["--method", "fisher", *args]) == 2
    err = capsys.readouterr().err
    assert "experts[0]'s Fisher does not have the tree structure of base" in err, err
    assert f"experts[0]'s Fisher is {tmp_path / 'f0'}" in err

"""End-to-end tests of ``umtam-merge`` on real Orbax checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import umtam_jax
from tests import trees
from tests.merging import helpers as H
from umtam_jax import merging
from umtam_jax.cli.merge import main

# Out-of-core and in-memory merges in float32: equal dtypes, values up to rounding.
TOL = {"rtol": 1e-6, "atol": 1e-7}

checkpoint = pytest.importorskip("umtam_jax.checkpoint")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A base, two experts with UMTAM statistics, one without, and two Fisher checkpoints."""
    root = tmp_path_factory.mktemp("ckpts")
    rng = np.random.default_rng(0)
    base, experts = H.random_experts(rng, 3, dtype=np.float32)
    stats = H.random_statistics(rng, 2, dtype=np.float32)
    fishers = [H.random_params(rng, dtype=np.float32) for _ in range(2)]
    fishers = [jax.tree.map(np.abs, f) for f in fishers]
    paths = {"base": str(root / "base")}
    checkpoint.save_checkpoint(paths["base"], base)
    for i in range(2):
        paths[f"e{i}"] = str(root / f"e{i}")
        checkpoint.save_checkpoint(paths[f"e{i}"], experts[i], statistics=stats[i])
        paths[f"f{i}"] = str(root / f"f{i}")
        checkpoint.save_checkpoint(paths[f"f{i}"], fishers[i])
    paths["plain"] = str(root / "plain")
    checkpoint.save_checkpoint(paths["plain"], experts[2])
    return {"paths": paths, "base": base, "experts": experts, "stats": stats, "fishers": fishers}


def _write(tmp_path, text):
    path = tmp_path / "merge.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_yaml_umtam_matches_library(ckpts, tmp_path):
    p = ckpts["paths"]
    out = tmp_path / "merged"
    cfg = _write(
        tmp_path,
        f"""
        method: umtam
        base: {p["base"]}
        experts:
          - path: {p["e0"]}
            density: 0.3
          - {p["e1"]}
        parameters:
          density: 0.5
          normalize: selected
          sign_election: false
        output: {out}
        """,
    )
    assert main([cfg, "--no-progress"]) == 0
    got = checkpoint.restore_params(str(out))
    want = merging.umtam(
        ckpts["base"],
        ckpts["experts"][:2],
        ckpts["stats"],
        density=[0.3, 0.5],
        normalize="selected",
        sign_election=False,
    )
    trees.assert_trees_close_typed(got, want, **TOL)
    meta = checkpoint.read_metadata(str(out))
    assert meta["user"]["merge"]["method"] == "umtam"


def test_flags_ties_dare_and_global_scope(ckpts, tmp_path):
    p = ckpts["paths"]
    base, experts = ckpts["base"], ckpts["experts"][:2]
    common = ["--base", p["base"], "--no-progress"]
    e = ["--expert", f"{p['e0']},weight=2.0", "--expert", f"{p['e1']},density=0.7"]
    assert (
        main(["--method", "ties", *common, *e, "--param", "density=0.2", "-o", str(tmp_path / "t")])
        == 0
    )
    want = merging.ties(base, experts, density=[0.2, 0.7], weights=[2.0, 1.0])
    trees.assert_trees_close_typed(checkpoint.restore_params(str(tmp_path / "t")), want, **TOL)
    # DARE is merged leaf by leaf but equals the whole-tree call (keys depend on leaf paths).
    assert (
        main(
            [
                "--method",
                "dare_ties",
                *common,
                *e,
                "--param",
                "density=0.5",
                "--seed",
                "3",
                "--param",
                "normalize=true",
                "-o",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    want = merging.dare_ties(
        base, experts, density=[0.5, 0.7], weights=[2.0, 1.0], key=jax.random.key(3), normalize=True
    )
    trees.assert_trees_close_typed(checkpoint.restore_params(str(tmp_path / "d")), want, **TOL)
    assert (
        main(
            [
                "--method",
                "umtam",
                *common,
                "--expert",
                p["e0"],
                "--param",
                "scope=global",
                "--param",
                "density=0.1",
                "-o",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    want = merging.umtam(base, experts[:1], ckpts["stats"][:1], density=0.1, scope="global")
    trees.assert_trees_close_typed(checkpoint.restore_params(str(tmp_path / "g")), want, **TOL)


def test_fisher_ota_prune(ckpts, tmp_path):
    p = ckpts["paths"]
    base, experts = ckpts["base"], ckpts["experts"][:2]
    common = ["--base", p["base"], "--no-progress"]
    assert (
        main(
            [
                "--method",
                "fisher",
                *common,
                "--expert",
                f"{p['e0']},fisher={p['f0']}",
                "--expert",
                f"{p['e1']},fisher={p['f1']}",
                "-o",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    trees.assert_trees_close_typed(
        checkpoint.restore_params(str(tmp_path / "f")),
        merging.fisher(base, experts, ckpts["fishers"]),
        **TOL,
    )
    assert (
        main(
            [
                "--method",
                "ota",
                *common,
                "--expert",
                p["e0"],
                "--expert",
                p["e1"],
                "--param",
                "power=1.0",
                "-o",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    trees.assert_trees_close_typed(
        checkpoint.restore_params(str(tmp_path / "o")),
        merging.ota(base, experts, ckpts["stats"], power=1.0),
        **TOL,
    )
    assert (
        main(
            [
                "--method",
                "prune",
                *common,
                "--expert",
                p["e0"],
                "--param",
                "density=0.25",
                "-o",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    trees.assert_trees_close_typed(
        checkpoint.restore_params(str(tmp_path / "p")),
        merging.prune(base, experts[0], ckpts["stats"][0], density=0.25),
        **TOL,
    )
    assert (
        main(
            [
                "--method",
                "prune",
                *common,
                "--expert",
                p["plain"],
                "--param",
                "density=0.25",
                "--param",
                "scores=magnitude",
                "-o",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    trees.assert_trees_close_typed(
        checkpoint.restore_params(str(tmp_path / "m")),
        merging.prune(base, ckpts["experts"][2], None, density=0.25),
        **TOL,
    )


def test_scanned_scope_from_yaml(ckpts, tmp_path):
    """``scope: {scanned: [names], axis: A}`` counts per layer of those leaves, as
    ``scope=umtam_jax.scanned(*names, axis=A)`` does in memory (and is recorded as written)."""
    p = ckpts["paths"]
    out = tmp_path / "merged"
    cfg = _write(
        tmp_path,
        f"""
        method: ties
        base: {p["base"]}
        experts: [{p["e0"]}, {p["e1"]}]
        parameters:
          density: 0.3
          scope: {{scanned: [conv], axis: 2}}
        output: {out}
        """,
    )
    assert main([cfg, "--no-progress"]) == 0
    scope = umtam_jax.scanned("conv", axis=2)
    want = merging.ties(ckpts["base"], ckpts["experts"][:2], density=0.3, scope=scope)
    trees.assert_trees_close_typed(checkpoint.restore_params(str(out)), want, **TOL)
    per_tensor = merging.ties(ckpts["base"], ckpts["experts"][:2], density=0.3)
    assert not np.array_equal(want["conv"]["kernel"], per_tensor["conv"]["kernel"])
    recorded = checkpoint.read_metadata(str(out))["user"]["merge"]["parameters"]["scope"]
    assert recorded == {"scanned": ["conv"], "axis": 2}


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


@pytest.mark.parametrize(
    "config,message",
    [
        (
            "method: frankenmerge\nbase: b\nexperts: [a]\noutput: o\n",
            "unknown method 'frankenmerge'",
        ),
        ("method: ties\nbase: b\nexperts: [a]\noutput: o\n", "requires the parameter 'density'"),
        (
            "method: ties\nbase: b\nexperts: [a]\nparameters: {density: 0.2, lamda: 1}\n",
            "unknown parameters ['lamda']",
        ),
        (
            "method: umtam\nbase: b\nexperts: [a]\nparameters: {sign_election: 1}\n",
            "must be true or false",
        ),
        (
            "method: ota\nbase: b\nexperts: [{path: a, weight: 2}]\nparameters: {power: x}\n",
            "must be a number",
        ),
        ("method: umtam\nbase: b\nexperts: [{path: a, weight: 2}]\n", "no per-expert weights"),
        (
            "method: prune\nbase: b\nexperts: [a, c]\nparameters: {density: 0.1}\n",
            "exactly one expert",
        ),
        ("method: fisher\nbase: b\nexperts: [a]\n", "needs a 'fisher' checkpoint"),
        ("method: ties\nbase: b\nexperts: [{path: a, alpha: 1}]\n", "unknown keys ['alpha']"),
        ("method: ties\nmodel: x\n", "unknown configuration keys ['model']"),
        ("!!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
        ("method: ties\nbase: b\nexperts: []\n", "non-empty list"),
        (
            "method: ties\nbase: b\nexperts: [a]\nparameters: {density: 0.2, scope: layers}\n",
            "'scope' of method 'ties' must be one of tensor, layer, global or a mapping",
        ),
        (
            "method: ties\nbase: b\nexperts: [a]\n"
            "parameters: {density: 0.2, scope: {scaned: [blocks]}}\n",
            "parameters.scope as a mapping takes 'scanned'",
        ),
        (
            "method: ties\nbase: b\nexperts: [a]\n"
            "parameters: {density: 0.2, scope: {scanned: blocks, axis: -1}}\n",
            "parameters.scope: axis must be a non-negative int, got -1",
        ),
        (
            "method: ties\nbase: b\nexperts: [a]\n"
            "parameters: {density: 0.2, scope: {scanned: [1]}}\n",
            "parameters.scope.scanned must be a list of key names, got [1]",
        ),
        (
            "method: ties\nbase: b\nexperts: [a, b/../a]\nparameters: {density: 0.2}\n",
            "experts[1] ('b/../a') repeats experts[0]: a model merged twice counts twice",
        ),
        (
            "method: ties\nbase: b\nexperts: [a]\n_mergekit_parameter_keys: {density: x}\n",
            "unknown configuration key ['_mergekit_parameter_keys']",
        ),
        (
            "method: ties\nbase: b\nexperts: [{path: a, _mergekit_key: x}]\n",
            "unknown configuration key experts[0]['_mergekit_key']",
        ),
        (
            "method: task_arithmetic\nbase: b\nexperts: [a, ./b]\n",
            "experts[1] ('./b') is the base: method 'task_arithmetic' reads the base as the",
        ),
    ],
)
def test_config_errors(tmp_path, capsys, config, message):
    assert main([_write(tmp_path, config), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


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


def test_module_entry_point():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-m", "umtam_jax.merge", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0
    assert "umtam-merge" in res.stdout


def test_an_interruption_a_missing_method_and_a_seed_nothing_draws_are_one_line(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C printed a KeyboardInterrupt traceback; no method read "unknown method None";
    a seed for a method that draws nothing was ignored."""
    from umtam_jax.cli import merge as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert cli.main(["--method", "ties", "--base", "b", "--expert", "e"]) == 130
    assert capsys.readouterr().err == "umtam-merge: interrupted\n"
    monkeypatch.undo()
    assert cli.main(["--base", "b", "--expert", "e", "--dry-run"]) == 2
    assert "'method' is required" in capsys.readouterr().err
    args = ["--method", "ties", "--base", "b", "--expert", "e", "--seed", "3", "--dry-run"]
    assert cli.main([*args, "--param", "density=0.5"]) == 2
    assert "method 'ties' draws nothing at random: it takes no 'seed'" in capsys.readouterr().err


def test_flag_options_given_twice_or_without_a_key_are_refused(capsys):
    from umtam_jax.cli import merge as cli

    for flags, needle in [
        (["--expert", "e,weight=1,weight=2"], "--expert e: weight is given twice"),
        (["--expert", "e", "--param", "=0.3"], "--param '=0.3' is not KEY=VALUE"),
        (["--expert", "e,=2"], "--expert option '=2' is not KEY=VALUE"),
        (["--expert", "e,density"], "--expert option 'density' is not KEY=VALUE"),
        (["--expert", "e,density=0.5,"], "--expert option '' is not KEY=VALUE"),
        # A comma without '=' after it belongs to the path.
        (["--expert", "e,v2,weight=2", "--param", "density=0.5"], "checkpoint e,v2: no checkpoint"),
    ]:
        assert cli.main(["--method", "ties", "--base", "b", *flags, "--dry-run"]) == 2
        assert needle in capsys.readouterr().err


def test_a_native_parameter_out_of_range_names_its_key(capsys):
    """It read 'the merge would fail: gamma must lie ...' without the key."""
    from umtam_jax.cli import merge as cli

    args = ["--method", "breadcrumbs", "--base", "b", "--expert", "e", "--dry-run"]
    assert cli.main([*args, "--param", "density=0.5", "--param", "gamma=7"]) == 2
    assert "error: --param gamma must lie in [0.0, 1.0], got 7\n" in capsys.readouterr().err


def test_python_warnings_are_one_line_each(tmp_path, capsys):
    """A warning raised during the run (here the reader's, for a folder holding both
    model.safetensors and an index) is one 'umtam-merge: warning:' line, not a file, line
    and source dump."""
    for name, value in (("base", 0.0), ("a", 1.0)):
        checkpoint.save_safetensors(tmp_path / name, {"w": np.full(3, value, np.float32)})
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps(index))
    argv = ["--method", "task_arithmetic", "--base", str(tmp_path / "base"), "--expert",
            str(tmp_path / "a"), "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("umtam-merge: warning: ") for line in lines), lines
    assert "holds both model.safetensors and model.safetensors.index.json" in lines[0]

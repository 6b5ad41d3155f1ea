"""``umtam-merge`` end to end on real Orbax checkpoints: a YAML configuration or flags
give the merge the library computes in memory, for UMTAM, TIES, DARE, Fisher, OTA,
pruning and per-layer (scanned) scopes."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import umtam_jax
from tests import trees
from tests.cli.cli_merge_helpers import TOL, _write, save_ckpts
from umtam_jax import merging
from umtam_jax.cli.merge import main

checkpoint = pytest.importorskip("umtam_jax.checkpoint")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A base, two experts with UMTAM statistics, one without, and two Fisher checkpoints."""
    return save_ckpts(tmp_path_factory.mktemp("ckpts"))


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

"""The method registry: every entry point reads the same methods and parameters."""

from __future__ import annotations

import inspect

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging import helpers as H
from umtam_jax import merging
from umtam_jax.cli.merge import main


def test_every_public_method_is_registered_with_its_signature():
    public = {"umtam", "task_arithmetic", "ties", "dare", "dare_ties", "fisher", "ota", "prune"}
    public |= {"linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap"}
    public |= {"arcee_fusion", "passthrough", "breadcrumbs", "breadcrumbs_ties", "della"}
    public |= {"della_linear", "sce", "ram", "ramplus_tl"}
    public |= {"regmean", "tsv_merge", "iso_c", "iso_cts", "consensus", "consensus_ties"}
    assert set(merging.METHODS) == public
    for name, method in merging.METHODS.items():
        assert method.fn is getattr(merging, name)
        signature = inspect.signature(method.fn).parameters
        for p in method.params:
            assert signature[p.name].kind is inspect.Parameter.KEYWORD_ONLY
            default = signature[p.name].default
            if default is inspect.Parameter.empty:
                assert method.defaults()[p.name] is merging.REQUIRED
            else:
                assert method.defaults()[p.name] == default
            assert p.kind in (
                "number",
                "numbers",
                "density",
                "weights",
                "bool",
                "choice",
                "scope",
                "key",
            )


def test_merge_by_name_equals_the_function_and_checks_its_parameters():
    rng = np.random.default_rng(0)
    base, experts = H.random_experts(rng, 2, dtype=np.float32)
    by_name = merging.merge("ties", base, experts, density=0.4, scaling=0.7)
    direct = merging.ties(base, experts, density=0.4, scaling=0.7)
    chex.assert_trees_all_equal(by_name, direct)
    with pytest.raises(ValueError, match="unknown method 'frankenmerge'; choose one of umtam"):
        merging.merge("frankenmerge", base, experts)
    with pytest.raises(TypeError, match=r"unexpected parameters \['lambda'\]"):
        merging.merge("ties", base, experts, density=0.4, **{"lambda": 1.0})
    with pytest.raises(TypeError, match="requires the parameter 'density'"):
        merging.merge("ties", base, experts)
    with pytest.raises(TypeError, match="sign_election must be True or False"):
        merging.merge("umtam", base, experts, [None, None], sign_election="yes")


def test_merge_refuses_a_per_expert_input_the_method_takes_none():
    """It was ignored: ``extra`` given to a method without one is an error naming it."""
    base, experts = {"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}, {"w": -jnp.ones(2)}]
    with pytest.raises(
        TypeError,
        match=r"method 'task_arithmetic' takes no per-expert input "
        r"besides the experts, but got extra\[1\]\['junk'\]",
    ):
        merging.merge("task_arithmetic", base, experts, [None, {"junk": 1}])
    with pytest.raises(
        TypeError,
        match=r"method 'slerp' takes no per-expert input .* got extra "
        r"\(a dict\)",
    ):
        merging.merge("slerp", base, experts[0], {}, t=0.5)
    got = merging.merge("fisher", base, experts, [{"w": jnp.ones(2)}] * 2)  # takes Fishers
    np.testing.assert_array_equal(np.asarray(got["w"]), [0.0, 0.0])


def test_prune_by_name_takes_one_expert_and_optional_scores():
    base = {"w": jnp.zeros(4)}
    expert = {"w": jnp.array([1.0, -3.0, 2.0, 0.5])}
    got = merging.merge("prune", base, expert, density=0.5)
    np.testing.assert_array_equal(np.asarray(got["w"]), [0.0, -3.0, 2.0, 0.0])
    scores = {"w": jnp.array([4.0, 0.0, 0.0, 3.0])}
    got = merging.merge("prune", base, expert, scores, density=0.5)
    np.testing.assert_array_equal(np.asarray(got["w"]), [1.0, 0.0, 0.0, 0.5])


def test_list_methods_prints_the_registry(capsys):
    assert main(["--list-methods"]) == 0
    out = capsys.readouterr().out
    for name, method in merging.METHODS.items():
        assert f"{name}: {method.summary}" in out
        for p in method.params:
            assert f"  {p.name} (" in out
    assert "density (density, required; per expert as 'density')" in out
    assert "normalize (choice, default 'all', one of all, selected)" in out
    # What umtam-merge also accepts: prune's scores, and no base where it is optional.
    assert "scores (choice, default 'saliency', one of saliency, magnitude)" in out
    for name, method in merging.METHODS.items():
        described = merging.describe(method).splitlines()[1]
        assert described.startswith("  inputs: optional base") == method.base_optional, name


def test_a_method_is_checked_when_it_is_made():
    """A top-k method without an importance, or an unknown sparsify step, crashed inside a
    merge (a NoneType error)."""
    import dataclasses

    from umtam_jax.merging import METHODS

    ties = METHODS["ties"]
    with pytest.raises(TypeError, match="'custom' has sparsify='topk' but no importance"):
        dataclasses.replace(ties, name="custom", importance=None)
    with pytest.raises(ValueError, match="sparsify must be 'topk', 'bernoulli' or None"):
        dataclasses.replace(ties, name="custom", sparsify="random")

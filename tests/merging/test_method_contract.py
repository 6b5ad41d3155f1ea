"""The contract every registered merging method keeps, run over the whole registry.

Each method in :data:`umtam_jax.merging.METHODS` needs an entry in ``CASES`` (a test fails
when one is missing), saying which arguments make a valid call and which properties apply:

- permutation invariance (experts, their per-expert inputs and weights permuted together)
  for the methods that are symmetric in their experts;
- K copies of one expert merge to that expert (with the arguments that make the method an
  average), or, for the methods taking one expert, an expert equal to the base gives the
  base;
- inputs are never modified;
- output structure and dtypes are the base's, for float32 and bfloat16 inputs;
- a non-finite value in any input is one error naming the input and the leaf path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging import helpers as H
from umtam_jax import merging

K = 3


@dataclasses.dataclass(frozen=True)
class Case:
    """How to call one method in the contract tests.

    Attributes:
      kwargs: keyword arguments of a valid call.
      copies: keyword arguments (over ``kwargs``) under which K copies of one expert
        merge to that expert; None when the method has no such setting (the reason is in
        ``why_not``).
      symmetric: whether the merge is invariant to the order of the experts.
      why_not: why a property does not apply.
      count: how many experts the method merges.
    """

    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    copies: dict[str, Any] | None = dataclasses.field(default_factory=dict)
    symmetric: bool = True
    why_not: str = ""
    count: int = 3


KEY = jax.random.key(0)
_ISOTROPIC = "the merged spectrum is flattened, so a copy's own spectrum is not kept"
_RANDOM = "the keep masks are drawn per expert index, so a permutation changes them"
CASES: dict[str, Case] = {
    "umtam": Case({"density": 0.5}, {"density": 1.0}),
    "task_arithmetic": Case({"weights": [1.0, 0.5, 2.0]}, {"weights": None, "scaling": 1 / K}),
    "ties": Case({"density": 0.5, "weights": [1.0, 0.5, 2.0]}, {"density": 1.0}),
    "dare": Case({"density": 0.5, "key": KEY}, {"density": 1.0, "scaling": 1 / K}, False, _RANDOM),
    "dare_ties": Case(
        {"density": 0.5, "key": KEY}, {"density": 1.0, "normalize": True}, False, _RANDOM
    ),
    "ota": Case({"weights": [1.0, 0.5, 2.0]}, {"weights": None}),
    "prune": Case({"density": 0.5}),
    "linear": Case({"weights": [1.0, 0.5, 2.0]}),
    "slerp": Case({"t": 0.3}),
    "nuslerp": Case({"weights": [1.0, 0.5]}, count=2),
    "multislerp": Case({"weights": [1.0, 0.5, 2.0]}),
    "karcher": Case(),
    "model_stock": Case(),
    "nearswap": Case({"t": 0.3}),
    "arcee_fusion": Case(),
    "passthrough": Case(),
    "fisher": Case({"weights": [1.0, 0.5, 2.0]}),
    "regmean": Case({"weights": [1.0, 0.5, 2.0]}),
    "breadcrumbs": Case(
        {"density": 0.8, "gamma": 0.1}, {"density": 1.0, "gamma": 0.0, "scaling": 1 / K}
    ),
    "breadcrumbs_ties": Case(
        {"density": 0.8, "gamma": 0.1}, {"density": 1.0, "gamma": 0.0, "normalize": True}
    ),
    "della": Case({"density": 0.6, "key": KEY}, {"density": 1.0, "epsilon": 0.0}, False, _RANDOM),
    "della_linear": Case(
        {"density": 0.6, "key": KEY},
        {"density": 1.0, "epsilon": 0.0, "scaling": 1 / K},
        False,
        _RANDOM,
    ),
    "sce": Case(),
    "ram": Case(),
    "ramplus_tl": Case(),
    "tsv_merge": Case(copies=None, why_not="each task keeps 1/K of its singular directions"),
    "iso_c": Case(copies=None, why_not=_ISOTROPIC),
    "iso_cts": Case(copies=None, why_not=_ISOTROPIC),
    "consensus": Case({"k": 2}, {"k": 1, "scaling": 1 / K}),
    "consensus_ties": Case({"density": 0.5}, {"density": 1.0, "k": 1, "normalize": True}),
}
methods = pytest.mark.parametrize("name", sorted(CASES))


def _extra(method, rng, base, k, dtype):
    """A valid per-expert input for ``method`` (None when it takes none)."""
    positive = lambda: H.build(lambda p, s, _: (rng.random(s) + 0.1).astype(dtype))  # noqa: E731
    if method.extra == "statistics":
        return H.random_statistics(rng, k, dtype=dtype)
    if method.extra in ("curvatures", "fishers"):
        return [positive() for _ in range(k)]
    if method.extra == "scores":
        return positive()
    if method.extra == "grams":

        def gram(path, shape, split):
            if len(shape) < 2:
                return None
            x = rng.standard_normal(shape[:-2] + (3 * shape[-2], shape[-2]))
            return (np.swapaxes(x, -1, -2) @ x).astype(dtype)

        return [H.build(gram) for _ in range(k)]
    return None


def _call(name, base, experts, extra, **overrides):
    method = merging.METHODS[name]
    kwargs = {**CASES[name].kwargs, **overrides}
    if method.single_expert:
        return merging.merge(method, base, experts[0], extra, **kwargs)
    if name == "passthrough":  # passes one model through, scaled
        return merging.merge(method, base, experts[:1], extra, **kwargs)
    return merging.merge(method, base, experts, extra, **kwargs)


def _inputs(name, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    k = CASES[name].count
    base, experts = H.random_experts(rng, k, dtype=dtype)
    extra = _extra(merging.METHODS[name], rng, base, k, dtype)
    return base, experts, extra


def test_every_registered_method_has_a_contract_case():
    assert sorted(merging.METHODS) == sorted(CASES)


@methods
def test_permuting_the_experts_does_not_change_the_merge(name):
    method, case = merging.METHODS[name], CASES[name]
    if method.single_expert or name == "passthrough" or not case.symmetric:
        pytest.skip(case.why_not or "takes one expert")
    base, experts, extra = _inputs(name)
    order = [2, 0, 1] if len(experts) == 3 else [1, 0]
    permuted = {}
    if case.kwargs.get("weights") is not None:
        permuted["weights"] = [case.kwargs["weights"][i] for i in order]
    want = _call(name, base, experts, extra)
    extra_p = [extra[i] for i in order] if isinstance(extra, list) else extra
    got = _call(name, base, [experts[i] for i in order], extra_p, **permuted)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


@methods
def test_copies_of_one_expert_merge_to_that_expert(name):
    method, case = merging.METHODS[name], CASES[name]
    base, experts, extra = _inputs(name)
    if method.single_expert or name == "passthrough":
        # One model in: an expert equal to the base is the base (passthrough: itself).
        got = _call(name, base, [base], extra if method.single_expert else None)
        chex.assert_trees_all_close(got, base, rtol=1e-5, atol=1e-6)
        return
    if case.copies is None:
        pytest.skip(case.why_not)
    k = len(experts)
    copies = [experts[0]] * k
    extra_c = [extra[0]] * k if isinstance(extra, list) else extra
    got = _call(name, base, copies, extra_c, **case.copies)
    chex.assert_trees_all_close(got, experts[0], rtol=1e-4, atol=1e-5)


@methods
def test_inputs_are_not_modified(name):
    inputs = _inputs(name)
    before = jax.tree.map(np.copy, inputs)
    _call(name, *inputs)
    chex.assert_trees_all_equal(inputs, before)


@methods
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_output_has_the_base_structure_and_dtypes(name, dtype):
    base, experts, extra = _inputs(name, dtype=np.float32)
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)  # noqa: E731
    base, experts = cast(base), [cast(e) for e in experts]
    got = _call(name, base, experts, extra)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, base)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(got))


@methods
@pytest.mark.parametrize("where", ["base", "expert", "extra"])
def test_a_non_finite_input_is_one_error_naming_its_leaf(name, where):
    base, experts, extra = _inputs(name)
    if where == "extra" and extra is None:
        pytest.skip("takes no per-expert input")
    if where == "extra" and merging.METHODS[name].extra == "statistics":
        extra[0]["attn"]["kernel"] = extra[0]["attn"]["kernel"]._replace(
            row=np.full_like(extra[0]["attn"]["kernel"].row, np.nan)
        )
    elif where == "extra":
        target = extra[0] if isinstance(extra, list) else extra
        target["attn"]["kernel"] = np.full_like(target["attn"]["kernel"], np.nan)
    else:
        tree = base if where == "base" else experts[0]
        tree["attn"]["kernel"] = np.where(
            np.arange(tree["attn"]["kernel"].size).reshape(6, 5) == 7, np.inf, 0.0
        ).astype(np.float32)
    with pytest.raises(ValueError, match=r"\['attn'\]\['kernel'\]"):
        _call(name, base, experts, extra)


@methods
def test_inputs_closed_over_by_a_jitted_function_merge_as_outside_it(name):
    """Models held fixed in a jitted function (only, say, a sweep's value traced): the
    value checks run on the concrete inputs at trace time instead of failing on a traced
    flag, the merge is the eager one, and the inputs reach the compiled program behind an
    optimization barrier (as constants XLA folded the selections at compile time: 20×
    slower compiles)."""
    base, experts, extra = _inputs(name)
    want = _call(name, base, experts, extra)
    got = jax.jit(lambda unused: _call(name, base, experts, extra))(0.0)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    jaxpr = jax.make_jaxpr(lambda unused: _call(name, base, experts, extra))(0.0)
    assert "optimization_barrier" in str(jaxpr)
    bad = jax.tree.map(np.copy, experts)
    bad[0]["attn"]["kernel"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"\['attn'\]\['kernel'\] is not finite"):
        jax.jit(lambda unused: _call(name, base, bad, extra))(0.0)


@methods
def test_inputs_passed_to_a_jitted_function_merge_as_outside_it(name):
    """Every array traced (the usual jit): value checks are skipped, nothing is computed
    at trace time (a base=None method built its zero base eagerly, as a model-sized
    constant, and multislerp's check read traced experts)."""
    base, experts, extra = _inputs(name)
    method = merging.METHODS[name]
    bases = [base, None] if method.base_optional else [base]
    for b in bases:
        want = _call(name, b, experts, extra)
        got = jax.jit(lambda b, e, x: _call(name, b, e, x))(b, experts, extra)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)

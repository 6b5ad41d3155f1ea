"""Input validation: clear errors that name the offending leaf path."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from umtam_jax import merging
from umtam_jax.optimizer._state import DenseStatistics

from . import helpers as H


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    base, experts = H.random_experts(rng, 2, dtype=np.float32)
    stats = H.random_statistics(rng, 2, dtype=np.float32)
    return base, experts, stats


KEY = jax.random.key(0)
ALL = {
    "umtam": lambda b, e, s, **kw: merging.umtam(b, e, s, **kw),
    "ties": lambda b, e, s, **kw: merging.ties(b, e, density=kw.pop("density", 0.5), **kw),
    "task_arithmetic": lambda b, e, s, **kw: merging.task_arithmetic(b, e, **kw),
    "dare": lambda b, e, s, **kw: merging.dare(b, e, density=kw.pop("density", 0.5), key=KEY),
    "dare_ties": lambda b, e, s, **kw: merging.dare_ties(
        b, e, density=kw.pop("density", 0.5), key=KEY
    ),
    "ota": lambda b, e, s, **kw: merging.ota(b, e, s),
    "fisher": lambda b, e, s, **kw: merging.fisher(b, e, [H.build(lambda *a: 1.0)] * len(e)),
}


def _set(tree, path, value):
    tree = jax.tree.map(lambda x: x, tree)
    tree[path[0]][path[1]] = value
    return tree


@pytest.mark.parametrize("method", sorted(ALL))
def test_shape_mismatch_names_leaf(inputs, method):
    base, experts, stats = inputs
    bad = _set(experts[1], ("attn", "kernel"), np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError, match=re.escape("['attn']['kernel']")):
        ALL[method](base, [experts[0], bad], stats)


@pytest.mark.parametrize("method", sorted(ALL))
def test_dtype_mismatch_names_leaf(inputs, method):
    base, experts, stats = inputs
    bad = _set(experts[0], ("conv", "kernel"), np.zeros((2, 3, 4), np.float16))
    with pytest.raises(ValueError, match=re.escape("dtype mismatch at ['conv']['kernel']")):
        ALL[method](base, [bad, experts[1]], stats)


@pytest.mark.parametrize("method", sorted(ALL))
def test_structure_mismatch_names_leaf(inputs, method):
    base, experts, stats = inputs
    bad = jax.tree.map(lambda x: x, experts[1])
    del bad["norm"]["scale"]
    bad["norm"]["bias"] = np.zeros((), np.float32)
    with pytest.raises(ValueError, match=re.escape("experts[1]") + ".*" + re.escape("['norm']")):
        ALL[method](base, [experts[0], bad], stats)


def test_integer_and_string_keys_of_the_same_names_are_told_apart_in_the_error():
    """An nnx.Sequential saved with Orbax (integer layer keys) beside safetensors experts
    (string names): the paths looked alike but for the quotes."""
    base = {"layers": {0: {"w": np.ones(2, np.float32)}}}
    expert = {"layers": {"0": {"w": np.ones(2, np.float32)}}}
    with pytest.raises(ValueError, match=re.escape(
        "it lacks base's leaf ['layers'][0]['w'] (it has ['layers']['0']['w']: the same "
        "names, one with integer keys, the other with strings")):  # fmt: skip
        merging.task_arithmetic(base, [expert])


@pytest.mark.parametrize("method", sorted(ALL))
def test_no_experts(inputs, method):
    base, _, _ = inputs
    with pytest.raises(ValueError, match="at least one expert"):
        ALL[method](base, [], [])


@pytest.mark.parametrize("method", ["umtam", "ties", "dare", "dare_ties"])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range(inputs, method, density):
    base, experts, stats = inputs
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"):
        ALL[method](base, experts, stats, density=density)


def test_densities_name_the_expert_and_refuse_strings(inputs):
    """A list of densities names its entry even when every entry is the same bad value
    (umtam-merge then names the file's key); strings and bools are not densities."""
    base, experts, _ = inputs
    with pytest.raises(ValueError, match=r"^density\[0\] must lie in \(0, 1\], got 2$"):
        merging.ties(base, experts, density=[2, 2])
    with pytest.raises(ValueError, match=r"^density\[1\] must lie in \(0, 1\], got 0.0$"):
        merging.ties(base, experts, density=[0.5, 0.0])
    with pytest.raises(ValueError, match=r"^density must lie in \(0, 1\], got 2$"):
        merging.ties(base, experts, density=2)
    # A 1-D array is one density per expert, as a list is (as weights take arrays).
    listed = merging.ties(base, experts, density=[0.3, 0.6])
    chex.assert_trees_all_equal(merging.ties(base, experts, density=np.array([0.3, 0.6])), listed)
    for bad, name in (("0.5", "density"), (b"0.5", "density"), (np.str_("0.5"), "density"),
                      (True, "density"), (["0.5", "0.5"], r"density\[0\]"),
                      ([0.5, np.bool_(True)], r"density\[1\]")):  # fmt: skip
        with pytest.raises(TypeError, match=rf"^{name} must be a number in \(0, 1\], got "):
            merging.ties(base, experts, density=bad)


def _with_value(tree, path, value):
    leaf = np.array(tree[path[0]][path[1]])  # a copy: the caller's tree stays as it was
    leaf.flat[0] = value
    return _set(tree, path, leaf)


@pytest.mark.parametrize("value", [np.nan, -np.inf])
@pytest.mark.parametrize("method", sorted(ALL))
def test_non_finite_expert_or_base_is_refused_with_its_path(inputs, method, value):
    base, experts, stats = inputs
    bad = _with_value(experts[1], ("attn", "kernel"), value)
    with pytest.raises(ValueError, match=re.escape("experts[1]['attn']['kernel'] is not finite")):
        ALL[method](base, [experts[0], bad], stats)
    assert np.all(np.isfinite(experts[1]["attn"]["kernel"]))
    bad_base = _with_value(base, ("conv", "kernel"), value)
    with pytest.raises(ValueError, match=re.escape("base['conv']['kernel'] is not finite")):
        ALL[method](bad_base, experts, stats)


def test_non_finite_statistics_curvatures_fishers_and_scores_are_refused(inputs):
    base, experts, stats = inputs
    node = stats[0]["attn"]["kernel"]
    row = np.array(node.row)
    row[0] = np.inf
    bad = jax.tree.map(lambda x: x, stats[0], is_leaf=lambda x: hasattr(x, "_fields"))
    bad["attn"]["kernel"] = node._replace(row=row)
    with pytest.raises(ValueError, match=re.escape("statistics[0]['attn']['kernel'].row is not")):
        merging.umtam(base, experts, [bad, stats[1]])
    with pytest.raises(ValueError, match=re.escape("curvatures[0]['attn']['kernel'].row is not")):
        merging.ota(base, experts, [bad, stats[1]])
    ones = H.build(lambda p, s, _: np.ones(s, np.float32))
    nan_fisher = _with_value(ones, ("norm", "scale"), np.nan)
    with pytest.raises(ValueError, match=re.escape("fishers[1]['norm']['scale'] is not finite")):
        merging.fisher(base, experts, [ones, nan_fisher])
    with pytest.raises(ValueError, match=re.escape("scores['norm']['scale'] is not finite")):
        merging.prune(base, experts[0], nan_fisher, density=0.5)


@pytest.mark.parametrize("field", ["row", "col", "saliency"])
def test_negative_second_moments_or_saliency_are_refused(inputs, field):
    """They are means of squares and magnitudes: a negative entry is not an optimizer's
    statistic (a sign flipped in a conversion), and the merge took it as it was."""
    base, experts, stats = inputs
    node = stats[0]["attn"]["kernel"]
    value = np.array(getattr(node, field))
    value.flat[0] = -1.0
    bad = jax.tree.map(lambda x: x, stats[0], is_leaf=lambda x: hasattr(x, "_fields"))
    bad["attn"]["kernel"] = node._replace(**{field: value})
    where = f"statistics[0]['attn']['kernel'].{field} has an entry -1.0"
    with pytest.raises(ValueError, match=re.escape(where)):
        merging.umtam(base, experts, [bad, stats[1]])


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda b, e, s: merging.task_arithmetic(b, e, scaling=np.nan), "scaling"),
        (lambda b, e, s: merging.ties(b, e, density=0.5, weights=[1.0, np.inf]), "weights[1]"),
        (lambda b, e, s: merging.umtam(b, e, s, lambda_curvature=np.nan), "lambda_curvature"),
        (lambda b, e, s: merging.ota(b, e, s, power=np.inf), "power"),
    ],
)
def test_non_finite_scalar_options_are_refused(inputs, call, name):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be finite")):
        call(*inputs)


def test_prune_density_and_scores_errors(inputs):
    base, experts, stats = inputs
    with pytest.raises(ValueError, match="density"):
        merging.prune(base, experts[0], None, density=0.0)
    bad = H.build(lambda p, s, _: np.ones(s, np.float32))
    bad["attn"]["bias"] = np.ones(7, np.float32)
    with pytest.raises(ValueError, match=re.escape("['attn']['bias']")):
        merging.prune(base, experts[0], bad, density=0.5)


def test_wrong_counts(inputs):
    base, experts, stats = inputs
    with pytest.raises(ValueError, match="1 statistics pytrees for 2 experts"):
        merging.umtam(base, experts, stats[:1])
    with pytest.raises(ValueError, match="3 weights for 2 experts"):
        merging.ties(base, experts, density=0.5, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="3 densities for 2 experts"):
        merging.ties(base, experts, density=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="1 curvature pytrees for 2 experts"):
        merging.ota(base, experts, stats[:1])
    with pytest.raises(ValueError, match="1 Fisher pytrees for 2 experts"):
        merging.fisher(base, experts, stats[:1])


def test_unknown_options(inputs):
    base, experts, stats = inputs
    with pytest.raises(ValueError, match="unknown normalize='mean'"):
        merging.umtam(base, experts, stats, normalize="mean")
    with pytest.raises(ValueError, match="unknown scope='layers'"):
        merging.umtam(base, experts, stats, scope="layers")
    with pytest.raises(ValueError, match="unknown scope"):
        merging.ties(base, experts, density=0.5, scope="model")
    with pytest.raises(ValueError, match="unknown scope"):
        merging.prune(base, experts[0], None, density=0.5, scope=None)


def test_statistics_errors_name_leaf(inputs):
    base, experts, stats = inputs
    bad = jax.tree.map(lambda x: x, stats[1], is_leaf=lambda x: hasattr(x, "_fields"))
    node = bad["attn"]["kernel"]
    bad["attn"]["kernel"] = node._replace(row=np.ones(7, np.float32))
    with pytest.raises(ValueError, match=re.escape("statistics[1]['attn']['kernel']")):
        merging.umtam(base, experts, [stats[0], bad])
    bad["attn"]["kernel"] = node._replace(sigma=np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape("statistics[1]['attn']['kernel'].sigma")):
        merging.umtam(base, experts, [stats[0], bad])
    bad["attn"]["kernel"] = optax.MaskedNode()
    with pytest.raises(ValueError, match=re.escape("statistics[1]['attn']['kernel'] has no")):
        merging.umtam(base, experts, [stats[0], bad])
    missing = {"attn": stats[1]["attn"], "conv": stats[1]["conv"]}
    with pytest.raises(ValueError, match=re.escape("['norm']['scale']")):
        merging.umtam(base, experts, [stats[0], missing])
    with pytest.raises(ValueError, match="holds no UMTAM statistics"):
        merging.umtam(base, experts, [stats[0], {"foo": np.zeros(3)}])
    # A checkpoint's dict form of the statistics with a field missing is named as such.
    as_dicts = H.as_dict_statistics(stats[1])
    del as_dicts["attn"]["bias"]["nu"]
    with pytest.raises(ValueError, match=re.escape("statistics[1]['attn']['bias'] lacks ['nu']")):
        merging.umtam(base, experts, [stats[0], as_dicts])
    del as_dicts["attn"]["bias"]
    as_dicts["attn"]["kernel"]["mu"] = np.zeros(3, np.float32)  # a dense field too
    mixed = "['attn']['kernel'] mixes the factored fields with ['mu']"
    with pytest.raises(ValueError, match=re.escape(mixed)):
        merging.umtam(base, experts, [stats[0], as_dicts])
    del as_dicts["attn"]["kernel"]["row"]
    with pytest.raises(ValueError, match=re.escape("['attn']['kernel'] lacks ['row']")):
        merging.umtam(base, experts, [stats[0], as_dicts])


def test_type_errors(inputs):
    base, experts, stats = inputs
    with pytest.raises(TypeError, match="sequence"):
        merging.task_arithmetic(base, experts[0])
    with pytest.raises(TypeError, match="floating"):
        merging.task_arithmetic({"i": np.arange(3)}, [{"i": np.arange(3)}])
    with pytest.raises(TypeError, match="PRNG key"):
        merging.dare(base, experts, density=0.5, key=None)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda d: merging.ties(base, experts, density=d))(0.5)


def test_statistics_dict_with_dense_node():
    base = {"b": jnp.zeros(3)}
    experts = [{"b": jnp.array([1.0, -2.0, 3.0])}]
    as_tuple = [{"b": DenseStatistics(mu=jnp.ones(3), nu=jnp.ones(3), saliency=None)}]
    as_dict = [{"b": {"mu": jnp.ones(3), "nu": jnp.ones(3)}}]
    a = merging.umtam(base, experts, as_tuple, density=0.5)
    b = merging.umtam(base, experts, as_dict, density=0.5)
    np.testing.assert_array_equal(np.asarray(a["b"]), np.asarray(b["b"]))


def test_integer_options_beyond_int32_are_taken_as_numbers():
    """JAX refuses a Python int beyond int32 (an OverflowError from inside jit): such a
    scaling or weight is taken as the float it is; one beyond float64 is not finite."""
    base = {"w": jnp.zeros(3)}
    experts = [{"w": jnp.array([1.0, -2.0, 0.5])}]
    got = merging.task_arithmetic(base, experts, scaling=3_000_000_000)["w"]
    np.testing.assert_allclose(got, 3e9 * np.array([1.0, -2.0, 0.5]), rtol=1e-6)
    got = merging.linear(base, experts + experts, weights=[2**40, 2**40])["w"]
    np.testing.assert_allclose(got, [1.0, -2.0, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match=r"weights\[0\] must be finite"):
        merging.task_arithmetic(base, experts, weights=[10**400])


@pytest.mark.parametrize("name", ["slerp", "nearswap", "prune", "arcee_fusion"])
def test_a_method_of_one_expert_given_a_list_says_so(name):
    """It said the list's item lacked a leaf of the base, though the two were alike."""
    base, expert = {"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)}
    options = {"slerp": {"t": 0.5}, "nearswap": {"t": 0.5}, "prune": {"density": 0.5}}
    with pytest.raises(TypeError, match=f"method '{name}' merges one expert with the base"):
        merging.merge(name, base, [expert], **options.get(name, {}))
    # A model whose parameters are a list is still one expert.
    as_list = merging.merge(name, [base["w"]], [expert["w"]], **options.get(name, {}))
    assert isinstance(as_list, list) and as_list[0].shape == (3,)


def test_a_scanned_scope_naming_no_leaf_is_refused():
    """A misspelt name merged the stacked leaves per tensor, silently."""
    base = {"blocks": {"kernel": jnp.zeros((2, 4, 3))}, "head": jnp.zeros((4, 3))}
    experts = [jax.tree.map(lambda x, i=i: x + i, base) for i in (1.0, 2.0)]
    for names in (("blokcs",), ("blocks", "blokcs")):  # a merge sees the whole tree
        with pytest.raises(ValueError, match=r"no leaf's key path contains 'blokcs'$"):
            merging.ties(base, experts, density=0.5, scope=umtam_jax.scanned(*names))
    merging.ties(base, experts, density=0.5, scope=umtam_jax.scanned("blocks"))


def test_a_big_endian_input_is_refused_naming_its_leaf():
    """JAX cannot hold such arrays: its promotion error named no leaf."""
    base, expert = {"w": np.zeros(3, ">f4")}, {"w": np.ones(3, ">f4")}
    with pytest.raises(TypeError, match=r"base\['w'\] has dtype >f4, whose byte order"):
        merging.task_arithmetic(base, [expert, expert])


def test_a_missing_base_or_expert_is_named():
    e = {"w": jnp.ones(3)}
    for merge, named in (
        (lambda: merging.ties(None, [e, e], density=0.5), "ties needs"),
        (lambda: merging.tsv_merge(None, [e, e]), "tsv_merge needs"),
        (lambda: merging.ties(None, e, density=0.5), "ties needs"),  # before the experts
        (lambda: merging.emr_merge(None, [e, e]), "base is None: this merge needs"),  # unnamed
    ):
        with pytest.raises(TypeError, match=f"^{named} the base model"):
            merge()
    with pytest.raises(TypeError, match=r"^experts\[0\] is None$"):
        merging.linear(None, [None, e])
    np.testing.assert_array_equal(merging.linear(None, [e, e])["w"], e["w"])  # base optional

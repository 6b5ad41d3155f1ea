"""The protocol's settings: the search space of every compared method (or the reason it
is excluded), each candidate's merge, the expert recipes and the test-split cap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umtam_jax import experiments as E
from umtam_jax import merging
from umtam_jax.experiments import protocol, spaces


def test_max_test_caps_the_test_split_only():
    cfg = E.PipelineConfig(max_eval=16, max_test=1000)
    assert cfg.test_cap == 1000 and cfg.data_key()["max_test"] == 1000
    assert "max_test" not in E.PipelineConfig(max_eval=16).data_key()
    with pytest.raises(ValueError):
        E.PipelineConfig(max_test="all")


def _small_inputs(k=3):
    """A small base, K experts, UMTAM statistics and Fishers for merging checks."""
    import umtam_jax

    keys = jax.random.split(jax.random.key(1), 2 * k + 1)
    base = {"w": jax.random.normal(keys[0], (8, 6)), "b": jnp.zeros(6)}
    experts, stats = [], []
    for i in range(k):
        e = jax.tree.map(lambda x, i=i: x + 0.1 * jax.random.normal(keys[i + 1], x.shape), base)
        experts.append(e)
        tx = umtam_jax.umtam(1e-2)
        grads = jax.tree.map(lambda x, i=i: jax.random.normal(keys[k + i + 1], x.shape), base)
        _, state = tx.update(grads, tx.init(base), base)
        stats.append(umtam_jax.statistics(state))
    fishers = [jax.tree.map(lambda x: jnp.abs(x) + 0.1, e) for e in experts]
    return base, experts, {"statistics": stats, "fisher": fishers, "": None}


def test_every_registered_method_is_compared_or_excluded_with_a_reason():
    pool = spaces.candidates(4)
    compared = {c.method for c in pool.values()}
    assert set(merging.METHODS) <= compared | set(spaces.EXCLUDED)
    assert not compared & set(spaces.EXCLUDED)
    assert all(
        merging.METHODS[m].single_expert or m in ("passthrough", "nuslerp") for m in spaces.EXCLUDED
    )
    for flag in ("curvature_pruning", "sign_election", "curvature_aggregation"):
        assert pool[f"umtam_no_{flag}"].fixed[flag] is False
    assert {pool["umtam"].fixed["normalize"], pool["umtam_selected"].fixed["normalize"]} == {
        "all",
        "selected",
    }
    # UMTAM normalize="all" shrinks by ~K: its scaling grid reaches K.
    assert max(pool["umtam"].axes[1].values) == 4.0
    for c in pool.values():
        n = int(np.prod([len(a.values) for a in c.axes]))
        assert n <= protocol.SIZES["tiny"].budget, c.key


def test_every_candidate_merges_and_scaling_is_linear():
    """Each candidate merges at its initial grid's first point; where ``scaling`` is
    searched, it multiplies the merged task vector (what the protocol's rescaling of one
    merge relies on)."""
    k = 3
    base, experts, extras = _small_inputs(k)
    seen = set()
    for c in spaces.candidates(k).values():
        if c.per_task or c.needs == "grams" or (c.method, tuple(c.axes)) in seen:
            continue  # per-task methods and RegMean run in the tiny end-to-end test
        seen.add((c.method, tuple(c.axes)))  # UMTAM's ablations: one check of each grid
        hp = {a.name: a.values[0] for a in c.axes}
        extra = extras[c.needs]
        kw = {"fishers" if c.needs == "fisher" else c.needs: extra} if c.needs else {}
        key = jax.random.key(0)
        one = E.merge_encoders(c.merge_method, base, experts, key=key, **kw, **hp)
        if "scaling" not in hp:
            continue
        hp["scaling"] = 1.0
        unit = E.merge_encoders(c.merge_method, base, experts, key=key, **kw, **hp)
        s = c.axes[[a.name for a in c.axes].index("scaling")].values[0]
        leaves = zip(*map(jax.tree.leaves, (unit, one, base)), strict=True)
        for u, o, b in leaves:
            np.testing.assert_allclose(o - b, s * (u - b), rtol=1e-4, atol=1e-6, err_msg=c.key)


def test_expert_recipes_add_the_memory_modes_to_the_size_settings():
    medium = protocol.SIZES["medium"]
    lean = protocol._expert_kwargs(medium, "umtam_lean")
    assert lean == {**medium.optimizer_kwargs, "error_decay": 0.0, "saliency": "final"}
    assert protocol._expert_kwargs(medium, "umtam") == dict(medium.optimizer_kwargs)
    assert protocol._expert_kwargs(medium, "adamw") == {}
    pool = spaces.candidates(4)
    assert protocol.usable(pool, "umtam_bf16") == list(pool)
    with pytest.raises(ValueError, match="experts_by='sgd'"):
        protocol.run_protocol(["a"], size="tiny", workdir="unused", experts_by="sgd")

"""Merging checkpoints that Orbax wrote itself: CheckpointManager steps, StandardCheckpointer
folders, Composite items and ``flax.nnx`` states, read leaf by leaf."""

from __future__ import annotations

import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import umtam_jax
from umtam_jax import checkpoint, engine, merging
from umtam_jax.cli.merge import main


def _train(params, tx, seed, steps=3):
    """A few steps on random gradients: the expert and its optimizer state."""
    state = tx.init(params)
    for t in range(steps):
        keys = jax.random.split(jax.random.key(100 * seed + t), len(jax.tree.leaves(params)))
        leaves, treedef = jax.tree.flatten(params)
        grads = treedef.unflatten(
            [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        )
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _digest(folder) -> str:
    """A hash of every file (name and bytes) under ``folder``."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base saved with StandardCheckpointer and two experts trained with
    ``chain(clip, umtam)``, each saved by a CheckpointManager as one ``default`` item."""
    root = tmp_path_factory.mktemp("plain_orbax")
    base = {
        "dense": {"kernel": jnp.linspace(-1, 1, 48).reshape(8, 6), "bias": jnp.zeros(6)},
        "head": {"kernel": jnp.ones((6, 3))},
    }
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=2)
    )
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(root / "base", base)
    experts, states = [], []
    for i in range(2):
        params, state = _train(base, tx, seed=i)
        experts.append(params)
        states.append(state)
        with ocp.CheckpointManager(root / f"run{i}") as manager:
            tree = {"params": params, "opt_state": state, "step": 3}
            manager.save(3, args=ocp.args.StandardSave(tree))
            manager.wait_until_finished()
    return {"root": root, "base": base, "experts": experts, "states": states}


def test_umtam_merge_of_manager_steps_equals_the_in_memory_merge(runs, tmp_path):
    root = runs["root"]
    before = _digest(root)
    # A step folder and an item folder of a step both name a checkpoint.
    out = engine.merge_checkpoints(
        "umtam",
        root / "base",
        [root / "run0" / "3", root / "run1" / "3" / "default"],
        tmp_path / "merged",
        density=0.5,
        progress=False,
    )
    stats = [umtam_jax.statistics(s) for s in runs["states"]]
    want = merging.umtam(runs["base"], runs["experts"], stats, density=0.5)
    got = checkpoint.restore_params(out)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert _digest(root) == before  # the inputs are read, never written


def test_source_reads_the_saved_arrays_and_statistics(runs):
    source = engine.open_source(runs["root"] / "run1" / "3", "expert 1's")
    assert isinstance(source, engine.PlainOrbaxSource)
    abstract = source.abstract()
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(
        lambda x: x.shape, runs["experts"][1]
    )
    names = [
        jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]
    ]
    want = dict(zip(names, jax.tree.leaves(runs["experts"][1]), strict=True))
    order = list(reversed(range(len(names))))  # any subset, in any order
    for j, array in zip(order, source.read(order), strict=True):
        np.testing.assert_array_equal(array, want[names[j]])
    stats = umtam_jax.statistics(runs["states"][1])
    flat = jax.tree_util.tree_flatten_with_path(
        stats, is_leaf=lambda n: isinstance(n, tuple) and hasattr(n, "_fields")
    )[0]
    by_name = {jax.tree_util.keystr(kp): node for kp, node in flat}
    for j, node in enumerate(source.read_statistics(range(len(names)))):
        saved = by_name[names[j]]
        assert type(node) is type(saved)
        for field in saved._fields:
            np.testing.assert_array_equal(getattr(node, field), getattr(saved, field))


def test_composite_items_params_and_opt_state(tmp_path):
    params = {"w": jnp.arange(12.0).reshape(4, 3)}
    tx = umtam_jax.umtam(1e-2, min_dim_size_to_factor=2)
    params, state = _train(params, tx, seed=5, steps=2)
    with ocp.CheckpointManager(tmp_path / "run", item_names=("params", "opt_state")) as manager:
        manager.save(
            1,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(state)
            ),
        )
        manager.wait_until_finished()
    source = engine.open_source(tmp_path / "run" / "1", "expert 0's")
    np.testing.assert_array_equal(source.read([0])[0], params["w"])
    [node] = source.read_statistics([0])
    np.testing.assert_array_equal(node.row, umtam_jax.statistics(state)["w"].row)


def test_nnx_model_and_optimizer_states(tmp_path):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 4, rngs=rngs)

    base = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
    experts, stats = [], []
    for i in range(2):
        model = Model(nnx.Rngs(0))
        tx = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=2)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        for t in range(2):
            grads = jax.tree.map(
                lambda x, t=t, i=i: jax.random.normal(jax.random.key(7 * i + t), x.shape),
                nnx.state(model, nnx.Param),
            )
            optimizer.update(model, grads)
        experts.append(nnx.state(model, nnx.Param))
        stats.append(umtam_jax.statistics(optimizer))
        with ocp.StandardCheckpointer() as ckptr:
            tree = {"model": nnx.state(model, nnx.Param), "optimizer": nnx.state(optimizer)}
            ckptr.save(tmp_path / f"e{i}", tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "base", base)
    source = engine.open_source(tmp_path / "e0", "expert 0's")
    assert sorted(source.abstract()["lin"]) == ["bias", "kernel"]  # Variables read as arrays
    out = engine.merge_checkpoints(
        "umtam", tmp_path / "base", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "m",
        density=0.5, progress=False,
    )  # fmt: skip
    want = nnx.to_pure_dict(merging.umtam(base, experts, stats, density=0.5))
    jax.tree.map(np.testing.assert_array_equal, checkpoint.restore_params(out), want)


def test_umtam_merge_cli_reads_manager_steps(runs, tmp_path):
    root = runs["root"]
    config = tmp_path / "ties.yaml"
    config.write_text(
        f"merge_method: ties\nbase_model: {root / 'base'}\nmodels:\n"
        f"  - model: {root / 'run0' / '3'}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {root / 'run1' / '3'}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    )
    assert main([str(config), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    want = merging.ties(runs["base"], runs["experts"], density=0.5)
    got = checkpoint.restore_params(str(tmp_path / "out"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_a_manager_folder_names_its_steps(runs):
    with pytest.raises(FileNotFoundError, match=r"CheckpointManager's folder.*steps \(3\)"):
        engine.open_source(runs["root"] / "run0", "expert 0's")


def test_unclear_parameters_are_refused(tmp_path):
    params = {"w": jnp.ones((2, 2))}
    state = umtam_jax.umtam(1e-2).init(params)
    with ocp.CheckpointManager(tmp_path / "a", item_names=("weights", "opt")) as manager:
        args = {"weights": ocp.args.StandardSave(params), "opt": ocp.args.StandardSave(state)}
        manager.save(0, args=ocp.args.Composite(**args))
        manager.wait_until_finished()
    with pytest.raises(ValueError, match=r"items 'opt', 'weights' and none is 'params'"):
        engine.open_source(tmp_path / "a" / "0", "expert 0's")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "b", {"weights": params, "opt_state": state})
    with pytest.raises(ValueError, match=r"optimizer state but no 'params' entry"):
        engine.open_source(tmp_path / "b", "expert 0's")


def _damage(folder) -> None:
    """Overwrites 32 bytes of every data file Orbax wrote under ``folder``."""
    data = [
        os.path.join(d, f)
        for d, _, files in os.walk(folder)
        for f in files
        if os.path.basename(d) == "d" and os.path.getsize(os.path.join(d, f)) > 64
    ]
    assert data
    for path in data:
        with open(path, "r+b") as f:
            f.seek(16)
            f.write(b"\xff" * 32)


def test_damage_and_unfinished_saves_are_reported(runs, tmp_path):
    for name, saved in [("base", runs["root"] / "base"), ("3", runs["root"] / "run0" / "3")]:
        copy = tmp_path / name
        shutil.copytree(saved, copy)
        _damage(copy)
        # Orbax reads its array index with the metadata: damage shows on opening at the latest.
        with pytest.raises(checkpoint.CheckpointCorruptError, match=f"{copy}.*damaged"):
            source = engine.open_source(copy, "expert 0's")
            source.read(range(len(jax.tree.leaves(source.abstract()))))
    unfinished = tmp_path / "4.orbax-checkpoint-tmp-17"
    shutil.copytree(runs["root"] / "run0" / "3", unfinished)
    with pytest.raises(ValueError, match="unfinished Orbax save"):
        engine.open_source(unfinished, "expert 0's")


def test_only_orbax_folders_are_taken(runs, tmp_path):
    ours = checkpoint.save_checkpoint(tmp_path / "ours", {"w": np.ones(2, "f4")})
    hf = checkpoint.save_safetensors(tmp_path / "hf", {"w": np.ones(2, "f4")})
    assert not checkpoint.is_orbax_folder(ours)
    assert not checkpoint.is_orbax_folder(hf)
    assert not checkpoint.is_orbax_folder(tmp_path / "missing")
    assert checkpoint.is_orbax_folder(runs["root"] / "base")
    assert isinstance(engine.open_source(ours, "the base"), engine.OrbaxSource)


def test_a_umtam_jax_checkpoint_missing_its_metadata_is_not_taken_for_plain_orbax(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ours", {"w": np.ones(2, "f4")})
    shutil.rmtree(path / "umtam_metadata")
    assert not checkpoint.is_orbax_folder(path)
    with pytest.raises(FileNotFoundError, match="'umtam_metadata'.*does not exist"):
        engine.open_source(path, "expert 0's")


def test_saved_layouts_without_a_params_entry(tmp_path):
    params = {"w": jnp.ones((4, 3))}
    tx = umtam_jax.umtam(1e-2, min_dim_size_to_factor=2)
    params, state = _train(params, tx, seed=6, steps=1)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "pair", (params, state))  # a tuple: which part is which?
        ckptr.save(tmp_path / "nested", {"state": {"params": params, "opt_state": state}})
    with pytest.raises(ValueError, match="holds an optimizer state but no 'params' entry"):
        engine.open_source(tmp_path / "pair", "expert 0's")
    source = engine.open_source(tmp_path / "nested", "expert 0's")  # one level down
    np.testing.assert_array_equal(source.read([0])[0], params["w"])
    np.testing.assert_array_equal(
        source.read_statistics([0])[0].row, umtam_jax.statistics(state)["w"].row
    )


def test_value_keys_of_a_plain_tree_are_kept(tmp_path):
    """Only an nnx state (its optimizer state saved as Variables too) loses its
    ``value`` keys: a plain tree whose leaves are named ``value`` keeps them."""
    params = {"attn": {"value": jnp.ones((4, 3))}}
    tx = umtam_jax.umtam(1e-2, min_dim_size_to_factor=2)
    params, state = _train(params, tx, seed=7, steps=1)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "e", {"params": params, "opt_state": state})
    source = engine.open_source(tmp_path / "e", "expert 0's")
    assert source.abstract()["attn"]["value"].shape == (4, 3)
    assert source.read_statistics([0])[0].saliency.shape == (4, 3)


def test_an_nnx_list_expert_merges_with_a_umtam_jax_base(tmp_path):
    """Orbax saves an ``nnx.List``'s integer keys as strings; merged with a umtam_jax
    checkpoint (which keeps them) they take its integers."""

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(11)])

    base = nnx.to_pure_dict(nnx.state(Model(nnx.Rngs(0)), nnx.Param))
    expert = jax.tree.map(lambda x: x + 1.0, base)
    checkpoint.save_checkpoint(tmp_path / "base", base)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "e", expert)
    out = engine.merge_checkpoints(
        "task_arithmetic", tmp_path / "base", [tmp_path / "e"], tmp_path / "m", progress=False
    )
    jax.tree.map(np.testing.assert_array_equal, checkpoint.restore_params(out), expert)


def test_nothing_is_written_as_a_step_or_inside_an_orbax_checkpoint(runs, tmp_path):
    """A merge written as a new step beside an expert's CheckpointManager steps would be
    restored by a resumed run and deleted past max_to_keep, one written inside a step is
    deleted with it: both refused. Other names in the manager's folder are not steps."""
    root = runs["root"]
    with pytest.raises(ValueError, match="is that of a step of the CheckpointManager"):
        engine.merge_checkpoints(
            "task_arithmetic", root / "base", [root / "run0" / "3"], root / "run0" / "4",
            progress=False,
        )  # fmt: skip
    assert sorted(os.listdir(root / "run0")) == ["3"]
    with pytest.raises(ValueError, match="inside the Orbax checkpoint"):
        checkpoint.save_checkpoint(root / "run1" / "3" / "merged", {"w": np.ones(2, "f4")})
    with pytest.raises(ValueError, match="inside the Orbax checkpoint"):
        checkpoint.save_checkpoint(root / "base" / "merged", {"w": np.ones(2, "f4")})
    shutil.copytree(root / "run0", tmp_path / "run")
    merged = checkpoint.save_checkpoint(tmp_path / "run" / "merged", {"w": np.ones(2, "f4")})
    with ocp.CheckpointManager(tmp_path / "run") as manager:
        assert manager.all_steps() == [3]  # not taken for a step
    assert merged.exists()


def test_a_link_into_an_unfinished_save_is_refused(runs, tmp_path):
    unfinished = tmp_path / "5.orbax-checkpoint-tmp-1"
    shutil.copytree(runs["root"] / "run0" / "3", unfinished)
    os.symlink(unfinished, tmp_path / "link")
    for path in (unfinished / "default", tmp_path / "link"):
        with pytest.raises(ValueError, match="unfinished Orbax save"):
            engine.open_source(path, "expert 0's")


def test_prefixed_and_padded_steps_and_links_into_a_step(tmp_path):
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", step_format_fixed_length=4)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        manager.save(3, args=ocp.args.StandardSave({"w": np.ones(2, "f4")}))
        manager.wait_until_finished()
    assert os.listdir(tmp_path / "run") == ["checkpoint_0003"]
    params = {"w": np.ones(2, "f4")}
    with pytest.raises(ValueError, match="is that of a step"):
        checkpoint.save_checkpoint(tmp_path / "run" / "checkpoint_0004", params)
    checkpoint.save_checkpoint(tmp_path / "run" / "other_0004", params)  # another prefix
    os.symlink(tmp_path / "run" / "checkpoint_0003" / "default", tmp_path / "link")
    with pytest.raises(ValueError, match="inside the Orbax checkpoint"):
        checkpoint.save_checkpoint(tmp_path / "link" / "merged", params)
    ours = checkpoint.save_checkpoint(tmp_path / "ours", params)
    assert not checkpoint.is_orbax_folder(ours / "params")  # an item of a umtam_jax one


def test_two_models_in_one_tree_are_refused_and_nnx_beside_plain_entries_read(tmp_path):
    params = {"w": jnp.ones((4, 3))}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(
            tmp_path / "gan", {"generator": {"params": params}, "critic": {"params": params}}
        )
    with pytest.raises(ValueError, match="entries 'critic', 'generator' each hold parameters"):
        engine.open_source(tmp_path / "gan", "expert 0's")
    state = umtam_jax.umtam(1e-2).init(params)
    hparams = {"model": {"depth": 4}, "optimizer": {"lr": 1e-3}}  # no optimizer state
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(
            tmp_path / "run", {"state": {"params": params, "opt_state": state}, "hp": hparams}
        )
    source = engine.open_source(tmp_path / "run", "expert 0's")
    assert list(source.abstract()) == ["w"] and source.has_statistics()

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 3, rngs=rngs)

    model = Model(nnx.Rngs(0))
    tx = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
    tree = {
        "model": nnx.state(model, nnx.Param),
        "optimizer": nnx.state(optimizer),
        "epoch": jnp.asarray(3),  # a plain entry beside the nnx ones
    }
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "nnx", tree)
    source = engine.open_source(tmp_path / "nnx", "expert 0's")
    assert source.has_statistics()
    want = umtam_jax.statistics(optimizer)["lin"]["kernel"].row
    j = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(
        source.abstract())[0]].index("['lin']['kernel']")  # fmt: skip
    np.testing.assert_array_equal(source.read_statistics([j])[0].row, want)

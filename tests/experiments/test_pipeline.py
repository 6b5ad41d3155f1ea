"""Miniature end-to-end pipeline: train → checkpoint → merge → evaluate (tiny BERT)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tests.experiments.toy_task_helpers import registered_toy_tasks, tokenizer_or_skip
from umtam_jax import experiments as E
from umtam_jax.experiments import data as data_lib
from umtam_jax.experiments import task_registry
from umtam_jax.experiments.models import minilm, minilm_pretrained
from umtam_jax.experiments.protocol_setup import TINY_BERT as TINY

CFG = E.PipelineConfig(
    max_length=16,
    batch_size=8,
    steps=3,
    learning_rate=1e-2,
    max_train=32,
    max_eval=16,
    eval_batch_size=8,
    config=TINY,
)
# Factor the tiny model's matrices too (32 x 64, 32 x 32, the 30522 x 32 embedding).
UMTAM_KW = {"rank": 4, "min_dim_size_to_factor": 16}
GRIDS = {
    "linear": [{}],
    "ties": [{"density": 0.3}, {"density": 0.6}],
    "dare": [{"density": 0.5, "scaling": 0.5}],
    "dare_ties": [{"density": 0.5, "scaling": 0.5}],
    "fisher": [{}],
    "ota": [{"scaling": 1.0}],
    "umtam": [{"density": 0.3}, {"density": 0.6, "normalize": "selected"}],
}


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_or_skip()


@pytest.fixture(scope="module")
def base():
    return minilm.init_encoder(jax.random.key(0), TINY)


@pytest.fixture
def custom_tasks():
    with registered_toy_tasks(["pipe_test_single", "pipe_test_pair"], "macro_f1") as names:
        yield list(names)


def _run(tasks, tokenizer, base, workdir, grids=GRIDS):
    _, ttasks, experts = E.prepare_experts(
        tasks,
        CFG,
        workdir,
        optimizer_kwargs=UMTAM_KW,
        base_encoder=base,
        ttasks={t: E.prepare_task(t, tokenizer, CFG, cache_dir=workdir / "tok") for t in tasks},
        progress=False,
        log=None,
    )
    result = E.run_merging(
        experts,
        ttasks,
        base,
        CFG,
        methods=list(grids),
        grids=grids,
        fisher_examples=8,
        progress=False,
    )
    return ttasks, experts, result


def _check_result(result, tasks, ttasks, grids=GRIDS):
    ttasks_labels = {t: ttasks[t].arrays["test"]["labels"] for t in tasks}
    assert set(result["methods"]) == set(grids)
    for r in result["methods"].values():
        for split in ("validation", "test"):
            assert set(tasks) <= set(r[split])
            assert all(0.0 <= r[split][t] <= 1.0 for t in tasks)
            assert np.isfinite(r[split]["norm"])
        ci = r["test_interval"]
        assert ci["estimate"] == pytest.approx(r["test"]["norm"])
        assert ci["low"] <= ci["estimate"] <= ci["high"]
        # The stored predictions give the reported test scores.
        for t in tasks:
            labels = ttasks_labels[t]
            spec = data_lib.get_task(t)
            pred = np.asarray(r["test_predictions"][t])
            want = data_lib.compute_metric(spec.metric, labels, pred, num_labels=len(spec.labels))
            assert r["test"][t] == pytest.approx(want)
    assert ("fisher" not in grids) or result["fisher_seconds"] > 0
    table = E.format_table(result)
    assert "UMTAM" in table and "Expert" in table


def test_custom_tasks_end_to_end(custom_tasks, tokenizer, base, tmp_path):
    """Tasks registered at run time flow through train → checkpoint → merge → evaluate."""
    from umtam_jax import checkpoint

    grids = {m: GRIDS[m] for m in ("ties", "umtam")}
    ttasks, experts, result = _run(custom_tasks, tokenizer, base, tmp_path, grids)
    assert ttasks["pipe_test_pair"].arrays["train"]["token_type_ids"].max() == 1
    _check_result(result, custom_tasks, ttasks, grids)
    for e in experts:
        assert (e.path / "umtam_metadata").exists() or e.path.exists()
        restored = checkpoint.restore_params(e.path)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(e.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        stats = checkpoint.restore_statistics(e.path)
        assert set(stats) == {"encoder", "head"}
    # Chosen hyper-parameters come from the grids (validation), never outside them.
    assert result["methods"]["umtam"]["hparams"] in [dict(g) for g in GRIDS["umtam"]]

    # Rerun: experts are restored from their checkpoints, results are identical.
    _, experts2, result2 = _run(custom_tasks, tokenizer, base, tmp_path, grids)
    assert all(e.info["restored"] for e in experts2)
    assert [e.scores for e in experts2] == [e.scores for e in experts]
    for m in grids:
        assert result2["methods"][m]["test"] == result["methods"][m]["test"], m


def test_builtin_tasks_end_to_end(tokenizer, base, tmp_path):
    """Two of the real tasks, tiny: the same pipeline as the demo."""
    tasks = ["fortune_topic", "kjv_section"]
    try:
        for t in tasks:
            data_lib.load_task(t, max_per_split=4)
    except data_lib.MissingDataError as e:
        pytest.skip(str(e))
    cfg_metric = {t: data_lib.get_task(t).metric for t in tasks}
    ttasks, experts, result = _run(tasks, tokenizer, base, tmp_path)
    _check_result(result, tasks, ttasks)
    for t in tasks:
        assert ttasks[t].task.metric == cfg_metric[t]
        assert len(ttasks[t].arrays["validation"]["labels"]) <= CFG.max_eval


def test_retrain_when_config_changes(custom_tasks, tokenizer, base, tmp_path):
    tt = E.prepare_task(custom_tasks[0], tokenizer, CFG, cache_dir=tmp_path / "tok")
    e1 = E.train_expert(tt, base, CFG, tmp_path, optimizer_kwargs=UMTAM_KW, progress=False)
    cfg2 = dataclasses.replace(CFG, steps=1)
    e2 = E.train_expert(tt, base, cfg2, tmp_path, optimizer_kwargs=UMTAM_KW, progress=False)
    assert e1.path != e2.path and not e2.info["restored"]
    e3 = E.train_expert(tt, base, cfg2, tmp_path, optimizer="adamw", progress=False)
    assert e3.statistics is None


def test_demo_cli_rejects_unknown_task(capsys):
    from umtam_jax.cli import demo

    assert demo.main(["--tasks", "no_such_task,kjv_section"]) == 2
    assert "no_such_task" in capsys.readouterr().err
    assert demo.main(["--list-tasks"]) == 0
    assert "kjv_section" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--steps", "-1"], "--steps: must be positive, got -1"),
        (["--max-eval", "0"], "--max-eval: must be positive, got 0"),
        (["--svd-every", "0"], "--svd-every: must be positive, got 0"),
        (["--learning-rate", "x"], "--learning-rate: 'x' is not a float"),
    ],
)
def test_demo_cli_rejects_values_that_would_train_nothing(capsys, argv, needle):
    from umtam_jax.cli import demo

    with pytest.raises(SystemExit) as exit_:
        demo.main(argv)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_demo_cli_writes_only_into_its_own_work_directory(tmp_path, monkeypatch, capsys):
    from umtam_jax.cli import demo

    # Stop after the checks: the stage that would train.
    def trained(*args, **kwargs):
        raise AssertionError("the demo went past its checks")

    monkeypatch.setattr(E, "prepare_experts", trained)
    home = tmp_path / "home"
    home.mkdir()
    (home / "demo_results.json").write_text("mine")
    (home / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "dangling").symlink_to("nowhere")
    named_like_the_demos = tmp_path / "results"  # only names the demo writes, no marker
    (named_like_the_demos / "experts").mkdir(parents=True)
    (named_like_the_demos / "demo_results.json").write_text("mine")
    for workdir, needle in (
        (home, "holds files the demo did not write (demo_results.json, notes.txt)"),
        (named_like_the_demos, "did not write (demo_results.json, experts)"),
        (tmp_path / "a_file", "is a file, not a folder"),
        (tmp_path / "a_file" / "sub", "cannot be made the demo's folder: Not a directory"),
        (tmp_path / "dangling", "is a link to nowhere, which does not exist"),
    ):
        assert demo.main(["--workdir", str(workdir)]) == 2
        assert needle in capsys.readouterr().err
    assert sorted(p.name for p in home.iterdir()) == ["demo_results.json", "notes.txt"]
    assert demo.main(["--workdir", str(tmp_path / "w"), "--methods", " , "]) == 2
    assert "--methods names no merge method" in capsys.readouterr().err
    for workdir in (tmp_path / "new", home / "empty"):  # a new folder, or an empty one
        workdir.mkdir(exist_ok=workdir.parent == home)
        with pytest.raises(AssertionError, match="past its checks"):
            demo.main(["--workdir", str(workdir)])
        assert (workdir / ".umtam-demo").is_file()
    (tmp_path / "new" / "notes.txt").write_text("added later")  # a demo folder stays one
    with pytest.raises(AssertionError, match="past its checks"):
        demo.main(["--workdir", str(tmp_path / "new")])


# A realistic plugin: string annotations and a dataclass need the module in sys.modules.
_PLUGIN = """
from __future__ import annotations

import dataclasses

from umtam_jax.experiments import data


@dataclasses.dataclass
class Source:
    texts: list[str]


data.register_task(
    "{name}",
    lambda seed: data.Examples(["a good one", "a bad one"] * 20, [0, 1] * 20),
    ("good", "bad"),
    overwrite=True,
)
"""


def test_demo_cli_imports_task_modules_from_a_file_and_a_module(tmp_path, monkeypatch, capsys):
    from umtam_jax.cli import demo

    (tmp_path / "my_tasks_file.py").write_text(_PLUGIN.format(name="plugin_task_file"))
    (tmp_path / "my_tasks_mod.py").write_text(_PLUGIN.format(name="plugin_task_mod"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        argv = ["--import", str(tmp_path / "my_tasks_file.py"), "--import", "my_tasks_mod"]
        assert demo.main([*argv, "--list-tasks"]) == 0
        out = capsys.readouterr().out
        assert "plugin_task_file" in out and "plugin_task_mod" in out
        assert data_lib.load_task("plugin_task_file").train.labels.size > 0
    finally:
        data_lib.unregister_task("plugin_task_file")
        data_lib.unregister_task("plugin_task_mod")
    assert demo.main(["--import", "no_such_module_xyz", "--list-tasks"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err
    assert demo.main(["--import", str(tmp_path / "missing.py"), "--list-tasks"]) == 2
    assert "missing.py" in capsys.readouterr().err


def test_tasks_from_the_entry_point_group_are_registered_on_first_use(monkeypatch):
    import importlib.metadata

    calls = []

    def register():
        calls.append(1)
        data_lib.register_task(
            "entry_point_task", lambda seed: (["x", "y"] * 10, [0, 1] * 10), ("a", "b")
        )

    class FakeEntryPoint:
        name, value = "demo_plugin", "some_pkg.tasks:register"

        def load(self):
            return register

    def entry_points(group):
        return [FakeEntryPoint()] if group == data_lib.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(task_registry, "_PLUGINS_LOADED", False)
    try:
        assert "entry_point_task" in data_lib.available_tasks()
        assert data_lib.get_task("entry_point_task").labels == ("a", "b")
        assert calls == [1]  # loaded once
    finally:
        data_lib.unregister_task("entry_point_task")


def test_a_broken_entry_point_names_itself(monkeypatch):
    import importlib.metadata

    class Broken:
        name, value = "broken_plugin", "nowhere.mod"

        def load(self):
            raise ModuleNotFoundError("No module named 'nowhere'")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Broken()])
    monkeypatch.setattr(task_registry, "_PLUGINS_LOADED", False)
    with pytest.raises(ImportError, match="broken_plugin"):
        data_lib.available_tasks()


def test_tokenized_cache_is_written_atomically_and_a_damaged_one_is_rebuilt(
    custom_tasks, tokenizer, tmp_path, monkeypatch
):
    def assert_same(got, want):
        assert got.arrays.keys() == want.arrays.keys()
        for split, arrays in want.arrays.items():
            assert got.arrays[split].keys() == arrays.keys()
            for field, value in arrays.items():
                np.testing.assert_array_equal(got.arrays[split][field], value)

    first = E.prepare_task(custom_tasks[0], tokenizer, CFG, cache_dir=tmp_path)
    (cached,) = tmp_path.iterdir()  # the arrays, and no temporary left beside them
    assert cached.suffix == ".npz"
    cached.write_bytes(cached.read_bytes()[:100])  # a write cut short by a crash
    assert_same(E.prepare_task(custom_tasks[0], tokenizer, CFG, cache_dir=tmp_path), first)
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]

    # The rebuilt entry is read back, not tokenized again.
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized although the cache holds the arrays")

    monkeypatch.setattr(minilm_pretrained, "tokenize_batch", no_tokenizing)
    assert_same(E.prepare_task(custom_tasks[0], tokenizer, CFG, cache_dir=tmp_path), first)


def test_the_caches_follow_every_label_and_the_base_encoder(tokenizer, base, tmp_path):
    # A task re-registered with corrected labels (of any split) is tokenized and trained
    # again, and an expert is never restored for another base encoder.
    def labelled(flip):
        def build(seed):  # given split: only the test split's labels change
            def split(n, start, flipped=False):
                texts = [f"this is text number {i}" for i in range(start, start + n)]
                return data_lib.Examples(texts, [(i % 2) ^ flipped for i in range(n)])

            return {"train": split(24, 0), "validation": split(8, 100), "test": split(8, 200, flip)}

        return build

    name = "pipe_test_relabelled"
    try:
        first = []
        for flip in (False, True):
            data_lib.register_task(name, labelled(flip), ("a", "b"), overwrite=True)
            tt = E.prepare_task(name, tokenizer, CFG, cache_dir=tmp_path / "tokens")
            first.append(tt)
            want = np.concatenate([tt.task.splits[s].labels for s in tt.arrays])
            got = np.concatenate([tt.arrays[s]["labels"] for s in tt.arrays])
            np.testing.assert_array_equal(got, want)
        assert E.expert_fingerprint(first[0], CFG) != E.expert_fingerprint(first[1], CFG)
        other = jax.tree.map(lambda x: x + 1e-3, base)
        keys = {E.expert_fingerprint(first[1], CFG, base_encoder=b) for b in (base, other)}
        assert len(keys) == 2
    finally:
        data_lib.unregister_task(name)

"""Tests of the real-task builders, splits, cache, metrics and registry."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest

from umtam_jax.experiments import builtin_tasks, data

BUILTIN = ("fortune_topic", "kjv_section", "wn_defmatch", "wn_supersense", "py_package")
CAPS = {"train": 300, "validation": 80, "test": 80}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("umtam_cache")


def _load(name, cache_root, **kw):
    try:
        return data.load_task(name, use_cache=True, cache_root=cache_root, **kw)
    except data.MissingDataError as e:
        pytest.skip(f"Debian data for {name} not installed: {e}")


@pytest.fixture(scope="module")
def full(cache):
    return {name: _load(name, cache, seed=0) for name in BUILTIN}


def test_builtins_registered():
    assert set(BUILTIN) <= set(data.available_tasks())
    assert data.get_task("wn_defmatch").kind == "pair"
    assert data.get_task("wn_defmatch").metric == "accuracy"
    for name in ("kjv_section", "fortune_topic", "wn_supersense", "py_package"):
        spec = data.get_task(name)
        assert spec.kind == "single" and spec.metric == "macro_f1"
    with pytest.raises(KeyError, match="available"):
        data.get_task("nope")


@pytest.mark.parametrize("name", BUILTIN)
def test_full_splits_stratified_and_disjoint(full, name):
    task = full[name]
    spec = data.get_task(name)
    assert task.label_names == spec.labels
    total = sum(len(e) for e in task.splits.values())
    counts = {s: e.class_counts(task.num_labels) for s, e in task.splits.items()}
    all_counts = sum(counts.values())
    assert (all_counts > 0).all()
    for s, frac in zip(data.SPLITS, (0.8, 0.1, 0.1), strict=True):
        # Per class, each split holds its fraction up to rounding (or +-1% for the
        # group-split pair task).
        tol = 1 if name != "wn_defmatch" else 0.01 * all_counts + 2
        assert np.all(np.abs(counts[s] - frac * all_counts) <= tol + 1), (s, counts[s])
    texts = {s: set(e.texts) for s, e in task.splits.items()}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert total > 2000


@pytest.mark.parametrize("name", BUILTIN)
def test_small_slice_sane_and_deterministic(name, cache):
    a = _load(name, cache, seed=0, max_per_split=CAPS)
    b = data.load_task(name, seed=0, max_per_split=CAPS, use_cache=False)  # fresh build
    c = _load(name, cache, seed=1, max_per_split=CAPS)
    kind = data.get_task(name).kind
    for s, cap in CAPS.items():
        ex = a.splits[s]
        assert len(ex) == cap
        assert ex.labels.dtype == np.int64
        assert ex.labels.min() >= 0 and ex.labels.max() < a.num_labels
        assert len(np.unique(ex.labels)) == a.num_labels  # every class present
        if kind == "pair":
            assert all(isinstance(t, tuple) and len(t) == 2 for t in ex.texts)
        else:
            assert all(isinstance(t, str) and t.strip() for t in ex.texts)
        assert ex.texts == b.splits[s].texts
        np.testing.assert_array_equal(ex.labels, b.splits[s].labels)
    assert a.train.texts != c.train.texts


def test_subsample_keeps_proportions(full):
    task = full["wn_supersense"]
    n = 1000
    idx = data.stratified_subsample(task.train.labels, n, seed=3)
    assert idx.size == n and np.unique(idx).size == n
    p_full = task.train.class_counts(5) / len(task.train)
    p_sub = np.bincount(task.train.labels[idx], minlength=5) / n
    np.testing.assert_allclose(p_sub, p_full, atol=1.0 / n + 1e-9)


def test_defmatch_pairs(full):
    task = full["wn_defmatch"]
    for ex in task.splits.values():
        counts = ex.class_counts(2)
        assert counts[0] == counts[1]
        # Every lemma appears once as a positive and once as a negative.
        pos = sorted(t[0] for t, y in zip(ex.texts, ex.labels, strict=True) if y == 1)
        neg = sorted(t[0] for t, y in zip(ex.texts, ex.labels, strict=True) if y == 0)
        assert pos == neg
    synsets = builtin_tasks.read_noun_synsets()
    by_def = {s.definition: s for s in synsets}
    for (lemma, gloss), y in list(zip(task.test.texts, task.test.labels, strict=True))[:500]:
        words = {w.lower() for w in by_def[gloss].words}
        assert (lemma.lower() in words) == bool(y)


def test_kjv_and_fortune_content(full):
    try:
        verses = builtin_tasks.kjv_verses()
    except data.MissingDataError as e:
        pytest.skip(str(e))
    assert len(verses) == 31102
    assert verses[0][0] == 0 and verses[-1][0] == 65
    kjv = full["kjv_section"]
    lookup = dict(zip(kjv.train.texts + kjv.test.texts + kjv.validation.texts,
                      np.concatenate([kjv.train.labels, kjv.test.labels,
                                      kjv.validation.labels]), strict=True))  # fmt: skip
    assert lookup["In the beginning God created the heaven and the earth."] == 0
    assert lookup["Jesus wept."] == 2
    fort = full["fortune_topic"]
    for ex in fort.splits.values():
        assert not any("\x08" in t or t == "%" for t in ex.texts)


def test_missing_packages_name_apt_command(tmp_path, monkeypatch):
    with pytest.raises(data.MissingDataError, match="apt-get install -y fortunes"):
        builtin_tasks.fortune_entries("computers", fortune_dir=tmp_path)
    monkeypatch.setenv("UMTAM_WORDNET_DIR", str(tmp_path))
    monkeypatch.setattr(builtin_tasks, "WORDNET_DIRS", ())
    with pytest.raises(data.MissingDataError, match="apt-get install -y wordnet-base"):
        builtin_tasks.wordnet_dir()
    monkeypatch.setattr(builtin_tasks, "BIBLE_DIRS", ())
    monkeypatch.delenv("UMTAM_BIBLE_DIR", raising=False)
    with pytest.raises(data.MissingDataError, match="apt-get install -y bible-kjv"):
        builtin_tasks.kjv_verses()


def test_py_package_reads_every_function_of_each_package(tmp_path, monkeypatch):
    from umtam_jax.experiments import code_task

    for i, package in enumerate(code_task.PY_PACKAGES):
        (tmp_path / package / "sub").mkdir(parents=True)
        (tmp_path / package / "a.py").write_text(
            f"def f{i}(x):\n    return x\n\n"
            f"class C:\n    async def m{i}(self):\n\n        def inner():\n"
            f"            pass\n        return 1\n"
        )
        (tmp_path / package / "sub" / "b.py").write_text("def shared():\n    pass\n")
    assert code_task.stdlib_functions("xml", root=tmp_path) == [
        "def f1(x):\nreturn x",
        "async def m1(self):\ndef inner():\npass\nreturn 1",
        "def inner():\npass",
        "def shared():\npass",
    ]
    monkeypatch.setenv("UMTAM_PYTHON_STDLIB", str(tmp_path))
    ex = code_task.build_py_package()
    # ``shared`` and ``inner`` appear in every package with two labels: dropped.
    assert ex.texts[:2] == [
        "def f0(x):\nreturn x",
        "async def m0(self):\ndef inner():\npass\nreturn 1",
    ]
    assert list(ex.labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    monkeypatch.setenv("UMTAM_PYTHON_STDLIB", str(tmp_path / "none"))
    monkeypatch.setattr(code_task, "STDLIB_DIRS", ())
    with pytest.raises(data.MissingDataError, match="apt-get install -y libpython3.11-stdlib"):
        code_task.build_py_package()


def test_py_package_cuts_functions_where_the_parser_puts_them(tmp_path):
    from umtam_jax.experiments import code_task

    # CRLF and lone-CR line ends (the file is read with universal newlines), a form feed
    # (not a line end for the parser), non-ASCII text before and inside a function
    # (columns count UTF-8 bytes), a one-line function after code on the same line, and an
    # unterminated last line.
    source = (
        "s = 'é'; x = 1\r\ndef f(a='ü'):\r\n    return a\r\n\x0c\n"
        "if True: z = 'ß'; \rclass K:\n    def g(self): return 'ñ'  # é\n"
        "def h():\n    pass"
    )
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "m.py").write_bytes(source.encode())
    want = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_source_segment(source, node)
            want.append("\n".join(ln.strip() for ln in text.splitlines() if ln.strip()))
    assert len(want) == 3
    assert code_task.stdlib_functions("email", root=tmp_path) == want


def test_cache_roundtrip(tmp_path):
    calls = []

    def builder(seed):
        calls.append(seed)
        return data.Examples([f"t{i}" for i in range(40)], np.arange(40) % 2)

    data.register_task("cached_toy", builder, ("a", "b"), cache=True, overwrite=True)
    try:
        a = data.load_task("cached_toy", seed=5, cache_root=tmp_path)
        b = data.load_task("cached_toy", seed=5, cache_root=tmp_path)
        assert calls == [5]
        path = tmp_path / "tasks" / "cached_toy-v1-seed5.json"
        assert a.test.texts == b.test.texts
        # A damaged or edited cache is built again, never used (nor a JSON traceback).
        record = json.loads(path.read_text())
        record["content"]["labels"] = [0] * 40  # relabelled by hand: valid JSON
        path.write_text(json.dumps(record))
        for damage in (lambda: None, lambda: path.write_bytes(path.read_bytes()[:100])):
            damage()
            c = data.load_task("cached_toy", seed=5, cache_root=tmp_path)
            assert c.test.labels.tolist() == a.test.labels.tolist()
        assert calls == [5, 5, 5]
    finally:
        data.unregister_task("cached_toy")


def test_custom_tasks_plug_in():
    def pairs(seed):
        rng = np.random.default_rng(seed)
        texts = [(f"q{i}", f"a{i}") for i in range(60)]
        return texts, rng.permutation(np.arange(60) % 3)

    data.register_task("toy_pair", pairs, ("x", "y", "z"), "macro_f1", "pair")
    try:
        with pytest.raises(ValueError, match="already registered"):
            data.register_task("toy_pair", pairs, ("x", "y", "z"))
        assert "toy_pair" in data.available_tasks()
        task = data.load_task("toy_pair", seed=0, fractions=(0.5, 0.25, 0.25))
        assert (len(task.train), len(task.validation), len(task.test)) == (30, 15, 15)
        assert task.evaluate(task.test.labels, task.test.labels) == 1.0

        def presplit():
            ex = data.Examples(["u", "v"], [0, 1])
            return {"train": ex, "validation": ex, "test": ex}

        data.register_task("toy_presplit", presplit, ("neg", "pos"))
        assert data.load_task("toy_presplit").test.texts in (["u", "v"], ["v", "u"])

        data.register_task("toy_bad", lambda: (["a"], [7]), ("neg", "pos"))
        with pytest.raises(ValueError, match="labels outside"):
            data.load_task("toy_bad")
        with pytest.raises(ValueError, match="kind"):
            data.register_task("toy_kind", pairs, ("a",), kind="triple")
    finally:
        for n in ("toy_pair", "toy_presplit", "toy_bad"):
            data.unregister_task(n)
    assert "toy_pair" not in data.available_tasks()


def test_mirror_task_reverses_the_labels_of_the_same_examples():
    spec = data.get_task("wn_defmatch_mirror")
    assert (spec.mirror_of, spec.labels, spec.kind) == (
        "wn_defmatch",
        ("defines", "different"),
        "pair",
    )

    def three(seed):
        rng = np.random.default_rng(seed)
        return [f"t{i}" for i in range(90)], rng.permutation(np.arange(90) % 3)

    data.register_task("toy3", three, ("x", "y", "z"), "macro_f1")
    try:
        mirror = data.register_mirror_task("toy3")
        assert (mirror.name, mirror.labels, mirror.metric) == (
            "toy3_mirror",
            ("z", "y", "x"),
            "macro_f1",
        )
        caps = {"train": 30, "test": 7}
        task = data.load_task("toy3", seed=2, max_per_split=caps)
        mirrored = data.load_task("toy3_mirror", seed=2, max_per_split=caps)
        assert (task.seed_name, mirrored.seed_name, mirrored.name) == (
            "toy3",
            "toy3",
            "toy3_mirror",
        )
        assert mirrored.label_names == ("z", "y", "x")
        for split in data.SPLITS:
            a, b = getattr(task, split), getattr(mirrored, split)
            assert a.texts == b.texts  # same examples in the same order
            np.testing.assert_array_equal(b.labels, 2 - a.labels)
        with pytest.raises(ValueError, match="already the mirror of 'toy3'"):
            data.register_mirror_task("toy3_mirror")
        with pytest.raises(ValueError, match="already registered"):
            data.register_mirror_task("toy3")
        assert data.register_mirror_task("toy3", mirror_name="toy3_b").mirror_of == "toy3"
        with pytest.raises(ValueError, match="a name of its own"):
            data.register_mirror_task("toy3", mirror_name="toy3", overwrite=True)
        # The mirror follows the task as registered now (here replaced by a 2-class one).
        two = lambda: ([f"t{i}" for i in range(40)], np.arange(40) % 2)  # noqa: E731
        data.register_task("toy3", two, ("p", "q"), overwrite=True)
        again = data.load_task("toy3_mirror", seed=2)
        assert again.label_names == ("q", "p")
        np.testing.assert_array_equal(
            again.test.labels, 1 - data.load_task("toy3", seed=2).test.labels
        )
    finally:
        for n in ("toy3", "toy3_mirror", "toy3_b"):
            data.unregister_task(n)


def test_metrics():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    assert data.accuracy(y, p) == pytest.approx(4 / 6)
    # per class F1: c0: tp1 fp1 fn1 -> .5; c1: tp2 fp1 fn0 -> .8; c2: tp1 fp0 fn1 -> 2/3
    assert data.macro_f1(y, p) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert data.compute_metric("macro_f1", y, p, num_labels=4) == pytest.approx(
        (0.5 + 0.8 + 2 / 3) / 4
    )
    data.register_metric("always_one", lambda t, p, num_labels=None: 1.0)
    assert data.compute_metric("always_one", y, p) == 1.0

"""``umtam-merge`` answers every bad configuration, input or output with one line on
standard error and exit status 2, writes nothing and leaves every input as it was."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from umtam_jax import checkpoint
from umtam_jax.checkpoint._format import FORMAT_VERSION_WITHOUT_KEYS as VERSION
from umtam_jax.cli import merge as cli
from umtam_jax.cli._yaml import MAX_CONFIG_BYTES


@pytest.fixture(scope="module")
def saved_ckpts(tmp_path_factory):
    """A base and two experts (with their UMTAM states), written once per module."""
    root = tmp_path_factory.mktemp("saved")
    rng = np.random.default_rng(0)
    base = {"w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)}
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=4)
    checkpoint.save_checkpoint(root / "base", base)
    for name in ("a", "b"):
        state = opt.init(base)
        g = {"w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)}
        updates, state = opt.update(g, state, base)
        expert = jax.tree.map(lambda p, u: p + u, base, updates)
        checkpoint.save_checkpoint(root / name, expert, opt_state=state)
    return root


@pytest.fixture
def ckpts(saved_ckpts, tmp_path, monkeypatch):
    """A private copy of the checkpoints as the working folder: each test may damage it."""
    work = tmp_path / "work"
    shutil.copytree(saved_ckpts, work, symlinks=True)
    monkeypatch.chdir(work)
    return work


def _files(root) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            path = os.path.join(folder, n)
            if os.path.islink(path):
                out[os.path.relpath(path, root)] = os.readlink(path).encode()
                continue
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _run(capsys, *argv) -> str:
    code = cli.main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umtam-merge: error: "), err
    assert "Traceback" not in err
    return lines[0]


TIES = ["--method", "ties", "--base", "base", "--expert", "a", "--param", "density=0.5"]
SUM_A = ["--method", "task_arithmetic", "--base", "base", "--expert", "a"]


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return str(path)


BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


@pytest.mark.parametrize("where", ["seed: *h", "parameters: {density: *h}", "weight"])
def test_yaml_alias_bomb_is_refused_before_expansion(ckpts, capsys, where):
    body = "method: ties\nbase: base\noutput: out\n"
    if where == "weight":
        body += "experts:\n  - {path: a, weight: *h}\n"
    else:
        body += f"experts: [a]\n{where}\n"
    start = time.perf_counter()
    line = _run(capsys, _config(ckpts, BOMB + body))
    assert time.perf_counter() - start < 5
    assert "not allowed" in line and "line" in line
    assert not (ckpts / "out").exists()


def test_duplicate_keys_and_oversized_files_are_refused(ckpts, capsys):
    text = "method: ties\nmethod: task_arithmetic\nbase: base\nexperts: [a]\noutput: out\n"
    assert "duplicate key 'method'" in _run(capsys, _config(ckpts, text))
    big = "method: ties\n" + "#" * (MAX_CONFIG_BYTES + 1)
    assert "larger than" in _run(capsys, _config(ckpts, big))
    twice = ["--param", "density=0.5", "--param", "density=0.7"]  # the last one was kept
    line = _run(capsys, "--method", "ties", "--base", "base", "--expert", "a", *twice, "-o", "out")
    assert "--param density is given twice" in line


@pytest.mark.parametrize(
    "flag",
    [
        ["--param", "density=!!python/object/apply:os.system ['echo hacked']"],
        ["--expert", "a,weight=!!python/object/apply:os.system ['echo hacked']"],
        ["--param", "density=*x"],
    ],
)
def test_flag_values_use_the_safe_loader(ckpts, capsys, flag):
    line = _run(capsys, "--method", "ties", "--base", "base", "--expert", "a", *flag, "-o", "out")
    assert flag[0] in line
    assert not (ckpts / "out").exists()


DARE = ["--method", "dare", "--base", "base", "--expert", "a", "--param", "density=0.5"]


@pytest.mark.parametrize("seed", [2**70, 2**63, -(2**63) - 1])
def test_seed_out_of_range(ckpts, capsys, seed):
    line = _run(capsys, *DARE, "--seed", str(seed), "-o", "out")
    assert "'seed'" in line
    assert not (ckpts / "out").exists()


def test_seed_range_is_what_jax_accepts(ckpts, capsys):
    for seed in (-1, -(2**63), 2**63 - 1):  # jax.random.key takes any C long
        assert cli.main([*DARE, "--seed", str(seed), "--dry-run"]) == 0
        assert "dry run OK" in capsys.readouterr().out


@pytest.fixture
def no_ckpts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "text,message",
    [
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "yaml is not valid YAML: YAML nested deeper"),
        ("a: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested deeper than 64 levels, line 1"),
        ("method: ties\n<<: {base: b}\nexperts: [a]\n", "merge keys (<<) are not allowed, line 2"),
        ("method: [ties]\nbase: b\nexperts: [a]\n", "unknown method ['ties']"),
        ("1: x\nmodel: y\n", "unknown configuration keys [1, 'model']"),
        ("method: ties\nbase: b\nexperts: [{path: a, 2: x, y: 1}]\n", "unknown keys [2, 'y']"),
        ("method: ties\nbase: ''\nexperts: [a]\n", "'base' (the base checkpoint path)"),
        ("method: ties\nbase: b\nexperts: ['']\n", "experts[0] needs a 'path'"),
        ("method: fisher\nbase: b\nexperts: [{path: a, fisher: ''}]\n", "experts[0].fisher"),
        ("method: dare\nbase: b\nexperts: [a]\nparameters: {density: 1}\noutput: ''\n", "'output'"),
    ],
)
def test_odd_yaml_gives_one_line(no_ckpts, capsys, text, message):
    line = _run(capsys, _config(no_ckpts, text))
    assert message in line


def test_readme_weight_example_names_the_key(no_ckpts, capsys):
    text = (
        "method: umtam\nbase: ckpt/base\nexperts:\n  - {path: ckpt/task_a, weight: 1.0}\n"
        "  - {path: ckpt/task_b, density: 0.3}\nparameters: {density: 0.2, normalize: all}\n"
        "output: ckpt/merged\n"
    )
    line = _run(capsys, _config(no_ckpts, text))
    assert "experts[0].weight: method 'umtam' takes no per-expert weights" in line
    assert "task_arithmetic" in line


@pytest.mark.parametrize(
    "argv",
    [["--seed", "abc"], ["--bogus"], ["--method", "frankenmerge"], ["a.yaml", "b.yaml"]],
)
def test_bad_command_line_gives_one_line(no_ckpts, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umtam-merge: error: "), err
    assert "usage" not in err


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize(
    "output",
    [
        "",
        ".",
        "..",
        "base",
        "base/merged",
        "base/params/merged",
        "notes.txt",
        "folder",
        "dangling",
        "notes.txt/out",
    ],
)
def test_bad_outputs_never_touch_anything(ckpts, capsys, output, in_memory):
    (ckpts / "notes.txt").write_text("precious")
    (ckpts / "folder").mkdir()
    (ckpts / "folder" / "data.bin").write_bytes(b"\x01\x02")
    (ckpts / "dangling").symlink_to(ckpts / "nowhere")
    before = _files(ckpts)
    extra = ["--in-memory"] if in_memory else []
    _run(capsys, *SUM_A, "--expert", "b", "-o", output, "--force", *extra)
    assert _files(ckpts) == before
    assert not (ckpts / "nowhere").exists()


@pytest.mark.parametrize("in_memory", [False, True])
def test_full_disk_and_unwritable_folder_give_one_line(
    ckpts, capsys, monkeypatch, in_memory, caplog
):
    from umtam_jax.checkpoint import _streaming

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "out")

    # The CLI writes its Orbax output, merged streamed or in memory, with this writer.
    monkeypatch.setattr(_streaming, "_write_streaming", full)
    before = _files(ckpts)
    extra = ["--in-memory"] if in_memory else []
    line = _run(capsys, *TIES, "-o", "out", *extra)
    assert "No space left on device" in line
    assert _files(ckpts) == before  # no output, no staging left behind

    def full_tensorstore(*args, **kwargs):  # how Orbax reports it: logged, then raised
        logging.getLogger("absl").error("_SignalingThread.run() raised an exception")
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file '
            '"/x/.out.umtam-new-1/params": Failed to write 17 bytes to file 8: No space left '
            "on device [os_error_code='28']"
        )

    monkeypatch.setattr(_streaming, "_write_streaming", full_tensorstore)
    line = _run(capsys, *TIES, "-o", "out", *extra)
    assert line.endswith(f"cannot write {ckpts / 'out'}: No space left on device"), line
    assert not [r for r in caplog.records if r.name == "absl"]  # no traceback logged first
    assert _files(ckpts) == before

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(ckpts / "locked"))

    monkeypatch.setattr(os, "makedirs", denied)
    line = _run(capsys, *TIES, "-o", "locked/out", *extra)
    assert "Permission denied" in line
    assert _files(ckpts) == before


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_expert_is_named(ckpts, capsys, in_memory, damage):
    data = max(
        (os.path.join(d, n) for d, _, ns in os.walk(ckpts / "a" / "params") for n in ns),
        key=os.path.getsize,
    )
    blob = bytearray(open(data, "rb").read())  # noqa: SIM115
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x20
    else:
        blob = blob[: len(blob) // 2]
    with open(data, "wb") as f:
        f.write(blob)
    extra = ["--in-memory"] if in_memory else []
    line = _run(capsys, *SUM_A, "-o", "out", *extra)
    assert "corrupt" in line and os.fspath(ckpts / "a") in line
    assert not (ckpts / "out").exists()


@pytest.mark.parametrize(
    "old,new,where",
    [
        ('"t"', '"u"', "the entry at the root has no node type"),
        ('"children"', '"childran"', "the dict at the root has no list of children"),
        ('"float32"', '"flaat32"', "the array at /w has no valid dtype"),
        ('"shape": [64', '"shape": [-64', "the array at /w has no valid shape"),
        (
            f'"format_version": {VERSION}',
            f'"format_version": "{VERSION}"',
            f"format_version '{VERSION}'",
        ),
    ],
)
def test_damaged_checkpoint_metadata_is_named_corrupt(ckpts, capsys, old, new, where):
    meta = ckpts / "a" / "umtam_metadata" / "metadata"
    text = meta.read_text()
    assert old in text
    meta.write_text(text.replace(old, new, 1))
    line = _run(capsys, *SUM_A, "-o", "out")
    assert f"checkpoint {ckpts / 'a'} has damaged metadata" in line and where in line
    with pytest.raises(checkpoint.CheckpointCorruptError, match="damaged metadata"):
        checkpoint.restore_params(ckpts / "a")
    assert not (ckpts / "out").exists()


@pytest.mark.parametrize("damaged", ["model.safetensors", "model.safetensors.index.json"])
def test_deeply_nested_safetensors_json_gives_one_line(ckpts, capsys, damaged):
    folder = ckpts / "hf"
    checkpoint.save_safetensors(folder, {"w": np.ones(4, np.float32)})
    if damaged == "model.safetensors.index.json":
        os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
        (folder / damaged).write_text("[" * 100_000 + "]" * 100_000)
    else:
        header = b"[" * 100_000 + b"]" * 100_000
        (folder / damaged).write_bytes(len(header).to_bytes(8, "little") + header)
    line = _run(capsys, "--method", "linear", "--expert", "hf", "-o", "o")
    assert f"{folder / damaged} is not a valid safetensors" in line


def test_a_failed_merge_leaves_no_folder_it_made(ckpts, capsys):
    checkpoint.save_safetensors(ckpts / "nan", {"w": np.full((64, 48), np.nan, np.float32)})
    before = _files(ckpts)
    line = _run(capsys, *SUM_A[:-1], "nan", "-o", "new/deep/out")
    assert "is not finite" in line
    assert not (ckpts / "new").exists() and _files(ckpts) == before


@pytest.mark.parametrize(
    ("base_pos", "expert_pos", "message"),
    [
        (np.int64, np.float32, "the base's is int64, e's is float32"),
        (np.float32, np.int64, "the base's is float32, e's is int64"),
        (np.int64, np.bool_, "the base's is int64, e's is bool"),
    ],
)
def test_integer_buffer_of_another_kind_is_refused(
    tmp_path, capsys, monkeypatch, base_pos, expert_pos, message
):
    """An integer buffer (BERT's ``position_ids``) is copied from the base: an expert
    holding it as floats is a different model, refused whichever of the two is the base
    (the values 0, 1, 2 compare equal as floats, so a value check alone accepted it)."""
    monkeypatch.chdir(tmp_path)
    w = np.ones((3, 4), np.float32)
    checkpoint.save_safetensors("b", {"w": w, "pos": np.arange(2).astype(base_pos)})
    checkpoint.save_safetensors("e", {"w": 2 * w, "pos": np.arange(2).astype(expert_pos)})
    line = _run(capsys, "--method", "task_arithmetic", "--base", "b", "--expert", "e", "-o", "o")
    assert f"dtype mismatch at ['pos']: {message}" in line
    assert not os.path.exists("o")


def test_integer_buffer_of_another_width_is_copied_from_the_base(tmp_path, monkeypatch):
    """int32 ``position_ids`` (a model saved by JAX without x64) beside the base's int64
    ones: the values are equal, so the base's int64 buffer is copied."""
    monkeypatch.chdir(tmp_path)
    w = np.ones((3, 4), np.float32)
    checkpoint.save_safetensors("b", {"w": w, "pos": np.arange(5, dtype=np.int64)})
    checkpoint.save_safetensors("e", {"w": 2 * w, "pos": np.arange(5, dtype=np.int32)})
    argv = ["--method", "task_arithmetic", "--base", "b", "--expert", "e", "-o", "o"]
    assert cli.main([*argv, "--no-progress"]) == 0
    reader = checkpoint.SafetensorsReader("o")
    out = dict(zip(["pos", "w"], reader.read(["pos", "w"]), strict=True))
    assert out["pos"].dtype == np.int64
    np.testing.assert_array_equal(out["pos"], np.arange(5))
    np.testing.assert_array_equal(out["w"], 2 * w)


def test_errors_give_the_path_of_each_expert_they_name(tmp_path, capsys, monkeypatch):
    """A mergekit file lists the base among its ``models``, so the library's index among
    the experts (``experts[1]``) is not the entry's place there: the message names the
    entry as the file does (``models[2]``), and its path follows."""
    monkeypatch.chdir(tmp_path)
    for name, rows in (("b", 3), ("e1", 3), ("e2", 4), ("e3", 3)):
        checkpoint.save_safetensors(name, {"w": np.ones((rows, 4), np.float32)})
    config = _config(
        tmp_path,
        "merge_method: ties\nbase_model: b\nparameters: {density: 0.5}\n"
        "models: [{model: b}, {model: e1}, {model: e2}]\n",
    )
    line = _run(capsys, config, "-o", "o")
    assert line.endswith("base has (3, 4), models[2] has (4, 4) (models[2] is e2)"), line
    # A list under the native 'parameters' is named there, not as an expert's own value.
    native = _config(tmp_path, "method: ties\nbase: b\nexperts: [e1, e3]\n"
                               "parameters: {density: [0.5, 2.0]}\n")  # fmt: skip
    line = _run(capsys, native, "-o", "o")
    assert "parameters.density[1] must lie in (0, 1], got 2.0" in line, line
    # A tensor named like a per-expert value keeps its name in a leaf path.
    for name, rows in (("b2", 3), ("c2", 4)):
        checkpoint.save_safetensors(name, {"blocks": {"density[1]": np.ones((rows, 4), "f4")}})
    config = _config(tmp_path, "merge_method: ties\nbase_model: b2\nparameters: {density: 0.5}"
                               "\nmodels: [{model: b2}, {model: c2}]\n")  # fmt: skip
    line = _run(capsys, config, "-o", "o")
    assert "shape mismatch at ['blocks']['density[1]']: base has (3, 4), models[1]" in line, line

"""Checkpoints never lose or silently corrupt data: overwrite rules, crash-safe swaps,
locking, leftovers of killed saves, checksums and exact round trips of awkward keys."""

from __future__ import annotations

import errno
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from umtam_jax import checkpoint, engine
from umtam_jax.checkpoint import _filesystem, _processes, _safety, _save

OLD = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones(3, np.float32)}
NEW = {"w": -np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.zeros(3, np.float32)}


def _tree_files(root) -> dict[str, bytes]:
    out = {}
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _hidden_leftovers(path) -> list[str]:
    parent, name = os.path.split(os.fspath(path))
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}.") or ".orbax" in n)


# ----------------------------------------------------------------------------- overwrite


@pytest.mark.parametrize("overwrite", [False, True])
def test_never_replaces_a_regular_file(tmp_path, overwrite):
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    with pytest.raises(ValueError, match="is not a umtam_jax checkpoint"):
        checkpoint.save_checkpoint(target, OLD, overwrite=overwrite)
    assert target.read_text() == "precious"


@pytest.mark.parametrize("overwrite", [False, True])
def test_never_replaces_a_foreign_folder(tmp_path, overwrite):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = _tree_files(folder)
    with pytest.raises(ValueError, match="not a umtam_jax output"):
        checkpoint.save_checkpoint(folder, OLD, overwrite=overwrite)
    like = {"w": jnp.zeros((2,))}
    with pytest.raises(ValueError, match="not a umtam_jax output"):
        checkpoint.save_params_streaming(
            folder, like, lambda i: np.zeros(2, np.float32), overwrite=overwrite
        )
    assert _tree_files(folder) == before


def test_existing_checkpoint_needs_overwrite_then_is_replaced(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save_checkpoint(path, NEW)
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    checkpoint.save_checkpoint(path, NEW, overwrite=True)
    chex.assert_trees_all_equal(checkpoint.restore_params(path), NEW)
    assert _hidden_leftovers(path) == []


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_overwrite_refuses_an_output_holding_what_its_save_did_not_write(tmp_path, fmt):
    save = checkpoint.save_checkpoint if fmt == "orbax" else checkpoint.save_safetensors
    path, source = tmp_path / "model", tmp_path / "source"
    save(source, OLD)
    save(path, OLD)
    save(path, NEW, overwrite=True)  # only its own entries: replaced
    save(path / "umtam_statistics", OLD)  # the statistics folder beside a model's tensors
    (path / "README.md").write_text("model card")
    before = _tree_files(tmp_path)
    with pytest.raises(ValueError, match=r"holds README\.md, umtam_statistics, which umtam_jax"):
        save(path, OLD, overwrite=True)
    assert _tree_files(tmp_path) == before  # nothing deleted, nothing written
    with pytest.raises(ValueError, match="README.md"):
        engine.check_output(
            epath.Path(path),
            engine.job_from_paths("passthrough", None, [source], statistics=None, kwargs={}),
            fmt,
            overwrite=True,
        )  # fmt: skip


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_overwrite_refuses_files_added_in_subfolders_or_edited_since(tmp_path, fmt):
    """The record of what a save wrote covers every file of the output, with its size and
    modification time: a note put into one of its folders, or a file of it edited by
    hand (a model card, a config), is not deleted by the next overwrite."""
    save = checkpoint.save_checkpoint if fmt == "orbax" else checkpoint.save_safetensors
    path = tmp_path / "model"
    save(path, OLD)
    inner = sorted(p for p in path.rglob("*") if p.is_dir())
    if inner:  # Orbax's item folders
        (inner[0] / "MY_NOTES.txt").write_text("keep me")
        shown = f"{inner[0].relative_to(path)}/MY_NOTES.txt"
    else:  # a safetensors folder has none: make one, it counts as added
        (path / "notes").mkdir()
        (path / "notes" / "x.txt").write_text("keep me")
        shown = "notes"
    before = _tree_files(tmp_path)
    with pytest.raises(ValueError, match=f"holds {re.escape(shown)}, which umtam_jax"):
        save(path, NEW, overwrite=True)
    assert _tree_files(tmp_path) == before
    for extra in path.rglob("*"):
        if extra.name in ("MY_NOTES.txt", "x.txt", "notes"):
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    ours = next(
        p
        for p in sorted(path.rglob("*"))
        if p.is_file() and "json" in p.name and p.name != ".umtam-contents.json"
    )
    ours.write_text(ours.read_text() + " ")  # edited by hand
    with pytest.raises(ValueError, match=f"holds {re.escape(str(ours.relative_to(path)))}"):
        save(path, NEW, overwrite=True)


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_overwrite_refuses_a_copied_output_without_its_contents_record(tmp_path, fmt):
    """``cp out/* repo/`` copies an output's visible files but not its hidden record of
    what it wrote: replacing ``repo`` would delete the user's ``.git`` and files."""
    import shutil

    save = checkpoint.save_checkpoint if fmt == "orbax" else checkpoint.save_safetensors
    out, repo = tmp_path / "out", tmp_path / "repo"
    save(out, OLD)
    (repo / ".git").mkdir(parents=True)
    (repo / "README.md").write_text("model card")
    for entry in out.iterdir():
        if not entry.name.startswith("."):
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, repo / entry.name)
    before = _tree_files(tmp_path)
    with pytest.raises(ValueError, match="no readable record of the entries"):
        save(repo, NEW, overwrite=True)
    assert _tree_files(tmp_path) == before
    assert (repo / ".git").is_dir()
    # A damaged record is no record either.
    (out / ".umtam-contents.json").write_text("[damaged")
    with pytest.raises(ValueError, match="missing or damaged"):
        save(out, NEW, overwrite=True)


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_an_empty_folder_made_for_the_output_is_written(tmp_path, fmt):
    save = checkpoint.save_checkpoint if fmt == "orbax" else checkpoint.save_safetensors
    restore = checkpoint.restore_params if fmt == "orbax" else checkpoint.SafetensorsReader
    path = tmp_path / "merged"
    path.mkdir()
    save(path, OLD)  # no overwrite needed: an empty folder holds nothing
    if fmt == "orbax":
        chex.assert_trees_all_equal(restore(path), OLD)
    else:
        assert (path / "model.safetensors").is_file()
    assert _hidden_leftovers(path) == []


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
@pytest.mark.parametrize("empty", [True, False])
def test_a_file_put_into_the_target_during_the_save_is_never_deleted(tmp_path, fmt, empty):
    """The target is checked again just before the swap: a file put into an empty output
    folder (or into an earlier output) while the checkpoint was written stays."""
    save = checkpoint.save_checkpoint if fmt == "orbax" else checkpoint.save_safetensors
    path = tmp_path / "merged"
    if empty:
        path.mkdir()
    else:
        save(path, OLD)

    def hook(step):
        if step == "staged":
            (path / "README.md").write_text("written meanwhile")

    _safety._step_hook = hook
    try:
        with pytest.raises(ValueError, match="README.md|not a umtam_jax output"):
            save(path, NEW, overwrite=True)
    finally:
        _safety._step_hook = None
    assert (path / "README.md").read_text() == "written meanwhile"
    assert _hidden_leftovers(path) == []


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_an_empty_working_directory_is_never_taken_as_the_output(tmp_path, fmt, monkeypatch):
    save = checkpoint.save_checkpoint if fmt == "orbax" else checkpoint.save_safetensors
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for target in (".", os.getcwd()):
        with pytest.raises(ValueError, match="empty folder, but the working directory.*inside"):
            save(target, OLD)
    assert os.getcwd() == str(tmp_path / "work") and os.listdir(".") == []


def test_a_target_name_with_glob_characters_touches_only_its_own_leftovers(tmp_path):
    # Another job's save in progress, and a stale temporary of a name the pattern matches.
    others = ["run1.orbax-checkpoint-tmp-17/params/data", ".run1.umtam-new-abc/data"]
    for name in others:
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_text("theirs")
    for name in ("run[0-9]", "run?", "run*"):
        checkpoint.save_checkpoint(tmp_path / name, OLD)
        checkpoint.save_checkpoint(tmp_path / name, NEW, overwrite=True)
    assert all((tmp_path / name).read_text() == "theirs" for name in others)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["run1.orbax-checkpoint-tmp-17", ".run1.umtam-new-abc", "run[0-9]", "run?", "run*"]
    )


def test_symlinks_and_file_parents_are_refused(tmp_path):
    real = tmp_path / "real"
    checkpoint.save_checkpoint(real, OLD)
    link = tmp_path / "link"
    link.symlink_to(real)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for path in (link, dangling):
        with pytest.raises(ValueError, match="symbolic link"):
            checkpoint.save_checkpoint(path, NEW, overwrite=True)
    assert not (tmp_path / "nowhere").exists()
    chex.assert_trees_all_equal(checkpoint.restore_params(real), OLD)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        checkpoint.save_checkpoint(tmp_path / "file" / "ckpt", OLD)
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    for parent in (tmp_path / "loop_a", dangling):
        with pytest.raises(NotADirectoryError, match=f"{parent} is a symbolic link that leads"):
            checkpoint.save_checkpoint(parent / "ckpt", OLD)
    for bad in ("", "."):
        with pytest.raises(ValueError):
            checkpoint.save_checkpoint(bad, OLD, overwrite=True)


@pytest.fixture
def experts(tmp_path):
    base = checkpoint.save_checkpoint(tmp_path / "base", OLD)
    a = checkpoint.save_checkpoint(tmp_path / "a", NEW)
    b = checkpoint.save_checkpoint(tmp_path / "b", {k: v * 2 for k, v in NEW.items()})
    return base, a, b


@pytest.mark.parametrize(
    "output", [".", "", "..", "base", "base/merged", "base/params/merged", "a/x/y"]
)
def test_merge_output_never_touches_an_input(tmp_path, experts, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    before = _tree_files(tmp_path)
    with pytest.raises(ValueError, match="output"):
        engine.merge_checkpoints(
            "task_arithmetic", "base", ["a", "b"], output, overwrite=True, progress=False
        )
    assert _tree_files(tmp_path) == before


# ----------------------------------------------------------------------------- crashes

_KILL_AT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from umtam_jax import checkpoint
    from umtam_jax.checkpoint import _safety

    path, step, exchange = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    _safety._use_exchange = exchange
    def hook(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)
    _safety._step_hook = hook
    new = {"w": -np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.zeros(3, np.float32)}
    checkpoint.save_checkpoint(path, new, overwrite=True)
    """
)


def _run_killed(path, step, exchange) -> int:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AT, os.fspath(path), step, "1" if exchange else "0"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    return proc.returncode


@pytest.mark.parametrize(
    "exchange,step",
    [
        (True, "locked"),
        (True, "staged"),
        (True, "swapped"),
        (True, "trashed"),
        (False, "staged"),
        (False, "retired"),
        (False, "swapped"),
        (False, "trashed"),
    ],
)
def test_overwrite_killed_at_each_step_keeps_old_or_new(tmp_path, exchange, step):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    assert _run_killed(path, step, exchange) == -9
    # Right after the kill, or after the automatic recovery of the next call, the final
    # path holds the complete old or the complete new checkpoint.
    got = checkpoint.restore_params(path)
    is_new = np.array_equal(np.asarray(got["w"]), NEW["w"])
    chex.assert_trees_all_equal(checkpoint.restore_params(path), NEW if is_new else OLD)
    if step in ("locked", "staged", "retired"):
        assert not is_new
    if step in ("swapped", "trashed"):
        assert is_new
    # The next save cleans up everything the killed one left and still works.
    checkpoint.save_checkpoint(path, OLD, overwrite=True)
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    assert _hidden_leftovers(path) == []


@pytest.mark.parametrize("then", ["restore", "save", "save_fails"])
def test_an_empty_folder_made_after_a_killed_swap_gets_the_old_checkpoint_back(
    tmp_path, then, monkeypatch
):
    """Killed between retiring the old checkpoint and publishing the new one (no atomic
    exchange), then a script makes the output folder again before its next call."""
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    assert _run_killed(path, "retired", False) == -9
    assert not path.exists()
    path.mkdir()
    if then == "restore":
        chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    elif then == "save":  # without overwrite: the old checkpoint is back and kept
        with pytest.raises(FileExistsError):
            checkpoint.save_checkpoint(path, NEW)
        chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    else:  # a save that fails after its repair never leaves less than the old one
        monkeypatch.setattr(_save, "_write", _raise_oserror)
        with pytest.raises(OSError, match="disk on fire"):
            checkpoint.save_checkpoint(path, NEW, overwrite=True)
        chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)


def _raise_oserror(*args, **kwargs):
    raise OSError(errno.EIO, "disk on fire")


def test_a_killed_swaps_old_copy_is_kept_while_a_foreign_folder_holds_the_path(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    assert _run_killed(path, "retired", False) == -9
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    olds = [n for n in _hidden_leftovers(path) if ".umtam-old-" in n]
    with pytest.raises(ValueError, match="not a umtam_jax"):
        checkpoint.save_checkpoint(path, NEW, overwrite=True)
    assert [n for n in _hidden_leftovers(path) if ".umtam-old-" in n] == olds != []
    assert (path / "notes.txt").read_text() == "mine"


def test_a_lock_name_planted_as_a_link_is_never_followed(tmp_path):
    path, victim = tmp_path / "ckpt", tmp_path / "victim"
    os.symlink(victim, tmp_path / ".ckpt.umtam-lock")
    with pytest.raises(OSError, match="lock file .*ckpt.umtam-lock is a symbolic link"):
        checkpoint.save_checkpoint(path, OLD)
    assert not victim.exists() and not path.exists()


def test_killed_streaming_write_leaves_nothing_at_the_path(tmp_path):
    path = tmp_path / "merged"
    script = textwrap.dedent(
        """
        import os, signal, sys
        import jax, numpy as np
        from umtam_jax import checkpoint
        like = {f"w{i}": jax.ShapeDtypeStruct((64,), np.float32) for i in range(4)}
        def produce(i):
            if i == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return np.full((64,), i, np.float32)
        checkpoint.save_params_streaming(sys.argv[1], like, produce)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, os.fspath(path)],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9
    assert not path.exists()
    assert _hidden_leftovers(path)  # the killed run's staging folder is still there ...
    with pytest.raises(FileNotFoundError):
        checkpoint.restore_params(path)
    checkpoint.save_checkpoint(path, OLD)
    assert _hidden_leftovers(path) == []  # ... until the next save to that path
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)


def test_stale_leftovers_removed_and_neighbours_untouched(tmp_path):
    path = tmp_path / "ckpt"
    stale = (
        ".ckpt.umtam-new-0123456789ab",
        ".ckpt.umtam-trash-0123456789ab",
        ".ckpt.umtam-new-0123456789ab.orbax-checkpoint-tmp-1",
    )
    for name in stale:
        (tmp_path / name / "params").mkdir(parents=True)
        (tmp_path / name / "params" / "junk").write_bytes(b"0" * 1000)
    # Not derived from a save of ours to ckpt: never deleted (an Orbax save of another tool).
    # Nor a user's folder that only starts like a leftover (no 12-hex-digit token).
    neighbours = [
        ".ckpt2.umtam-new-0123456789ab",
        "ckpt.txt",
        ".ckpt",
        "ckpt.orbax-checkpoint-tmp-1",
    ]
    neighbours += [".ckpt.umtam-new-mybackup", ".ckpt.umtam-trash-notes"]
    for name in neighbours:
        (tmp_path / name).write_text("mine")
    checkpoint.save_checkpoint(path, OLD)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", *neighbours])


# ----------------------------------------------------------------------------- locking


def test_second_writer_fails_at_once(tmp_path):
    path = tmp_path / "ckpt"
    with _filesystem.locked(epath.Path(path)):
        with pytest.raises(checkpoint.CheckpointBusyError, match="being written"):
            checkpoint.save_checkpoint(path, OLD)
        with pytest.raises(checkpoint.CheckpointBusyError):
            engine.merge_checkpoints(
                "task_arithmetic",
                checkpoint.save_checkpoint(tmp_path / "base", OLD),
                [checkpoint.save_checkpoint(tmp_path / "e", NEW)],
                path,
                progress=False,
            )
    assert not path.exists()
    checkpoint.save_checkpoint(path, OLD)  # the lock is gone with its holder
    assert _hidden_leftovers(path) == []


def test_concurrent_processes_never_mix(tmp_path):
    """A writer paused after staging holds the lock; a second process is refused."""
    path = tmp_path / "ckpt"
    ready = tmp_path / "ready"
    go = tmp_path / "go"
    slow = textwrap.dedent(
        """
        import os, sys, time
        import numpy as np
        from umtam_jax import checkpoint
        from umtam_jax.checkpoint import _safety
        def hook(name):
            if name == "staged":
                open(sys.argv[2], "w").close()
                while not os.path.exists(sys.argv[3]):
                    time.sleep(0.05)
        _safety._step_hook = hook
        checkpoint.save_checkpoint(sys.argv[1], {"w": np.full(8, 1.0, np.float32)})
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.Popen(
        [sys.executable, "-c", slow, os.fspath(path), os.fspath(ready), os.fspath(go)], env=env
    )
    try:
        for _ in range(1200):
            if ready.exists() or first.poll() is not None:
                break
            import time

            time.sleep(0.05)
        assert ready.exists()
        with pytest.raises(checkpoint.CheckpointBusyError):
            checkpoint.save_checkpoint(path, {"w": np.full(8, 2.0, np.float32)})
    finally:
        go.touch()
        first.wait(timeout=120)
    assert first.returncode == 0
    np.testing.assert_array_equal(np.asarray(checkpoint.restore_params(path)["w"]), 1.0)


# ----------------------------------------------------------------------------- integrity


def _data_files(path):
    return sorted(
        (f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f)),
        key=os.path.getsize,
    )


@pytest.mark.parametrize("seed", range(6))
def test_flipped_byte_is_detected(tmp_path, seed):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((32, 32)).astype(np.float32)}
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", params)
    data = _data_files(path)[-1]  # the array's data file is the largest
    blob = bytearray(pathlib.Path(data).read_bytes())
    blob[int(rng.integers(len(blob)))] ^= 1 << int(rng.integers(8))
    pathlib.Path(data).write_bytes(blob)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="params/w|corrupt"):
        checkpoint.restore_params(path)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="params/w|corrupt"):
        checkpoint.CheckpointReader(path).restore_arrays("params", [("w",)])
    got = checkpoint.restore_params(path, verify=False)  # the explicit opt-out: no check
    assert got["w"].shape == (32, 32)


def test_flipped_statistics_and_opt_state_are_detected(tmp_path):
    import jax

    import umtam_jax

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)}
    opt = umtam_jax.umtam(1e-2, rank=2)
    state = opt.init(params)
    grads = {"w": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)}
    _, state = opt.update(grads, state, params)
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", params, opt_state=state)
    for item, restore in [
        ("statistics", lambda: checkpoint.restore_statistics(path)),
        ("opt_state", lambda: checkpoint.restore_opt_state(path, state)),
    ]:
        saved = jax.tree.leaves(restore())
        data = [f for f in _data_files(path) if os.sep + item + os.sep in f][-1]
        original = pathlib.Path(data).read_bytes()
        detected = 0
        for position in range(len(original) // 8, len(original), len(original) // 8):
            blob = bytearray(original)
            blob[position] ^= 0x40
            pathlib.Path(data).write_bytes(blob)
            try:  # either an error naming the corruption, or bytes no array uses
                got = jax.tree.leaves(restore())
            except checkpoint.CheckpointCorruptError as err:
                assert "corrupt" in str(err)
                detected += 1
            else:
                chex.assert_trees_all_equal(got, saved)
        assert detected >= 4
        pathlib.Path(data).write_bytes(original)
        restore()


def test_edited_metadata_dtype_and_missing_checksums(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", {"w": jnp.ones((2, 2))})
    meta = path / "umtam_metadata" / "metadata"
    text = meta.read_text()
    for edited in ("float16", "int32"):
        meta.write_text(text.replace('"float32"', f'"{edited}"'))
        # The metadata's own CRC catches the edit first (older records: the dtype check).
        with pytest.raises(checkpoint.CheckpointCorruptError, match="metadata does not match"):
            checkpoint.restore_params(path)
    meta.write_text(text)
    (path / "umtam_checksums.json").unlink()
    with pytest.raises(checkpoint.CheckpointCorruptError, match="checksum record .* missing"):
        checkpoint.restore_params(path)


def _edit_record(path, edit):
    record = path / "umtam_checksums.json"
    data = json.loads(record.read_text())
    edit(data)
    record.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["items"]["params"].clear(),  # an emptied item
        lambda d: d["items"].update(paraos=d["items"].pop("params")),  # a flipped key bit
        lambda d: d["items"]["params"].pop("w"),  # one array's entry
    ],
)
def test_an_array_missing_from_the_checksum_record_is_damage(tmp_path, edit):
    """With the data damaged too, a record that skipped the array would let it through."""
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", {"w": np.arange(64.0, dtype=np.float32)})
    data = _data_files(path)[-1]
    blob = bytearray(pathlib.Path(data).read_bytes())
    blob[len(blob) // 2] ^= 0x40
    pathlib.Path(data).write_bytes(blob)
    _edit_record(path, edit)
    for restore in (
        lambda: checkpoint.restore_params(path),
        lambda: checkpoint.CheckpointReader(path).restore_arrays("params", [("w",)]),
    ):
        with pytest.raises(checkpoint.CheckpointCorruptError, match="params/w has no entry"):
            restore()


def test_a_checksum_record_without_the_metadata_crc_is_damage(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", {"w": np.ones(3, np.float32)})
    _edit_record(path, lambda d: d.pop("metadata"))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="no checksum of the metadata"):
        checkpoint.restore_params(path)
    assert checkpoint.restore_params(path, verify=False)["w"].shape == (3,)  # the opt-out


def test_a_version_2_record_may_leave_arrays_out_and_a_null_crc_is_not_verified():
    """Format 2 recorded only arrays the saving process could see (multi-host sharding);
    format 3 records those with a null CRC."""
    from umtam_jax.checkpoint import _integrity

    leaves = {"w": {"dtype": "float32", "shape": [3]}}
    old = _integrity.Records({"params": {}})
    _integrity.check_spec(pathlib.Path("ck"), "params", leaves, old)  # no error
    new = _integrity.Records({"params": {"w": {**leaves["w"], "crc32": None}}})
    new.complete = True
    _integrity.check_spec(pathlib.Path("ck"), "params", leaves, new)
    _integrity.verify(pathlib.Path("ck"), "params", "w", np.zeros(3, np.float32), new)
    new["params"]["w"]["crc32"] = 0
    with pytest.raises(checkpoint.CheckpointCorruptError, match="does not match its checksum"):
        _integrity.verify(pathlib.Path("ck"), "params", "w", np.ones(3, np.float32), new)


@pytest.mark.parametrize(
    "tree",
    [
        {"a.b": 1.0, "a": {"b": 2.0}},
        {"a/b": 1.0, "a": {"b": 2.0}},
        {"%2E": 1.0, ".": 2.0, "%": 3.0, "": 4.0},
        {"x.y": {"z.w": 1.0}, "x": {"y": {"z": {"w": 2.0}}}},
    ],
)
def test_keys_with_separators_round_trip_exactly(tmp_path, tree):
    import jax

    arrays = jax.tree.map(lambda v: np.full((3,), v, np.float32), tree)
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", arrays)
    got = checkpoint.restore_params(path)
    chex.assert_trees_all_equal(got, arrays)
    reader = checkpoint.CheckpointReader(path)
    assert jax.tree.structure(reader.abstract("params")) == jax.tree.structure(arrays)


def test_multiprocess_save_publishes_from_process_zero(tmp_path, monkeypatch):
    """The collective path: a shared staging name, barriers, process 0 publishes."""
    barriers = []
    monkeypatch.setattr(_processes, "count", lambda: 2)
    monkeypatch.setattr(_processes, "shared_token", lambda: "sharedtoken0")
    monkeypatch.setattr(_processes, "barrier", barriers.append)
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    checkpoint.save_checkpoint(path, NEW, overwrite=True)
    assert [b.rsplit("_", 1)[0] for b in barriers[:3]] == [
        "umtam_checkpoint_start",
        "umtam_checkpoint_staged",
        "umtam_checkpoint_published",
    ]
    assert len(barriers) == 6
    chex.assert_trees_all_equal(checkpoint.restore_params(path), NEW)
    assert _hidden_leftovers(path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_multiprocess_save_checks_the_path_again_before_publishing(
    tmp_path, monkeypatch, overwrite
):
    """A folder made at a free path, or a file put into the checkpoint being replaced,
    while the processes write: every process refuses, nothing is swapped away."""
    path = tmp_path / "ckpt"
    if overwrite:
        checkpoint.save_checkpoint(path, OLD)
    monkeypatch.setattr(_processes, "count", lambda: 2)
    monkeypatch.setattr(_processes, "shared_token", lambda: "sharedtoken0")
    barriers = []
    monkeypatch.setattr(_processes, "barrier", barriers.append)
    write = _save._write

    def write_then_the_user_writes(*args, **kwargs):
        write(*args, **kwargs)
        path.mkdir(exist_ok=True)
        (path / "thesis.tex").write_text("mine")

    monkeypatch.setattr(_save, "_write", write_then_the_user_writes)
    with pytest.raises((ValueError, FileExistsError), match="thesis.tex|not a umtam_jax"):
        checkpoint.save_checkpoint(path, NEW, overwrite=overwrite)
    assert (path / "thesis.tex").read_text() == "mine"
    assert [n for n in _hidden_leftovers(path) if "umtam-new" in n] == []
    # Every process stops before the barrier after which process 0 publishes.
    assert not any(b.startswith("umtam_checkpoint_staged") for b in barriers)


def test_a_failed_write_names_the_output_and_a_failed_read_keeps_its_own_error(tmp_path):
    """A full disk while writing is one OSError naming the output (not the hidden staging
    folder, not tensorstore's ValueError); an input that cannot be read while the output
    is written keeps its own error, naming the input."""
    like = {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}
    out = tmp_path / "out"

    def missing_input(i):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/e1/model")

    with pytest.raises(FileNotFoundError, match="/data/e1/model"):
        checkpoint.save_params_streaming(out, like, missing_input)

    def full_disk(i):
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing "w" at local file "{tmp_path}/.out.umtam-new-'
            "abc/params\": No space left on device [os_error_code='28']"
        )

    with pytest.raises(OSError, match=f"cannot write {out}: No space left on device") as err:
        checkpoint.save_params_streaming(out, like, full_disk)
    assert err.value.errno == errno.ENOSPC and isinstance(err.value.__cause__, ValueError)

    def denied_in_staging(i):
        raise PermissionError(errno.EACCES, "Permission denied", f"{tmp_path}/.out.umtam-new-x/a")

    with pytest.raises(PermissionError, match=f"cannot write {out}: Permission denied"):
        checkpoint.save_params_streaming(out, like, denied_in_staging)
    assert os.listdir(tmp_path) == []


def test_an_output_that_is_an_input_seen_through_a_bind_mount_is_refused(tmp_path):
    """``realpath`` cannot see through a bind mount: the output ``m/a`` of a merge whose
    input is ``d/a`` (``m`` bound to ``d``) overwrote expert a. Compared by identity."""
    (tmp_path / "d").mkdir()
    (tmp_path / "m").mkdir()
    base = checkpoint.save_checkpoint(tmp_path / "d" / "base", OLD)
    a = checkpoint.save_checkpoint(tmp_path / "d" / "a", NEW)
    bound = subprocess.run(["mount", "--bind", tmp_path / "d", tmp_path / "m"], check=False)
    if bound.returncode != 0:
        pytest.skip("bind mounts need root and a mount namespace")
    try:
        for output, what in ((tmp_path / "m" / "a", "is expert 0"), (tmp_path / "m", "contains")):
            with pytest.raises(ValueError, match=f"{what}.*seen through a mount"):
                engine.merge_checkpoints(
                    "task_arithmetic", base, [a], output, overwrite=True, progress=False
                )
        chex.assert_trees_all_equal(checkpoint.restore_params(a), NEW)
    finally:
        subprocess.run(["umount", tmp_path / "m"], check=True)


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_an_output_keeps_the_permissions_of_the_folder_it_replaces(tmp_path, fmt):
    """A private (0700) folder made for the output, or a private earlier output, stays
    private: the new folder was created with the default mode (0755 under umask 022)."""
    save = checkpoint.save_checkpoint if fmt == "orbax" else checkpoint.save_safetensors
    path = tmp_path / "private"
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    save(path, OLD)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o700)
    os.chmod(path, 0o750)
    save(path, NEW, overwrite=True)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o750)


@pytest.mark.parametrize(
    ("old", "new"), [('"step": 5000', '"step": 4000'), ("lr.scale", "lr.scalf")]
)
def test_an_edit_of_the_metadata_that_still_parses_is_detected(tmp_path, old, new):
    """One changed character of the metadata record (a user value, the original name of
    an escaped key) parsed and was restored silently: its CRC is in the checksum record."""
    path = checkpoint.save_checkpoint(
        tmp_path / "ck", {"lr.scale": np.ones(3, np.float32)}, metadata={"step": 5000}
    )
    meta = path / "umtam_metadata" / "metadata"
    text = meta.read_text()
    edited = text.replace(old, new).replace(old.replace(" ", ""), new.replace(" ", ""))
    assert edited != text  # with or without the space JSON may put after the colon
    meta.write_text(edited)
    for read in (checkpoint.read_metadata, checkpoint.restore_params):
        with pytest.raises(checkpoint.CheckpointCorruptError, match="metadata does not match"):
            read(path)


def test_a_partial_restore_of_damaged_data_is_a_corrupt_error_naming_the_leaf(tmp_path):
    """CheckpointReader raised a plain ValueError for a deleted data file, unlike
    restore_params, and named no leaf."""
    path = checkpoint.save_checkpoint(tmp_path / "ck", {"w": np.ones((64, 48), np.float32)})
    reader = checkpoint.CheckpointReader(path)
    for data in glob.glob(f"{path}/params/**/d/*", recursive=True):
        os.unlink(data)
    with pytest.raises(
        checkpoint.CheckpointCorruptError, match="cannot restore w of item 'params'"
    ):
        reader.restore_arrays("params", [("w",)])


def test_dot_dot_after_a_link_is_resolved_as_the_file_system_does(tmp_path, monkeypatch):
    """``sl/../ck`` with ``sl -> deep/sub`` is ``deep/ck`` (as ``ls`` and the shell see
    it); text normalisation wrote ``./ck``, and with overwrite replaced that other one."""
    (tmp_path / "deep" / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "deep" / "sub", tmp_path / "sl")
    monkeypatch.chdir(tmp_path)
    other = checkpoint.save_checkpoint("ck", OLD)  # the one text normalisation points at
    checkpoint.save_checkpoint("sl/../ck", NEW)
    chex.assert_trees_all_equal(checkpoint.restore_params(tmp_path / "deep" / "ck"), NEW)
    chex.assert_trees_all_equal(checkpoint.restore_params(other), OLD)
    chex.assert_trees_all_equal(checkpoint.restore_params("sl/../ck"), NEW)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system of its own (a tmpfs; needs root and a mount namespace)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk], check=False, capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root and a mount namespace")
    try:
        yield disk
    finally:
        subprocess.run(["umount", disk], check=True)


def test_an_empty_mount_point_is_refused_with_the_reason(small_disk):
    with pytest.raises(ValueError, match="empty folder, but a mount point.*inside it"):
        checkpoint.save_checkpoint(small_disk, OLD)
    assert os.listdir(small_disk) == []
    checkpoint.save_checkpoint(small_disk / "ckpt", OLD)  # a folder inside it is written


@pytest.mark.parametrize("streaming", [False, True])
def test_a_real_full_disk_is_one_error_naming_the_output_and_no_logged_traceback(
    small_disk, caplog, streaming
):
    """Saving 4 MiB onto a 1 MiB disk: the caller gets one OSError naming the output;
    Orbax's threads log no traceback of it first (through absl); nothing is left."""
    big = {"w": np.random.default_rng(0).standard_normal((1024, 1024), np.float32)}
    out = small_disk / "out"
    with pytest.raises(OSError, match=f"cannot write {out}: No space left on device"):
        if streaming:
            like = {"w": jax.ShapeDtypeStruct((1024, 1024), np.float32)}
            checkpoint.save_params_streaming(out, like, lambda i: big["w"])
        else:
            checkpoint.save_checkpoint(out, big)
    assert not [r for r in caplog.records if r.name == "absl" and r.exc_info]
    assert os.listdir(small_disk) == []


def test_a_save_keeps_other_threads_logged_tracebacks(tmp_path, caplog):
    """Only a failure in this save's staging folder is dropped from the absl log: another
    thread's full disk elsewhere, logged while the save runs, is kept."""
    import logging
    import threading

    from umtam_jax.checkpoint._write_errors import naming_the_target

    def other():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/var/log/other.db")
        except OSError:
            logging.getLogger("absl").exception("a background job failed")

    with naming_the_target(epath.Path(tmp_path / "out")):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["a background job failed"]


def test_only_this_saves_staging_folder_counts_as_its_write_failure():
    """``/scratch/x/.out.umtam-new-1`` is another save's staging folder, not ``/x/out``'s,
    though its name ends the same way."""
    from umtam_jax.checkpoint._write_errors import _write_failure

    out = epath.Path("/x/out")
    ours = OSError(errno.ENOENT, "gone", "/x/.out.umtam-new-1/f")
    other = OSError(errno.ENOENT, "gone", "/scratch/x/.out.umtam-new-1/f")
    assert _write_failure(ours, out, on_staging=True) == errno.ENOENT
    assert _write_failure(other, out, on_staging=True) is None
    assert _write_failure(other, out) is None
    quoted = ValueError("""writing local file "/x/.out.umtam-new-1/p" [os_error_code='28']""")
    assert _write_failure(quoted, out, on_staging=True) == errno.ENOSPC
    elsewhere = ValueError("""local file "/scratch/x/.out.umtam-new-1/p" [os_error_code='2']""")
    assert _write_failure(elsewhere, out, on_staging=True) is None


def test_overwrite_must_be_a_bool(tmp_path):
    """overwrite="no" is truthy: it would have replaced the folder."""
    checkpoint.save_checkpoint(tmp_path / "ckpt", OLD)
    for save in (checkpoint.save_checkpoint, checkpoint.save_safetensors):
        with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):
            save(tmp_path / "ckpt", NEW, overwrite="no")
    chex.assert_trees_all_equal(checkpoint.restore_params(tmp_path / "ckpt"), OLD)

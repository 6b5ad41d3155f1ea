"""Checkpoint saves never replace what is not theirs: the overwrite rules, and refusals of
a target that is a file, a foreign, copied or edited folder, a link, the working directory,
a mount point or a merge's own input; what a replacing save keeps (files put in meanwhile,
the folder's permissions)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from tests.reliability.checkpoint_helpers import NEW, OLD, _hidden_leftovers
from umtam_jax import checkpoint, engine
from umtam_jax.checkpoint import _safety


def _tree_files(root) -> dict[str, bytes]:
    out = {}
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


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
    # A merge's own output, with a file added since: refused, naming it.
    job = engine.job_from_paths("passthrough", None, [source], statistics=None, kwargs={})
    merged = epath.Path(tmp_path / "merged")
    engine.merge(job, engine.writer(job, merged, fmt, overwrite=False, metadata=None),
                 progress=False)  # fmt: skip
    engine.check_output(merged, job, fmt, overwrite=True)
    (merged / "README.md").write_text("model card")
    with pytest.raises(ValueError, match="README.md"):
        engine.check_output(merged, job, fmt, overwrite=True)


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
    for name in ("run?", "run*"):
        checkpoint.save_checkpoint(tmp_path / name, OLD)
        checkpoint.save_checkpoint(tmp_path / name, NEW, overwrite=True)
        chex.assert_trees_all_equal(checkpoint.restore_params(tmp_path / name), NEW)
    assert all((tmp_path / name).read_text() == "theirs" for name in others)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["run1.orbax-checkpoint-tmp-17", ".run1.umtam-new-abc", "run?", "run*"]
    )


@pytest.mark.parametrize("target", ["run[0-9]", "runs[lr=0.1]/ck"])
def test_a_checkpoint_path_with_a_bracket_is_refused_before_anything_is_written(tmp_path, target):
    # Orbax finds the arrays it wrote by globbing the folder's path: under "[" it would
    # publish a checkpoint without them (and an overwrite would lose the old one).
    (tmp_path / "runs[lr=0.1]").mkdir()
    with pytest.raises(ValueError, match=r"contains '\['.*without '\['"):
        checkpoint.save_checkpoint(tmp_path / target, OLD)
    expert = checkpoint.save_checkpoint(tmp_path / "expert", OLD)
    with pytest.raises(ValueError, match=r"contains '\['"):  # a merge's Orbax output too
        engine.merge_checkpoints("linear", None, [expert], tmp_path / target, progress=False)
    shutil.rmtree(expert)
    assert sorted(os.listdir(tmp_path)) == ["runs[lr=0.1]"]
    assert os.listdir(tmp_path / "runs[lr=0.1]") == []
    # A safetensors folder (no Orbax) may be named so.
    checkpoint.save_safetensors(tmp_path / target, OLD)
    reader = checkpoint.SafetensorsReader(tmp_path / target)
    chex.assert_trees_all_equal(
        dict(zip(reader.names, reader.read(reader.names), strict=True)), OLD
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


def test_an_empty_mount_point_is_refused_with_the_reason(small_disk):
    with pytest.raises(ValueError, match="empty folder, but a mount point.*inside it"):
        checkpoint.save_checkpoint(small_disk, OLD)
    assert os.listdir(small_disk) == []
    checkpoint.save_checkpoint(small_disk / "ckpt", OLD)  # a folder inside it is written


def test_overwrite_must_be_a_bool(tmp_path):
    """overwrite="no" is truthy: it would have replaced the folder."""
    checkpoint.save_checkpoint(tmp_path / "ckpt", OLD)
    for save in (checkpoint.save_checkpoint, checkpoint.save_safetensors):
        with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):
            save(tmp_path / "ckpt", NEW, overwrite="no")
    chex.assert_trees_all_equal(checkpoint.restore_params(tmp_path / "ckpt"), OLD)


def test_a_local_path_holding_a_scheme_separator_is_one_clear_error(tmp_path):
    """etils reads ``a://`` as a file system scheme and raised a bare KeyError."""
    path = f"{tmp_path}/run://1"
    for call in (
        lambda: checkpoint.save_checkpoint(path, OLD),
        lambda: checkpoint.save_safetensors(path, OLD),
        lambda: checkpoint.restore_params(path),
    ):
        with pytest.raises(ValueError, match=r"run://' is not a file system scheme"):
            call()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_a_file_put_into_the_old_output_just_before_the_swap_is_kept(
    tmp_path, monkeypatch, exchange
):
    """After the last check, before the swap (an exchange, or two renames where the file
    system has none): the old output goes back, the file in it."""
    monkeypatch.setattr(_safety, "_use_exchange", exchange)
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", OLD)
    is_empty = _safety.is_empty_folder

    def racing(folder):  # runs between the last check and the swap
        (tmp_path / "ckpt" / "notes.txt").write_text("an evaluation job's notes")
        return is_empty(folder)

    monkeypatch.setattr(_safety, "is_empty_folder", racing)
    with pytest.raises(ValueError, match="notes.txt appeared in it while the new output"):
        checkpoint.save_checkpoint(path, NEW, overwrite=True)
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "an evaluation job's notes"
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    assert _hidden_leftovers(path) == []

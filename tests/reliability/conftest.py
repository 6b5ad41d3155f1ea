"""Fixtures shared by the reliability tests."""

from __future__ import annotations

import subprocess

import pytest


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

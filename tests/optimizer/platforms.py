"""Running the optimizer's GPU/TPU code on this CPU."""

from __future__ import annotations

import jax


def take_default_branches(monkeypatch) -> None:
    """Every ``lax.platform_dependent`` traced from here on takes its ``default`` (GPU/TPU)
    branch, also on this CPU. Tests jit fresh functions after it, so that no trace made
    with the CPU branches is reused."""
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default, **_: default(*args))

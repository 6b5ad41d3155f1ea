"""The small-GPT language-modelling harness shared by the training benchmarks.

The model sizes (``DEFAULT``, ``QUICK``), the compared optimizers at learning rate 1 with
the shared warmup-cosine shape and a traced per-run learning rate, and one training run
with its curves and timings, and the run's data: the training batches and two disjoint
held-out sets — validation windows, on which learning rates are chosen, and test windows,
on which the chosen runs are reported (:func:`lm_run_data`). ``benchmarks.training`` runs
the learning-rate grids and rank sweeps; ``cold_start`` and ``spectrum`` train the same
models with the same optimizers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import umtam_jax
from umtam_jax.experiments.models.gpt import GPTConfig, gpt_loss


@dataclasses.dataclass(frozen=True)
class Size:
    """Model and run size."""

    d_model: int
    n_layers: int
    n_heads: int
    context: int
    batch: int
    steps: int
    eval_every: int
    val_batches: int
    min_dim_size_to_factor: int
    test_batches: int
    warmup_frac: float = 0.1


# Sized from measured step times on the shared 2-core CPU (see RESULTS.md for the
# times actually seen): d=256 makes rank 128 half-rank on the 256×1024 MLP matrices.
DEFAULT = Size(
    d_model=256,
    n_layers=2,
    n_heads=4,
    context=64,
    batch=8,
    steps=240,
    eval_every=20,
    val_batches=8,
    min_dim_size_to_factor=64,
    test_batches=32,
)
QUICK = Size(
    d_model=64,
    n_layers=1,
    n_heads=2,
    context=32,
    batch=4,
    steps=100,
    eval_every=20,
    val_batches=4,
    min_dim_size_to_factor=32,
    test_batches=4,
)

#: ``umtam_bc`` is ``umtam(..., bias_correction=True)``: the paper (and the library default,
#: docs/algorithm.md §2.2) has no bias correction, so with b2 = 0.999 the early second
#: moments are underestimated (R, C ≈ (1 − b2^t) × their mean) and the early steps are up to
#: 1/sqrt(1 − b2^t) ≈ 31× larger than Adam's; in a 240-step run that factor is still 2.2× at
#: the end.
OPTIMIZERS = ("adamw", "adafactor", "galore", "umtam", "umtam_bc")
UMTAM_VARIANTS = ("umtam", "umtam_bc")
LOWRANK = (*UMTAM_VARIANTS, "galore")
DEFAULT_LRS = {k: (3e-4, 1e-3, 3e-3, 1e-2) for k in OPTIMIZERS}
QUICK_LRS = {k: (3e-3, 1e-2) for k in OPTIMIZERS}


#: Embedding tables kept dense (Adam-like rule) in UMTAM and GaLore unless
#: ``--factor-embeddings``: GaLore projects only the transformer-block matrices, and on this
#: CPU the QR of UMTAM's 4096×r sketch of the 4096×256 token embedding alone costs ~0.65 s
#: per step (measured; the block matrices together ~0.09 s), which would make every UMTAM
#: run ~10× longer.
EMBEDDINGS = ("wte", "wpe")


def top_key(path) -> str:
    """The name of the top-level entry of a pytree key path (``"wte"``, ``"block_0"``)."""
    k = path[0]
    return str(getattr(k, "key", getattr(k, "name", k)))


def umtam_row_axes(path, shape) -> int:
    """UMTAM 2-D view: embeddings dense (0), everything else fan-in × fan-out."""
    return 0 if top_key(path) in EMBEDDINGS else umtam_jax.default_row_axes(path, shape)


def base_transform(
    name: str,
    *,
    rank: int,
    min_dim: int,
    svd_method: str = "subspace",
    galore_gap: int = 50,
    factor_embeddings: bool = False,
    error_decay: float = 0.9,
) -> optax.GradientTransformation:
    """The optimizer with learning rate 1 (the lr and schedule are applied outside).

    No weight decay for any optimizer (short runs; keeps Adafactor, whose decay is not
    multiplied by the learning rate, comparable).
    """
    if name == "adamw":
        return optax.adamw(1.0, weight_decay=0.0)
    if name == "adafactor":
        # Absolute step size (no parameter-scale multiplier) so its lr grid matches Adam's.
        return optax.adafactor(
            1.0, min_dim_size_to_factor=min_dim, multiply_by_parameter_scale=False
        )
    if name == "galore":
        galore = optax.contrib.galore(1.0, rank=rank, update_proj_gap=galore_gap)
        if factor_embeddings:
            return galore
        return optax.multi_transform(
            {"lowrank": galore, "dense": optax.adam(1.0)},
            lambda params: {
                k: jax.tree.map(lambda _, k=k: "dense" if k in EMBEDDINGS else "lowrank", v)
                for k, v in params.items()
            },
        )
    if name in UMTAM_VARIANTS:
        return umtam_jax.umtam(
            1.0,
            rank=rank,
            min_dim_size_to_factor=min_dim,
            svd_method=svd_method,
            error_decay=error_decay,
            bias_correction=name == "umtam_bc",
            row_axes=None if factor_embeddings else umtam_row_axes,
        )
    raise ValueError(f"unknown optimizer {name!r}")


def make_tx(base: optax.GradientTransformation, steps: int, warmup_frac: float):
    """``base`` (lr 1) × warmup-cosine shape × a traced per-run learning rate."""
    shape = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, max(1, int(warmup_frac * steps)), steps, end_value=0.1
    )
    return optax.chain(
        base,
        optax.scale_by_schedule(shape),
        optax.inject_hyperparams(optax.scale)(step_size=1.0),
    )


def set_lr(opt_state, lr: float):
    """Sets the traced learning rate held by ``inject_hyperparams(optax.scale)``."""
    inj = opt_state[-1]
    hp = dict(inj.hyperparams)
    hp["step_size"] = jnp.asarray(lr, jnp.float32)
    return (*opt_state[:-1], inj._replace(hyperparams=hp))


@dataclasses.dataclass(frozen=True)
class RunData:
    """The data of one seed's runs: the same for every optimizer and learning rate.

    Attributes:
        batches: Training windows, ``[steps, batch, context + 1]`` int32.
        val: Validation windows (learning-rate selection), ``[val_batches·batch,
            context + 1]``.
        test: Test windows (the reported loss), ``[test_batches·batch, context + 1]``.
    """

    batches: np.ndarray
    val: jax.Array
    test: jax.Array


def split_held_out(tokens: np.ndarray, eot: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The held-out stream cut in two at the document end nearest its middle.

    Args:
        tokens: Held-out documents, each followed by the end-of-text token ``eot``.
        eot: The end-of-text id (``lm_token_arrays``' tokenizer: 0).

    Returns:
        ``(validation, test)``: no document has tokens in both.

    Example:
        >>> v, t = split_held_out(np.array([5, 6, 0, 7, 0, 8, 9, 9, 0]))
        >>> v.tolist(), t.tolist()
        ([5, 6, 0, 7, 0], [8, 9, 9, 0])
    """
    ends = np.flatnonzero(tokens == eot) + 1
    if ends.size < 2:
        raise ValueError("the held-out stream needs at least two documents to split")
    cut = int(ends[np.argmin(np.abs(ends[:-1] - tokens.size / 2))])
    return tokens[:cut], tokens[cut:]


def windows(tokens: np.ndarray, shape: tuple[int, ...], length: int, seed: int) -> np.ndarray:
    """Windows of ``length`` tokens at uniform starts drawn by ``default_rng(seed)``:
    ``shape + (length,)`` int32 (training batches: ``(steps, batch)``)."""
    starts = np.random.default_rng(seed).integers(0, tokens.size - length, size=shape)
    return tokens[starts[..., None] + np.arange(length)].astype(np.int32)


def lm_run_data(train: np.ndarray, held_out: np.ndarray, size: Size, seed: int) -> RunData:
    """Training batches, validation and test windows of one seed (see :class:`RunData`).

    Args:
        train: The training token stream of ``lm_token_arrays``.
        held_out: Its held-out stream, split by :func:`split_held_out`.
        size: The run size (steps, batch, context, validation and test batches).
        seed: Draws the training windows; ``seed + 1_000_003`` the validation and
            ``seed + 2_000_003`` the test windows.

    Returns:
        A :class:`RunData`.
    """
    length = size.context + 1
    batches = windows(train, (size.steps, size.batch), length, seed)
    val_tokens, test_tokens = split_held_out(held_out)
    val = windows(val_tokens, (size.val_batches * size.batch,), length, seed + 1_000_003)
    test = windows(test_tokens, (size.test_batches * size.batch,), length, seed + 2_000_003)
    return RunData(batches, jnp.asarray(val), jnp.asarray(test))


def make_eval_fn(config: GPTConfig, size: Size):
    """A jitted mean loss of ``params`` over windows, one batch of ``size.batch`` at a time."""

    @jax.jit
    def eval_fn(params, windows):
        vb = windows.reshape(-1, size.batch, size.context + 1)
        return jax.lax.map(lambda b: gpt_loss(params, b, config=config), vb).mean()

    return eval_fn


def run_key(r: dict[str, Any]) -> str:
    """The identity of a run: optimizer, rank, SVD method and learning rate."""
    return f"{r['optimizer']}|r{r.get('rank')}|{r.get('svd_method', '-')}|lr{r['lr']:.3g}"


def train_one(
    step_fn,
    eval_fn,
    tx,
    params0,
    data: RunData,
    lr: float,
    size: Size,
    label: str,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """One training run; returns curves and timings.

    The validation loss is evaluated every ``size.eval_every`` steps (the curves, and the
    loss learning rates are chosen on); the test loss once, after the last step
    (``final_test_loss``: None for an abandoned run, inf for a diverged one).
    With ``max_seconds``, the run is abandoned after 4 steps when the projected time of
    the remaining steps exceeds it (``aborted`` is then set).
    """
    from tqdm.auto import tqdm

    params = params0
    opt_state = set_lr(tx.init(params0), lr)
    eval_steps, val_losses, train_losses, times = [0], [float(eval_fn(params, data.val))], [], []
    diverged = aborted = False
    bar = tqdm(range(1, size.steps + 1), desc=label, leave=False, mininterval=5)
    for t in bar:
        t0 = time.perf_counter()
        params, opt_state, loss = step_fn(params, opt_state, data.batches[t - 1])
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        train_losses.append(loss)
        if not math.isfinite(loss):
            diverged = True
            break
        if max_seconds is not None and t == 4:
            projected = float(np.median(times[1:])) * (size.steps - t)
            if projected > max_seconds:
                print(
                    f"[training] {label}: projected {projected:.0f} s > {max_seconds:.0f} s,"
                    " abandoned",
                    flush=True,
                )
                aborted = True
                break
        if t % size.eval_every == 0 or t == size.steps:
            vl = float(eval_fn(params, data.val))
            eval_steps.append(t)
            val_losses.append(vl)
            bar.set_postfix(val=f"{vl:.3f}")
            if not math.isfinite(vl):
                diverged = True
                break
    bar.close()
    steady = times[1:] if len(times) > 1 else times
    final_test = None if aborted else float("inf")
    if not (aborted or diverged):
        final_test = float(eval_fn(params, data.test))
    return {
        "eval_steps": eval_steps,
        "val_loss": val_losses,
        "train_loss": train_losses,
        "final_val_loss": (None if aborted else val_losses[-1] if not diverged else float("inf")),
        "final_test_loss": final_test,
        "diverged": diverged,
        "aborted": aborted,
        "first_step_s": times[0] if times else None,
        "step_s_median": float(np.median(steady)) if steady else None,
        "step_s_p10": float(np.percentile(steady, 10)) if steady else None,
    }


def gpt_config(size: Any) -> GPTConfig:
    """The GPT of a benchmark size (vocabulary of the LM data's tokenizer, 4096)."""
    return GPTConfig(
        vocab_size=4096,
        context=size.context,
        d_model=size.d_model,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
    )

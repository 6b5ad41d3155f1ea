"""UMTAM on a device mesh: the multi-host recipe, runnable on one host.

On a TPU pod every host runs this same script (``jax.distributed.initialize()`` first);
here ``--simulate N`` fakes N CPU devices so the identical code runs on one machine:

    python examples/sharded_training.py --simulate 8 --axis-type explicit
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", type=int, default=0, help="fake N CPU devices")
    parser.add_argument("--axis-type", choices=("auto", "explicit"), default="explicit")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize")
    args = parser.parse_args()
    if args.simulate:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.simulate}"

    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import umtam_jax
    from umtam_jax import checkpoint

    if args.distributed:
        jax.distributed.initialize()  # once per host, before any other JAX call
    n = jax.device_count()
    axis = AxisType.Explicit if args.axis_type == "explicit" else AxisType.Auto
    mesh = jax.make_mesh((max(n // 4, 1), min(n, 4)), ("data", "model"), axis_types=(axis,) * 2)
    # Megatron-style: w1 split by output columns, w2 by input rows, the batch by "data".
    specs = {"w1": P(None, "model"), "w2": P("model", None), "b": P("model")}

    with jax.set_mesh(mesh):
        shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}

        def init_params(key):
            k1, k2 = jax.random.split(key)
            return {
                "w1": 0.05 * jax.random.normal(k1, (256, 512)),
                "w2": 0.05 * jax.random.normal(k2, (512, 128)),
                "b": jnp.zeros(512),
            }

        params = jax.jit(init_params, out_shardings=shardings)(jax.random.key(0))
        opt = umtam_jax.umtam(1e-2, rank=16, min_dim_size_to_factor=64)
        # Every state array shards like its parameter (u like the rows, v like the columns).
        state_shardings = umtam_jax.state_shardings(opt, params)
        state = jax.jit(opt.init, out_shardings=state_shardings)(params)

        def loss_fn(p, x):
            h = jnp.tanh(x @ p["w1"] + p["b"])
            # With Explicit axes a contraction over a sharded axis names its output sharding.
            out_sharding = P("data", None) if axis == AxisType.Explicit else None
            return jnp.mean(jnp.square(jnp.matmul(h, p["w2"], out_sharding=out_sharding)))

        @jax.jit
        def step(p, s, x):
            loss, grads = jax.value_and_grad(loss_fn)(p, x)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        x = jax.device_put(
            jax.random.normal(jax.random.key(1), (32, 256)), NamedSharding(mesh, P("data", None))
        )
        for i in range(args.steps):
            params, state, loss = step(params, state, x)
            print(f"step {i + 1}: loss {float(loss):.5f}")
        print("w1 sharding:", params["w1"].sharding.spec)
        print("u of w1:", state[0].leaves["w1"].u.sharding.spec)

        directory = os.path.join(tempfile.mkdtemp(), "ckpt")
        checkpoint.save_checkpoint(directory, params, opt_state=state)
        stats = checkpoint.restore_statistics(directory)
        print("saved params + statistics + state to", directory)
        print("statistics of w1:", type(stats["w1"]).__name__)


if __name__ == "__main__":
    main()

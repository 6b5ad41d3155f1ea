"""One process of a two-process CPU "pod" (2 devices each) saving and restoring a
checkpoint whose arrays no process sees whole: run by test_checkpoint_multiprocess.py.

Usage: ``python multiprocess_worker.py PROCESS_ID PORT DIRECTORY MODE``, MODE one of
``save``, ``restore`` (the saved sharding) and ``restore_coarse`` (column blocks twice
as wide, each holding two saved shards).
"""

import os
import sys


def main(process: int, port: str, directory: str, mode: str) -> None:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from umtam_jax import checkpoint

    mesh = jax.make_mesh((4,), ("model",))
    if mode == "restore_coarse":  # one device of each process: 2 column blocks of 16
        mesh = jax.sharding.Mesh(np.array(jax.devices())[[0, 2]], ("model",))
    shardings = {"w": NamedSharding(mesh, P(None, "model")), "b": NamedSharding(mesh, P())}
    values = {
        "w": np.arange(64 * 32, dtype=np.float32).reshape(64, 32),
        "b": np.ones(32, np.float32),
    }
    if mode == "save":
        params = jax.jit(lambda: jax.tree.map(jnp.asarray, values), out_shardings=shardings)()
        checkpoint.save_checkpoint(directory, params)
    else:
        target = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in values.items()
        }
        try:
            restored = checkpoint.restore_params(directory, target=target)
        except checkpoint.CheckpointCorruptError as err:
            print("CORRUPT", err, flush=True)
        else:
            for k, v in restored.items():
                for shard in v.addressable_shards:
                    assert np.array_equal(np.asarray(shard.data), values[k][shard.index]), k
            print("RESTORED", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])

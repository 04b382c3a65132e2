"""Data parallelism over every JAX device: batches are split along their leading axis.

The E-step and the M-step put their batches on a one-axis mesh of all devices; XLA partitions
the per-sample computation and all-reduces the gradients. A multi-GPU node uses every GPU; on a
CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=2` simulates two devices. In a
multi-process run (`distributed.py`) the mesh spans the devices of every process: each process
holds the whole batch on the host and places only the rows of its own devices.
"""

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


def batch_sharding() -> NamedSharding:
    """Splits an array's leading axis over all devices (replicates the other axes)."""
    return NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), PartitionSpec("batch"))


def replicated_sharding() -> NamedSharding:
    """A copy of the whole array on every device (of every process)."""
    return NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), PartitionSpec())


def _place(leaf, sharding):
    if jax.process_count() == 1:
        return jax.device_put(leaf, sharding)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys: place their data
        impl = jax.random.key_impl(leaf)
        return jax.random.wrap_key_data(_place(jax.random.key_data(leaf), sharding), impl=impl)
    # A host value (the same in every process) onto devices of several processes: each process
    # builds the shards of its own devices.
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(tree: PyTree) -> PyTree:
    """Places every array leaf of `tree` split along its leading (batch) axis over all devices.

    **Raises:** `ValueError` if a batch size is not a multiple of the number of devices.
    """
    devices = jax.device_count()

    def place(leaf):
        if leaf.shape[0] % devices:
            raise ValueError(f"batch of {leaf.shape[0]} does not split over {devices} devices")
        return _place(leaf, batch_sharding())

    return jax.tree.map(place, tree)


def replicate(tree: PyTree) -> PyTree:
    """Places every array leaf of `tree` whole on every device; other leaves are kept.

    Needed in a multi-process run, where a computation on the global mesh takes global arrays
    only; in one process it gives every argument the same placement whether it was computed,
    loaded or made afresh, so that a jitted E-step or M-step compiles once, not once per lap.
    """
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda leaf: _place(leaf, replicated_sharding()), arrays), static)

"""Data parallelism over every JAX device: batches are split along their leading axis.

The E-step and the M-step put their batches on a one-axis mesh of all devices; XLA partitions
the per-sample computation and all-reduces the gradients. A multi-GPU node uses every GPU; on a
CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=2` simulates two devices.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


def batch_sharding() -> NamedSharding:
    """Splits an array's leading axis over all devices (replicates the other axes)."""
    return NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), PartitionSpec("batch"))


def shard_batch(tree: PyTree) -> PyTree:
    """Places every array leaf of `tree` split along its leading (batch) axis over all devices.

    **Raises:** `ValueError` if a batch size is not a multiple of the number of devices.
    """
    devices = jax.device_count()

    def place(leaf):
        if leaf.shape[0] % devices:
            raise ValueError(f"batch of {leaf.shape[0]} does not split over {devices} devices")
        return jax.device_put(leaf, batch_sharding())

    return jax.tree.map(place, tree)

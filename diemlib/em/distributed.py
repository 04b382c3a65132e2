"""Multi-process runs (`jax.distributed`): one EM run over the devices of several processes or nodes.

Every process runs the same program on the same data; the E-step and the M-step split their
batches over the *global* mesh (`sharding.py`), and everything else (the observations, the
evaluation, the checkpoints' contents) is computed identically in every process. Only process 0
touches the run directory: it writes the checkpoints and metrics and reads them back on resume,
then broadcasts what it read (`broadcast`, `broadcast_json`), so no shared filesystem is needed.

[`initialize`][] starts `jax.distributed` when the environment asks for it, and does nothing for
one process alone:

- explicit variables `DIEMLIB_COORDINATOR` (`host:port` of process 0), `DIEMLIB_NUM_PROCESSES`
  and `DIEMLIB_PROCESS_ID` (what `diem-run --coordinator --num-processes --process-id` set), or
- Slurm (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS` > 1, `SLURM_PROCID`,
  `SLURM_LOCALID`): JAX's own cluster detection (jax 0.10: coordinator = the first node of the
  step, port derived from the job id; one GPU per task, the one numbered `SLURM_LOCALID`).

It must run before JAX starts its backends: `diem-run` runs it in the notebook's kernel, in a
cell of its own before the notebook's first cell (so notebooks run unchanged as N processes); a
script calls it first thing. Timeouts, in seconds: `DIEMLIB_INIT_TIMEOUT` (default 300)
for every process to connect, `DIEMLIB_HEARTBEAT_TIMEOUT` (default 100) after which a process
whose peer died (or the coordinator) stops with an error instead of waiting forever.
"""

import json
import os

import jax
import numpy as np

ENV_COORDINATOR = "DIEMLIB_COORDINATOR"
ENV_NUM_PROCESSES = "DIEMLIB_NUM_PROCESSES"
ENV_PROCESS_ID = "DIEMLIB_PROCESS_ID"
ENV_INIT_TIMEOUT = "DIEMLIB_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "DIEMLIB_HEARTBEAT_TIMEOUT"
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def requested(environ=None) -> tuple[str, int, int] | None:
    """What the environment asks for, without starting anything.

    **Returns:** `("explicit" | "slurm", num_processes, process_id)`, or `None` for one process.

    **Raises:** `ValueError` for an incomplete or inconsistent set of `DIEMLIB_*` variables.
    """
    env = os.environ if environ is None else environ
    explicit = [env.get(name) for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)]
    if any(explicit):
        if not all(explicit):
            raise ValueError(
                f"multi-process runs need all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and "
                f"{ENV_PROCESS_ID} (got {dict(zip((ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID), explicit))})"
            )
        count, index = int(explicit[1]), int(explicit[2])
        if not 0 <= index < count:
            raise ValueError(f"{ENV_PROCESS_ID}={index} is not in [0, {ENV_NUM_PROCESSES}={count})")
        return ("explicit", count, index) if count > 1 else None
    if all(name in env for name in _SLURM) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
    return None


def process_id_from_env(environ=None) -> int:
    """This process's index as the environment gives it (0 for one process); starts nothing."""
    found = requested(environ)
    return 0 if found is None else found[2]


def initialize() -> bool:
    """Starts `jax.distributed` if the environment asks for several processes (see the module).

    Idempotent. On CPU, cross-process collectives use gloo. **Returns:** whether this is a
    multi-process run. **Raises:** `RuntimeError` if JAX's backends already started (call it
    before any JAX computation), or if the peers do not all connect within
    `DIEMLIB_INIT_TIMEOUT` seconds.
    """
    found = requested()
    if found is None:
        return False
    if jax.distributed.is_initialized():
        return True
    kind, count, index = found
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = dict(
        initialization_timeout=int(os.environ.get(ENV_INIT_TIMEOUT, 300)),
        heartbeat_timeout_seconds=int(os.environ.get(ENV_HEARTBEAT_TIMEOUT, 100)),
    )
    if kind == "explicit":
        jax.distributed.initialize(os.environ[ENV_COORDINATOR], count, index, **timeouts)
    else:
        jax.distributed.initialize(**timeouts)  # JAX reads the Slurm variables itself
    return True


def is_main() -> bool:
    """Whether this process writes files (process 0; always true for one process)."""
    return jax.process_index() == 0


def writes_files() -> bool:
    """[`is_main`][] without starting JAX's backends where `jax.distributed` is not running."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast(tree):
    """The array leaves of `tree` as process 0 has them, in every process (identity for one).

    Every process passes a tree of the same structure, shapes and dtypes.
    """
    if jax.process_count() == 1:
        return tree
    import equinox as eqx
    from jax.experimental import multihost_utils

    arrays, static = eqx.partition(tree, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)
    leaves = multihost_utils.broadcast_one_to_all([np.asarray(leaf) for leaf in leaves])
    return eqx.combine(jax.tree.unflatten(treedef, [jax.numpy.asarray(leaf) for leaf in leaves]), static)


def broadcast_json(obj):
    """A JSON-serialisable value as process 0 has it, in every process (identity for one)."""
    if jax.process_count() == 1:
        return obj
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8) if is_main() else np.zeros(0, np.uint8)
    size = int(broadcast([np.array(data.size, np.int64)])[0])
    if not is_main():
        data = np.zeros(size, np.uint8)
    return json.loads(np.asarray(broadcast([data])[0]).tobytes().decode("utf-8"))


def gather(tree):
    """Every array leaf of `tree` as one local array holding its global value, in every process.

    Arrays split over the devices of several processes (the E-step's samples, the M-step's
    weights) become ordinary single-process arrays; the identity for one process.
    """
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    def local(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.numpy.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return leaf

    return jax.tree.map(local, tree)

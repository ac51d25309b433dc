"""Data parallelism for the example: one mesh axis over every device, batches split along it.

The train state is replicated over a one-axis mesh of every device of every process (axis `AXIS`)
and each global batch is split along that axis. `data_parallel` runs a step function on each
device's share under `jax.shard_map`; the step combines what it needs over `AXIS` itself (the
batch-norm layers through their ``axis_name``, the gradients with `lax.pmean`). On one device the
mesh has one device and the same code runs. In a multi-process run every process reads only its own
rows of each global batch (`process_rows`) and `shard_batch` assembles the global arrays.

Nothing here knows the model or the step: `bnjax_examples.steps` holds those.
"""

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

AXIS = "data"  # The mesh axis that the global batch is split along.


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh (`AXIS`) over `devices`, by default every device of every process."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def describe_devices(mesh: Mesh) -> str:
  """What a run is split over, e.g. ``'8 devices (cpu) in 1 process'``."""
  platforms = sorted({device.platform for device in mesh.devices.flat})
  num_devices, num_processes = mesh.devices.size, jax.process_count()
  return (f"{num_devices} device{'s' * (num_devices != 1)} ({', '.join(platforms)}) in "
          f"{num_processes} process{'es' * (num_processes != 1)}")


def compiler_options(mesh: Mesh, unoptimised: bool) -> dict[str, Any] | None:
  """XLA options that skip LLVM optimisation, on CPU only: much faster to compile, slower to run."""
  on_cpu = all(device.platform == "cpu" for device in mesh.devices.flat)
  return {"xla_backend_optimization_level": 0} if unoptimised and on_cpu else None


def data_parallel(step_fn: Callable[..., Any], mesh: Mesh, *, donate_state: bool = False,
                  fast_compile: bool = False) -> Callable[..., Any]:
  """``step_fn(state, batch)`` over the mesh: state replicated, batch split along `AXIS`, jitted.

  ``check_vma=False``: the step's outputs (new state, metrics) are equal on every device by
  construction, since the step combines what differs over `AXIS` with collectives; that is what the
  replicated output spec states.

  Args:
    step_fn: ``(state, batch) -> outputs``, written for one device's share of the batch, with its
      collectives over `AXIS`.
    mesh: the devices, with the axis `AXIS`.
    donate_state: let XLA reuse the input state's buffers for the output (the caller must not use
      the state it passed in again).
    fast_compile: on CPU, compile without LLVM optimisation (about half the compile time, a few
      times slower steps): for runs of a few steps.

  Returns:
    The jitted step, taking the replicated state and a batch from `shard_batch`.
  """
  step = jax.shard_map(step_fn, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(AXIS)),
                       out_specs=PartitionSpec(), check_vma=False)
  return jax.jit(step, donate_argnums=0 if donate_state else (),
                 compiler_options=compiler_options(mesh, fast_compile))


def replicate(create_fn: Callable[[], Any], mesh: Mesh) -> Any:
  """Runs `create_fn` under `jit` with every output replicated over `mesh` (works multi-process).

  On CPU it is compiled without LLVM optimisation: it runs once, and XLA:CPU otherwise spends
  seconds optimising the random-number code of the initialisers (e.g. 10 s instead of 1 s for the
  small CNN), for the same values.
  """
  return jax.jit(create_fn, out_shardings=NamedSharding(mesh, PartitionSpec()),
                 compiler_options=compiler_options(mesh, unoptimised=True))()


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of each global batch that this process's devices hold (all rows with one process)."""
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  slices = [index[0] for index in
            sharding.addressable_devices_indices_map((global_batch_size,)).values()]
  start = min(s.start or 0 for s in slices)
  stop = max(global_batch_size if s.stop is None else s.stop for s in slices)
  return slice(start, stop)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                global_batch_size: int) -> dict[str, jax.Array]:
  """Assembles global arrays split along `AXIS` from this process's rows of the batch."""
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  return {name: jax.make_array_from_process_local_data(
      sharding, rows, (global_batch_size, *rows.shape[1:])) for name, rows in local_batch.items()}

"""Programs on simulated devices: sharded layers and a sharded ResNet step, with their collectives.

Runs inside a process started with ``--xla_force_host_platform_device_count=N`` (the device count
is fixed when JAX starts, so `bench.py` starts one process per count). The batch is sharded over a
one-axis mesh named "batch" with `shard_map`, and every program reads its statistics across it.
The layer programs come from `peers.SHARDED_LAYERS`; with one device, bnjax's layer also runs
under plain `jit` on unsharded arrays, to show what `shard_map` itself costs.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import cases, models, peers, programs, timing
from benchmarks.cases import DevicesSize

AXIS = "batch"
PLAIN_JIT = "bnjax layer fwd+bwd, plain jit"
RESNET_STEP = "bnjax ResNet train step"


def _on_mesh(apply, mesh):
  """Forward+backward of `apply` under `shard_map`: per-device gradients and state come back
  stacked along the batch axis."""

  def local(x, params, state, dy):
    y, (dx, dparams), new_state = programs.forward_backward(apply)(x, params, state, dy)
    return y, dx, jax.tree.map(lambda a: a[None], (dparams, new_state))

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(), P(), P(AXIS)),
                               out_specs=P(AXIS)))


def devices_benchmark(size: DevicesSize, *, fast: bool = False) -> dict:
  """Compiles, counts the collectives of and times every sharded program; one "devices" entry."""
  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = NamedSharding(mesh, P(AXIS))
  x = jax.device_put(cases.normal(size.shape, seed=0), sharded)
  dy = jax.device_put(cases.normal(size.shape, seed=1), sharded)
  runs, info = {}, {}

  def add(name, jitted, args):
    compiled = programs.compile_or_report(jitted, args, info, name, fast=fast)
    if compiled is not None:
      runs[name] = functools.partial(programs.call, compiled, args)

  for name, build in peers.SHARDED_LAYERS.items():
    layer = build(size.shape, "float32", axis_name=AXIS)
    add(name, _on_mesh(layer.apply, mesh), (x, layer.params, layer.state, dy))
  if devices == 1:  # the same layer without shard_map, on unsharded arrays.
    layer = peers.bnjax_batch_norm(size.shape, "float32")
    add(PLAIN_JIT, jax.jit(programs.forward_backward(layer.apply)),
        (jnp.asarray(x), layer.params, layer.state, jnp.asarray(dy)))
  if size.blocks is not None:
    add(RESNET_STEP, *_resnet_step(size, mesh, sharded))
  summary = timing.summarise(timing.round_robin(runs, size.rounds), {})
  for name, entry in info.items():
    summary.setdefault(name, {}).update(entry)
  return {"devices": devices, "shape": list(size.shape), "batch": size.batch, "impls": summary}


def _resnet_step(size: DevicesSize, mesh, sharded):
  """The ResNet step with bnjax, batch sharded: (jitted program, its arguments)."""
  images, labels = models.resnet_inputs(size.batch, size.image)
  variables = models.init_variables(models.resnet("bnjax", blocks=size.blocks), images[:2])
  images, labels = jax.device_put((images, labels), sharded)
  step = models.train_step(models.resnet("bnjax", axis_name=AXIS, blocks=size.blocks),
                           size.batch)

  def local_step(params, batch_stats, images, labels):
    params, new_stats, loss = step(params, batch_stats, images, labels)
    return params, jax.tree.map(lambda a: a[None], new_stats), loss[None]

  train = jax.jit(jax.shard_map(local_step, mesh=mesh,
                                in_specs=(P(), P(), P(AXIS), P(AXIS)),
                                out_specs=(P(), P(AXIS), P(AXIS))))
  return train, (variables["params"], variables["batch_stats"], images, labels)

"""Precise statistics across 8 simulated devices, against one device and float64 NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np

import bnjax
from bnjax import tools
from tests import reference
from tests.tools import test_precise

F32 = reference.TOLERANCES["float32"]
AXIS = "batch"


class _TwoLayers(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense -> BatchNorm (unbiased), statistics over `axis_name`."""

  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(3, name="dense1")(x)
    x = bnjax.BatchNorm(use_running_average=not train, axis_name=self.axis_name, name="bn1")(x)
    x = nn.Dense(2, name="dense2")(nn.relu(x))
    return bnjax.BatchNorm(use_running_average=not train, unbiased_running_var=True,
                           axis_name=self.axis_name, name="bn2")(x)


def _batches():
  """Two batches of 16 (one compilation); each device's rows from a different distribution.

  Batches of unequal size are merged by the code of one device (tests/tools/test_precise.py).
  """
  rng = np.random.default_rng(0)
  return [np.concatenate([rng.normal(3.0 + d + b, 1.0 + d, (2, 2)) for d in range(8)])
          .astype(np.float32) for b in range(2)]


def _variables(model, x):
  """Random parameters and running statistics of the model's shapes, drawn by NumPy (no compile)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 1.0, s.shape), jnp.float32),
                        shapes["params"])
  running = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 2.0, s.shape), jnp.float32),
                         shapes["batch_stats"])
  return {"params": params, "batch_stats": running}


def test_precise_batch_stats_across_devices_equal_one_device_and_float64():
  assert jax.device_count() >= 8
  mesh = Mesh(np.array(jax.devices()[:8]), (AXIS,))
  sharded_model, single_model = _TwoLayers(axis_name=AXIS), _TwoLayers()
  batches = _batches()
  variables = _variables(single_model, batches[0])

  def sharded_apply(variables, batch, *, mutable, train):
    def local(variables, batch):
      return sharded_model.apply(variables, batch, mutable=mutable, train=train)
    # The sown moments are global (combined over AXIS), hence replicated.
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS)),
                         out_specs=(P(AXIS), P()))(variables, batch)

  sharded = tools.precise_batch_stats(sharded_apply, variables, batches, train=True)
  single = tools.precise_batch_stats(single_model.apply, variables, batches, train=True)
  # Float64 statistics of each layer's input over the global batches, as in test_precise.py.
  reference_stats = test_precise._population_reference(variables, batches)  # noqa: SLF001
  want = dict(zip(("bn1", "bn2"), reference_stats))
  for layer in ("bn1", "bn2"):
    for got in (sharded, single):
      np.testing.assert_allclose(got["batch_stats"][layer]["mean"], want[layer][0], **F32)
      np.testing.assert_allclose(got["batch_stats"][layer]["var"], want[layer][1], **F32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32),
                 sharded["batch_stats"][layer], single["batch_stats"][layer])


def test_population_moments_of_sharded_batch_norm_are_those_of_the_global_batches():
  assert jax.device_count() >= 8
  mesh = Mesh(np.array(jax.devices()[:8]), (AXIS,))
  params, state = bnjax.init(2)

  def global_stats(x):
    return bnjax.batch_norm(params, state, x, True, axis_name=AXIS, return_stats=True)[2]

  step = jax.jit(jax.shard_map(global_stats, mesh=mesh, in_specs=P(AXIS), out_specs=P()))
  batches = _batches()
  total = None
  for x in batches:
    total = tools.merge_population(total, tools.population_moments(step(jnp.asarray(x))))
  pooled = np.concatenate(batches).astype(np.float64)
  np.testing.assert_array_equal(total.count, [len(pooled)] * 2)
  got = tools.population_state(total, unbiased=True)
  np.testing.assert_allclose(got.mean, pooled.mean(0), **F32)
  np.testing.assert_allclose(got.var, pooled.var(0, ddof=1), **F32)

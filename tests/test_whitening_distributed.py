"""Whitening across devices: per-device covariance moments merged by counts, equal to whitening the
concatenated global batch (float64 NumPy reference), with one all-reduce whose size does not
depend on the number of devices.

Each of the 8 simulated devices (tests/conftest.py) holds different data, shifted by a different
amount per device, and masks give the devices unequal numbers of valid rows.
"""

import functools
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

import bnjax
from benchmarks import hlo
from bnjax import stats
from bnjax.whitening import init_whitening, whitening_batch_norm
from tests import whitening_reference as ref

AXIS = "data"
C, GROUP = 5, 3  # groups of 3 and 2 channels
ROWS = 6  # rows per device
MOMENTUM = 0.9
VALID_PER_DEVICE = [6, 1, 0, 4, 6, 2, 5, 3]  # device 2 has no valid row


def _mesh(count):
  assert jax.device_count() >= count, (
      f"this test needs {count} devices, found {jax.device_count()}; tests/conftest.py sets "
      "--xla_force_host_platform_device_count=8 before JAX starts")
  return Mesh(np.array(jax.devices()[:count]), (AXIS,))


def _shard(x, mesh):
  return jax.device_put(x, NamedSharding(mesh, P(AXIS)))


def _global_batch(seed, devices=8, offset=1.0):
  """float32 [devices * ROWS, C]: correlated channels; device k's rows are shifted by k."""
  rng = np.random.default_rng(seed)
  mixing = np.eye(C) + 0.6 * rng.standard_normal((C, C))
  x = rng.standard_normal((devices, ROWS, C)) @ mixing.T
  x = x + np.arange(devices).reshape(devices, 1, 1) * np.linspace(0.5, 1.5, C) + offset
  return x.reshape(devices * ROWS, C).astype(np.float32)


def _row_mask():
  valid = np.arange(ROWS)[None, :] < np.asarray(VALID_PER_DEVICE)[:, None]
  return valid.reshape(-1)


def _params():
  rng = np.random.default_rng(1)
  return bnjax.BatchNormParams(jnp.asarray(rng.normal(1.0, 0.2, C), jnp.float32),
                               jnp.asarray(rng.normal(0.0, 0.2, C), jnp.float32))


@functools.cache
def _sharded_train(devices, masked, groups=None):
  """jit(shard_map(whitening)) -> (y, every device's new state)."""

  def step(params, state, x, mask):
    y, new_state = whitening_batch_norm(params, state, x, True, group_size=GROUP,
                                        momentum=MOMENTUM, axis_name=AXIS,
                                        axis_index_groups=groups, mask=mask if masked else None)
    return y, jax.tree.map(lambda v: v[None], new_state)

  return jax.jit(jax.shard_map(step, mesh=_mesh(devices), in_specs=(P(), P(), P(AXIS), P(AXIS)),
                               out_specs=(P(AXIS), P(AXIS))))


def _assert_state_matches(new_state, mean, sigma, device):
  np.testing.assert_allclose(new_state.mean[device], (1 - MOMENTUM) * mean, atol=2e-6, rtol=1e-5)
  for index in range(2):
    expected = MOMENTUM * np.eye(GROUP) + (1 - MOMENTUM) * ref.block(sigma, C, GROUP, index)
    np.testing.assert_allclose(new_state.covariance[device, index], expected, atol=2e-6,
                               rtol=1e-5)


def test_merge_covariances_equals_the_concatenated_batch():
  x = _global_batch(0, offset=50.0).reshape(8, ROWS, C)
  x[5] += 1e3  # one part far from the others
  valid = _row_mask().reshape(8, ROWS)
  grouped = jnp.pad(jnp.asarray(x), ((0, 0), (0, 0), (0, 1))).reshape(8, ROWS, 2, GROUP)
  merged = jax.jit(lambda x, m: stats.merge_covariances(
      jax.vmap(lambda x, m: stats.local_covariance(x, m)[0])(x, m)))(grouped, jnp.asarray(valid))
  mean, sigma = ref.batch_moments(x.reshape(-1, C), valid.reshape(-1))
  n = valid.sum()
  assert merged.count.tolist() == [n, n]
  np.testing.assert_allclose(merged.mean.reshape(-1)[:C], mean, rtol=1e-6)
  np.testing.assert_allclose(merged.cross[0], n * sigma[:3, :3], rtol=1e-4)
  np.testing.assert_allclose(merged.cross[1, :2, :2], n * sigma[3:, 3:], rtol=1e-4)


def test_shard_map_with_unequal_valid_rows_equals_the_global_batch():
  x = _global_batch(2)
  valid = _row_mask()
  x[~valid] = np.nan  # invalid rows hold NaN: they must reach nothing
  params, (_, state) = _params(), init_whitening(C, group_size=GROUP)
  mesh = _mesh(8)
  y, new_state = _sharded_train(8, True)(params, state, _shard(jnp.asarray(x), mesh),
                                         _shard(jnp.asarray(valid)[:, None], mesh))
  clean = np.where(valid[:, None], x, 0.0)
  y_ref, mean, sigma, _ = ref.train_step(clean, GROUP, "zca", mask_M=valid, scale=params.scale,
                                         bias=params.bias)
  np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], atol=1e-4, rtol=0)
  assert np.isfinite(np.asarray(y)).all()
  for device in range(8):
    _assert_state_matches(new_state, mean, sigma, device)
    for field in new_state:
      np.testing.assert_array_equal(field[device], field[0])


def test_shard_map_gradients_equal_single_device_gradients_on_the_global_batch():
  x = jnp.asarray(_global_batch(3))
  valid = jnp.asarray(_row_mask())[:, None]
  weights = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)
  params, (_, state) = _params(), init_whitening(C, group_size=GROUP)
  mesh = _mesh(8)

  def layer(params, x, mask, axis_name):
    return whitening_batch_norm(params, state, x, True, group_size=GROUP, axis_name=axis_name,
                                mask=mask)[0]

  def sharded(params, x):
    return jax.shard_map(functools.partial(layer, axis_name=AXIS), mesh=mesh,
                         in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(AXIS))(params, x, valid)

  def single(params, x):
    return layer(params, x, valid, None)

  def gradients(fn, x):
    objective = lambda params, x: jnp.sum(jnp.where(valid, jnp.sin(fn(params, x)) * weights, 0.0))
    return jax.jit(jax.grad(objective, argnums=(0, 1)))(params, x)

  g_sharded, g_single = gradients(sharded, _shard(x, mesh)), gradients(single, x)
  for a, b in zip(jax.tree.leaves(g_sharded), jax.tree.leaves(g_single)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_large_offset_across_devices_is_exact():
  x = _global_batch(5, offset=0.0)
  x = (x + np.float32(1e4) * x.std(axis=0)).astype(np.float32)  # running mean 0: pivot far away
  params, (_, state) = _params(), init_whitening(C, group_size=GROUP)
  mesh = _mesh(8)
  y, new_state = _sharded_train(8, True)(params, state, _shard(jnp.asarray(x), mesh),
                                         _shard(jnp.ones((8 * ROWS, 1), bool), mesh))
  y_ref, mean, sigma, _ = ref.train_step(x, GROUP, "zca", scale=params.scale, bias=params.bias)
  np.testing.assert_allclose(y, y_ref, atol=2e-4, rtol=0)
  np.testing.assert_allclose(new_state.mean[3], (1 - MOMENTUM) * mean, rtol=1e-6)
  np.testing.assert_allclose(new_state.covariance[3, 0], MOMENTUM * np.eye(3)
                             + (1 - MOMENTUM) * sigma[:3, :3], rtol=2e-5)


def _all_reduce_sizes(text):
  """Element counts of the all-reduces in a compiled HLO text (one operand each)."""
  sizes = []
  for line in text.splitlines():
    if re.search(r"\ball-reduce(-start)?\(", line):
      shape = re.search(r"=\s*\(?f32\[([\d,]*)\]", line)
      sizes.append(int(np.prod([int(s) for s in shape.group(1).split(",") if s])))
  return sizes


def test_one_all_reduce_whose_size_does_not_depend_on_the_device_count():
  params, (_, state) = _params(), init_whitening(C, group_size=GROUP)
  sizes = {}
  for devices in (2, 8):
    mesh = _mesh(devices)
    x = _shard(jnp.asarray(_global_batch(6, devices)), mesh)
    fn = _sharded_train(devices, False)
    text = fn.lower(params, state, x, None).compile().as_text()
    assert hlo.count_collectives(text, branches="min") == {"all-reduce": 1}
    assert hlo.count_collectives(text, branches="max") == {"all-reduce": 2}  # the re-centred round
    sizes[devices] = set(_all_reduce_sizes(text))
  # Two groups of 3: the upper triangles (6 each) and the sums of offsets (3 each).
  assert sizes[2] == sizes[8] == {2 * 6 + 2 * 3}


def test_axis_index_groups_whiten_each_group_of_devices_separately():
  x = _global_batch(7)
  params, (_, state) = _params(), init_whitening(C, group_size=GROUP)
  groups = ((0, 1, 2), (3, 4, 5, 6, 7))
  mesh = _mesh(8)
  y, new_state = _sharded_train(8, False, groups)(params, state, _shard(jnp.asarray(x), mesh),
                                                  None)
  for group in groups:
    rows = np.concatenate([np.arange(d * ROWS, (d + 1) * ROWS) for d in group])
    y_ref, mean, sigma, _ = ref.train_step(x[rows], GROUP, "zca", scale=params.scale,
                                           bias=params.bias)
    np.testing.assert_allclose(np.asarray(y)[rows], y_ref, atol=1e-4, rtol=0)
    for device in group:
      _assert_state_matches(new_state, mean, sigma, device)


def test_vmap_with_axis_name_equals_the_global_batch():
  x = _global_batch(8, devices=4)
  params, (_, state) = _params(), init_whitening(C, group_size=GROUP)

  @jax.jit
  def members(x):
    return jax.vmap(lambda x: whitening_batch_norm(params, state, x, True, group_size=GROUP,
                                                   method="iterative", axis_name="members")[0],
                    axis_name="members")(x.reshape(4, ROWS, C))

  y_ref, _, _, _ = ref.train_step(x, GROUP, "iterative", scale=params.scale, bias=params.bias)
  np.testing.assert_allclose(np.asarray(members(x)).reshape(-1, C), y_ref, atol=1e-4, rtol=0)

"""Cross-device batch norm under `shard_map`, `pmap`, `vmap(axis_name=...)` and sharded `jit`.

Every device holds different data (each device's rows are shifted by a different amount), and every
result is compared with the float64 NumPy reference on the concatenated global batch (or, with
`axis_index_groups`, on each group's concatenated batch). Running statistics must be bit-identical
on every device. The 8 simulated CPU devices come from tests/conftest.py; tests assert the count
instead of skipping.
"""

import functools
import re

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import bnjax
from benchmarks import hlo
from tests import reference

F32 = reference.TOLERANCES["float32"]
AXIS = "data"
C = 3  # channels
ROWS = 4  # rows per device
MOMENTUM = 0.9
UNEQUAL_GROUPS = ((0, 1, 2), (3, 4, 5, 6, 7))
INTERLEAVED_GROUPS = ((1, 6), (0, 2, 3, 4, 5, 7))


# ----------------------------------------------------------------------------- helpers


def _devices(count):
  assert jax.device_count() >= count, (
      f"this test needs {count} devices, found {jax.device_count()}; tests/conftest.py sets "
      "--xla_force_host_platform_device_count=8 before JAX starts")
  return jax.devices()[:count]


@functools.cache
def _mesh(count):
  return Mesh(np.array(_devices(count)), (AXIS,))


def _shard(x, mesh):
  """Splits the leading axis over the mesh (shard_map rejects inputs sharded otherwise)."""
  return jax.device_put(x, NamedSharding(mesh, P(mesh.axis_names)))


def _global_batch(seed, devices, rows=ROWS, loc=0.0, std=1.0):
  """float32 [devices * rows, C]: device d's rows are N(loc + d * std, std^2), so no two agree.

  `loc` and `std` are scalars or per-channel arrays of shape [C].
  """
  noise = np.asarray(jax.random.normal(jax.random.key(seed), (devices, rows, C), jnp.float32))
  shift = np.arange(devices, dtype=np.float64).reshape(devices, 1, 1)
  loc_C = np.broadcast_to(np.asarray(loc, np.float64), (C,))
  std_C = np.broadcast_to(np.asarray(std, np.float64), (C,))
  x = loc_C + std_C * (noise + shift)
  return jnp.asarray(x.reshape(devices * rows, C), jnp.float32)


def _params_and_state():
  params = bnjax.BatchNormParams(scale=jnp.array([1.5, 0.5, 2.0], jnp.float32),
                                 bias=jnp.array([0.1, -0.2, 0.3], jnp.float32))
  state = bnjax.BatchNormState(mean=jnp.array([0.5, -1.0, 2.0], jnp.float32),
                               var=jnp.array([2.0, 0.5, 1.5], jnp.float32))
  return params, state


def _row_mask(valid_per_device, rows=ROWS):
  """bool [devices * rows, 1]: the first `valid_per_device[d]` rows of device d are valid."""
  valid = np.arange(rows)[None, :] < np.asarray(valid_per_device)[:, None]
  return valid.reshape(-1, 1)


def _per_device(tree):
  """Adds a leading axis so that out_specs P(AXIS) returns every device's own copy."""
  return jax.tree.map(lambda v: v[None], tree)


def _assert_identical_on_every_device(stacked, devices):
  for name, field in zip(stacked._fields, stacked):
    assert field.shape[0] == devices, (name, field.shape)
    for d in range(1, devices):
      np.testing.assert_array_equal(field[d], field[0], err_msg=f"{name} on device {d}")


def _assert_train_matches_reference(x, y, new_state, params, state, mask=None):
  """Compares y (at valid positions) and the running statistics with the float64 reference."""
  y_ref, mean_ref, var_ref = reference.train_step(
      x, state.mean, state.var, params.scale, params.bias, momentum=MOMENTUM, mask=mask)
  valid = np.ones(np.shape(x), bool) if mask is None else np.broadcast_to(mask, np.shape(x))
  np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], **F32)
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)


def _device_rows(devices_in_group, rows=ROWS):
  return np.concatenate([np.arange(d * rows, (d + 1) * rows) for d in devices_in_group])


def _assert_groups_match_reference(x, y, stacked_state, params, state, groups):
  x, y = np.asarray(x), np.asarray(y)
  for group in groups:
    rows = _device_rows(group)
    y_ref, mean_ref, var_ref = reference.train_step(
        x[rows], state.mean, state.var, params.scale, params.bias, momentum=MOMENTUM)
    np.testing.assert_allclose(y[rows], y_ref, **F32, err_msg=f"group {group}")
    for d in group:
      np.testing.assert_allclose(stacked_state.mean[d], mean_ref, **F32, err_msg=f"device {d}")
      np.testing.assert_allclose(stacked_state.var[d], var_ref, **F32, err_msg=f"device {d}")
      np.testing.assert_array_equal(stacked_state.mean[d], stacked_state.mean[group[0]])
      np.testing.assert_array_equal(stacked_state.var[d], stacked_state.var[group[0]])


@functools.cache
def _shard_map_train(devices, groups=None):
  """jit(shard_map(batch_norm)) over a 1-D mesh: (y, per-device state, per-device batch stats)."""
  groups = None if groups is None else [list(g) for g in groups]

  def step(params, state, x, mask):
    y, new_state, stats = bnjax.batch_norm(
        params, state, x, True, momentum=MOMENTUM, axis_name=AXIS, axis_index_groups=groups,
        mask=mask, return_stats=True)
    return y, _per_device(new_state), _per_device(stats)

  return jax.jit(jax.shard_map(step, mesh=_mesh(devices), in_specs=(P(), P(), P(AXIS), P(AXIS)),
                               out_specs=(P(AXIS), P(AXIS), P(AXIS))))


def _run_shard_map(devices, x, mask=None, groups=None):
  params, state = _params_and_state()
  mesh = _mesh(devices)
  mask = None if mask is None else _shard(mask, mesh)
  return _shard_map_train(devices, groups)(params, state, _shard(x, mesh), mask)


@functools.cache
def _pmap_train(groups=None, masked=False):
  groups = None if groups is None else [list(g) for g in groups]

  def step(params, state, x, mask):
    return bnjax.batch_norm(params, state, x, True, momentum=MOMENTUM, axis_name=AXIS,
                            axis_index_groups=groups, mask=mask)

  return jax.pmap(step, axis_name=AXIS, in_axes=(None, None, 0, 0 if masked else None))


def _run_pmap(x, mask=None, groups=None):
  """pmap over 8 devices; returns y as [8 * ROWS, C] and the [8, C] per-device state."""
  devices = len(_devices(8))
  params, state = _params_and_state()
  mask = None if mask is None else mask.reshape(devices, ROWS, -1)
  y, new_state = _pmap_train(groups, mask is not None)(
      params, state, x.reshape(devices, ROWS, C), mask)
  return y.reshape(devices * ROWS, C), new_state


# ----------------------------------------------------------------------------- shard_map


@pytest.mark.parametrize("devices", [2, 8])
def test_shard_map_train_matches_reference_on_global_batch(devices):
  x = _global_batch(0, devices, loc=3.0, std=2.0)
  params, state = _params_and_state()
  y, new_state, stats = _run_shard_map(devices, x)
  _assert_train_matches_reference(x, y, jax.tree.map(lambda v: v[0], new_state), params, state)
  np.testing.assert_array_equal(stats.count, np.full((devices, C), devices * ROWS, np.float32))


@pytest.mark.parametrize("devices", [2, 8])
def test_shard_map_state_is_bitwise_identical_on_every_device(devices):
  x = _global_batch(1, devices, loc=-5.0, std=3.0)
  _, new_state, stats = _run_shard_map(devices, x)
  _assert_identical_on_every_device(new_state, devices)
  _assert_identical_on_every_device(stats, devices)


def test_shard_map_each_device_state_matches_reference():
  x = _global_batch(2, 8, loc=1.0, std=0.5)
  params, state = _params_and_state()
  _, new_state, _ = _run_shard_map(8, x)
  _, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, momentum=MOMENTUM)
  for d in range(8):
    np.testing.assert_allclose(new_state.mean[d], mean_ref, **F32, err_msg=f"device {d}")
    np.testing.assert_allclose(new_state.var[d], var_ref, **F32, err_msg=f"device {d}")


def test_shard_map_eval_uses_running_statistics_and_returns_state_unchanged():
  mesh = _mesh(8)
  x = _global_batch(3, 8, loc=2.0)
  params, state = _params_and_state()

  def step(params, state, x):
    y, new_state = bnjax.batch_norm(params, state, x, False, axis_name=AXIS)
    return y, _per_device(new_state)

  y, new_state = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                                       out_specs=(P(AXIS), P(AXIS))))(params, state, _shard(x, mesh))
  y_ref = reference.normalize(x, state.mean, state.var, params.scale, params.bias)
  np.testing.assert_allclose(y, y_ref, **F32)
  for d in range(8):
    np.testing.assert_array_equal(new_state.mean[d], state.mean)
    np.testing.assert_array_equal(new_state.var[d], state.var)


_COLLECTIVES = re.compile(
    r"\b(all_gather|all_gather_invariant|psum|psum_invariant|pmax|pmin|ppermute|all_to_all|"
    r"reduce_scatter|psum_scatter)\[")


def _collectives_in(fn, *args):
  return _COLLECTIVES.findall(str(jax.make_jaxpr(fn)(*args)))


def test_train_uses_one_all_reduce_a_second_only_when_needed_and_eval_none():
  mesh = _mesh(8)
  x = _shard(_global_batch(4, 8), mesh)
  params, state = _params_and_state()

  def mapped(train):
    return jax.shard_map(
        lambda p, s, x: bnjax.batch_norm(p, s, x, train, axis_name=AXIS)[0], mesh=mesh,
        in_specs=(P(), P(), P(AXIS)), out_specs=P(AXIS))

  def count(train, branches):
    text = jax.jit(mapped(train)).lower(params, state, x).compile().as_text()
    return hlo.count_collectives(text, branches=branches)

  assert count(True, "min") == {"all-reduce": 1}
  assert count(True, "max") == {"all-reduce": 2}  # the re-centred round, inside a conditional.
  assert count(False, "max") == {}


def test_two_dimensional_mesh_with_tuple_axis_name_matches_reference():
  mesh = Mesh(np.array(_devices(8)).reshape(2, 4), ("replica", AXIS))
  x = _global_batch(5, 8, loc=-1.0, std=4.0)
  params, state = _params_and_state()

  def step(params, state, x):
    y, new_state = bnjax.batch_norm(params, state, x, True, momentum=MOMENTUM,
                                    axis_name=("replica", AXIS))
    return y, jax.tree.map(lambda v: v[None, None], new_state)

  spec = P(("replica", AXIS))
  y, new_state = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), spec), out_specs=(spec, P("replica", AXIS))))(
          params, state, jax.device_put(x, NamedSharding(mesh, spec)))
  _assert_train_matches_reference(x, y, jax.tree.map(lambda v: v[0, 0], new_state), params, state)
  _assert_identical_on_every_device(jax.tree.map(lambda v: v.reshape(8, C), new_state), 8)


def test_one_axis_of_a_two_dimensional_mesh_normalises_each_sub_batch_separately():
  # The mesh sub-axis alternative to `axis_index_groups`: statistics over AXIS only, so each
  # "replica" row of the 2 x 4 mesh (devices 0-3 and 4-7) is normalised on its own.
  mesh = Mesh(np.array(_devices(8)).reshape(2, 4), ("replica", AXIS))
  x = _global_batch(6, 8, loc=2.0, std=3.0)
  params, state = _params_and_state()

  def step(params, state, x):
    y, new_state = bnjax.batch_norm(params, state, x, True, momentum=MOMENTUM, axis_name=AXIS)
    return y, jax.tree.map(lambda v: v[None, None], new_state)

  spec = P(("replica", AXIS))
  y, new_state = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), spec), out_specs=(spec, P("replica", AXIS))))(
          params, state, jax.device_put(x, NamedSharding(mesh, spec)))
  _assert_groups_match_reference(x, y, jax.tree.map(lambda v: v.reshape(8, C), new_state),
                                 params, state, [(0, 1, 2, 3), (4, 5, 6, 7)])


# ----------------------------------------------------------------------------- pmap


def test_pmap_train_matches_reference_on_global_batch():
  x = _global_batch(10, 8, loc=3.0, std=2.0)
  params, state = _params_and_state()
  y, new_state = _run_pmap(x)
  _assert_train_matches_reference(x, y, jax.tree.map(lambda v: v[0], new_state), params, state)
  for d in range(1, 8):
    np.testing.assert_allclose(new_state.mean[d], new_state.mean[0], **F32)


def test_pmap_state_is_bitwise_identical_on_every_device():
  x = _global_batch(11, 8, loc=-5.0, std=3.0)
  _, new_state = _run_pmap(x)
  _assert_identical_on_every_device(new_state, 8)


# ----------------------------------------------------------------------------- masks

# Valid rows per device: device 2 keeps 1 of 4 rows (the 3 masked rows hold NaN), device 3 has
# none (its rows hold +Inf), the others differ.
VALID_PER_DEVICE = [4, 3, 1, 0, 2, 4, 1, 3]


def _masked_batch(seed):
  x = np.array(_global_batch(seed, 8, loc=4.0, std=3.0))
  mask = _row_mask(VALID_PER_DEVICE)
  x[2 * ROWS + 1:3 * ROWS] = np.nan
  x[3 * ROWS:4 * ROWS] = np.inf
  assert not np.isfinite(x[~mask[:, 0]]).all()
  return jnp.asarray(x), jnp.asarray(mask)


def test_shard_map_mask_with_unequal_valid_counts_matches_reference():
  x, mask = _masked_batch(20)
  params, state = _params_and_state()
  y, new_state, stats = _run_shard_map(8, x, mask)
  _assert_train_matches_reference(x, y, jax.tree.map(lambda v: v[0], new_state), params, state,
                                  mask=mask)
  np.testing.assert_array_equal(stats.count[0], np.full(C, sum(VALID_PER_DEVICE), np.float32))
  _assert_identical_on_every_device(new_state, 8)


def test_pmap_mask_with_unequal_valid_counts_matches_reference():
  x, mask = _masked_batch(21)
  params, state = _params_and_state()
  y, new_state = _run_pmap(x, mask)
  _assert_train_matches_reference(x, y, jax.tree.map(lambda v: v[0], new_state), params, state,
                                  mask=mask)
  _assert_identical_on_every_device(new_state, 8)


def test_shard_map_mask_non_finite_padding_gives_finite_output():
  x, mask = _masked_batch(22)
  y, _, _ = _run_shard_map(8, x, mask)
  assert np.isfinite(np.asarray(y)).all()


def test_shard_map_mask_gradients_are_finite_and_zero_at_padding():
  mesh = _mesh(8)
  x, mask = _masked_batch(23)
  weight = _global_batch(24, 8)
  params, state = _params_and_state()

  @jax.jit
  @jax.grad
  def grads(params_and_x):
    params, x = params_and_x
    y = jax.shard_map(
        lambda p, s, x, m: bnjax.batch_norm(p, s, x, True, axis_name=AXIS, mask=m)[0], mesh=mesh,
        in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=P(AXIS))(params, state, x, mask)
    return jnp.sum(jnp.where(mask, y * weight, jnp.zeros((), y.dtype)))

  g_params, g_x = grads((params, _shard(x, mesh)))
  for g in (g_params.scale, g_params.bias, g_x):
    assert np.isfinite(np.asarray(g)).all()
  padding = np.broadcast_to(~np.asarray(mask), x.shape)
  np.testing.assert_array_equal(np.asarray(g_x)[padding], 0.0)
  assert np.abs(np.asarray(g_x)[~padding]).max() > 0


def test_shard_map_all_false_mask_on_every_device_keeps_state():
  x, _ = _masked_batch(25)
  mask = jnp.zeros((8 * ROWS, 1), bool)
  _, state = _params_and_state()
  y, new_state, stats = _run_shard_map(8, x, mask)
  assert np.isfinite(np.asarray(y)).all()
  for d in range(8):
    np.testing.assert_array_equal(new_state.mean[d], state.mean)
    np.testing.assert_array_equal(new_state.var[d], state.var)
  assert not np.asarray(stats.updated).any()


# ----------------------------------------------------------------------------- axis_index_groups


def test_pmap_unequal_axis_index_groups_match_reference_per_group():
  x = _global_batch(30, 8, loc=1.0, std=2.0)
  params, state = _params_and_state()
  y, new_state = _run_pmap(x, groups=UNEQUAL_GROUPS)
  _assert_groups_match_reference(x, y, new_state, params, state, UNEQUAL_GROUPS)


@pytest.mark.parametrize("groups", [UNEQUAL_GROUPS, INTERLEAVED_GROUPS],
                         ids=["contiguous", "interleaved"])
def test_shard_map_unequal_axis_index_groups_match_reference_per_group(groups):
  x = _global_batch(31, 8, loc=-2.0, std=0.5)
  params, state = _params_and_state()
  y, new_state, _ = _run_shard_map(8, x, groups=groups)
  _assert_groups_match_reference(x, y, new_state, params, state, groups)


BAD_GROUPS = [
    pytest.param([[0, 1, 2], [3, 4, 5, 6]], id="missing-index"),
    pytest.param([[0, 1, 2, 3], [3, 4, 5, 6, 7]], id="duplicate-index"),
    pytest.param([[0, 1, 2, 3], [4, 5, 6, 7, 8]], id="out-of-range-index"),
    pytest.param([[0, 1, 2, 3, 4, 5, 6, 7], []], id="empty-group"),
]
_BAD_GROUPS_MESSAGE = r"`axis_index_groups` must split the 8 indices of the named axis"


@pytest.mark.parametrize("groups", BAD_GROUPS)
def test_shard_map_axis_index_groups_not_a_partition_raise(groups):
  mesh = _mesh(8)
  params, state = _params_and_state()
  step = jax.jit(jax.shard_map(
      lambda p, s, x: bnjax.batch_norm(p, s, x, True, axis_name=AXIS, axis_index_groups=groups)[0],
      mesh=mesh, in_specs=(P(), P(), P(AXIS)), out_specs=P(AXIS)))
  with pytest.raises(ValueError, match=_BAD_GROUPS_MESSAGE):
    step(params, state, _shard(_global_batch(32, 8), mesh))


@pytest.mark.parametrize("groups", BAD_GROUPS)
def test_pmap_axis_index_groups_not_a_partition_raise(groups):
  params, state = _params_and_state()
  step = jax.pmap(
      lambda p, s, x: bnjax.batch_norm(p, s, x, True, axis_name=AXIS, axis_index_groups=groups)[0],
      axis_name=AXIS, in_axes=(None, None, 0))
  with pytest.raises(ValueError, match=_BAD_GROUPS_MESSAGE):
    step(params, state, _global_batch(33, 8).reshape(8, ROWS, C))


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
def test_large_offsets_across_devices_match_reference(offset):
  std_C = np.array([1.0, 1e-2, 1e2])
  x = _global_batch(40, 8, loc=offset * std_C, std=std_C)
  params, state = _params_and_state()
  y, new_state, stats = _run_shard_map(8, x)
  mean_ref, var_ref, _ = reference.moments(x)
  np.testing.assert_allclose(stats.mean[0], mean_ref, rtol=1e-5, atol=0)
  np.testing.assert_allclose(stats.var[0], var_ref, rtol=1e-5, atol=0)
  _assert_train_matches_reference(x, y, jax.tree.map(lambda v: v[0], new_state), params, state)


def test_constant_channel_across_devices_gives_exactly_bias():
  constant = np.float32(1234.567)
  x = np.array(_global_batch(41, 8, loc=5.0, std=2.0))
  x[:, 1] = constant
  params, _ = _params_and_state()
  y, _, stats = _run_shard_map(8, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y)[:, 1], np.full(8 * ROWS, params.bias[1]))
  np.testing.assert_array_equal(stats.var[:, 1], 0.0)
  np.testing.assert_array_equal(stats.mean[:, 1], constant)


# ----------------------------------------------------------------------------- jit, vmap


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_jit_on_batch_sharded_input_matches_single_device(masked):
  mesh = _mesh(8)
  x = _global_batch(50, 8, loc=3.0, std=2.0)
  mask = jnp.asarray(_row_mask(VALID_PER_DEVICE)) if masked else None
  params, state = _params_and_state()
  step = jax.jit(lambda p, s, x, m: bnjax.batch_norm(p, s, x, True, momentum=MOMENTUM, mask=m))
  single = jax.devices()[0]
  y_one, state_one = step(params, state, jax.device_put(x, single),
                          None if mask is None else jax.device_put(mask, single))
  y_sharded, state_sharded = step(params, state, _shard(x, mesh),
                                  None if mask is None else _shard(mask, mesh))
  assert len(y_sharded.sharding.device_set) == 8
  valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  np.testing.assert_allclose(np.asarray(y_sharded)[valid], np.asarray(y_one)[valid], **F32)
  np.testing.assert_allclose(state_sharded.mean, state_one.mean, **F32)
  np.testing.assert_allclose(state_sharded.var, state_one.var, **F32)
  _assert_train_matches_reference(x, y_sharded, state_sharded, params, state, mask=mask)


def test_vmap_axis_name_matches_reference_over_vmapped_batch():
  x = _global_batch(60, 8, loc=-3.0, std=2.0)
  params, state = _params_and_state()
  y, new_state = jax.jit(jax.vmap(
      lambda p, s, x: bnjax.batch_norm(p, s, x, True, momentum=MOMENTUM, axis_name="b"),
      in_axes=(None, None, 0), axis_name="b"))(params, state, x.reshape(8, ROWS, C))
  _assert_train_matches_reference(x, y.reshape(8 * ROWS, C),
                                  jax.tree.map(lambda v: v[0], new_state), params, state)
  _assert_identical_on_every_device(new_state, 8)


# ----------------------------------------------------------------------------- gradients


@jax.jit
def _single_device_grads(params, state, x, weight):
  """Gradients of sum(y * weight) for batch_norm on the whole batch, no axis_name."""
  def loss(params, x):
    y, _ = bnjax.batch_norm(params, state, x, True)
    return jnp.sum(y * weight)
  return jax.grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_shard_map_gradient_of_global_loss_matches_single_device(custom_vjp):
  mesh = _mesh(8)
  x = _global_batch(70, 8, loc=2.0, std=3.0)
  weight = _global_batch(71, 8)
  params, state = _params_and_state()
  sharded_bn = jax.shard_map(
      lambda p, s, x: bnjax.batch_norm(p, s, x, True, axis_name=AXIS, custom_vjp=custom_vjp)[0],
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS)), out_specs=P(AXIS))
  loss = lambda params, x: jnp.sum(sharded_bn(params, state, x) * weight)
  g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, _shard(x, mesh))
  r_params, r_x = _single_device_grads(params, state, x, weight)
  np.testing.assert_allclose(g_x, r_x, **F32)
  np.testing.assert_allclose(g_params.scale, r_params.scale, **F32)
  np.testing.assert_allclose(g_params.bias, r_params.bias, **F32)


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_shard_map_per_device_gradients_psum_to_single_device(custom_vjp):
  # Data-parallel style: each device differentiates its own loss; the x gradient flows back
  # through the collective, and summing the parameter gradients over devices gives the global one.
  mesh = _mesh(8)
  x = _global_batch(72, 8, loc=-1.0, std=0.5)
  weight = _global_batch(73, 8)
  params, state = _params_and_state()

  def per_device(params, state, x, weight):
    def local_loss(params, x):
      y, _ = bnjax.batch_norm(params, state, x, True, axis_name=AXIS, custom_vjp=custom_vjp)
      return jnp.sum(y * weight)
    g_params, g_x = jax.grad(local_loss, argnums=(0, 1))(params, x)
    return _per_device(lax.psum(g_params, AXIS)), g_x

  g_params, g_x = jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
      out_specs=(P(AXIS), P(AXIS)), check_vma=False))(
          params, state, _shard(x, mesh), _shard(weight, mesh))
  r_params, r_x = _single_device_grads(params, state, x, weight)
  np.testing.assert_allclose(g_x, r_x, **F32)
  for d in range(8):
    np.testing.assert_allclose(g_params.scale[d], r_params.scale, **F32, err_msg=f"device {d}")
    np.testing.assert_allclose(g_params.bias[d], r_params.bias, **F32, err_msg=f"device {d}")


# ----------------------------------------------------------------------------- one value per channel


def test_one_row_per_device_is_enough_across_eight_devices():
  x = _global_batch(80, 8, rows=1, loc=1.0, std=2.0)
  params, state = _params_and_state()
  mesh = _mesh(8)

  def step(params, state, x):
    y, new_state = bnjax.batch_norm(params, state, x, True, momentum=MOMENTUM, axis_name=AXIS)
    return y, _per_device(new_state)

  y, new_state = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                                       out_specs=(P(AXIS), P(AXIS))))(params, state, _shard(x, mesh))
  _assert_train_matches_reference(x, y, jax.tree.map(lambda v: v[0], new_state), params, state)


def test_one_value_per_channel_on_a_single_device_raises():
  params, state = _params_and_state()
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    bnjax.batch_norm(params, state, jnp.ones((1, C), jnp.float32), True)


def test_one_value_per_channel_on_a_one_device_mesh_raises():
  mesh = _mesh(1)
  params, state = _params_and_state()
  step = jax.jit(jax.shard_map(lambda p, s, x: bnjax.batch_norm(p, s, x, True, axis_name=AXIS)[0],
                               mesh=mesh, in_specs=(P(), P(), P(AXIS)), out_specs=P(AXIS)))
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    step(params, state, _shard(jnp.ones((1, C), jnp.float32), mesh))


def test_one_value_per_channel_in_a_singleton_group_raises():
  params, state = _params_and_state()
  step = jax.pmap(
      lambda p, s, x: bnjax.batch_norm(p, s, x, True, axis_name=AXIS,
                                       axis_index_groups=[[0], [1, 2, 3, 4, 5, 6, 7]])[0],
      axis_name=AXIS, in_axes=(None, None, 0))
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    step(params, state, _global_batch(81, 8, rows=1).reshape(8, 1, C))


# ----------------------------------------------------------------------------- flax module


def test_linen_init_needs_no_bound_axis():
  model = bnjax.BatchNorm(use_running_average=False, axis_name=AXIS, momentum=MOMENTUM)
  variables = jax.jit(model.init)(jax.random.key(0), _global_batch(90, 1))
  np.testing.assert_array_equal(variables["params"]["scale"], np.ones(C, np.float32))
  np.testing.assert_array_equal(variables["params"]["bias"], np.zeros(C, np.float32))
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(C, np.float32))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(C, np.float32))


def test_linen_module_with_axis_name_under_shard_map_matches_reference():
  mesh = _mesh(8)
  x = _global_batch(91, 8, loc=2.0, std=3.0)
  params, state = _params_and_state()
  model = bnjax.BatchNorm(use_running_average=False, axis_name=AXIS, momentum=MOMENTUM)
  jax.jit(model.init)(jax.random.key(0), x[:ROWS])  # outside shard_map: AXIS is not bound
  variables = {"params": {"scale": params.scale, "bias": params.bias},
               "batch_stats": {"mean": state.mean, "var": state.var}}

  def step(variables, x):
    y, updates = model.apply(variables, x, mutable=["batch_stats"])
    return y, _per_device(updates["batch_stats"])

  y, batch_stats = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)),
                                         out_specs=(P(AXIS), P(AXIS))))(variables, _shard(x, mesh))
  new_state = bnjax.BatchNormState(mean=batch_stats["mean"], var=batch_stats["var"])
  _assert_train_matches_reference(x, y, jax.tree.map(lambda v: v[0], new_state), params, state)
  _assert_identical_on_every_device(new_state, 8)


@pytest.mark.parametrize("loc", [0.0, 1e4], ids=["raw-sums", "data-pivot"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_jit_on_explicitly_sharded_batch_matches_single_device(loc, with_mask):
  # `jax.make_mesh` gives Explicit axes in jax 0.10: slicing a few rows of the sharded batch axis
  # is a type error there, so the pivot must be chosen without it.
  assert jax.device_count() >= 8
  mesh = jax.make_mesh((8,), (AXIS,))
  x_global = _global_batch(80, 8, loc=loc, std=2.0)
  mask_global = (np.arange(x_global.shape[0]) % 3 != 0)[:, None] if with_mask else None
  sharding = jax.NamedSharding(mesh, P(AXIS))
  x = jax.device_put(x_global, sharding)
  mask = None if mask_global is None else jax.device_put(jnp.asarray(mask_global), sharding)
  params, state = _params_and_state()
  bn = jax.jit(bnjax.batch_norm, static_argnames="train")
  y, new_state = bn(params, state, x, train=True, mask=mask)
  y_ref, mean_ref, var_ref = reference.train_step(
      x_global, state.mean, state.var, params.scale, params.bias, mask=mask_global)
  np.testing.assert_allclose(np.asarray(y), y_ref, **F32)
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_features_sharded_on_a_model_axis_of_an_explicit_mesh_train_like_one_device(with_mask):
  # Tensor parallelism: the batch on 'data', the features on 'model' (Explicit axes, as
  # `jax.make_mesh` gives them): values and gradients equal the unsharded computation.
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  x_global = jnp.asarray(np.random.default_rng(3).normal(2.0, 1.5, size=(16, 8)), jnp.float32)
  mask_global = (jnp.arange(16) % 5 != 0)[:, None] if with_mask else None
  w = jnp.asarray(np.random.default_rng(4).normal(size=(16, 8)), jnp.float32)
  params, state = bnjax.init(8)

  def loss(params, state, x, w, mask):
    y, new_state = bnjax.batch_norm(params, state, x, True, mask=mask)
    return jnp.sum(w * jnp.tanh(y)), new_state

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  expected = grad(params, state, x_global, w, mask_global)
  put = lambda v, *spec: jax.device_put(v, NamedSharding(mesh, P(*spec)))
  with jax.set_mesh(mesh):
    got = grad(put(params, "model"), put(state, "model"), put(x_global, "data", "model"),
               put(w, "data", "model"),
               None if mask_global is None else put(mask_global, "data", None))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, **F32)


def test_linen_module_with_features_sharded_on_a_model_axis_trains():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  x_global = jnp.asarray(np.random.default_rng(5).normal(1.0, 2.0, size=(16, 8)), jnp.float32)
  model = bnjax.BatchNorm(use_running_average=False)
  variables = model.init(jax.random.key(0), x_global)
  apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
  y_ref, updates_ref = apply(variables, x_global)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(variables, NamedSharding(mesh, P("model")))
    y, updates = apply(sharded, jax.device_put(x_global, NamedSharding(mesh, P("data", "model"))))
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(updates["batch_stats"]["var"], updates_ref["batch_stats"]["var"],
                             **F32)

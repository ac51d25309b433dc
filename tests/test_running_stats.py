"""Batch Renormalization, ghost batches and the cumulative average, against float64 NumPy.

Every expected value comes from `tests/reference.py` or the float64 formulas written out below,
never from bnjax. Cross-device cases run under `shard_map` on the 8 simulated CPU devices.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import bnjax
from bnjax.types import CumulativeState
from tests import reference

F32 = reference.TOLERANCES["float32"]
AXIS = "data"
EPS = 1e-5


def _inputs(shape=(10, 3), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal([0.5, 3.0, -2.0], [1.0, 4.0, 0.3], shape).astype(np.float32)
  params = bnjax.BatchNormParams(scale=jnp.array([1.5, 0.5, 2.0], jnp.float32),
                                 bias=jnp.array([0.1, -0.2, 0.3], jnp.float32))
  state = bnjax.BatchNormState(mean=jnp.array([0.4, 0.0, -2.0], jnp.float32),
                               var=jnp.array([1.1, 1.0, 0.09], jnp.float32))
  return jnp.asarray(x), params, state


def _renorm_reference(x, params, state, r_max, d_max, dy=None):
  """Ioffe (2017), Algorithm 1, in float64: y, and with `dy` the input and scale gradients."""
  x = np.asarray(x, np.float64)
  mean, var = x.mean(0), x.var(0)
  sigma_b = np.sqrt(var + EPS)
  sigma = np.sqrt(np.asarray(state.var, np.float64) + EPS)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mean - np.asarray(state.mean, np.float64)) / sigma, -d_max, d_max)
  x_hat = (x - mean) / sigma_b
  scale = np.asarray(params.scale, np.float64)
  y = scale * (x_hat * r + d) + np.asarray(params.bias, np.float64)
  if dy is None:
    return y
  dy = np.asarray(dy, np.float64)
  g = dy * scale * r  # r and d are constants: the batch-norm backward with scale * r.
  dx = (g - g.mean(0) - x_hat * (g * x_hat).mean(0)) / sigma_b
  d_scale = (dy * (x_hat * r + d)).sum(0)
  return y, dx, d_scale


@functools.cache
def _renorm_step(custom_vjp):
  """jit of (y, new_state, grads) with r_max, d_max as traced arguments."""

  def step(params, state, x, dy, r_max, d_max):
    def f(x, params):
      y, new_state = bnjax.batch_norm(params, state, x, True, renorm_r_max=r_max,
                                      renorm_d_max=d_max, custom_vjp=custom_vjp, momentum=0.9)
      return jnp.sum(y * dy), (y, new_state)

    (_, (y, new_state)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, params)
    return y, new_state, grads

  return jax.jit(step)


# ----------------------------------------------------------------------------- Batch Renormalization


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_renorm_matches_float64_reference_with_traced_bounds(custom_vjp):
  # Channel 1's batch std is ~4x the running one and its mean ~3 away: both clips act there;
  # channel 0 is near the running statistics (no clip); channel 2's var is near the running one.
  x, params, state = _inputs()
  dy = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
  r_max, d_max = 2.0, 1.5
  y, new_state, (dx, dparams) = _renorm_step(custom_vjp)(
      params, state, x, dy, jnp.float32(r_max), jnp.float32(d_max))
  y_ref, dx_ref, d_scale_ref = _renorm_reference(x, params, state, r_max, d_max, dy)
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(dx, dx_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dparams.scale, d_scale_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dparams.bias, np.asarray(dy, np.float64).sum(0), **F32)
  # The running statistics are batch norm's: renormalisation changes only the output.
  _, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, momentum=0.9)
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)
  # The clips are active on channel 1 (so the test sees them).
  sigma_ratio = np.sqrt((np.asarray(x, np.float64).var(0) + EPS) / (np.asarray(state.var) + EPS))
  assert sigma_ratio[1] > r_max


def test_renorm_closed_form_gradient_equals_autodiff():
  x, params, state = _inputs(seed=2)
  dy = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)
  args = (params, state, x, dy, jnp.float32(1.5), jnp.float32(0.5))
  _, _, (dx_c, dp_c) = _renorm_step(True)(*args)
  _, _, (dx_a, dp_a) = _renorm_step(False)(*args)
  np.testing.assert_allclose(dx_c, dx_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dp_c.scale, dp_a.scale, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dp_c.bias, dp_a.bias, atol=1e-5, rtol=1e-5)


def test_renorm_with_unit_bounds_is_batch_norm_exactly():
  x, params, state = _inputs(seed=4)
  dy = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
  y_r, state_r, (dx_r, dp_r) = _renorm_step(True)(params, state, x, dy, jnp.float32(1.0),
                                                   jnp.float32(0.0))

  @jax.jit
  def plain(params, state, x, dy):
    def f(x, params):
      y, new_state = bnjax.batch_norm(params, state, x, True, momentum=0.9)
      return jnp.sum(y * dy), (y, new_state)
    (_, (y, new_state)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, params)
    return y, new_state, grads

  y_b, state_b, (dx_b, dp_b) = plain(params, state, x, dy)
  np.testing.assert_allclose(y_r, y_b, atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(state_r.mean, state_b.mean)
  np.testing.assert_array_equal(state_r.var, state_b.var)
  np.testing.assert_allclose(dx_r, dx_b, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(dp_r.scale, dp_b.scale, atol=1e-6, rtol=1e-6)
  y_ref, _, _ = reference.train_step(x, state.mean, state.var, params.scale, params.bias)
  np.testing.assert_allclose(y_r, y_ref, **F32)


def test_renorm_evaluation_uses_running_statistics():
  x, params, state = _inputs()
  y, same = bnjax.batch_norm(params, state, x, False, renorm_r_max=3.0, renorm_d_max=5.0)
  y_ref = reference.normalize(x, state.mean, state.var, params.scale, params.bias)
  np.testing.assert_allclose(y, y_ref, **F32)
  assert same is state


@pytest.mark.parametrize("r_max, d_max, match", [
    (2.0, None, "needs both"), (0.5, 1.0, "renorm_r_max.*>= 1.*0.5"),
    (2.0, -1.0, "renorm_d_max.*>= 0.*-1.0")])
def test_bad_renorm_bounds_are_errors_naming_them(r_max, d_max, match):
  x, params, state = _inputs()
  with pytest.raises(ValueError, match=match):
    bnjax.batch_norm(params, state, x, True, renorm_r_max=r_max, renorm_d_max=d_max)


# ----------------------------------------------------------------------------- ghost batches


def _ghost_reference(x, params, state, size, momentum, dy):
  """Each run of `size` rows normalised on its own (a smaller last one), float64; the pooled
  update; the input gradient of sum(y * dy)."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  scale, bias = np.asarray(params.scale, np.float64), np.asarray(params.bias, np.float64)
  y, dx = np.empty_like(x), np.empty_like(x)
  for start in range(0, len(x), size):
    rows = slice(start, start + size)
    mean, var = x[rows].mean(0), x[rows].var(0)
    x_hat = (x[rows] - mean) / np.sqrt(var + EPS)
    y[rows] = scale * x_hat + bias
    g = dy[rows] * scale
    dx[rows] = (g - g.mean(0) - x_hat * (g * x_hat).mean(0)) / np.sqrt(var + EPS)
  _, new_mean, new_var = reference.train_step(x, state.mean, state.var, momentum=momentum)
  return y, new_mean, new_var, dx


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
@pytest.mark.parametrize("batch", [12, 10], ids=["divisible", "smaller-last"])
def test_ghost_batches_match_float64_reference(batch, custom_vjp):
  x, params, state = _inputs((batch, 3), seed=6)
  dy = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)

  @jax.jit
  def step(x, dy):
    def f(x):
      y, new_state = bnjax.batch_norm(params, state, x, True, ghost_batch_size=4, momentum=0.9,
                                      custom_vjp=custom_vjp)
      return jnp.sum(y * dy), (y, new_state)
    return jax.grad(f, has_aux=True)(x)

  dx, (y, new_state) = step(x, dy)
  y_ref, mean_ref, var_ref, dx_ref = _ghost_reference(x, params, state, 4, 0.9, dy)
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)
  np.testing.assert_allclose(dx, dx_ref, atol=1e-4, rtol=1e-4)


def test_ghost_batches_with_renorm_and_parameter_gradients_equal_autodiff():
  x, params, state = _inputs((10, 3), seed=8)
  dy = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)

  def grads(custom_vjp):
    def f(x, params):
      y, _ = bnjax.batch_norm(params, state, x, True, ghost_batch_size=4, renorm_r_max=1.5,
                              renorm_d_max=0.5, custom_vjp=custom_vjp, epsilon=jnp.float32(1e-3))
      return jnp.sum(y * dy)
    return jax.jit(jax.grad(f, argnums=(0, 1)))(x, params)

  for custom, auto in zip(jax.tree.leaves(grads(True)), jax.tree.leaves(grads(False))):
    np.testing.assert_allclose(custom, auto, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size, error, match", [
    (0, ValueError, "positive int"), (2.5, ValueError, "positive int"),
    ("4", TypeError, "positive int"), (3, ValueError, "last of 1 example")])
def test_bad_ghost_batch_size_is_an_error_naming_it(size, error, match):
  x, params, state = _inputs((10, 3))
  with pytest.raises(error, match=match):
    bnjax.batch_norm(params, state, x, True, ghost_batch_size=size)


def test_ghost_batches_need_the_batch_axis_first():
  x, params, state = _inputs((10, 3))
  with pytest.raises(ValueError, match="axis 0 a feature axis"):
    bnjax.batch_norm(params, state, x.T, True, axis=0, ghost_batch_size=5)


# ----------------------------------------------------------------------------- across devices


@functools.cache
def _mesh():
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 simulated CPU devices"
  return Mesh(np.array(jax.devices()[:8]), (AXIS,))


def _sharded_step(**options):
  def step(params, state, x, dy, r_max, d_max):
    def f(x, params):
      y, new_state = bnjax.batch_norm(params, state, x, True, axis_name=AXIS, momentum=0.9,
                                      renorm_r_max=r_max, renorm_d_max=d_max, **options)
      return jnp.sum(y * dy), (y, jax.tree.map(lambda v: v[None], new_state))
    (_, (y, new_state)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, params)
    # `params` are replicated (P()): their gradient comes summed over the devices already.
    return y, new_state, grads[0], grads[1]

  return jax.jit(jax.shard_map(step, mesh=_mesh(), in_specs=(P(), P(), P(AXIS), P(AXIS), P(), P()),
                               out_specs=(P(AXIS), P(AXIS), P(AXIS), P())))


def _shard(x):
  return jax.device_put(x, NamedSharding(_mesh(), P(AXIS)))


def test_renorm_across_8_devices_matches_reference_on_global_batch():
  x, params, state = _inputs((32, 3), seed=10)
  dy = jnp.asarray(np.random.default_rng(11).normal(size=x.shape), jnp.float32)
  y, new_state, dx, dparams = _sharded_step()(params, state, _shard(x), _shard(dy),
                                              jnp.float32(2.0), jnp.float32(1.5))
  y_ref, dx_ref, d_scale_ref = _renorm_reference(x, params, state, 2.0, 1.5, dy)
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(dx, dx_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dparams.scale, d_scale_ref, atol=1e-4, rtol=1e-4)
  _, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, momentum=0.9)
  for d in range(8):
    np.testing.assert_allclose(new_state.mean[d], mean_ref, **F32)
    np.testing.assert_allclose(new_state.var[d], var_ref, **F32)


def test_ghost_batches_are_local_to_each_device_and_update_from_the_global_batch():
  # 6 rows per device, ghost size 4: each device has a ghost batch of 4 and one of 2.
  x, params, state = _inputs((48, 3), seed=12)
  dy = jnp.asarray(np.random.default_rng(13).normal(size=x.shape), jnp.float32)
  y, new_state, dx, _ = _sharded_step(ghost_batch_size=4)(
      params, state, _shard(x), _shard(dy), jnp.float32(np.inf), jnp.float32(np.inf))
  xs, dys = np.asarray(x).reshape(8, 6, 3), np.asarray(dy).reshape(8, 6, 3)
  # Unclipped renorm with ghosts: each ghost batch standardised with the running statistics.
  y_ref = reference.normalize(x, state.mean, state.var, params.scale, params.bias)
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  for d in range(8):  # the input gradient is each device's own ghost batches' (r, d constants).
    dx_d = _ghost_gradient_with_unclipped_renorm(xs[d], dys[d], params, state, 4)
    np.testing.assert_allclose(np.asarray(dx).reshape(8, 6, 3)[d], dx_d, atol=1e-4, rtol=1e-4)
  _, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, momentum=0.9)
  for d in range(8):
    np.testing.assert_allclose(new_state.mean[d], mean_ref, **F32)
    np.testing.assert_allclose(new_state.var[d], var_ref, **F32)


def _ghost_gradient_with_unclipped_renorm(x, dy, params, state, size):
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  dx = np.empty_like(x)
  for start in range(0, len(x), size):
    rows = slice(start, start + size)
    var = x[rows].var(0)
    x_hat = (x[rows] - x[rows].mean(0)) / np.sqrt(var + EPS)
    r = np.sqrt(var + EPS) / np.sqrt(np.asarray(state.var, np.float64) + EPS)
    g = dy[rows] * np.asarray(params.scale, np.float64) * r
    dx[rows] = (g - g.mean(0) - x_hat * (g * x_hat).mean(0)) / np.sqrt(var + EPS)
  return dx


# ----------------------------------------------------------------------------- cumulative average


def test_cumulative_average_is_the_equal_weight_mean_of_batch_statistics():
  params, state = bnjax.init(3, cumulative=True)
  step = jax.jit(lambda state, x: bnjax.batch_norm(params, state, x, True, momentum=None,
                                                   unbiased_running_var=True))
  batches = [_inputs((n, 3), seed=20 + n)[0] for n in (4, 7, 5)]
  batches[1] = batches[1].at[2, 0].set(jnp.nan)  # channel 0 skips the second batch.
  for x in batches:
    _, state = step(state, x)
  np.testing.assert_array_equal(state.count, [2, 3, 3])
  stats = [reference.moments(x) for x in batches]
  unbiased = [v * n / (n - 1) for _, v, n in stats]
  for c, used in ((0, [0, 2]), (1, [0, 1, 2]), (2, [0, 1, 2])):
    np.testing.assert_allclose(state.mean[c], np.mean([stats[i][0][c] for i in used]), **F32)
    np.testing.assert_allclose(state.var[c], np.mean([unbiased[i][c] for i in used]), **F32)


def test_cumulative_average_needs_a_counting_state():
  x, params, state = _inputs()
  with pytest.raises(TypeError, match=r"`momentum` must be a number.*cumulative=True"):
    bnjax.batch_norm(params, state, x, True, momentum=None)


def test_cumulative_state_with_a_number_momentum_is_an_exponential_average_that_counts():
  x, params, _ = _inputs()
  _, state = bnjax.init(3, cumulative=True)
  _, new_state = bnjax.batch_norm(params, state, x, True, momentum=0.9)
  _, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, momentum=0.9)
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)
  np.testing.assert_array_equal(new_state.count, [1, 1, 1])
  assert isinstance(new_state, CumulativeState)


# ----------------------------------------------------------------------------- linen


def test_linen_default_variable_tree_is_flax_and_cumulative_adds_count():
  x = _inputs()[0]
  flax_tree = jax.tree.structure(
      __import__("flax").linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x))
  plain = bnjax.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  assert jax.tree.structure(plain) == flax_tree
  model = bnjax.BatchNorm(use_running_average=False, momentum=None)
  variables = model.init(jax.random.key(0), x)
  assert set(variables["batch_stats"]) == {"mean", "var", "count"}
  xs = [_inputs((n, 3), seed=30 + n)[0] for n in (4, 6)]
  for batch in xs:
    _, updates = model.apply(variables, batch, mutable=["batch_stats"])
    variables = {**variables, **updates}
  np.testing.assert_array_equal(variables["batch_stats"]["count"], [2, 2, 2])
  np.testing.assert_allclose(variables["batch_stats"]["mean"],
                             np.mean([reference.moments(b)[0] for b in xs], axis=0), **F32)


def test_linen_renorm_with_traced_bounds_and_ghost_batches_matches_functional():
  x, _, _ = _inputs((10, 3), seed=40)
  model = bnjax.BatchNorm(use_running_average=False, ghost_batch_size=4)
  variables = model.init(jax.random.key(0), x)
  variables = {"params": variables["params"],
               "batch_stats": {"mean": jnp.array([0.4, 0.0, -2.0]),
                               "var": jnp.array([1.1, 1.0, 0.09])}}

  @jax.jit
  def apply(variables, x, r_max, d_max):
    return model.apply(variables, x, renorm_r_max=r_max, renorm_d_max=d_max,
                       mutable=["batch_stats"])

  y, updates = apply(variables, x, jnp.float32(1.5), jnp.float32(0.5))
  params = bnjax.BatchNormParams(**variables["params"])
  state = bnjax.BatchNormState(**variables["batch_stats"])
  y_ref, new_state = bnjax.batch_norm(params, state, x, True, ghost_batch_size=4,
                                      renorm_r_max=1.5, renorm_d_max=0.5)
  np.testing.assert_allclose(y, y_ref, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], new_state.mean, atol=1e-7)
  # And it is renormalised: batch norm of each ghost batch would differ.
  y_bn, _ = bnjax.batch_norm(params, state, x, True, ghost_batch_size=4)
  assert np.max(np.abs(np.asarray(y) - np.asarray(y_bn))) > 0.1


# ----------------------------------------------------------------------------- nnx


def test_nnx_options_match_functional_and_cumulative_adds_a_count():
  from flax import nnx
  import bnjax.nnx

  x, params, state = _inputs((10, 3), seed=50)
  layer = bnjax.nnx.BatchNorm(3, momentum=None, ghost_batch_size=4, rngs=nnx.Rngs(0))
  assert sorted(nnx.state(layer, nnx.BatchStat)) == ["count", "mean", "var"]
  assert sorted(nnx.state(bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchStat)) == [
      "mean", "var"]
  layer.scale[...], layer.bias[...] = params.scale, params.bias
  layer.mean[...], layer.var[...] = state.mean, state.var
  layer.renorm_r_max, layer.renorm_d_max = jnp.float32(1.5), jnp.float32(0.5)
  y = layer(x)
  y_ref, new_state = bnjax.batch_norm(params, bnjax.init(3, cumulative=True)[1]._replace(
      mean=state.mean, var=state.var), x, True, momentum=None, ghost_batch_size=4,
      renorm_r_max=1.5, renorm_d_max=0.5)
  np.testing.assert_allclose(y, y_ref, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(layer.mean[...], reference.moments(x)[0], **F32)  # first update
  np.testing.assert_array_equal(layer.count[...], [1, 1, 1])
  np.testing.assert_allclose(layer.var[...], new_state.var, atol=1e-7)


def test_ghost_batches_with_a_mask_use_each_ghost_batch_valid_rows():
  x, params, state = _inputs((10, 3), seed=60)
  valid = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0], bool)[:, None]
  y, new_state = jax.jit(lambda x, m: bnjax.batch_norm(params, state, x, True, mask=m,
                                                       ghost_batch_size=4, momentum=0.9))(
      x, jnp.asarray(valid))
  xs = np.asarray(x, np.float64)
  for start in (0, 4, 8):  # ghost batches of 4, 4 and 2 rows.
    rows = slice(start, start + 4)
    mean, var, _ = reference.moments(xs[rows], mask=valid[rows])
    y_ref = reference.normalize(xs[rows], mean, var, params.scale, params.bias)
    keep = np.broadcast_to(valid[rows], y_ref.shape)
    np.testing.assert_allclose(np.asarray(y)[rows][keep], y_ref[keep], **F32)
  _, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, momentum=0.9, mask=valid)
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)


def test_renorm_adds_no_full_size_pass_and_no_collective_to_training():
  # Compiled-HLO budget: forward + closed-form backward with r and d costs what batch norm costs.
  from benchmarks import hlo

  x, params, state = _inputs((64, 3), seed=70)

  def program(renorm):
    def step(params, state, x, r_max, d_max):
      def f(x, params):
        bounds = dict(renorm_r_max=r_max, renorm_d_max=d_max) if renorm else {}
        y, _ = bnjax.batch_norm(params, state, x, True, axis_name=AXIS, **bounds)
        return jnp.sum(jnp.sin(y))
      return jax.grad(f, argnums=(0, 1))(x, params)
    mapped = jax.shard_map(step, mesh=_mesh(), in_specs=(P(), P(), P(AXIS), P(), P()),
                           out_specs=(P(AXIS), P()))
    return jax.jit(mapped).lower(params, state, _shard(x), jnp.float32(2.0),
                                 jnp.float32(1.0)).compile().as_text()

  plain, renorm = program(False), program(True)
  local_size = x.size // 8
  assert hlo.count_collectives(renorm) == hlo.count_collectives(plain)
  assert hlo.count_passes(renorm, local_size) == hlo.count_passes(plain, local_size)

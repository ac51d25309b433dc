"""`bnjax.batch_norm` and `bnjax.init` against the float64 NumPy reference and closed forms."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import reference

F32 = reference.TOLERANCES["float32"]

# Jitted once per static configuration: op-by-op dispatch would compile every primitive.
batch_norm = jax.jit(bnjax.batch_norm, static_argnames=(
    "train", "axis", "momentum", "epsilon", "unbiased_running_var", "dtype", "return_stats"))


def _normal(seed, shape, dtype=jnp.float32, loc=0.0, scale=1.0):
  return (loc + scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def _affine(feature_shape, seed=1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  scale = 1.0 + 0.1 * jax.random.normal(k1, feature_shape, jnp.float32)
  bias = 0.1 * jax.random.normal(k2, feature_shape, jnp.float32)
  return bnjax.BatchNormParams(scale, bias)


LAYOUTS = [
    pytest.param((32, 5), -1, id="NC"),
    pytest.param((8, 6, 6, 3), -1, id="NHWC"),
    pytest.param((8, 3, 6, 6), 1, id="NCHW"),
    pytest.param((4, 5, 6, 3), (1, 3), id="tuple-axes"),
    pytest.param((7, 4, 9), (-1, 0), id="negative-tuple-axes"),
]


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_train_output_and_state_match_reference(shape, axis):
  x = _normal(0, shape, loc=2.0, scale=3.0)
  feat = tuple(shape[a] for a in reference.feature_axes(len(shape), axis))
  params = _affine(feat)
  _, state = bnjax.init(feat)
  y, new_state = batch_norm(params, state, x, train=True, axis=axis, momentum=0.9)
  y_ref, mean_ref, var_ref = reference.train_step(
      x, state.mean, state.var, params.scale, params.bias, axis=axis, momentum=0.9)
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_eval_uses_running_statistics(shape, axis):
  x = _normal(2, shape)
  feat = tuple(shape[a] for a in reference.feature_axes(len(shape), axis))
  params = _affine(feat)
  state = bnjax.BatchNormState(_normal(3, feat), 0.5 + jnp.abs(_normal(4, feat)))
  y, new_state = batch_norm(params, state, x, train=False, axis=axis)
  y_ref = reference.normalize(x, state.mean, state.var, params.scale, params.bias, axis=axis)
  np.testing.assert_allclose(y, y_ref, **F32)


def test_eval_returns_the_incoming_state_object():
  params, state = bnjax.init(3)
  _, new_state = bnjax.batch_norm(params, state, _normal(0, (4, 3)), train=False)
  assert new_state is state


def test_nchw_equals_transposed_nhwc():
  x_nhwc = _normal(5, (6, 4, 4, 3), loc=1.0)
  params, state = bnjax.init(3)
  y_nhwc, s_nhwc = batch_norm(params, state, x_nhwc, True)
  y_nchw, s_nchw = batch_norm(params, state, jnp.transpose(x_nhwc, (0, 3, 1, 2)), True,
                                    axis=1)
  np.testing.assert_allclose(jnp.transpose(y_nchw, (0, 2, 3, 1)), y_nhwc, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(s_nchw.mean, s_nhwc.mean, atol=1e-7, rtol=1e-6)
  np.testing.assert_allclose(s_nchw.var, s_nhwc.var, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("steps", [0, 1, 2, 50])
def test_running_statistics_follow_closed_form(steps):
  # The same batch every step: mean_k = (1 - m^k) mu, var_k = m^k * 1 + (1 - m^k) sigma^2.
  momentum = 0.9
  x = _normal(6, (64, 4), loc=3.0, scale=2.0)
  params, state = bnjax.init(4)

  def step(state, _):
    _, state = batch_norm(params, state, x, True, momentum=momentum)
    return state, None

  state, _ = lax.scan(step, state, None, length=steps)
  mu, var, _ = reference.moments(x)
  decay = momentum ** steps
  np.testing.assert_allclose(state.mean, (1 - decay) * mu, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(state.var, decay + (1 - decay) * var, atol=1e-5, rtol=1e-5)


def test_unbiased_running_variance_uses_m_over_m_minus_1():
  x = _normal(7, (10, 3), scale=2.0)
  params, state = bnjax.init(3)
  _, new_state = batch_norm(params, state, x, True, momentum=0.5, unbiased_running_var=True)
  _, var, count = reference.moments(x)
  np.testing.assert_allclose(new_state.var, 0.5 + 0.5 * var * 10 / 9, **F32)
  np.testing.assert_allclose(new_state.var, 0.5 + 0.5 * np.var(np.asarray(x, np.float64), 0,
                                                               ddof=1), **F32)


def test_unbiased_option_does_not_change_the_training_output():
  x = _normal(8, (10, 3))
  params, state = bnjax.init(3)
  y_biased, _ = batch_norm(params, state, x, True)
  y_unbiased, _ = batch_norm(params, state, x, True, unbiased_running_var=True)
  np.testing.assert_array_equal(y_biased, y_unbiased)


def test_from_torch_momentum_matches_pytorch_update_rule():
  p = 0.1
  x = _normal(9, (16, 2))
  params, state = bnjax.init(2)
  _, new_state = batch_norm(params, state, x, True, momentum=bnjax.from_torch_momentum(p),
                                  unbiased_running_var=True)
  mean, var, n = reference.moments(x)
  np.testing.assert_allclose(new_state.mean, (1 - p) * 0.0 + p * mean, **F32)
  np.testing.assert_allclose(new_state.var, (1 - p) * 1.0 + p * var * n / (n - 1), **F32)


def test_running_statistics_carry_no_gradient():
  x = _normal(10, (8, 3))
  params, state = bnjax.init(3)

  def loss(x, state):
    _, new_state = batch_norm(params, state, x, True)
    return jnp.sum(new_state.mean * 3.0) + jnp.sum(new_state.var)

  grad_x = jax.grad(loss)(x, state)
  np.testing.assert_array_equal(grad_x, np.zeros_like(grad_x))


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5, 1e6])
def test_large_offsets_match_float64_reference(offset):
  x = _normal(11, (256, 4), loc=offset, scale=1.0)  # float32 values; the reference reads them exactly.
  params, state = bnjax.init(4)
  y, _, stats = batch_norm(params, state, x, True, return_stats=True)
  mean, var, _ = reference.moments(x)
  np.testing.assert_allclose(stats.var, var, rtol=1e-5)
  np.testing.assert_allclose(y, reference.normalize(x, mean, var), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [0.0, 3.25, -7e5, 1e6 + 0.5])
def test_constant_channel_outputs_exactly_bias(value):
  x = jnp.concatenate([jnp.full((64, 1), value, jnp.float32), _normal(12, (64, 1))], axis=1)
  params = _affine((2,))
  _, state = bnjax.init(2)
  y, new_state = batch_norm(params, state, x, True)
  np.testing.assert_array_equal(y[:, 0], jnp.broadcast_to(params.bias[0], (64,)))
  np.testing.assert_array_equal(new_state.var[0], jnp.float32(0.99))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_input_keeps_dtype_and_float32_state(dtype):
  x = _normal(13, (32, 4), dtype=dtype, loc=4.0, scale=2.0)
  params, state = bnjax.init(4)
  y, new_state = batch_norm(params, state, x, True)
  assert y.dtype == jnp.dtype(dtype)
  assert new_state.mean.dtype == jnp.float32 and new_state.var.dtype == jnp.float32
  y_ref, mean_ref, var_ref = reference.train_step(x, state.mean, state.var)
  tol = reference.TOLERANCES[dtype]
  np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, **tol)
  # The statistics themselves are float32: exact for the (rounded) half-precision values.
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)


def test_float64_input_keeps_float32_state():
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(5.0, 2.0, (32, 3)))
    params, state = bnjax.init(3, dtype=jnp.float64)
    y, new_state = batch_norm(params, state, x, True)
    assert y.dtype == jnp.float64
    assert new_state.mean.dtype == jnp.float32 and new_state.var.dtype == jnp.float32
    y_ref, _, _ = reference.train_step(x, state.mean, state.var)
    np.testing.assert_allclose(y, y_ref, **reference.TOLERANCES["float64"])


def test_output_dtype_argument():
  x = _normal(14, (8, 3), dtype=jnp.bfloat16)
  params, state = bnjax.init(3)
  y, _ = batch_norm(params, state, x, True, dtype=jnp.float32)
  assert y.dtype == jnp.float32


def test_affine_can_be_switched_off():
  x = _normal(15, (16, 3), loc=1.0, scale=2.0)
  params, state = bnjax.init(3, use_scale=False, use_bias=False)
  assert params == bnjax.BatchNormParams(None, None)
  y, _ = batch_norm(params, state, x, True)
  mean, var, _ = reference.moments(x)
  np.testing.assert_allclose(y, reference.normalize(x, mean, var), **F32)


def test_init_values_and_dtypes():
  params, state = bnjax.init((2, 3), dtype=jnp.bfloat16)
  assert params.scale.shape == (2, 3) and params.scale.dtype == jnp.bfloat16
  np.testing.assert_array_equal(params.scale, np.ones((2, 3)))
  np.testing.assert_array_equal(params.bias, np.zeros((2, 3)))
  np.testing.assert_array_equal(state.mean, np.zeros((2, 3), np.float32))
  np.testing.assert_array_equal(state.var, np.ones((2, 3), np.float32))
  assert state.mean.dtype == jnp.float32 and state.var.dtype == jnp.float32


# --- masks -------------------------------------------------------------------------------------

MASKS = [
    pytest.param((8, 1, 1, 1), id="rows"),
    pytest.param((8, 5, 5, 1), id="positions"),
    pytest.param((8, 5, 5, 3), id="full"),
    pytest.param((5, 1, 1), id="broadcast-lower-rank"),
]


@pytest.mark.parametrize("mask_shape", MASKS)
def test_mask_statistics_match_reference(mask_shape):
  x = _normal(16, (8, 5, 5, 3), loc=1.0, scale=2.0)
  mask = jax.random.bernoulli(jax.random.key(17), 0.6, mask_shape)
  mask = mask.at[(0,) * len(mask_shape)].set(True)  # at least one valid value per channel.
  params = _affine((3,))
  _, state = bnjax.init(3)
  y, new_state = batch_norm(params, state, x, True, mask=mask)
  y_ref, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, params.scale,
                                                  params.bias, mask=mask)
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)


def _padded_batch(pad_value):
  x = _normal(18, (12, 4), loc=2.0)
  mask = jnp.arange(12)[:, None] < 9  # rows 9.. are padding.
  return jnp.where(mask, x, pad_value), mask


@pytest.mark.parametrize("train", [True, False])
def test_nan_padding_changes_neither_valid_outputs_nor_gradients(train):
  params = _affine((4,))
  state = bnjax.BatchNormState(jnp.full((4,), 0.5), jnp.full((4,), 2.0))

  def loss(params, x, mask):
    y, _ = batch_norm(params, state, x, train, mask=mask)
    return jnp.sum(jnp.where(mask, y, 0.0) ** 2)

  results = {}
  for pad in ("0", "nan", "inf"):
    x, mask = _padded_batch(float(pad))
    y, _ = batch_norm(params, state, x, train, mask=mask)
    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x, mask)
    results[pad] = (y[:9], g_params, g_x)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(g_params))
    assert np.isfinite(g_x).all()
    assert np.isfinite(y).all()
  for pad in ("nan", "inf"):
    np.testing.assert_array_equal(results[pad][0], results["0"][0])
    jax.tree.map(np.testing.assert_array_equal, results[pad][1], results["0"][1])
    np.testing.assert_array_equal(results[pad][2], results["0"][2])


def test_all_false_mask_keeps_state_and_stays_finite():
  x = _normal(19, (6, 3)).at[0, 0].set(jnp.nan)
  mask = jnp.zeros((6, 1), bool)
  params = _affine((3,))
  state = bnjax.BatchNormState(jnp.array([0.1, 0.2, 0.3]), jnp.array([1.5, 2.0, 2.5]))

  def loss(params, x):
    y, _ = batch_norm(params, state, x, True, mask=mask)
    return jnp.sum(y)

  y, new_state, stats = batch_norm(params, state, x, True, mask=mask, return_stats=True)
  assert np.isfinite(y).all()
  np.testing.assert_array_equal(new_state.mean, state.mean)
  np.testing.assert_array_equal(new_state.var, state.var)
  np.testing.assert_array_equal(stats.updated, np.zeros(3, bool))
  np.testing.assert_array_equal(stats.count, np.zeros(3))
  grads = jax.grad(loss, argnums=(0, 1))(params, x)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_mask_count_is_taken_after_broadcasting():
  x = _normal(20, (4, 5, 2))
  mask = jnp.array([True, False, True, True])[:, None, None]
  params, state = bnjax.init(2)
  _, _, stats = batch_norm(params, state, x, True, mask=mask, return_stats=True)
  np.testing.assert_array_equal(stats.count, np.full(2, 15.0))


def test_integer_mask_is_accepted_as_boolean():
  x = _normal(21, (6, 2))
  int_mask = jnp.array([1, 0, 1, 1, 0, 1])[:, None]
  params, state = bnjax.init(2)
  y_int, s_int = batch_norm(params, state, x, True, mask=int_mask)
  y_bool, s_bool = batch_norm(params, state, x, True, mask=int_mask.astype(bool))
  np.testing.assert_array_equal(y_int, y_bool)
  jax.tree.map(np.testing.assert_array_equal, s_int, s_bool)


# --- bad data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_batch_does_not_poison_running_statistics(bad):
  x = _normal(22, (8, 3)).at[2, 1].set(bad)
  params, state = bnjax.init(3)
  _, new_state, stats = batch_norm(params, state, x, True, return_stats=True)
  _, clean_state = batch_norm(params, state, x.at[:, 1].set(0.0), True)
  np.testing.assert_array_equal(stats.updated, np.array([True, False, True]))
  np.testing.assert_array_equal(new_state.mean[1], state.mean[1])
  np.testing.assert_array_equal(new_state.var[1], state.var[1])
  # The other channels update as usual (a NaN batch may take the data-pivot path: float32 rounding).
  np.testing.assert_allclose(new_state.mean[::2], clean_state.mean[::2], **F32)
  np.testing.assert_allclose(new_state.var[::2], clean_state.var[::2], **F32)


def test_overflowing_variance_keeps_old_statistics():
  x = jnp.array([[-3e38], [3e38], [0.0]], jnp.float32)  # finite values, infinite variance.
  params, state = bnjax.init(1)
  _, new_state, stats = batch_norm(params, state, x, True, return_stats=True)
  assert not bool(stats.updated[0])
  np.testing.assert_array_equal(new_state.var, state.var)


def test_return_stats_reports_batch_moments():
  x = _normal(23, (10, 2), loc=1.0)
  params, state = bnjax.init(2)
  _, _, stats = batch_norm(params, state, x, True, return_stats=True)
  mean, var, count = reference.moments(x)
  np.testing.assert_allclose(stats.mean, mean, **F32)
  np.testing.assert_allclose(stats.var, var, **F32)
  np.testing.assert_array_equal(stats.count, count)


# --- composition with transforms ---------------------------------------------------------------

def test_jit_equals_eager():
  x = _normal(24, (16, 4), loc=1.0)
  params, state = _affine((4,)), bnjax.init(4)[1]
  eager = bnjax.batch_norm(params, state, x, True)
  jitted = jax.jit(bnjax.batch_norm, static_argnames="train")(params, state, x, train=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), eager, jitted)


def test_vmap_over_independent_models():
  xs = _normal(25, (3, 16, 2), loc=1.0)
  params, state = bnjax.init(2)
  ys, states = jax.vmap(lambda x: batch_norm(params, state, x, True))(xs)
  for i in range(3):
    y, s = batch_norm(params, state, xs[i], True)
    np.testing.assert_allclose(ys[i], y, atol=1e-6)
    np.testing.assert_allclose(states.mean[i], s.mean, atol=1e-7)


def test_checkpoint_gives_same_values_and_gradients():
  x = _normal(26, (16, 4), loc=1.0)
  params = _affine((4,))
  _, state = bnjax.init(4)

  def loss(params, x):
    y, _ = batch_norm(params, state, x, True)
    return jnp.sum(jnp.sin(y))

  plain = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
  remat = jax.value_and_grad(jax.checkpoint(loss), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), plain, remat)


@pytest.mark.parametrize("outlier", [30.0, 1e3, 1e5])
def test_outlying_leading_rows_still_give_exact_variance(outlier):
  # The pivot comes from the first rows; when they sit far from the mean the one-pass sums would
  # cancel, and the exact second pass must take over.
  x = _normal(27, (65536, 2), loc=1e4, scale=1.0).at[:8].add(outlier)
  params, state = bnjax.init(2)
  _, _, stats = batch_norm(params, state, x, True, return_stats=True)
  mean, var, _ = reference.moments(x)
  np.testing.assert_allclose(stats.var, var, rtol=1e-5)
  # The mean within 1e-5 standard deviations, or float32 rounding of the mean itself.
  np.testing.assert_allclose(stats.mean, mean, rtol=2.4e-7, atol=1e-5 * np.sqrt(var).min())


# ----------------------------------------------------------------------------- state dtype, counts


def _bf16_state(mean, var):
  return bnjax.BatchNormState(jnp.asarray(mean, jnp.bfloat16), jnp.asarray(var, jnp.bfloat16))


def test_bfloat16_running_statistics_move_as_float32_ones_would_then_round():
  params, _ = bnjax.init(1)
  state = _bf16_state([2.0], [1.0])
  x = jnp.array([[2.0], [4.0]])  # batch mean 3.0
  _, new_state = bnjax.batch_norm(params, state, x, True)
  assert new_state.mean.dtype == jnp.bfloat16
  # 0.99 * 2.0 + 0.01 * 3.0 = 2.01, whose nearest bfloat16 is 2.015625 (a bfloat16 sum: 2.0).
  assert float(new_state.mean[0]) == 2.015625


def test_bfloat16_running_statistics_follow_a_float32_update_rounded_each_step():
  import ml_dtypes
  params, _ = bnjax.init(3)
  state = _bf16_state(np.zeros(3), np.ones(3))
  means = np.array([4.4, 4.8, 5.1], np.float32)
  x = jnp.asarray(means[None] + np.array([[-1.0], [1.0]], np.float32))  # batch means as given
  step = jax.jit(lambda s: bnjax.batch_norm(params, s, x, True)[1])
  expected = np.zeros(3, ml_dtypes.bfloat16)
  batch_mean = np.asarray(x, np.float32).mean(0)
  for _ in range(300):
    state = step(state)
    expected = (np.float32(0.99) * expected.astype(np.float32)
                + np.float32(0.01) * batch_mean).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(state.mean), expected)
  # bfloat16 arithmetic stalled all three at 3.34375; rounding only the result gets each closer.
  got = np.asarray(state.mean, np.float32)
  assert np.all(np.abs(got - batch_mean) < np.abs(3.34375 - batch_mean)), got


def test_batch_stats_count_is_exact_beyond_float32():
  n = 2 ** 24 + 3  # not a float32
  params, state = bnjax.init(1)
  x = jnp.zeros((n, 1)).at[::2].set(1.0)
  _, _, batch = jax.jit(lambda x: bnjax.batch_norm(params, state, x, True, return_stats=True))(x)
  assert batch.count.dtype == jnp.int32
  assert int(batch.count[0]) == n


def test_epsilon_gradient_matches_closed_form_and_autodiff():
  x = _normal(3, (16, 3), loc=1.0, scale=0.3)
  params, state = _affine((3,)), bnjax.init(3)[1]
  weights = _normal(4, (16, 3))

  def loss(epsilon, custom_vjp):
    y, _ = bnjax.batch_norm(params, state, x, True, epsilon=epsilon, custom_vjp=custom_vjp)
    return jnp.sum(weights * y)

  epsilon = 0.05
  mean, var, _ = reference.moments(x)
  xn, w = np.asarray(x, np.float64), np.asarray(weights, np.float64)
  closed = np.sum(w * np.asarray(params.scale) * (xn - mean) * -0.5 * (var + epsilon) ** -1.5)
  for custom_vjp in (True, False):
    got = jax.grad(loss)(jnp.float32(epsilon), custom_vjp)
    np.testing.assert_allclose(got, closed, rtol=1e-4, err_msg=f"custom_vjp={custom_vjp}")
  per_channel = jax.grad(loss)(jnp.full((3,), epsilon, jnp.float32), True)
  expected = np.sum(w * np.asarray(params.scale) * (xn - mean) * -0.5 * (var + epsilon) ** -1.5, 0)
  np.testing.assert_allclose(per_channel, expected, rtol=1e-4)

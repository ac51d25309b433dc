"""`bnjax.linen.WhiteningBatchNorm` and `bnjax.nnx.WhiteningBatchNorm`: variables, and the same
numbers as the pure function they wrap (itself checked against float64 NumPy elsewhere)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import pytest

import bnjax
import bnjax.linen
import bnjax.nnx
from bnjax.whitening import WhiteningState, init_whitening, whitening_batch_norm

C, GROUP = 5, 3
KW = dict(group_size=GROUP, method="iterative", momentum=0.9, epsilon=1e-4)


def _batch(seed):
  rng = np.random.default_rng(seed)
  mixing = np.eye(C) + 0.5 * rng.standard_normal((C, C))
  return jnp.asarray(rng.standard_normal((2, 4, 4, C)) @ mixing.T + 1.0, jnp.float32)


@functools.partial(jax.jit, static_argnames="train")
def _expected(x, state=None, train=True):
  params, initial = init_whitening(C, group_size=GROUP)
  return whitening_batch_norm(params, initial if state is None else state, x, train, **KW)


def test_linen_variables_and_values_match_the_function():
  model = bnjax.linen.WhiteningBatchNorm(**KW)
  x = _batch(0)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, use_running_average=False))(x)
  assert jax.tree.map(jnp.shape, variables) == {
      "params": {"scale": (C,), "bias": (C,)},
      "batch_stats": {"mean": (C,), "covariance": (2, GROUP, GROUP),
                      "whitening": (2, GROUP, GROUP)}}
  _, initial = init_whitening(C, group_size=GROUP)
  for name, value in variables["batch_stats"].items():  # init does not move the statistics
    np.testing.assert_array_equal(value, getattr(initial, name))

  @jax.jit
  def train_then_evaluate(variables, x):
    y, updates = model.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    y_eval = model.apply({"params": variables["params"], **updates}, x, use_running_average=True)
    return y, updates["batch_stats"], y_eval

  y, batch_stats, y_eval = train_then_evaluate(variables, x)
  y_ref, state_ref = _expected(x)
  np.testing.assert_allclose(y, y_ref, atol=1e-6)
  for name, value in batch_stats.items():
    np.testing.assert_allclose(value, getattr(state_ref, name), atol=1e-7)
  np.testing.assert_allclose(y_eval, _expected(x, state_ref, train=False)[0], atol=1e-6)


def test_linen_with_mask_and_channels_first_matches_the_function():
  model = bnjax.linen.WhiteningBatchNorm(use_running_average=False, axis=1, **KW)
  x = jnp.transpose(_batch(1), (0, 3, 1, 2))
  mask = jnp.arange(2)[:, None, None, None] < 1  # the second example is invalid
  params, state = init_whitening(C, group_size=GROUP)
  variables = {"params": params._asdict(), "batch_stats": state._asdict()}

  @jax.jit
  def both(x):
    y, updates = model.apply(variables, x, mask=mask, mutable=["batch_stats"])
    return (y, updates["batch_stats"]), whitening_batch_norm(params, state, x, True, axis=1,
                                                              mask=mask, **KW)

  (y, batch_stats), (y_ref, state_ref) = both(x)
  np.testing.assert_allclose(y, y_ref, atol=1e-6)
  np.testing.assert_allclose(batch_stats["covariance"], state_ref.covariance, atol=1e-7)


def test_nnx_variables_and_values_match_the_function():
  layer = bnjax.nnx.WhiteningBatchNorm(C, rngs=nnx.Rngs(0), **KW)
  assert isinstance(layer.covariance, nnx.BatchStat) and isinstance(layer.scale, nnx.Param)
  x = _batch(2)

  @nnx.jit
  def train_step(layer, x):
    return layer(x)

  y = train_step(layer, x)
  y_ref, state_ref = _expected(x)
  np.testing.assert_allclose(y, y_ref, atol=1e-6)
  for name in WhiteningState._fields:
    np.testing.assert_allclose(getattr(layer, name)[...], getattr(state_ref, name), atol=1e-7)
  y_eval = nnx.jit(lambda layer, x: layer(x, use_running_average=True))(layer, x)
  np.testing.assert_allclose(y_eval, _expected(x, state_ref, train=False)[0], atol=1e-6)
  np.testing.assert_allclose(layer.mean[...], state_ref.mean)  # evaluation moved nothing


def test_nnx_gradients_reach_scale_and_bias_only():
  layer = bnjax.nnx.WhiteningBatchNorm(C, rngs=nnx.Rngs(0), **KW)
  grads = nnx.jit(nnx.grad(lambda layer, x: jnp.sum(layer(x) ** 3)))(layer, _batch(3))
  leaves = jax.tree.map(jnp.shape, nnx.state(grads))
  assert set(leaves) == {"scale", "bias"}


def test_module_errors_name_the_argument():
  with pytest.raises(ValueError, match="`method` must be one of"):
    bnjax.nnx.WhiteningBatchNorm(C, method="svd", rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="`axis` must be one int"):
    bnjax.linen.WhiteningBatchNorm(use_running_average=True, axis=(1, 2)).init(
        jax.random.key(0), _batch(0))

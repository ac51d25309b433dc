"""Gradients of `batch_norm`: finite differences in float64, the closed form, bias cancellation."""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


def _float64_inputs(shape=(6, 3), loc=1.0, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(loc, 2.0, shape))
  scale = jnp.asarray(rng.normal(1.0, 0.2, shape[-1:]))
  bias = jnp.asarray(rng.normal(0.0, 0.2, shape[-1:]))
  return x, scale, bias


@pytest.mark.parametrize("with_mask", [False, True])
def test_training_gradients_match_finite_differences_to_second_order(with_mask):
  with jax.enable_x64(True):
    x, scale, bias = _float64_inputs()
    _, state = bnjax.init(3)
    mask = jnp.array([True, True, False, True, True, False])[:, None] if with_mask else None

    def f(x, scale, bias):
      y, _ = bnjax.batch_norm(bnjax.BatchNormParams(scale, bias), state, x, True, mask=mask)
      return jnp.sin(y)  # a non-linear head so second derivatives are non-trivial.

    jtu.check_grads(f, (x, scale, bias), order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


def test_eval_gradients_match_finite_differences_to_second_order():
  with jax.enable_x64(True):
    x, scale, bias = _float64_inputs(seed=1)
    state = bnjax.BatchNormState(jnp.array([0.5, -1.0, 2.0], jnp.float32),
                                 jnp.array([1.5, 0.5, 3.0], jnp.float32))

    def f(x, scale, bias):
      return bnjax.batch_norm(bnjax.BatchNormParams(scale, bias), state, x, False)[0] ** 2

    jtu.check_grads(f, (x, scale, bias), order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


def test_input_gradient_equals_closed_form():
  # dx = scale / sqrt(var + eps) * (dy - mean(dy) - x_hat * mean(dy * x_hat)).
  with jax.enable_x64(True):
    x, scale, bias = _float64_inputs((16, 4), seed=2)
    dy = jnp.asarray(np.random.default_rng(3).normal(size=(16, 4)))
    _, state = bnjax.init(4)
    y, vjp = jax.vjp(lambda x: bnjax.batch_norm(bnjax.BatchNormParams(scale, bias), state, x,
                                                True)[0], x)
    (dx,) = vjp(dy)
    xn = np.asarray(x)
    mean, var = xn.mean(0), xn.var(0)
    dyn = np.asarray(dy)
    x_hat = (xn - mean) / np.sqrt(var + 1e-5)
    expected = (np.asarray(scale) / np.sqrt(var + 1e-5)
                * (dyn - dyn.mean(0) - x_hat * (dyn * x_hat).mean(0)))
    np.testing.assert_allclose(dx, expected, atol=1e-10, rtol=1e-10)


def test_bias_before_batch_norm_gets_zero_gradient():
  # The lecture's point: a bias added before BN is cancelled by the mean subtraction.
  x = jax.random.normal(jax.random.key(0), (32, 4))
  w = jax.random.normal(jax.random.key(1), (4, 5))
  b = jnp.arange(5.0)
  params, state = bnjax.init(5)

  def loss(b):
    y, _ = bnjax.batch_norm(params, state, x @ w + b[None, :], True)
    return jnp.sum(jnp.tanh(y) * jnp.arange(1.0, 6.0)[None, :])

  grad_b = jax.grad(loss)(b)
  np.testing.assert_allclose(grad_b, np.zeros(5), atol=1e-5)
  w_grad = jax.grad(lambda w: loss_w(w, x, params, state))(w)
  assert np.abs(w_grad).max() > 1e-2  # the weights still learn.


def loss_w(w, x, params, state):
  y, _ = bnjax.batch_norm(params, state, x @ w, True)
  return jnp.sum(jnp.tanh(y) * jnp.arange(1.0, 6.0)[None, :])


def test_gradients_jit_equal_eager():
  x = jax.random.normal(jax.random.key(2), (8, 3)) + 3.0
  params, state = bnjax.init(3)

  def loss(params, x):
    return jnp.sum(jnp.cos(bnjax.batch_norm(params, state, x, True)[0]))

  eager = jax.grad(loss, argnums=(0, 1))(params, x)
  jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), eager, jitted)

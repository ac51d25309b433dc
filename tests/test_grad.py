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


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_training_gradients_match_finite_differences_to_second_order(with_mask, custom_vjp):
  with jax.enable_x64(True):
    x, scale, bias = _float64_inputs()
    _, state = bnjax.init(3)
    mask = jnp.array([True, True, False, True, True, False])[:, None] if with_mask else None

    def f(x, scale, bias):
      y, _ = bnjax.batch_norm(bnjax.BatchNormParams(scale, bias), state, x, True, mask=mask,
                              custom_vjp=custom_vjp)
      return jnp.sin(y)  # a non-linear head so second derivatives are non-trivial.

    # A custom VJP has no forward mode; reverse-over-reverse checks its backward's derivative.
    modes = ["rev"] if custom_vjp else ["fwd", "rev"]
    jtu.check_grads(f, (x, scale, bias), order=2, modes=modes, atol=1e-6, rtol=1e-6)


def test_eval_gradients_match_finite_differences_to_second_order():
  with jax.enable_x64(True):
    x, scale, bias = _float64_inputs(seed=1)
    state = bnjax.BatchNormState(jnp.array([0.5, -1.0, 2.0], jnp.float32),
                                 jnp.array([1.5, 0.5, 3.0], jnp.float32))

    def f(x, scale, bias):
      return bnjax.batch_norm(bnjax.BatchNormParams(scale, bias), state, x, False)[0] ** 2

    jtu.check_grads(f, (x, scale, bias), order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_input_gradient_equals_closed_form(custom_vjp):
  # dx = scale / sqrt(var + eps) * (dy - mean(dy) - x_hat * mean(dy * x_hat)).
  with jax.enable_x64(True):
    x, scale, bias = _float64_inputs((16, 4), seed=2)
    dy = jnp.asarray(np.random.default_rng(3).normal(size=(16, 4)))
    _, state = bnjax.init(4)
    y, vjp = jax.vjp(lambda x: bnjax.batch_norm(bnjax.BatchNormParams(scale, bias), state, x,
                                                True, custom_vjp=custom_vjp)[0], x)
    (dx,) = vjp(dy)
    xn = np.asarray(x)
    mean, var = xn.mean(0), xn.var(0)
    dyn = np.asarray(dy)
    x_hat = (xn - mean) / np.sqrt(var + 1e-5)
    expected = (np.asarray(scale) / np.sqrt(var + 1e-5)
                * (dyn - dyn.mean(0) - x_hat * (dyn * x_hat).mean(0)))
    np.testing.assert_allclose(dx, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype, bound", [(jnp.float32, 1e-5), (jnp.float64, 1e-12)])
def test_bias_before_batch_norm_gets_zero_gradient(dtype, bound):
  # A bias added before batch norm is cancelled by the mean subtraction, so its gradient is zero
  # up to rounding: measured relative to the gradient of batch norm's own bias, which it replaces.
  with jax.enable_x64(dtype == jnp.float64):
    x = jax.random.normal(jax.random.key(0), (32, 4), dtype)
    w = jax.random.normal(jax.random.key(1), (4, 5), dtype)
    b = jnp.arange(5.0, dtype=dtype)
    params, state = bnjax.init(5, dtype=dtype)

    def loss(b, params):
      y, _ = bnjax.batch_norm(params, state, x @ w + b[None, :], True)
      return jnp.sum(jnp.tanh(y) * jnp.arange(1.0, 6.0, dtype=dtype)[None, :])

    grad_b, grad_params = jax.grad(loss, argnums=(0, 1))(b, params)
    ratio = np.abs(grad_b).max() / np.abs(grad_params.bias).max()
    assert ratio < bound, ratio
    w_grad = jax.grad(lambda w: loss_w(w, x, params, state))(w)
    assert np.abs(w_grad).max() > 1e-2  # the weights still learn.


def loss_w(w, x, params, state):
  y, _ = bnjax.batch_norm(params, state, x @ w, True)
  return jnp.sum(jnp.tanh(y) * jnp.arange(1.0, 6.0, dtype=y.dtype)[None, :])


def test_gradients_jit_equal_eager():
  x = jax.random.normal(jax.random.key(2), (8, 3)) + 3.0
  params, state = bnjax.init(3)

  def loss(params, x):
    return jnp.sum(jnp.cos(bnjax.batch_norm(params, state, x, True)[0]))

  eager = jax.grad(loss, argnums=(0, 1))(params, x)
  jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), eager, jitted)


GRAD_CASES = [
    pytest.param((16, 4), -1, None, "float32", id="NC"),
    pytest.param((4, 5, 5, 3), -1, (4, 5, 5, 1), "float32", id="NHWC-position-mask"),
    pytest.param((4, 3, 5, 5), (1,), (4, 1, 1, 1), "float32", id="NCHW-row-mask"),
    pytest.param((6, 4, 3), (0, 2), None, "float32", id="tuple-axes"),
    pytest.param((16, 4), -1, None, "bfloat16", id="bf16"),
    pytest.param((64, 3), -1, None, "float32", id="offset-1e4"),
]


@pytest.mark.parametrize("shape, axis, mask_shape, dtype", GRAD_CASES)
def test_custom_vjp_equals_autodiff(shape, axis, mask_shape, dtype):
  # Mean within a few standard deviations of zero (the backward's raw sums), or far (centred sums).
  loc = 1e4 if shape == (64, 3) else 2.0
  x = (loc + 3.0 * jax.random.normal(jax.random.key(4), shape)).astype(dtype)
  feat = tuple(shape[a] for a in sorted(a % len(shape) for a in
                                        ((axis,) if isinstance(axis, int) else axis)))
  params = bnjax.BatchNormParams(1.0 + 0.1 * jax.random.normal(jax.random.key(5), feat),
                                 0.1 * jax.random.normal(jax.random.key(6), feat))
  _, state = bnjax.init(feat)
  mask = None
  if mask_shape is not None:
    mask = jax.random.bernoulli(jax.random.key(7), 0.7, mask_shape).at[(0,) * len(shape)].set(True)
    x = jnp.where(mask, x, jnp.asarray(jnp.nan, x.dtype))  # NaN padding must not matter.
  head = jax.random.normal(jax.random.key(8), shape)

  def loss(params, x, custom_vjp):
    y, _ = bnjax.batch_norm(params, state, x, True, axis=axis, mask=mask, custom_vjp=custom_vjp)
    y = y.astype(jnp.float32)
    if mask is not None:
      y = jnp.where(mask, y, 0.0)
    return jnp.sum(jnp.tanh(y) * head)

  grads = {c: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, x, c)
           for c in (True, False)}
  tol = dict(atol=1e-5, rtol=1e-5) if dtype == "float32" else dict(atol=2e-2, rtol=2e-2)
  for a, b in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    assert np.isfinite(np.asarray(a, np.float32)).all()


def test_forward_mode_works_with_autodiff_path():
  x = jax.random.normal(jax.random.key(9), (8, 3))
  params, state = bnjax.init(3)
  f = lambda x: bnjax.batch_norm(params, state, x, True, custom_vjp=False)[0]
  _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
  # A constant shift of every value is removed by the mean subtraction.
  np.testing.assert_allclose(tangent, np.zeros((8, 3)), atol=1e-5)

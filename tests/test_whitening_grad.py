"""Gradients of whitening batch norm: finite differences in float64 for every method, and the ZCA
derivative where eigenvalues repeat, against the Sylvester-equation oracle.

For ``W = S^(-1/2)``, ``W² = S⁻¹``, so ``W dW + dW W = d(S⁻¹) = -W² dS W²``: a Sylvester equation
whose solution is the derivative, well defined for repeated eigenvalues, and computed by SciPy
without any eigendecomposition.
"""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import bnjax
from bnjax import whitening
from bnjax.whitening import init_whitening, whitening_batch_norm

METHODS = whitening.METHODS


def _inputs(rows=12, channels=5, seed=0):
  rng = np.random.default_rng(seed)
  mixing = np.eye(channels) + 0.5 * rng.standard_normal((channels, channels))
  x = jnp.asarray(rng.standard_normal((rows, channels)) @ mixing.T + 1.0)
  scale = jnp.asarray(rng.normal(1.0, 0.2, channels))
  bias = jnp.asarray(rng.normal(0.0, 0.2, channels))
  return x, scale, bias


def _layer_gradient_check(method, masked, custom_vjp):
  with jax.enable_x64(True):
    x, scale, bias = _inputs()
    _, state = init_whitening(5, group_size=3)  # groups of 3 and 2
    mask = jnp.asarray(np.arange(12) % 5 != 2)[:, None] if masked else None

    @jax.jit
    def f(x, scale, bias):
      y, _ = whitening_batch_norm(bnjax.BatchNormParams(scale, bias), state, x, True,
                                  group_size=3, method=method, mask=mask, epsilon=1e-3,
                                  custom_vjp=custom_vjp)
      return jnp.sin(y)  # a non-linear head, so the cotangents vary.

    # The closed-form backward has no forward mode; autodiff is checked in both.
    modes = ["rev"] if custom_vjp else ["fwd", "rev"]
    jtu.check_grads(f, (x, scale, bias), order=1, modes=modes, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_closed_form_gradients_with_mask_match_finite_differences(method):
  _layer_gradient_check(method, masked=True, custom_vjp=True)


def test_closed_form_gradients_without_mask_match_finite_differences():
  _layer_gradient_check("iterative", masked=False, custom_vjp=True)


def test_autodiff_gradients_match_finite_differences_in_both_modes():
  _layer_gradient_check("zca", masked=True, custom_vjp=False)


def _repeated_eigenvalue_batch(rotate):
  """float64 rows ±e_1, ±e_2, ±2e_3 (rotated): covariance Q diag(1/3, 1/3, 4/3) Qᵀ, with two
  exactly equal eigenvalues (before the rotation, bit for bit)."""
  rows = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 2], [0, 0, -2]], float)
  if rotate:
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))
    rows = rows @ q.T
  return jnp.asarray(rows + 0.5)


@pytest.mark.parametrize("rotate", [False, True], ids=["diagonal", "rotated"])
def test_zca_gradient_is_finite_and_correct_for_repeated_eigenvalues(rotate):
  with jax.enable_x64(True):
    x = _repeated_eigenvalue_batch(rotate)
    params, state = init_whitening(3, group_size=3)
    params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal((6, 3)))

    @jax.jit
    def f(x):
      y, _ = whitening_batch_norm(params, state, x, True, group_size=3, method="zca")
      return jnp.sum(weights * y * y * y)

    grad = jax.grad(f)(x)
    assert bool(jnp.all(jnp.isfinite(grad)))
    jtu.check_grads(f, (x,), order=1, modes=["rev"], atol=1e-7, rtol=1e-7)


def _sylvester_derivative(s, ds):
  w = np.real(scipy.linalg.sqrtm(np.linalg.inv(s)))
  return scipy.linalg.solve_sylvester(w, w, -(w @ w) @ ds @ (w @ w))


@pytest.mark.parametrize("gap", [0.0, 1e-9, 1e-4], ids=["repeated", "nearly-repeated", "close"])
def test_zca_matrix_derivative_matches_the_sylvester_oracle(gap):
  with jax.enable_x64(True):
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))
    eigenvalues = np.array([0.5, 0.5 + gap, 0.5 + gap, 2.0])
    sigma = (q * eigenvalues) @ q.T
    direction = np.random.default_rng(4).standard_normal((4, 4))
    direction = direction + direction.T
    epsilon = 1e-5
    _, dw = jax.jvp(lambda s: whitening.whitening_matrix(s, epsilon=epsilon), (jnp.asarray(sigma),),
                    (jnp.asarray(direction),))
    expected = _sylvester_derivative(sigma + epsilon * np.eye(4), direction)
    np.testing.assert_allclose(dw, expected, atol=1e-9, rtol=1e-9)
    # Reverse mode is the transpose of the same linear map: <G, dW(D)> = <vjp(G), D>.
    cotangent = np.random.default_rng(5).standard_normal((4, 4))
    _, vjp = jax.vjp(lambda s: whitening.whitening_matrix(s, epsilon=epsilon), jnp.asarray(sigma))
    (ds_bar,) = vjp(jnp.asarray(cotangent))
    np.testing.assert_allclose(np.sum(ds_bar * direction), np.sum(cotangent * expected),
                               rtol=1e-9)


def test_zca_matrix_derivative_is_accurate_in_float32_for_repeated_eigenvalues():
  sigma = np.diag([0.25, 0.25, 0.25, 1.0])  # exactly repeated in float32 too
  direction = np.random.default_rng(6).standard_normal((4, 4))
  direction = direction + direction.T
  _, dw = jax.jvp(whitening.whitening_matrix, (jnp.asarray(sigma, jnp.float32),),
                  (jnp.asarray(direction, jnp.float32),))
  expected = _sylvester_derivative(sigma + 1e-5 * np.eye(4), direction)
  np.testing.assert_allclose(dw, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", ["pca", "cholesky", "iterative"])
def test_other_methods_have_finite_gradients_for_repeated_eigenvalues(method):
  x = _repeated_eigenvalue_batch(rotate=False).astype(jnp.float32)
  params, state = init_whitening(3, group_size=3)

  def f(x):
    return jnp.sum(jnp.sin(whitening_batch_norm(params, state, x, True, group_size=3,
                                                method=method)[0]))

  assert bool(jnp.all(jnp.isfinite(jax.jit(jax.grad(f))(x))))


def test_evaluation_gradients_match_finite_differences():
  with jax.enable_x64(True):
    x, scale, bias = _inputs(rows=6, seed=7)
    _, state = init_whitening(5, group_size=3)
    rng = np.random.default_rng(8)
    a = rng.standard_normal((2, 3, 3))
    covariance = jnp.asarray(np.eye(3) + np.einsum("gij,gkj->gik", a, a) / 3)

    @jax.jit
    def f(x, scale, covariance):
      s = state._replace(covariance=covariance)
      return whitening_batch_norm(bnjax.BatchNormParams(scale, bias), s, x, False,
                                  group_size=3)[0]

    jtu.check_grads(f, (x, scale, covariance), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)

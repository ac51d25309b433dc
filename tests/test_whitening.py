"""`whitening_batch_norm` against the float64 NumPy reference (tests/whitening_reference.py).

Data has correlated channels and an offset; every group's output covariance, every output and
every running estimate is compared with float64 whitening of the same (float32) input. Tests share
a few compiled programs (one batch shape, one configuration per method) to stay fast.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import whitening
from bnjax.whitening import init_whitening, whitening_batch_norm
from tests import whitening_reference as ref

METHODS = whitening.METHODS
EPS = 1e-5
ROWS, C, GROUP = 512, 10, 4  # groups of 4, 4 and 2 channels.
MOMENTUM = 0.9


@functools.partial(jax.jit, static_argnames=("method", "masked"))
def _train(params, state, x, mask, *, method, masked=False):
  """The shared training program: (y, new_state, stats)."""
  return whitening_batch_norm(params, state, x, True, group_size=GROUP, method=method,
                              momentum=MOMENTUM, mask=mask if masked else None, return_stats=True)


@functools.partial(jax.jit, static_argnames=("estimate",))
def _evaluate(params, state, x, *, estimate):
  return whitening_batch_norm(params, state, x, False, group_size=GROUP,
                              running_estimate=estimate)[0]


def _correlated(seed, rows=ROWS, channels=C, offset=2.0, spread=1.0):
  """float32 [rows, channels]: N(0, I) rows mixed by a random well-conditioned matrix, shifted."""
  rng = np.random.default_rng(seed)
  mixing = np.eye(channels) + 0.6 * rng.standard_normal((channels, channels)) / np.sqrt(channels)
  scales = np.exp(rng.uniform(-0.5, 0.5, channels))
  x = rng.standard_normal((rows, channels)) @ mixing.T * scales * spread + offset
  return x.astype(np.float32)


def _affine(channels=C, seed=7):
  rng = np.random.default_rng(seed)
  return bnjax.BatchNormParams(jnp.asarray(rng.normal(1.0, 0.2, channels), jnp.float32),
                               jnp.asarray(rng.normal(0.0, 0.2, channels), jnp.float32))


def _identity_affine(channels=C):
  return bnjax.BatchNormParams(jnp.ones((channels,)), jnp.zeros((channels,)))


def _state():
  return init_whitening(C, group_size=GROUP)[1]


def _group_covariances(y):
  y = np.asarray(y, np.float64)
  centred = y - y.mean(axis=0)
  full = centred.T @ centred / y.shape[0]
  return [full[g, g] for g in ref.groups(y.shape[1], GROUP)]


def _pad(w, size=GROUP):
  out = np.eye(size)
  out[:len(w), :len(w)] = w
  return out


# ----------------------------------------------------------------------------- training output


@pytest.mark.parametrize("method", ["zca", "cholesky", "pca"])
def test_training_output_covariance_is_identity_per_group(method):
  x = _correlated(0)
  y, _, _ = _train(_identity_affine(), _state(), x, None, method=method)
  _, sigma = ref.batch_moments(x)
  for g, cov in zip(ref.groups(C, GROUP), _group_covariances(y)):
    s = sigma[g, g]
    # W (Σ + εI) Wᵀ = I, so the output covariance W Σ Wᵀ is I - ε W Wᵀ: ε accounted for.
    w = ref.matrix(s, method, EPS)
    np.testing.assert_allclose(cov, np.eye(len(s)) - EPS * w @ w.T, atol=2e-5, rtol=0)


def test_iterative_output_deviates_from_identity_as_float64_newton_schulz():
  x = _correlated(1, spread=3.0)
  y, _, _ = _train(_identity_affine(), _state(), x, None, method="iterative")
  _, sigma = ref.batch_moments(x)
  deviations = []
  for g, cov in zip(ref.groups(C, GROUP), _group_covariances(y)):
    w = ref.newton_schulz(sigma[g, g] + EPS * np.eye(g.stop - g.start), 5)
    expected = w @ sigma[g, g] @ w.T
    np.testing.assert_allclose(cov, expected, atol=2e-5, rtol=0)
    deviations.append(np.abs(expected - np.eye(len(expected))).max())
  assert max(deviations) > 1e-3  # T = 5 has not converged here: the comparison is not with I.


@pytest.mark.parametrize("method", METHODS)
def test_training_output_and_running_statistics_match_reference(method):
  x = _correlated(2)
  params = _affine()
  y, new_state, batch = _train(params, _state(), x, None, method=method)
  y_ref, mean, sigma, matrices = ref.train_step(x, GROUP, method, scale=params.scale,
                                                bias=params.bias)
  if method == "pca":  # eigenvectors have arbitrary signs: align each output with the reference.
    x_hat = (np.asarray(y, np.float64) - np.asarray(params.bias)) / np.asarray(params.scale)
    x_hat_ref = (y_ref - np.asarray(params.bias)) / np.asarray(params.scale)
    signs = np.sign(np.sum(x_hat * x_hat_ref, axis=0))
    np.testing.assert_allclose(x_hat * signs, x_hat_ref, atol=2e-4, rtol=0)
  else:
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=0)
    for index, w in enumerate(matrices):
      np.testing.assert_allclose(batch.whitening[index], _pad(w), atol=2e-4, rtol=0)
      np.testing.assert_allclose(new_state.whitening[index],
                                 MOMENTUM * np.eye(GROUP) + (1 - MOMENTUM) * _pad(w), atol=2e-5)
  np.testing.assert_allclose(new_state.mean, (1 - MOMENTUM) * mean, atol=1e-6, rtol=1e-5)
  for index in range(3):
    expected = MOMENTUM * np.eye(GROUP) + (1 - MOMENTUM) * ref.block(sigma, C, GROUP, index)
    np.testing.assert_allclose(new_state.covariance[index], expected, atol=2e-6, rtol=1e-5)
  assert bool(jnp.all(batch.updated)) and batch.count.tolist() == [ROWS] * 3


@pytest.mark.parametrize("estimate", whitening.RUNNING_ESTIMATES)
def test_evaluation_whitens_with_the_chosen_running_estimate(estimate):
  rng = np.random.default_rng(3)
  params = _affine()
  mean = rng.normal(size=C).astype(np.float32)
  a = rng.normal(size=(C, C)) / np.sqrt(C)
  full = (np.eye(C) + a @ a.T).astype(np.float32)
  cov_blocks = np.stack([ref.block(full, C, GROUP, i) for i in range(3)]).astype(np.float32)
  w_blocks = np.stack([_pad(ref.zca(b[:n, :n] + np.eye(n)))
                       for b, n in zip(cov_blocks, (4, 4, 2))]).astype(np.float32)
  state = whitening.WhiteningState(jnp.asarray(mean), jnp.asarray(cov_blocks),
                                   jnp.asarray(w_blocks))
  x = _correlated(4)
  y = _evaluate(params, state, x, estimate=estimate)
  centred = np.asarray(x, np.float64) - mean
  y_ref = np.empty_like(centred)
  for i, g in enumerate(ref.groups(C, GROUP)):
    n = g.stop - g.start
    w = (ref.zca(full[g, g] + EPS * np.eye(n)) if estimate == "covariance"
         else w_blocks[i][:n, :n])
    y_ref[:, g] = centred[:, g] @ w.T
  y_ref = y_ref * np.asarray(params.scale) + np.asarray(params.bias)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)


def test_evaluation_returns_the_incoming_state_object():
  params, state = init_whitening(C, group_size=GROUP)
  _, same = whitening_batch_norm(params, state, jnp.ones((3, C)), False, group_size=GROUP,
                                 running_estimate="whitening")
  assert same is state


def test_group_size_one_is_batch_norm_for_every_method():
  x = _correlated(5, rows=64, channels=6, offset=3.0)
  params = _affine(6)
  _, state = init_whitening(6, group_size=1)

  @jax.jit
  def every_method(x):
    return {m: whitening_batch_norm(params, state, x, True, group_size=1, method=m,
                                    momentum=MOMENTUM) for m in METHODS}

  _, bn_state = bnjax.init(6)
  y_bn, bn_new = bnjax.batch_norm(params, bn_state, x, True, momentum=MOMENTUM)
  for method, (y, new_state) in every_method(x).items():
    np.testing.assert_allclose(y, y_bn, atol=2e-6, rtol=1e-6, err_msg=method)
    np.testing.assert_allclose(new_state.mean, bn_new.mean, atol=1e-7, rtol=1e-6)
    np.testing.assert_allclose(new_state.covariance[:, 0, 0], bn_new.var, atol=1e-7, rtol=1e-6)


def test_channels_first_axis_equals_channels_last():
  x = _correlated(7, rows=2 * 5 * 5, channels=6).reshape(2, 5, 5, 6)
  params, state = init_whitening(6, group_size=4)

  @jax.jit
  def both(x):
    last = whitening_batch_norm(params, state, x, True, group_size=4)
    first = whitening_batch_norm(params, state, jnp.transpose(x, (0, 3, 1, 2)), True,
                                 group_size=4, axis=1)
    return last, first

  (y_last, s_last), (y_first, s_first) = both(x)
  np.testing.assert_allclose(np.transpose(y_first, (0, 2, 3, 1)), y_last, atol=1e-6, rtol=0)
  np.testing.assert_allclose(s_first.covariance, s_last.covariance, atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- equivariance


def _random_rotation(d, seed):
  q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
  return q * np.sign(np.diag(r))


def test_only_zca_is_equivariant_to_permuting_and_rotating_channels():
  d = 5
  x = _correlated(8, rows=200, channels=d)
  params, state = init_whitening(d, group_size=d)
  permutation = np.array([3, 0, 4, 1, 2])
  rotation = _random_rotation(d, 9).astype(np.float32)

  @jax.jit
  def outputs(x):
    def y(method, x):
      return whitening_batch_norm(params, state, x, True, group_size=d, method=method)[0]
    return {m: (y(m, x), y(m, x[:, permutation]), y(m, x @ rotation.T))
            for m in ("zca", "pca", "cholesky")}

  for method, (y, y_perm, y_rot) in outputs(x).items():
    perm_error = np.abs(np.asarray(y_perm) - np.asarray(y)[:, permutation]).max()
    rot_error = np.abs(np.asarray(y_rot) - np.asarray(y) @ rotation.T).max()
    if method == "zca":  # W(QΣQᵀ) = Q W(Σ) Qᵀ, so the output rotates with the input.
      assert perm_error < 1e-5 and rot_error < 1e-4, (perm_error, rot_error)
    else:  # PCA's outputs are principal components; Cholesky's depend on the order.
      assert perm_error > 0.1 and rot_error > 0.1, (method, perm_error, rot_error)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", ["zca", "iterative"])
def test_large_offsets_are_exact(method):
  base = _correlated(10, offset=0.0)
  x = (base + np.float32(1e4) * np.std(base, axis=0)).astype(np.float32)
  y, new_state, batch = _train(_identity_affine(), _state(), x, None, method=method)
  y_ref, mean, sigma, _ = ref.train_step(x, GROUP, method)  # float64 on the same float32 input
  np.testing.assert_allclose(y, y_ref, atol=2e-4, rtol=0)
  np.testing.assert_allclose(batch.mean, mean, atol=0, rtol=1e-7)
  np.testing.assert_allclose(batch.covariance[0], sigma[:4, :4], atol=0, rtol=5e-5)


def test_singular_covariances_give_finite_output_and_gradients():
  rows = 6  # fewer rows than the 8 channels of the group: a singular covariance
  x = _correlated(11, rows=rows, channels=8)
  x[:, 2] = 5.0  # a constant channel
  x[:, 5] = x[:, 1]  # a duplicated channel
  params, state = init_whitening(8, group_size=8)

  def loss(x, params, method):
    y, _ = whitening_batch_norm(params, state, x, True, group_size=8, method=method)
    return jnp.sum(jnp.sin(y)), y

  @jax.jit
  def every_method(x, params):
    return {m: jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params, m)
            for m in METHODS}

  for method, ((_, y), grads) in every_method(x, params).items():
    assert bool(jnp.all(jnp.isfinite(y))), method
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)), method
    if method != "pca":  # PCA's outputs are components, not channels.
      # The constant channel has no signal: its output is the bias (exactly with Cholesky and
      # IterNorm, whose factors keep its zero row; within roundoff with an eigendecomposition).
      np.testing.assert_allclose(y[:, 2], 0.0, atol=0 if method != "zca" else 2e-3,
                                 err_msg=method)


# ----------------------------------------------------------------------------- masks and bad data


def test_mask_excludes_rows_and_nan_there_reaches_nothing():
  x = _correlated(12)
  valid = np.arange(ROWS) % 3 != 0
  x_nan = np.where(valid[:, None], x, np.nan).astype(np.float32)
  params = _affine()
  mask = jnp.asarray(valid)[:, None]

  def loss(x, params):
    y, new_state, _ = _train(params, _state(), x, mask, method="zca", masked=True)
    return jnp.sum(jnp.where(mask, jnp.sin(y), 0.0)), (y, new_state)

  (_, (y, new_state)), (dx, dparams) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x_nan, params)
  y_ref, mean, _, _ = ref.train_step(x, GROUP, "zca", mask_M=valid, scale=params.scale,
                                     bias=params.bias)
  np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], atol=1e-4, rtol=0)
  # A non-finite value in an invalid row is centred to 0: the output there is the bias.
  np.testing.assert_allclose(np.asarray(y)[~valid],
                             np.broadcast_to(params.bias, (int((~valid).sum()), C)), atol=1e-6)
  np.testing.assert_allclose(new_state.mean, (1 - MOMENTUM) * mean, atol=1e-6, rtol=1e-5)
  assert bool(jnp.all(jnp.isfinite(dx))) and bool(jnp.all(dx[~valid] == 0))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(dparams))


def test_all_invalid_rows_use_and_keep_the_running_statistics():
  x = _correlated(13)
  params = _affine()
  state = _state()._replace(mean=jnp.full((C,), 2.0))
  y, new_state, batch = _train(params, state, x, jnp.zeros((ROWS, 1), bool), method="zca",
                               masked=True)
  y_eval = _evaluate(params, state, x, estimate="covariance")
  np.testing.assert_allclose(y, y_eval, atol=1e-6)
  assert not bool(jnp.any(batch.updated))
  for old, new in zip(state, new_state):
    np.testing.assert_array_equal(old, new)


def test_non_finite_batch_keeps_the_running_statistics_of_its_groups():
  x = _correlated(14)
  x[3, 5] = np.inf  # group 1 (channels 4-7)
  state = _state()
  _, new_state, batch = _train(_affine(), state, x, None, method="zca")
  assert batch.updated.tolist() == [True, False, True]
  np.testing.assert_array_equal(new_state.covariance[1], state.covariance[1])
  np.testing.assert_array_equal(new_state.whitening[1], state.whitening[1])
  np.testing.assert_array_equal(new_state.mean[4:8], state.mean[4:8])
  assert not np.array_equal(new_state.covariance[0], state.covariance[0])


# ----------------------------------------------------------------------------- running estimates


def test_running_covariance_is_the_consistent_estimator_and_running_whitening_is_biased():
  """Small batches (8 rows for 4 channels) of a known population, many steps: the running
  covariance (unbiased) whitens like the float64 population ZCA; the running average of the
  batch whitening matrices overshoots it (E[Σ_B^(-1/2)] ≠ E[Σ_B]^(-1/2))."""
  d, rows, steps = 4, 8, 6000
  basis = _random_rotation(d, 16)
  population = basis @ np.diag([4.0, 1.0, 0.5, 0.25]) @ basis.T
  root = np.linalg.cholesky(population).astype(np.float32)
  offset = np.array([[1.0, -2.0, 3.0, 0.0]], np.float32)
  params, state = init_whitening(d, group_size=d)

  @jax.jit
  def run(key):
    def step(states, key):
      x = jax.random.normal(key, (rows, d)) @ root.T + offset
      return tuple(whitening_batch_norm(params, s, x, True, group_size=d, momentum=0.999,
                                        unbiased_running_cov=unbiased)[1]
                   for s, unbiased in zip(states, (True, False))), None

    final, _ = jax.lax.scan(step, (state, state), jax.random.split(key, steps))
    return final, [whitening.whitening_matrix(s.covariance[0]) for s in final]

  (unbiased, _), (w_unbiased, w_biased) = run(jax.random.key(15))
  w_population = ref.zca(population + EPS * np.eye(d))

  def error(w):
    return np.linalg.norm(np.asarray(w, np.float64) - w_population) / np.linalg.norm(w_population)

  from_covariance, from_whitening = error(w_unbiased), error(unbiased.whitening[0])
  assert from_covariance < 0.04, from_covariance
  # The biased batch covariance is (m - 1)/m of the population's: its W is sqrt(8/7) too large.
  assert abs(error(w_biased) - (np.sqrt(rows / (rows - 1)) - 1)) < 0.03, error(w_biased)
  assert from_whitening > 0.3, from_whitening
  np.testing.assert_allclose(unbiased.mean, offset[0], atol=0.05)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(group_size=0), "`group_size` must be a positive int; got 0"),
    (dict(method="svd"), "`method` must be one of"),
    (dict(iterations=0), "`iterations` must be a positive int; got 0"),
    (dict(axis=(0, 1)), "`axis` must be one int"),
    (dict(running_estimate="ema"), "`running_estimate` must be one of"),
    (dict(group_size=3), r"`state.covariance` has shape \(3, 4, 4\), expected \(4, 3, 3\)"),
    (dict(mask=jnp.ones((8, C), bool)), "varies along the feature axis"),
    (dict(epsilon=0.0), "`epsilon` must be a number > 0"),
    (dict(momentum=jnp.ones(C)), "`momentum` must be a scalar"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
  params, state = init_whitening(C, group_size=GROUP)
  kwargs = dict(dict(group_size=GROUP), **kwargs)
  with pytest.raises((ValueError, TypeError), match=message):
    whitening_batch_norm(params, state, jnp.ones((8, C)), True, **kwargs)


def test_one_row_in_training_raises():
  params, state = init_whitening(C, group_size=GROUP)
  with pytest.raises(ValueError, match="expected more than 1 value per channel"):
    whitening_batch_norm(params, state, jnp.ones((1, C)), True, group_size=GROUP)


def test_batch_norm_state_is_refused_with_the_fix():
  params, state = bnjax.init(C)
  with pytest.raises(TypeError, match="init_whitening"):
    whitening_batch_norm(params, state, jnp.ones((8, C)), True)

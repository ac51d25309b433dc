"""`bnjax.stats`: moments by each route, their precision bound, and the pure merges, against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import stats
from tests import reference


def _moments_f64(x, axis=-1, mask=None):
  mean, var, count = reference.moments(x, axis, mask)
  return mean, var * count, count  # mean, m2, count


def _as_arrays(m):
  return (np.asarray(m.mean, np.float64).ravel(), np.asarray(m.m2, np.float64).ravel(),
          np.asarray(m.count).ravel())


# ----------------------------------------------------------------------------- merge_moments


_adaptive = jax.jit(stats.adaptive_moments, static_argnums=2)


def _part(x, mask=None):
  return _adaptive(jnp.asarray(x, jnp.float32), mask, (0,))


def _stack(parts):
  return jax.tree.map(lambda *v: jnp.stack(v), *parts)


def test_merge_moments_of_unequal_parts_equals_moments_of_the_union():
  rng = np.random.default_rng(0)
  pieces = [rng.normal(3.0 + i, 1.0 + i, size=(n, 4)).astype(np.float32)
            for i, n in enumerate([1, 7, 2, 30])]
  merged = stats.merge_moments(_stack([_part(p) for p in pieces]))
  mean, m2, count = _moments_f64(np.concatenate(pieces))
  got_mean, got_m2, got_count = _as_arrays(merged)
  np.testing.assert_array_equal(got_count, count)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
  np.testing.assert_allclose(got_m2, m2, rtol=1e-5)


def test_merge_moments_ignores_a_part_without_data():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  empty = _part(np.full((4, 3), np.nan, np.float32), mask=jnp.zeros((4, 1), bool))
  merged = stats.merge_moments(_stack([empty, _part(x), empty]))
  mean, m2, count = _moments_f64(x)
  got_mean, got_m2, got_count = _as_arrays(merged)
  np.testing.assert_array_equal(got_count, count)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
  np.testing.assert_allclose(got_m2, m2, rtol=1e-5)


def test_merge_moments_with_far_apart_pivots_stays_exact():
  # Two parts 1e6 standard deviations apart and a third near zero: float32 values, float64 truth.
  rng = np.random.default_rng(2)
  pieces = [(1e6 + rng.normal(size=(8, 2))).astype(np.float32),
            (-1e6 + rng.normal(size=(5, 2))).astype(np.float32),
            rng.normal(size=(3, 2)).astype(np.float32)]
  merged = stats.merge_moments(_stack([_part(p) for p in pieces]))
  mean, m2, _ = _moments_f64(np.concatenate(pieces))
  got_mean, got_m2, _ = _as_arrays(merged)
  np.testing.assert_allclose(got_m2, m2, rtol=1e-6)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-6, atol=1e-1)


def test_merge_moments_of_zero_parts_is_empty():
  parts = _stack([_part(np.ones((3, 2), np.float32), mask=jnp.zeros((3, 1), bool))] * 2)
  merged = stats.merge_moments(parts)
  np.testing.assert_array_equal(merged.count, 0)
  np.testing.assert_array_equal(merged.m2, 0.0)


def test_power_sums_round_trip_equals_merge():
  rng = np.random.default_rng(3)
  pieces = [rng.normal(5.0, 2.0, size=(n, 3)).astype(np.float32) for n in (4, 9)]
  parts = [_part(p) for p in pieces]
  pivot = jnp.full((1, 3), 5.0, jnp.float32)
  sums = [stats.power_sums(p, pivot) for p in parts]
  count = parts[0].count + parts[1].count
  merged, precise = stats.from_power_sums(count, pivot, sums[0][0] + sums[1][0],
                                          sums[0][1] + sums[1][1])
  assert bool(precise)
  mean, m2, _ = _moments_f64(np.concatenate(pieces))
  got_mean, got_m2, _ = _as_arrays(merged)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
  np.testing.assert_allclose(got_m2, m2, rtol=1e-5)


def test_power_sums_far_pivot_is_reported_imprecise():
  x = (1e4 + np.random.default_rng(4).normal(size=(16, 2))).astype(np.float32)
  part = _part(x)
  pivot = jnp.zeros((1, 2), jnp.float32)
  _, precise = stats.from_power_sums(part.count, pivot, *stats.power_sums(part, pivot))
  assert not bool(precise)


# ----------------------------------------------------------------------------- routes


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("route", ["adaptive", "one_pass", "auto"])
def test_every_route_is_exact_for_iid_rows(route, offset):
  x = (offset + np.random.default_rng(5).normal(size=(64, 3))).astype(np.float32)
  m = jax.jit(lambda x: stats.local_moments(x, None, (0,), route))(x)
  mean, m2, _ = _moments_f64(x)
  got_mean, got_m2, _ = _as_arrays(m)
  np.testing.assert_allclose(got_m2, m2, rtol=1e-5)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-6)


@pytest.mark.parametrize("k", [4.0, 64.0, 256.0])
def test_one_pass_loses_at_most_log2_one_plus_k_squared_bits(k):
  # Rows 0..7 (the pivot's rows) sit k standard deviations above the rest: the pivot is ~k sigma
  # from the mean. The relative error of m2 must stay within eps * 2**log2(1 + k^2), with a
  # constant for the summation's own rounding.
  rng = np.random.default_rng(6)
  x = rng.normal(size=(4096, 2))
  x[:8] = x[:8] * 0.0 + k * x.std() + x.mean()
  x = (x + 1e3).astype(np.float32)
  m = stats.one_pass_moments(jnp.asarray(x), None, (0,))
  _, m2, _ = _moments_f64(x)
  centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
  pivot = np.asarray(m.pivot, np.float64).ravel()
  k_measured = np.abs(pivot - x.astype(np.float64).mean(0)) / centred.std(0)
  bound = 64 * np.finfo(np.float32).eps * (1 + k_measured ** 2)
  error = np.abs(np.asarray(m.m2, np.float64).ravel() - m2) / m2
  assert np.all(error <= bound), (error, bound, k_measured)
  # The adaptive route is exact whatever the pivot.
  exact = stats.adaptive_moments(jnp.asarray(x), None, (0,))
  np.testing.assert_allclose(np.asarray(exact.m2, np.float64).ravel(), m2, rtol=1e-5)


def test_adaptive_route_falls_back_to_the_exact_pass_for_a_far_pivot():
  # The one-pass result at k = 1e4 has lost every bit; the adaptive route must not.
  x = np.random.default_rng(7).normal(size=(256, 2))
  x[:8] = 1e4
  x = x.astype(np.float32)
  _, m2, _ = _moments_f64(x)
  adaptive = stats.adaptive_moments(jnp.asarray(x), None, (0,))
  np.testing.assert_allclose(np.asarray(adaptive.m2, np.float64).ravel(), m2, rtol=1e-5)


def test_no_reduced_axis_gives_each_value_as_its_own_moment():
  x = jnp.array([1.5, -2.0, 7.0])
  for route in stats.ROUTES:
    m = stats.local_moments(x, None, (), route)
    np.testing.assert_array_equal(m.count, [1, 1, 1])
    np.testing.assert_array_equal(m.mean, x)
    np.testing.assert_array_equal(m.m2, [0.0, 0.0, 0.0])


def test_counts_are_exact_integers_beyond_float32():
  # 2**24 + 3 is not a float32; the count must still be exact.
  n = 2 ** 24 + 3
  count = stats.valid_count((n, 2), None, (0,))
  assert count.dtype == jnp.int32
  np.testing.assert_array_equal(count, [[n, n]])
  mask = jnp.ones((n, 1), bool)
  np.testing.assert_array_equal(stats.valid_count((n, 2), mask, (0,)), [[n, n]])


@pytest.mark.parametrize("route", ["auto", "one_pass"])
def test_route_under_vmap_gives_the_same_moments_as_a_loop(route):
  x = (3.0 + np.random.default_rng(8).normal(size=(4, 32, 3))).astype(np.float32)
  batched = jax.vmap(lambda x: stats.local_moments(x, None, (0,), route))(x)
  for i in range(4):
    _, m2, _ = _moments_f64(x[i])
    np.testing.assert_allclose(np.asarray(batched.m2[i], np.float64).ravel(), m2, rtol=1e-5)


def test_moments_have_exact_derivatives_under_every_route():
  # f = sum(m2) / n + sum(mean**2) = sum(x**2) / n per channel: gradient 2x / n, and the gradient
  # of sum(gradient) is 2 / n everywhere. Under vmap too, where "auto" takes the one-pass route.
  x = (2.0 + np.random.default_rng(9).normal(size=(16, 2))).astype(np.float32)

  def f(x, route):
    m = stats.local_moments(x, None, (0,), route)
    return jnp.sum(m.m2 / 16.0) + jnp.sum(m.mean ** 2)

  for route in stats.ROUTES:
    first, second, batched = jax.jit(lambda x, route=route: (
        jax.grad(f)(x, route),
        jax.grad(lambda x: jax.grad(f)(x, route).sum())(x),
        jax.vmap(jax.grad(f), in_axes=(0, None))(jnp.stack([x, -x]), route)))(x)
    np.testing.assert_allclose(first, 2 * x / 16, atol=1e-6, err_msg=route)
    np.testing.assert_allclose(second, np.full_like(x, 2 / 16), atol=1e-6, err_msg=route)
    np.testing.assert_allclose(batched[1], -2 * x / 16, atol=1e-6, err_msg=route)

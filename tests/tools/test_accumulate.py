"""One running-statistics update per optimizer step from k micro-batches, against float64 NumPy."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax import tools
from tests import reference

F32 = reference.TOLERANCES["float32"]


def test_micro_batch_update_equals_one_big_batch_update():
  rng = np.random.default_rng(0)
  # Micro-batches with very different means: k sequential updates, or equal weights of variances,
  # would be far from the big batch's.
  x = np.concatenate([rng.normal(10.0 * i, 1.0 + i, (4, 3)) for i in range(3)]).astype(np.float32)
  params, state = bnjax.init(3)

  @jax.jit
  def step(state, micro_batches):
    def micro_step(_, xb):
      _, _, batch_stats = bnjax.batch_norm(params, state, xb, True, return_stats=True)
      return None, batch_stats
    _, stacked = lax.scan(micro_step, None, micro_batches)
    return tools.update_from_micro_batches(state, stacked, momentum=0.9, unbiased_running_var=True)

  new_state = step(state, jnp.asarray(x).reshape(3, 4, 3))
  _, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, momentum=0.9,
                                              unbiased=True)
  np.testing.assert_allclose(new_state.mean, mean_ref, **F32)
  np.testing.assert_allclose(new_state.var, var_ref, **F32)
  assert isinstance(new_state, bnjax.BatchNormState)


def test_pooled_statistics_of_unequal_micro_batches():
  rng = np.random.default_rng(1)
  parts = [rng.normal(1e3, 2.0, (n, 2)).astype(np.float32) for n in (2, 5, 3)]
  stats = [reference.moments(p) for p in parts]
  stacked = bnjax.BatchStats(mean=jnp.asarray(np.stack([s[0] for s in stats]), jnp.float32),
                             var=jnp.asarray(np.stack([s[1] for s in stats]), jnp.float32),
                             count=jnp.asarray(np.stack([s[2] for s in stats]), jnp.int32),
                             updated=jnp.ones((3, 2), bool))
  pooled = jax.jit(tools.pool_batch_stats)(stacked)
  whole = np.concatenate(parts).astype(np.float64)
  np.testing.assert_allclose(pooled.mean, whole.mean(0), **F32)
  np.testing.assert_allclose(pooled.var, whole.var(0), rtol=1e-4)
  np.testing.assert_array_equal(pooled.count, [10, 10])

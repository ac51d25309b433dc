"""The Batch Renormalization schedule against optax's linear schedules (the paper's numbers)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax import tools


def test_schedule_equals_optax_linear_schedules_traced():
  steps = jnp.array([0, 4_999, 5_000, 7_500, 25_000, 30_000, 40_000, 90_000])
  r, d = jax.jit(jax.vmap(tools.renorm_schedule))(steps)
  r_ref = optax.linear_schedule(1.0, 3.0, 35_000, transition_begin=5_000)
  d_ref = optax.linear_schedule(0.0, 5.0, 20_000, transition_begin=5_000)
  np.testing.assert_allclose(r, [float(r_ref(int(t))) for t in steps], rtol=1e-6)
  np.testing.assert_allclose(d, [float(d_ref(int(t))) for t in steps], rtol=1e-6, atol=1e-6)
  assert float(r[0]) == 1.0 and float(d[0]) == 0.0  # batch norm exactly during warm-up.


def test_schedule_rejects_ramps_that_end_before_the_warm_up():
  with pytest.raises(ValueError, match="after the warm-up"):
    tools.renorm_schedule(0, warmup_steps=50_000)

"""Claim 10's normalisations: batch renorm's training output against its closed form in NumPy."""

import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax_examples.experiments import batch_renorm
from configs.experiments import batch_renorm as batch_renorm_config


def _inputs():
  x = np.random.default_rng(0).normal(1.0, 1.0, (8, 3)).astype(np.float32)
  params, _ = bnjax.init(3)
  running = bnjax.BatchNormState(mean=jnp.full((3,), 0.5), var=jnp.full((3,), 4.0))
  return x, params, {"bn": running, "step": jnp.asarray(100, jnp.int32)}


def test_batch_renorm_arm_corrects_by_r_and_d_after_its_warm_up():
  config = batch_renorm_config.get_config()
  x, params, state = _inputs()
  norm = batch_renorm.arm_norm("batch renorm", config, num_steps=100)  # Step 100: bounds 3 and 5.
  y, new = norm(params, state, jnp.asarray(x), True)
  xd = x.astype(np.float64)
  mean, sigma_b = xd.mean(0), np.sqrt(xd.var(0) + 1e-5)
  sigma = np.sqrt(4.0 + 1e-5)
  r = np.clip(sigma_b / sigma, 1 / 3, 3)
  d = np.clip((mean - 0.5) / sigma, -5, 5)
  np.testing.assert_allclose(y, (xd - mean) / sigma_b * r + d, rtol=1e-5, atol=1e-5)
  assert int(new["step"]) == 101


def test_batch_norm_arm_and_renorm_in_its_warm_up_normalise_by_the_batch():
  config = batch_renorm_config.get_config()
  x, params, state = _inputs()
  xd = x.astype(np.float64)
  expected = (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-5)
  y, _ = batch_renorm.arm_norm("batch norm", config, num_steps=100)(params, state, jnp.asarray(x),
                                                                 True)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  warm_up = {**state, "step": jnp.asarray(2, jnp.int32)}  # Before 5 % of 100 steps: r = 1, d = 0.
  y, _ = batch_renorm.arm_norm("batch renorm", config, num_steps=100)(params, warm_up,
                                                                   jnp.asarray(x), True)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

"""Claim 10's normalisations: batch renorm's training output against its closed form in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax_examples.experiments import batch_renorm
from bnjax_examples.experiments import batch_renorm_non_iid
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


def test_few_class_rows_draws_half_the_batch_from_each_of_two_classes():
  labels = np.repeat(np.arange(10), np.arange(3, 13))  # Unequal classes: 3, 4, ..., 12 rows.
  rows_fn = jax.jit(batch_renorm_non_iid.few_class_rows(jnp.asarray(labels, jnp.int32),
                                                        batch_size=6))
  seen_one_class = 0
  for step in range(40):
    rows = np.asarray(rows_fn(jax.random.key(3), jnp.asarray(step)))
    assert rows.shape == (6,)
    assert 0 <= rows.min() <= rows.max() < len(labels)
    classes = labels[rows]
    # Examples alternate between the two drawn classes: 3 of each (or 6 of one).
    assert len(set(classes[0::2])) == 1
    assert len(set(classes[1::2])) == 1
    seen_one_class += int(classes[0] == classes[1])
  assert 0 < seen_one_class < 12  # Equal classes have probability 1/10: about 4 of 40.


def test_few_class_rows_reaches_every_row_of_a_class():
  labels = np.asarray([0, 1, 0, 1, 1, 0, 1], np.int32)
  rows_fn = jax.jit(batch_renorm_non_iid.few_class_rows(jnp.asarray(labels), batch_size=2,
                                                        num_classes=2))
  drawn = {int(r) for step in range(60)
           for r in np.asarray(rows_fn(jax.random.key(0), jnp.asarray(step)))}
  assert drawn == set(range(len(labels)))

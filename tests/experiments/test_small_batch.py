"""Claim 8: the group-norm and ghost-batch layers against float64 NumPy, and the smoke run."""

import json
import os

import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax_examples.experiments import RESULT_FIELDS
from bnjax_examples.experiments import RESULT_FILE
from bnjax_examples.experiments import harness
from bnjax_examples.experiments import runner
from bnjax_examples.experiments import small_batch
from configs.experiments import small_batch as small_batch_config


def _standardise(x, axis):
  return (x - x.mean(axis, keepdims=True)) / np.sqrt(x.var(axis, keepdims=True) + 1e-5)


def test_group_norm_standardises_each_example_within_each_group_of_units():
  x = np.random.default_rng(0).normal(3.0, 2.0, (5, 12)).astype(np.float32)
  params, _ = bnjax.init(12)
  y, state = small_batch.group_norm(3)(params, None, jnp.asarray(x), True)
  groups = x.astype(np.float64).reshape(5, 3, 4)  # Groups of 4 consecutive units.
  expected = (groups - groups.mean(2, keepdims=True)) / np.sqrt(groups.var(2, keepdims=True)
                                                                 + 1e-6)
  np.testing.assert_allclose(y, expected.reshape(5, 12), rtol=1e-4, atol=1e-4)
  assert state is None
  # Per example: the output for one row does not depend on the others.
  y_one, _ = small_batch.group_norm(3)(params, None, jnp.asarray(x[:1]), True)
  np.testing.assert_allclose(y_one, y[:1], rtol=1e-5, atol=1e-5)


def test_ghost_batches_normalise_each_run_of_b_examples_by_its_own_statistics():
  x = np.random.default_rng(1).normal(0.0, 1.0, (12, 3)).astype(np.float32)
  x[4:8] += 5.0  # The second ghost batch has another mean.
  params, state = bnjax.init(3)
  y, new = harness.bnjax_norm(momentum=0.0, ghost_batch_size=4)(params, state, jnp.asarray(x),
                                                                 True)
  xd = x.astype(np.float64)
  expected = _standardise(xd.reshape(3, 4, 3), 1).reshape(12, 3)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  # The running statistics come from the whole batch (momentum 0: replaced by them).
  np.testing.assert_allclose(new.mean, xd.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.var, xd.var(0), rtol=1e-5, atol=1e-5)


def test_smoke_run_reports_both_parts(tmp_path):
  config = small_batch_config.get_config("smoke")
  runner.run_experiment(config, str(tmp_path))
  with open(os.path.join(tmp_path, RESULT_FILE)) as f:
    result = json.load(f)
  assert [field for field in RESULT_FIELDS if field not in result] == []
  assert result["claim_number"] == 8
  assert result["criterion"].startswith("confirmed if")
  data = result["data"]
  assert set(data["batch_summary"]) == {"4"}
  for row in data["batch_summary"].values():
    assert set(row) == {"batch norm/ema", "batch norm/precise", "group norm"}
    assert all(0 <= cell["mean"] <= 100 for cell in row.values())
  assert set(data["ghost_summary"]) == {"8"}
  for row in data["ghost_summary"].values():
    # The gap is train minus test accuracy, seed by seed.
    np.testing.assert_allclose(row["ema/gap"]["mean"],
                               row["ema/train"]["mean"] - row["ema/test"]["mean"], atol=1e-4)

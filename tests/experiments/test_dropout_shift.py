"""Claim 6: the variance-shift formula and the dropout + batch norm layer against float64 NumPy."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax_examples.experiments import RESULT_FIELDS
from bnjax_examples.experiments import RESULT_FILE
from bnjax_examples.experiments import dropout_shift
from bnjax_examples.experiments import harness
from bnjax_examples.experiments import runner
from configs.experiments import dropout_shift as dropout_shift_config


@pytest.mark.parametrize("mean", [0.0, 1.0, -2.0])
@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_variance_shift_matches_a_float64_simulation(mean, rate):
  rng = np.random.default_rng(0)
  var = 1.5
  x = rng.normal(mean, np.sqrt(var), 1_000_000)
  dropped = np.where(rng.random(x.shape) >= rate, x / (1 - rate), 0.0)
  simulated = x.var() / dropped.var()
  np.testing.assert_allclose(dropout_shift.variance_shift(mean, var, rate), simulated, rtol=1e-2)


def test_dropout_before_batch_norm_stores_the_training_variance_of_the_formula():
  c_C = np.array([0.0, 1.0, -2.0])
  v_C = np.array([1.0, 0.5, 2.0])
  rate = 0.4
  x = np.random.default_rng(1).normal(c_C, np.sqrt(v_C), (20_000, 3)).astype(np.float32)
  params, state = bnjax.init(3)
  norm = dropout_shift.dropout_norm(momentum=0.0)  # The running statistics become the batch's.
  layer = {"bn": state, "key": jax.random.key(2), "before": jnp.float32(rate),
           "after": jnp.float32(0.0)}
  _, new = norm(params, layer, jnp.asarray(x), True)
  train_var = (c_C**2 + v_C) / (1 - rate) - c_C**2  # Inverted dropout, closed form.
  np.testing.assert_allclose(new["bn"].var, train_var, rtol=3e-2)
  np.testing.assert_allclose(new["bn"].mean, c_C, atol=3e-2)
  assert not np.array_equal(jax.random.key_data(new["key"]), jax.random.key_data(layer["key"]))


def test_dropout_norm_in_evaluation_is_plain_batch_norm_without_dropout():
  x = np.random.default_rng(3).normal(size=(6, 2)).astype(np.float32)
  params, _ = bnjax.init(2)
  running = bnjax.BatchNormState(mean=jnp.array([0.5, -1.0]), var=jnp.array([4.0, 0.25]))
  layer = {"bn": running, "key": jax.random.key(0), "before": jnp.float32(0.5),
           "after": jnp.float32(0.5)}
  y, same = dropout_shift.dropout_norm(0.99)(params, layer, jnp.asarray(x), False)
  expected = (x.astype(np.float64) - [0.5, -1.0]) / np.sqrt(np.array([4.0, 0.25]) + 1e-5)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  assert same is layer


def test_variance_ratios_use_each_units_mean_and_variance_before_dropout():
  model = harness.MLP(hidden=(4,), activation="relu", placement="before")
  x = np.random.default_rng(4).normal(0.5, 1.0, (4_000, 3)).astype(np.float32)
  params, _ = model.init(jax.random.key(0), 3)
  rate = 0.3
  states = [{"bn": bnjax.init(4)[1], "key": jax.random.key(1), "before": jnp.float32(rate),
             "after": jnp.float32(0.0)}]
  ratios = jax.jit(lambda p, s, x: dropout_shift.variance_ratios(
      model, p, s, x, jax.random.key(5), draws=4))(params, states, jnp.asarray(x))
  z = x.astype(np.float64) @ np.asarray(params["dense"][0]["w"], np.float64)
  c, v = z.mean(0), z.var(0)
  formula = v / ((c**2 + v) / (1 - rate) - c**2)
  np.testing.assert_allclose(ratios["formula"][0], formula, rtol=1e-4)
  np.testing.assert_allclose(ratios["measured"][0], formula, rtol=3e-2)  # 16,000 masked values.


def test_layer_rates_put_dropout_before_every_norm_or_after_the_last():
  before, after = dropout_shift.layer_rates("before", 0.2, 3)
  np.testing.assert_array_equal(before, np.full(3, 0.2, np.float32))
  np.testing.assert_array_equal(after, [0, 0, 0])
  before, after = dropout_shift.layer_rates("after", 0.2, 3)
  np.testing.assert_array_equal(before, [0, 0, 0])
  np.testing.assert_array_equal(after, np.array([0, 0, 0.2], np.float32))
  with pytest.raises(ValueError, match="`arm`"):
    dropout_shift.layer_rates("middle", 0.2, 3)


def test_smoke_run_reports_every_field_and_the_shift(tmp_path):
  config = dropout_shift_config.get_config("smoke")
  runner.run_experiment(config, str(tmp_path))
  with open(os.path.join(tmp_path, RESULT_FILE)) as f:
    result = json.load(f)
  assert [field for field in RESULT_FIELDS if field not in result] == []
  assert result["claim_number"] == 6
  assert result["criterion"].startswith("confirmed if")
  summary = result["data"]["summary"]
  assert set(summary) == {"before, p=0", "before, p=0.5", "after, p=0.5"}
  for row in summary.values():
    assert 0 <= row["ema/accuracy"]["mean"] <= 100
    assert 0 <= row["precise/accuracy"]["mean"] <= 100
  # Without dropout before a norm nothing shifts: both ratios are exactly one.
  for cell in ("before, p=0", "after, p=0.5"):
    np.testing.assert_allclose(summary[cell]["formula_ratio"]["mean"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(summary[cell]["measured_ratio"]["mean"], 1.0, rtol=1e-6)
  # At p = 0.5 the first layer (input features standardised, c near 0) shifts to about 1 - p.
  shifted = summary["before, p=0.5"]
  assert 0.3 < shifted["formula_ratio"]["mean"][0] < 0.6
  np.testing.assert_allclose(shifted["measured_ratio"]["mean"], shifted["formula_ratio"]["mean"],
                             rtol=0.05)

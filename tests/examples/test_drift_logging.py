"""Tests for the example's per-layer drift logging (``config.log_drift``).

The train step's drift metrics (of the shared `accumulated_step`, conftest.py) are checked
against float64 NumPy for the first norm layer (its input, a convolution of the images, does not
depend on any normalisation), the epoch averaging and its checkpointed progress by hand, and the
plot. The smoke runs of ``test_train.py`` log drift
by default: their metrics lines and ``drift.png`` are checked there, and the exact resumption test
covers the drift sums a checkpoint's progress keeps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax_examples import config_check
from bnjax_examples import metrics
from bnjax_examples import reporting
from configs import default as default_config
from tests.examples import float64_reference

LAYERS = ("BatchNorm_0", "BatchNorm_1", "BatchNorm_2")  # The smoke CNN's norm layers.


def test_first_layer_drift_is_the_whole_batch_against_numpy_and_every_layer_is_reported(
    accumulated_step):
  # The shared step pools 4 micro-batches: for the first layer, the whole batch's moments.
  config, _, state, batch, _, _, step_metrics = accumulated_step
  step_metrics = jax.device_get(step_metrics)
  running = jax.device_get(state.batch_stats["BatchNorm_0"])
  smd, log_ratio = float64_reference.drift_means(
      *float64_reference.first_layer_moments(batch["image"], state.params["Conv_0"]["kernel"]),
      running["mean"], running["var"], config.batch_norm_epsilon)
  assert smd > 1e-3  # A batch unlike the initial running statistics.
  assert log_ratio > 1e-3
  np.testing.assert_allclose(step_metrics["drift/BatchNorm_0/mean_abs_smd"], smd, rtol=1e-4)
  np.testing.assert_allclose(step_metrics["drift/BatchNorm_0/mean_abs_log_var_ratio"], log_ratio,
                             rtol=1e-4)
  drift_names = {name for name in step_metrics if name.startswith(metrics.DRIFT_PREFIX)}
  assert drift_names == {f"drift/{layer}/{field}" for layer in LAYERS
                         for field in ("mean_abs_smd", "mean_abs_log_var_ratio", "skipped")}
  assert all(step_metrics[f"drift/{layer}/skipped"] == 0.0 for layer in LAYERS)


def test_a_non_finite_batch_is_flagged_as_skipped(accumulated_step):
  _, _, state, batch, step, _, _ = accumulated_step
  images = np.array(batch["image"])
  images[0, 3, 3, 0] = np.nan  # Reaches every channel of the first convolution.
  new_state, step_metrics = step(state, {**batch, "image": jnp.asarray(images)})
  assert float(step_metrics["drift/BatchNorm_0/skipped"]) == 1.0
  np.testing.assert_array_equal(new_state.batch_stats["BatchNorm_0"]["mean"],
                                state.batch_stats["BatchNorm_0"]["mean"])


def test_epoch_totals_average_drift_over_steps_and_survive_a_checkpoint():
  def step_metrics(smd, log_ratio, skipped):
    return {"loss_sum": 1.0, "correct": 1.0, "count": 2.0,
            "drift/Block_0/BatchNorm_0/mean_abs_smd": np.float32(smd),
            "drift/Block_0/BatchNorm_0/mean_abs_log_var_ratio": np.float32(log_ratio),
            "drift/Block_0/BatchNorm_0/skipped": np.float32(skipped)}

  totals = metrics.EpochTotals()
  totals.add([step_metrics(0.5, 1.0, 0.0)])
  resumed = metrics.EpochTotals.from_progress(totals.as_progress())  # As a checkpoint stores it.
  resumed.add([step_metrics(0.25, 3.0, 1.0)])
  summary = resumed.summary()  # Means over the 2 steps, not the 4 examples.
  assert summary["train_loss"] == 0.5
  assert summary["drift"] == {"Block_0/BatchNorm_0": {
      "mean_abs_smd": 0.375, "mean_abs_log_var_ratio": 2.0, "skipped_steps": 1}}
  without = metrics.EpochTotals()
  without.add([{"loss_sum": 1.0, "correct": 1.0, "count": 2.0}])
  assert "drift" not in without.summary()


def test_drift_plot_is_a_png_and_is_skipped_without_drift(tmp_path):
  records = [{"step": step, "drift": {layer: {"mean_abs_smd": 0.1 * step,
                                              "mean_abs_log_var_ratio": 0.2,
                                              "skipped_steps": int(step == 8)}
                                      for layer in LAYERS}} for step in (4, 8)]
  assert reporting.plot_drift(records, str(tmp_path / "drift.png"))
  assert (tmp_path / "drift.png").read_bytes().startswith(b"\x89PNG")
  assert not reporting.plot_drift([{"step": 4}], str(tmp_path / "none.png"))
  assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("api", "nnx", "bnjax.nnx.BatchNorm does not expose them"),
    ("norm", "flax", "config.log_drift = True: drift is read from the batch moments"),
])
def test_asking_for_drift_where_there_is_none_fails_before_training(field, value, message):
  config = default_config.get_config("smoke")
  config.log_drift = True
  config[field] = value
  with pytest.raises(config_check.ConfigError) as error:
    config_check.validate_config(config, num_devices=8)
  assert message in str(error.value)
  with config.unlocked():
    config.log_drift = None  # Unset: nothing is logged there, and nothing fails.
  config_check.validate_config(config, num_devices=8)
  assert not config_check.logs_drift(config)


def test_drift_is_logged_by_default_and_switched_off_by_false():
  config = default_config.get_config("smoke")
  assert config.log_drift is None
  assert config_check.logs_drift(config)
  config.log_drift = False
  assert not config_check.logs_drift(config)

"""Smoke test of configs/precise_stats.py: train with dropout, recompute precise statistics, report.

The run uses the suite's 8 simulated devices; the recomputation runs on the host copy.
"""

import itertools
import json

from flax import linen as nn
import jax
import numpy as np

from bnjax_examples import input_pipeline
from bnjax_examples import train
from configs import precise_stats as precise_config


def test_precise_stats_config_replaces_running_stats_and_reports_accuracy_before_and_after(
    tmp_path):
  config = precise_config.get_config("smoke")
  config.progress_bar = False
  state = train.train_and_evaluate(config, str(tmp_path))

  record = json.loads((tmp_path / train.PRECISE_STATS_FILE).read_text())
  assert record["batches"] == config.precise_stats_batches == 2
  for when in ("before", "after"):
    assert 0.0 <= record[when]["test_accuracy"] <= 1.0
  # The first norm layer's statistics are those of its input (the first convolution of the
  # images, no dropout upstream) over the two batches, computed here in float64.
  dataset = input_pipeline.load_dataset(config.dataset, seed=config.seed,
                                        test_fraction=config.test_fraction)
  batches = itertools.islice(input_pipeline.train_batches(
      dataset, global_batch_size=config.batch_size, seed=config.seed + 1,
      batches_per_epoch=config.steps_per_epoch), 2)
  params = jax.device_get(state.params)
  conv = nn.Conv(config.cnn.features[0], (3, 3), use_bias=False)
  h = np.concatenate([np.asarray(conv.apply({"params": params["Conv_0"]}, b["image"]), np.float64)
                      for b in batches])
  stats = jax.device_get(state.batch_stats)["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], h.mean(axis=(0, 1, 2)), atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(stats["var"], h.var(axis=(0, 1, 2)), atol=1e-5, rtol=1e-4)

"""The example with ``norm='whitening'``: the layer reaches the model, the config is checked, and
the correlation plot of `bnjax_examples/correlation.py` is drawn from trained checkpoints.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax.linen
from bnjax_examples import config_check
from bnjax_examples import correlation
from bnjax_examples import models
from bnjax_examples import steps
from bnjax_examples import train
from configs import whitening as whitening_config


def test_whitening_norm_reaches_the_model_with_its_options():
  config = whitening_config.get_config("smoke")
  config.norm = "whitening"
  model = steps.create_model(config, num_classes=10)
  assert model.norm.func is bnjax.linen.WhiteningBatchNorm
  assert model.norm.keywords["group_size"] == 16 and model.norm.keywords["method"] == "iterative"
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((2, 8, 8, 1)))
  # The CNN's 16-channel convolution: one group of 16.
  assert variables["batch_stats"]["WhiteningBatchNorm_1"]["covariance"].shape == (1, 16, 16)


def test_bad_whitening_method_fails_before_training():
  config = whitening_config.get_config("smoke")
  config.whitening.method = "svd"
  with pytest.raises(config_check.ConfigError, match="config.whitening.method = 'svd'"):
    config_check.validate_config(config, num_devices=8)


def test_whitening_is_one_of_the_example_norms():
  assert "whitening" in models.NORMS and "whitening" in train.NORM_LABELS


def test_correlation_plot_of_trained_batch_norm_and_whitening_runs(tmp_path):
  config = whitening_config.get_config("smoke")
  config.progress_bar = False
  config.num_epochs = 1
  config.steps_per_epoch = 2
  train.compare_norms(config, str(tmp_path))
  correlations = correlation.compare_correlations(config, str(tmp_path), layer=1,
                                                  max_images=64)
  assert set(correlations) == {"bnjax", "whitening"}
  for matrix in correlations.values():
    assert matrix.shape == (16, 16)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
  assert (tmp_path / correlation.PLOT_FILE).read_bytes().startswith(b"\x89PNG")

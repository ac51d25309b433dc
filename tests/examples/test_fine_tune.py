"""Fine-tuning a finished run with frozen batch norm (``configs/fine_tune.py``, ``init_from``).

The running statistics and the norm layers' scale/bias stay bit-identical to the loaded
checkpoint's while every other parameter trains; bad ``init_from`` values fail with the fix.
"""

import importlib

import jax
import numpy as np
import pytest

from bnjax_examples import checkpointing
from bnjax_examples import config_check
from bnjax_examples import train
from configs import default as default_config
from configs import fine_tune as fine_tune_config


def tiny(config):
  config.progress_bar = False
  config.num_epochs = 1
  config.steps_per_epoch = 2
  return config


def host_tree(tree) -> dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A finished smoke run of the default config (2 steps on 8 devices): what is fine-tuned."""
  workdir = tmp_path_factory.mktemp("trained")
  return workdir, train.train_and_evaluate(tiny(default_config.get_config("smoke")), str(workdir))


@pytest.fixture(scope="module")
def fine_tuned_run(trained_run, tmp_path_factory):
  trained_workdir, _ = trained_run
  config = tiny(fine_tune_config.get_config("smoke"))
  config.init_from = str(trained_workdir)
  config.learning_rate = 0.05
  return train.train_and_evaluate(config, str(tmp_path_factory.mktemp("fine_tuned")))


def is_norm_param(name: str) -> bool:
  return "BatchNorm_" in name


def test_fine_tuning_leaves_running_statistics_bit_identical(trained_run, fine_tuned_run):
  _, trained = trained_run
  assert int(jax.device_get(fine_tuned_run.step)) == 2
  expected, actual = host_tree(trained.batch_stats), host_tree(fine_tuned_run.batch_stats)
  assert expected.keys() == actual.keys()
  assert len(expected) == 6
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_fine_tuning_freezes_norm_scale_and_bias_and_trains_the_rest(trained_run, fine_tuned_run):
  _, trained = trained_run
  expected, actual = host_tree(trained.params), host_tree(fine_tuned_run.params)
  assert expected.keys() == actual.keys()
  norm_names = [name for name in expected if is_norm_param(name)]
  other_names = [name for name in expected if not is_norm_param(name)]
  assert len(norm_names) == 6
  assert len(other_names) == 5
  for name in norm_names:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
  for name in other_names:
    assert not np.array_equal(actual[name], expected[name]), f"{name} did not train"


def test_fine_tune_config_opens_with_its_command():
  docstring = importlib.import_module("configs.fine_tune").__doc__
  assert docstring.startswith(
      "python -m bnjax_examples.main --config=configs/fine_tune.py --workdir=")
  assert "--config.init_from=" in docstring.splitlines()[0]


def test_fine_tune_config_without_init_from_fails_with_the_fix():
  config = fine_tune_config.get_config("smoke")
  config_check.validate_config(tiny(default_config.get_config("smoke")), num_devices=8)
  with pytest.raises(config_check.ConfigError,
                     match=r"config.init_from = None: .* --config.init_from=workdir/default"):
    config_check.validate_config(config, num_devices=8)


def test_init_from_a_missing_directory_fails_before_training(tmp_path):
  config = fine_tune_config.get_config("smoke")
  config.init_from = str(tmp_path / "nowhere")
  with pytest.raises(config_check.ConfigError, match="an existing directory"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_init_from_a_directory_without_checkpoint_is_refused(tmp_path):
  config = tiny(fine_tune_config.get_config("smoke"))
  config.init_from = str(tmp_path)
  with pytest.raises(config_check.ConfigError, match="no checkpoint in"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_init_from_a_run_of_another_model_is_refused(trained_run, tmp_path):
  trained_workdir, _ = trained_run
  config = tiny(fine_tune_config.get_config("smoke"))
  config.init_from = str(trained_workdir)
  config.cnn.features = (4, 16)
  mismatch = r"params/Conv_0/kernel: checkpoint \(3, 3, 1, 8\), model \(3, 3, 1, 4\)"
  with pytest.raises(checkpointing.CheckpointMismatchError, match=mismatch):
    train.train_and_evaluate(config, str(tmp_path / "run"))

"""Tests for configs/*.py and the config checks of the training example: every config loads,
opens with its command and passes the checks; bad values fail before anything is loaded or
trained."""

import doctest
import importlib
import os
import pathlib
import subprocess
import sys

from absl import flags
import jax
from ml_collections import config_flags
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

from bnjax_examples import config_check
from bnjax_examples import train

CONFIG_NAMES = ("default", "no_norm", "compare", "mnist", "cifar10", "whitening",
                "precise_stats")


def load_config(name: str, arg: str | None = None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_docstring_opens_with_the_command_that_runs_it(name):
  docstring = importlib.import_module(f"configs.{name}").__doc__
  command = f"python -m bnjax_examples.main --config=configs/{name}.py --workdir="
  assert docstring.startswith(command)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_passes_validation(name):
  config_check.validate_config(load_config(name), num_devices=8)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_smoke_option_shrinks_every_config(name):
  config = load_config(name, "smoke")
  assert config.num_epochs * config.steps_per_epoch <= 12
  config_check.validate_config(config, num_devices=8)


def test_unknown_config_option_is_rejected():
  with pytest.raises(ValueError, match="Unknown config option 'tiny'"):
    load_config("default", "tiny")


def test_command_line_overrides_reach_the_config():
  argv = ["main", f"--config={REPO_ROOT / 'configs' / 'default.py'}:smoke",
          "--config.learning_rate=0.05", "--config.cnn.features=(4, 8)"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  assert flag_values.config.learning_rate == 0.05
  assert tuple(flag_values.config.cnn.features) == (4, 8)
  assert flag_values.config.num_epochs == 3


def test_negative_learning_rate_fails_before_training(tmp_path):
  config = load_config("default", "smoke")
  config.learning_rate = -0.1
  workdir = tmp_path / "run"
  with pytest.raises(config_check.ConfigError,
                     match=r"config.learning_rate = -0.1: must be a positive"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_batch_size_not_divisible_by_device_count_fails_before_training(tmp_path):
  assert jax.device_count() == 8
  config = load_config("default", "smoke")
  config.batch_size = 30
  workdir = tmp_path / "run"
  with pytest.raises(config_check.ConfigError) as error:
    train.train_and_evaluate(config, str(workdir))
  assert "config.batch_size = 30" in str(error.value)
  assert "multiple of 8" in str(error.value) and "--config.batch_size=32" in str(error.value)
  assert not workdir.exists()


def test_unknown_dataset_fails_before_training(tmp_path):
  config = load_config("default", "smoke")
  config.dataset = "imagenet"
  workdir = tmp_path / "run"
  with pytest.raises(config_check.ConfigError, match=r"config.dataset = 'imagenet': unknown "
                     r"dataset; use one of digits, mnist, cifar10"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_every_invalid_field_is_reported_at_once():
  config = load_config("default")
  config.learning_rate = 0.0
  config.momentum = 1.0
  config.norm = "batch"
  with pytest.raises(config_check.ConfigError) as error:
    config_check.validate_config(config, num_devices=1)
  for field in ("learning_rate", "momentum", "norm"):
    assert f"config.{field} = " in str(error.value)


def test_config_check_docstring_example_runs():
  result = doctest.testmod(config_check)
  assert result.attempted > 0 and result.failed == 0


def test_batch_larger_than_the_training_set_is_rejected():
  config = load_config("default")
  config.batch_size = 4096
  with pytest.raises(config_check.ConfigError, match="larger than the 1438 training examples"):
    config_check.validate_config(config, num_devices=1, num_train_examples=1438)


def test_command_line_error_is_one_clear_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "bnjax_examples.main", "--config=configs/default.py",
       f"--workdir={tmp_path / 'run'}", "--config.learning_rate=-1.0"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "error: Invalid config; nothing was trained:" in result.stderr
  assert "config.learning_rate = -1.0" in result.stderr and "Traceback" not in result.stderr

"""Checks a run's config before anything is loaded or trained.

Every invalid field is reported at once, each with its value and the fix, in one `ConfigError`:

  >>> from configs import default
  >>> config = default.get_config()
  >>> config.learning_rate = -0.1
  >>> validate_config(config, num_devices=1)
  Traceback (most recent call last):
  ...
  bnjax_examples.config_check.ConfigError: Invalid config; nothing was trained:
    config.learning_rate = -0.1: must be a positive number, e.g. --config.learning_rate=0.1.
"""

import math
import os
from typing import Any

import jax
import ml_collections

from bnjax_examples import input_pipeline
from bnjax_examples import models
from bnjax_examples import nnx_models

MODELS = ("CNN", "ResNet")
APIS = ("linen", "nnx")
NNX_NORMS = nnx_models.NORMS  # What the NNX CNN builds.


class ConfigError(ValueError):
  """A config value is invalid; the message names the field, the value and the fix."""


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    num_train_examples: int | None = None) -> None:
  """Checks every config value before anything is loaded or trained.

  Args:
    config: the run's config.
    num_devices: devices the global batch is split over (default: `jax.device_count()`).
    num_train_examples: size of the training set, once known, to check the batch size against it.

  Raises:
    ConfigError: listing every invalid field with its value and how to fix it.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  problems = []

  def require(ok: bool, field: str, message: str) -> None:
    if not ok:
      problems.append(f"config.{field} = {config.get(field)!r}: {message}")

  def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

  def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

  require(config.dataset in input_pipeline.DATASETS, "dataset",
          f"unknown dataset; use one of {', '.join(input_pipeline.DATASETS)}, e.g. "
          "--config.dataset=digits.")
  require(config.dataset == "digits" or bool(config.data_dir), "data_dir",
          f"{config.dataset} is read from local files; set --config.data_dir to the directory "
          "that holds them.")
  require(config.model in MODELS, "model", f"unknown model; use one of {', '.join(MODELS)}.")
  require(config.norm in models.NORMS, "norm",
          f"unknown normalisation; use one of {', '.join(models.NORMS)}.")
  compare = tuple(config.compare_norms)
  require(all(n in models.NORMS for n in compare) and len(set(compare)) == len(compare),
          "compare_norms", f"must list distinct values of {', '.join(models.NORMS)}, e.g. "
          "--config.compare_norms=\"('bnjax', 'none')\", or be () to train only config.norm.")
  require(is_number(config.learning_rate) and config.learning_rate > 0, "learning_rate",
          "must be a positive number, e.g. --config.learning_rate=0.1.")
  require(is_number(config.momentum) and 0 <= config.momentum < 1, "momentum",
          "the SGD momentum must be in [0, 1), e.g. --config.momentum=0.9.")
  require(is_number(config.weight_decay) and config.weight_decay >= 0, "weight_decay",
          "must be >= 0 (0 switches it off).")
  require(is_number(config.batch_norm_momentum) and 0 <= config.batch_norm_momentum <= 1,
          "batch_norm_momentum", "the decay of the running averages must be in [0, 1], e.g. 0.9.")
  require(is_number(config.batch_norm_epsilon) and config.batch_norm_epsilon > 0,
          "batch_norm_epsilon", "must be > 0, e.g. 1e-5.")
  whitening = whitening_options(config)
  if whitening.get("method", "zca") not in ("zca", "pca", "cholesky", "iterative"):
    problems.append(f"config.whitening.method = {whitening['method']!r}: use one of zca, pca, "
                    "cholesky, iterative.")
  for field in ("group_size", "iterations"):
    value = whitening.get(field, 1)
    if not (is_int(value) and value >= 1):
      problems.append(f"config.whitening.{field} = {value!r}: must be an int >= 1.")
  for field in ("batch_size", "eval_batch_size"):
    size = config.get(field)
    if not (is_int(size) and size > 0):
      require(False, field, "must be a positive int, e.g. 64.")
    else:
      multiple = max(num_devices, -(-size // num_devices) * num_devices)
      require(size % num_devices == 0, field,
              f"the global batch is split evenly over the {num_devices} devices "
              f"(jax.device_count()), so it must be a multiple of {num_devices}; use e.g. "
              f"--config.{field}={multiple}.")
  if is_int(config.batch_size) and num_train_examples is not None:
    require(config.batch_size <= num_train_examples, "batch_size",
            f"larger than the {num_train_examples} training examples of {config.dataset}; use at "
            f"most {num_train_examples}.")
  require(is_int(config.num_epochs) and config.num_epochs >= 1, "num_epochs",
          "must be an int >= 1.")
  require(is_int(config.steps_per_epoch) and (config.steps_per_epoch == -1
                                              or config.steps_per_epoch >= 1),
          "steps_per_epoch", "must be -1 (one pass over the training set) or an int >= 1.")
  require(is_number(config.warmup_epochs) and config.warmup_epochs >= 0, "warmup_epochs",
          "must be >= 0.")
  require(is_int(config.seed), "seed", "must be an int.")
  require(is_number(config.test_fraction) and 0 < config.test_fraction < 1, "test_fraction",
          "the held-out fraction of the digits must be in (0, 1), e.g. 0.2.")
  require(is_int(config.log_every_steps) and config.log_every_steps >= 1, "log_every_steps",
          "must be an int >= 1.")
  require(is_int(config.checkpoint_every_epochs) and config.checkpoint_every_epochs >= 0,
          "checkpoint_every_epochs", "must be an int >= 0 (0: only at the end).")
  require(is_int(config.stop_at_step) and config.stop_at_step >= 0, "stop_at_step",
          "must be an int >= 0 (0: train to the end).")
  api = config.get("api", "linen")
  init_from = config.get("init_from", "")
  require(api in APIS, "api", f"unknown Flax API; use one of {', '.join(APIS)}, e.g. "
          "--config.api=nnx.")
  if api == "nnx":
    require(config.model == "CNN", "model",
            "the NNX path (config.api='nnx') builds the CNN only; use --config.model=CNN.")
    require(config.norm in NNX_NORMS, "norm",
            f"the NNX path (config.api='nnx') builds the CNN with {', '.join(NNX_NORMS)}.")
    require(all(n in NNX_NORMS for n in compare), "compare_norms",
            f"the NNX path (config.api='nnx') compares only {', '.join(NNX_NORMS)}.")
    require(not init_from, "init_from",
            "fine-tuning from a checkpoint is built for the linen path only; drop "
            "--config.api=nnx (or --config.init_from).")
  require(init_from is not None, "init_from",
          "this config fine-tunes a finished run: give its work directory, e.g. "
          "--config.init_from=workdir/default.")
  require(init_from is None or (isinstance(init_from, str)
                                and (not init_from or os.path.isdir(init_from))),
          "init_from", "must be \"\" (train from scratch) or the --workdir of a finished "
          "run, an existing directory.")
  if init_from:
    require(not compare, "compare_norms",
            "fine-tuning (config.init_from) starts from one run's checkpoint; use ().")
  dropout_rate = config.get("dropout_rate", 0.0)
  require(is_number(dropout_rate) and 0 <= dropout_rate < 1, "dropout_rate",
          "must be in [0, 1), e.g. --config.dropout_rate=0.3 (0: no dropout).")
  if is_number(dropout_rate) and dropout_rate > 0:
    require(config.model == "CNN" and api == "linen" and not init_from, "dropout_rate",
            "dropout is built into the linen CNN trained from scratch only; use 0.")
  batch_renorm = config.get("batch_renorm", False)
  require(isinstance(batch_renorm, bool), "batch_renorm", "must be True or False.")
  if batch_renorm is True:
    require(config.model == "CNN" and config.norm == "bnjax" and api == "linen" and not init_from
            and not compare, "batch_renorm",
            "Batch Renormalization is built into the linen CNN with norm='bnjax' trained from "
            "scratch only; use False.")
  log_drift = config.get("log_drift")
  require(log_drift is None or isinstance(log_drift, bool), "log_drift",
          "must be True, False or unset (logged wherever the run has bnjax.BatchNorm layers).")
  if log_drift is True:
    require(api == "linen" and config.norm == "bnjax" and not init_from
            and all(n == "bnjax" for n in compare), "log_drift",
            "drift is read from the batch moments that the linen bnjax.BatchNorm sows in "
            "training; bnjax.nnx.BatchNorm does not expose them, and other norms, the "
            "fine-tuning step (frozen batch norm) and a comparison with them have none to log; "
            "use --config.log_drift=False, or --config.api=linen --config.norm=bnjax.")
  accum = config.get("grad_accum_steps", 1)
  require(is_int(accum) and accum >= 1, "grad_accum_steps",
          "must be an int >= 1 (1: no gradient accumulation).")
  if is_int(accum) and accum > 1:
    if is_int(config.batch_size) and config.batch_size > 0:
      per_device = config.batch_size // num_devices if config.batch_size % num_devices == 0 else 0
      require(per_device > 0 and per_device % accum == 0, "grad_accum_steps",
              f"each of the {num_devices} devices splits its share of config.batch_size = "
              f"{config.batch_size} into {accum} equal micro-batches, so config.batch_size must "
              f"be a multiple of {accum * num_devices} (grad_accum_steps x devices).")
    stats_norms = ("flax", "whitening")  # Running statistics, but no sown moments to pool.
    require(api == "linen" and not init_from
            and all(n not in stats_norms for n in (config.norm, *compare)),
            "grad_accum_steps",
            "gradient accumulation is built into the linen step trained from scratch, with "
            "bnjax.BatchNorm (updated once per optimizer step from the pooled micro-batch "
            "statistics) or norms without running statistics; use 1.")
  precise = config.get("precise_stats_batches", 0)
  require(is_int(precise) and precise >= 0, "precise_stats_batches",
          "must be an int >= 0 (0: keep the running averages).")
  if is_int(precise) and precise > 0:
    require(config.norm == "bnjax" and api == "linen" and not compare, "precise_stats_batches",
            "precise statistics are recomputed for the linen model with norm='bnjax' only "
            "(no comparison); use 0.")
  for field in ("augment", "progress_bar", "fast_compile"):
    require(isinstance(config.get(field), bool), field, "must be True or False.")
  if problems:
    raise ConfigError("Invalid config; nothing was trained:\n  " + "\n  ".join(problems))


def logs_drift(config: ml_collections.ConfigDict) -> bool:
  """Whether a run logs the drift of its norm layers (``config.log_drift``, see configs/default.py).

  Unless it is False: on the linen path, with norm ``'bnjax'``, trained from scratch (the layers
  that sow their batch moments in a training step).
  """
  return (config.get("log_drift") is not False and config.get("api", "linen") == "linen"
          and config.norm == "bnjax" and not config.get("init_from"))


def whitening_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.whitening`` as keyword arguments of `bnjax.linen.WhiteningBatchNorm` ({} if absent)."""
  whitening = config.get("whitening")
  return {} if whitening is None else dict(whitening.to_dict())

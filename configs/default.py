r"""python -m bnjax_examples.main --config=configs/default.py --workdir=workdir/default

The default: the Flax MNIST CNN with `bnjax.BatchNorm` after every layer, on scikit-learn's bundled
8x8 handwritten digits (1,797 images, 20% held out by seed). It needs no download and reached
99.4% test accuracy in about 30 s on two CPU cores (20 epochs).

Override any field on the command line, e.g. ``--config.learning_rate=0.05`` or
``--config.norm=flax``. Append ``:smoke`` to the config path (``--config=configs/default.py:smoke``)
for a run of a few steps with a tiny model, as the tests do.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config; ``arg='smoke'`` shrinks it to a few steps (see `apply_smoke`)."""
  config = ml_collections.ConfigDict()

  # Data. `data_dir` is only read by the datasets that come from local files (mnist, cifar10).
  config.dataset = "digits"  # One of: digits, mnist, cifar10.
  config.data_dir = ""
  config.test_fraction = 0.2  # The held-out share of the digits, split by `seed`.
  config.augment = False  # Random crops and flips (for CIFAR-10).

  # Model.
  config.model = "CNN"  # One of: CNN, ResNet.
  config.cnn = ml_collections.ConfigDict({"features": (32, 64), "hidden": 256})
  config.resnet = ml_collections.ConfigDict({"stage_sizes": (2, 2, 2), "num_filters": 16})
  # One of: bnjax, flax (flax.linen.BatchNorm), whitening, layer, group, instance, rms (bnjax's
  # per-example norms, `bnjax_examples.models.PerExampleNorm`), none.
  config.norm = "bnjax"
  # The Flax API of the model: "linen", or "nnx" (flax.nnx layers with bnjax.nnx.BatchNorm, or
  # flax.nnx.BatchNorm for norm="flax"; the CNN with norm bnjax, flax or none).
  config.api = "linen"
  # For norm="whitening" (bnjax.linen.WhiteningBatchNorm): IterNorm on groups of 16 channels.
  # The hidden dense layer sees one row per example, so its groups need well under
  # batch_size channels (see the README's "Whitening" section).
  config.whitening = ml_collections.ConfigDict(
      {"method": "iterative", "group_size": 16, "iterations": 5})
  # Batch Renormalization in every bnjax.BatchNorm of the CNN, with Ioffe's schedule scaled to the
  # run's length (`bnjax_examples.steps.renorm_bounds`); False: batch norm.
  config.batch_renorm = False
  # Dropout before the classifier of the CNN (0: none).
  config.dropout_rate = 0.0
  # > 0: after training, replace the running statistics by the exact population statistics of
  # this many training batches (`bnjax.tools.precise_batch_stats`, dropout off) and report the
  # test accuracy before and after (workdir/precise_stats.json); 0: keep the running averages.
  config.precise_stats_batches = 0
  # Each step's drift of every bnjax.BatchNorm's batch statistics from its running statistics
  # (`bnjax.tools.linen_drift`), averaged per epoch into metrics.jsonl and plotted to drift.png.
  # Unset (None): logged wherever the run has bnjax.BatchNorm layers on the linen path; True:
  # required (the config check refuses a run that has none to log); False: off.
  config.log_drift = config_dict.placeholder(bool)
  # k > 1: split each batch into k micro-batches, accumulate their gradients and update every
  # bnjax.BatchNorm's running statistics once per optimizer step, with the pooled statistics of
  # the k micro-batches (`bnjax.tools.update_from_micro_batches`).
  config.grad_accum_steps = 1
  # Comparison mode: train once per entry and plot them together, e.g. ("bnjax", "none").
  config.compare_norms = ()
  # 0.9 rather than Flax's 0.99: with a few hundred steps, 0.99 leaves the running averages
  # (used at test time) far behind the weights.
  config.batch_norm_momentum = 0.9
  config.batch_norm_epsilon = 1e-5

  # Optimisation: SGD with Nesterov momentum, linear warm-up then cosine decay.
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.warmup_epochs = 1.0
  config.batch_size = 64  # Global: split over every device of every process.
  config.eval_batch_size = 128
  config.num_epochs = 20
  config.steps_per_epoch = -1  # -1: one pass over the training set; more than that is capped.
  config.seed = 0
  # Fine-tuning: the --workdir of a finished run whose newest checkpoint's params and batch_stats
  # start this run, with batch norm frozen (see configs/fine_tune.py). "": train from scratch.
  config.init_from = ""
  # On CPU, compile without LLVM optimisation: about half the compile time, a few times slower
  # steps. Worth it only for runs of a few steps (the smoke tests).
  config.fast_compile = False

  # Reporting and checkpoints.
  config.log_every_steps = 5  # How often the progress bar fetches the metrics.
  config.progress_bar = True
  config.checkpoint_every_epochs = 1  # 0: only at the end.
  config.stop_at_step = 0  # > 0: checkpoint and stop at this step (rerun to resume); 0: no stop.

  if arg:
    apply_option(config, arg)
  return config


def apply_option(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies the option after the ``:`` of ``--config=configs/<name>.py:<option>``.

  Raises:
    ValueError: if the option is unknown.
  """
  if arg != "smoke":
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke', as in "
                     "--config=configs/default.py:smoke.")
  return apply_smoke(config)


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to 3 epochs of 4 steps of a tiny model, compiled fast: seconds, for tests."""
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 3
  config.steps_per_epoch = 4
  config.warmup_epochs = 0.0
  config.cnn.features = (8, 16)
  config.cnn.hidden = 32
  config.resnet.stage_sizes = (1, 1)
  config.resnet.num_filters = 8
  config.log_every_steps = 1
  config.fast_compile = True
  return config

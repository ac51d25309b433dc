r"""python -m bnjax_examples.experiments --config=configs/experiments/batch_renorm.py \
    --workdir=workdir/experiments/batch_renorm

Claim 10: at small batches batch renorm fixes batch norm's train/test discrepancy: a ReLU MLP with
batch norm, batch renorm or group norm at batch m = 2, 4, 32, evaluated with EMA, precise and
test-batch statistics. ``:smoke`` runs one batch size for one epoch.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "batch_renorm"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.hidden = (100, 100)
  config.batch_sizes = (2, 4, 32)
  config.small_batches = (2, 4)  # Where the criterion asks batch renorm to help.
  config.epochs = 15  # The same for every m.
  config.learning_rate = 0.1  # At `reference_batch`, scaled linearly with m.
  config.reference_batch = 32
  config.momentum = 0.99
  config.groups = 10  # Group norm: 10 groups of 10 channels.
  # Ioffe's schedule (warm-up 5k steps, d_max 5 at 25k, r_max 3 at 40k) as fractions of the run.
  config.renorm_warmup = 0.05
  config.renorm_d_max_at = 0.15
  config.renorm_r_max_at = 0.25
  config.r_max = 3.0
  config.d_max = 5.0
  config.test_batch_multiple = 32  # Test accuracy over the first 352 of 359 test examples.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0,)
    config.hidden = (20,)
    config.batch_sizes = (4,)
    config.small_batches = (4,)
    config.epochs = 1
    config.groups = 4
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

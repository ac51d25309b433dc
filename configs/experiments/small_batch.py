r"""python -m bnjax_examples.experiments --config=configs/experiments/small_batch.py \
    --workdir=workdir/experiments/small_batch

Claim 8: small batches break batch norm, not group norm; batch noise regularises: (a) a ReLU MLP
with batch norm or group norm at batch m = 2 ... 64; (b) batch norm with ghost batches of 4 ... 256
inside a batch of 256 on 300 training examples. ``:smoke`` runs a tiny network for a few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "small_batch"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.hidden = (100, 100)
  config.momentum = 0.99
  # (a) Batch norm vs group norm.
  config.batch_sizes = (2, 4, 8, 16, 32, 64)
  config.epochs = 10  # The same for every m.
  config.learning_rate = 0.1  # At `reference_batch`, scaled with sqrt(m).
  config.reference_batch = 32
  config.groups = 4  # Group norm: 4 groups of 25 units.
  config.agree_from = 32  # Criterion (a): at m >= this, batch norm and group norm agree ...
  config.agree_points = 1.0  # ... within this many accuracy points.
  # (b) Ghost batches at a fixed total batch on a small training subset.
  config.ghost_train_examples = 300
  config.ghost_total_batch = 256
  config.ghost_sizes = (4, 16, 64, 256)  # 256: plain batch norm.
  config.ghost_steps = 400
  config.ghost_learning_rate = 0.1
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0, 1)
    config.hidden = (8,)
    config.batch_sizes = (4,)
    config.epochs = 1
    config.groups = 2
    config.ghost_train_examples = 64
    config.ghost_total_batch = 16
    config.ghost_sizes = (8,)
    config.ghost_steps = 4
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

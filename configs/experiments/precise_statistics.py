r"""python -m bnjax_examples.experiments --config=configs/experiments/precise_statistics.py \
    --workdir=workdir/experiments/precise_statistics

Claim 7: the EMA is a stale approximation, precise statistics are better: a ReLU MLP with batch
norm at batch 32 and 256, EMA at momentum 0.9/0.99/0.999, the cumulative average, and precise
statistics from n = 64, 256, 1024 and all training examples. ``:smoke`` runs one batch size for a
few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "precise_statistics"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2, 3, 4)
  config.hidden = (100, 100)
  config.batch_sizes = (32, 256)
  config.momenta = (0.9, 0.99, 0.999)
  config.sample_sizes = (64, 256, 1024, 0)  # 0: all training examples.
  config.learning_rate = 0.1  # Constant: the weights still move at the end.
  config.num_steps = 2000
  config.enough_samples = 1024  # Criterion (c): precise from this many samples ...
  config.enough_tolerance = 0.5  # ... within this many accuracy points of all examples.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0,)
    config.hidden = (16,)
    config.batch_sizes = (32,)
    config.sample_sizes = (64, 0)
    config.num_steps = 20
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

r"""python -m bnjax_examples.experiments --config=configs/experiments/unbiased_variance.py \
    --workdir=workdir/experiments/unbiased_variance

Claim 9: with the biased variance at inference a normalised unit has test-time std sqrt(m/(m-1)):
a ReLU MLP with batch norm trained at batch m = 2 ... 256, biased, unbiased and precise statistics.
``:smoke`` runs two batch sizes for a few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "unbiased_variance"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.hidden = (100, 100)
  config.batch_sizes = (2, 4, 8, 16, 32, 64, 128, 256)
  config.learning_rate = 0.05  # Cosine-decayed to zero, so the running averages catch up.
  config.num_steps = 1000
  config.momentum = 0.99  # Of the running averages: about 100 batches.
  config.tolerance = 0.02  # Relative, for the verdict.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0,)
    config.hidden = (16,)
    config.batch_sizes = (2, 8)
    config.num_steps = 20
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

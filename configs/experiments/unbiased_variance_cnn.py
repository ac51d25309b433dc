r"""python -m bnjax_examples.experiments --config=configs/experiments/unbiased_variance_cnn.py \
    --workdir=workdir/experiments/unbiased_variance_cnn

Claim 9, convolutions: the harness CNN with batch norm trained at N = 1, 2, 4, 8 images per batch
(m = N·H·W values per channel), biased, unbiased and precise statistics at test time. ``:smoke``
runs one image per batch for a few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "unbiased_variance_cnn"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.features = (8, 16)  # Two stages: 8x8 (m = 64·N), then 4x4 (m = 16·N).
  config.images_per_batch = (1, 2, 4, 8)
  config.learning_rate = 0.05  # Cosine-decayed to zero, so the running averages catch up.
  config.num_steps = 1000
  config.momentum = 0.99  # Of the running averages: about 100 batches.
  config.tolerance = 0.02  # Relative, for the verdict.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0,)
    config.features = (4, 4)
    config.images_per_batch = (1,)
    config.num_steps = 20
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

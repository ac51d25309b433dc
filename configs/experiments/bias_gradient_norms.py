r"""python -m bnjax_examples.experiments --config=configs/experiments/bias_gradient_norms.py \
    --workdir=workdir/experiments/bias_gradient_norms

Claim 3, other norms: which biases layer norm (over C; over H,W,C), group norm and instance norm
cancel, in float32 and float64, with the closed-form backward pass and autodiff. ``:smoke`` runs
one seed, float32, the closed form only, on a small batch.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "bias_gradient_norms"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.batch_size = 16
  config.channels = 8
  config.groups = 2  # Group norm: 2 groups of 4 channels.
  config.dtypes = ("float32", "float64")
  config.backwards = 2  # 1: bnjax's closed-form backward pass only; 2: also JAX's autodiff.
  config.not_cancelled_floor = 0.01  # A bias not cancelled must reach this gradient ratio.
  config.fast_compile = True  # Tiny programs, run once per seed: compile time dominates.
  if arg == "smoke":
    config.seeds = (0,)
    config.batch_size = 4
    config.dtypes = ("float32",)
    config.backwards = 1
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

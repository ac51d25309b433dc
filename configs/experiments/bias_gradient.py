r"""python -m bnjax_examples.experiments --config=configs/experiments/bias_gradient.py \
    --workdir=workdir/experiments/bias_gradient

Claim 3: a bias before batch norm gets zero gradient in training mode (float32 and float64, with a
mask, over 8 simulated devices), not in evaluation mode. ``:smoke`` runs one seed on a small batch.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "bias_gradient"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.batch_size = 64  # Divisible by the 8 devices.
  config.width = 32
  config.dtypes = ("float32", "float64")
  config.backwards = 2  # 1: bnjax's closed-form backward pass only; 2: also JAX's autodiff.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0,)
    config.batch_size = 16
    config.width = 8
    config.dtypes = ("float32",)
    config.backwards = 1
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

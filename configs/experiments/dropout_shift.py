r"""python -m bnjax_examples.experiments --config=configs/experiments/dropout_shift.py \
    --workdir=workdir/experiments/dropout_shift

Claim 6: dropout right before batch norm shifts the variance; recomputing the statistics with
dropout off fixes it: a ReLU MLP (dense -> dropout -> batch norm -> ReLU, three layers of 100) at
p = 0, 0.2, 0.5, and with dropout moved after the last batch norm. ``:smoke`` runs a tiny network
for a few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "dropout_shift"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2, 3, 4)
  config.hidden = (100, 100, 100)
  config.rates = (0.0, 0.2, 0.5)  # Drop rates p; 0 is the control.
  config.batch_size = 64
  config.epochs = 20
  config.learning_rate = 0.1
  config.cosine_decay = True  # So the EMA is not stale at the end (p = 0 is a clean control).
  config.momentum = 0.99
  config.mask_draws = 4  # Dropout masks averaged over when measuring the variance ratio.
  config.formula_tolerance = 0.02  # Criterion (a): measured within 2 % of the formula.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0, 1)
    config.hidden = (8,)
    config.rates = (0.0, 0.5)
    config.epochs = 1
    config.mask_draws = 2
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

r"""python -m bnjax_examples.experiments --config=configs/experiments/training_speed.py \
    --workdir=workdir/experiments/training_speed

Claim 1: batch norm trains faster and tolerates a wider range of learning rates: the paper's
sigmoid MLP (3 x 100, batch 60) on the digits, with and without batch norm, learning rates 0.03 to
30. ``:smoke`` runs a tiny network for a few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "training_speed"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.hidden = (100, 100, 100)
  config.batch_size = 60
  config.learning_rates = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
  config.num_steps = 1500
  config.eval_every = 5
  config.target_accuracy = 0.9
  config.momentum = 0.9  # Of the running averages, used at test time.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0,)
    config.hidden = (16, 16)
    config.learning_rates = (0.3, 3.0)
    config.num_steps = 40
    config.eval_every = 20
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

r"""python -m bnjax_examples.experiments --config=configs/experiments/stop_gradient.py \
    --workdir=workdir/experiments/stop_gradient

Claim 4: normalising outside the gradient (stop_gradient on the batch mean and variance) makes the
parameters blow up: ‖b‖, ‖W‖, loss and accuracy over training at two learning rates. ``:smoke``
runs a tiny network for a few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "stop_gradient"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.hidden = (100, 100)
  config.batch_size = 64
  config.learning_rates = (0.1, 1.0)
  config.num_steps = 2000
  config.eval_every = 50
  config.momentum = 0.9  # Of the running averages, used at test time.
  config.growth = 1.5  # For the verdict: "still growing" over the second half of training.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0,)
    config.hidden = (16,)
    config.num_steps = 40
    config.eval_every = 20
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

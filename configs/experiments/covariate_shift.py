r"""python -m bnjax_examples.experiments --config=configs/experiments/covariate_shift.py \
    --workdir=workdir/experiments/covariate_shift

Claim 2: is it internal covariate shift? A ReLU MLP without batch norm, with it, and with noise
redrawn every step after it: test accuracy, the drift of the layer inputs between consecutive
steps, and the loss and gradient along the gradient direction. ``:smoke`` runs a tiny MLP for two
short epochs.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "covariate_shift"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.hidden = (100, 100, 100, 100, 100)  # With the output layer: 6 dense layers.
  config.batch_size = 64
  config.learning_rate = 0.05
  config.epochs = 15  # Of 22 steps (1,438 training examples // 64).
  config.momentum = 0.9  # Of the running statistics, used at test time.
  config.noise_shift = 1.0  # shift ~ U(−a, a) per unit and step.
  config.noise_scale = 0.5  # scale ~ U(1 − b, 1 + b) per unit and step (mean 1).
  config.probe = 256  # Fixed training examples for the drift and the landscape.
  config.etas = (0.05, 0.1, 0.2, 0.4)  # Steps along the gradient.
  config.accuracy_tolerance = 0.01  # Part 1: noisy BN within 1 point of BN.
  config.smoothness_factor = 2.0  # Part 2: BN's loss range and gradient change 2× smaller.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0, 1)
    config.hidden = (8, 8)
    config.batch_size = 256  # 5 steps per epoch.
    config.epochs = 2
    config.probe = 32
    config.etas = (0.1, 0.4)
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

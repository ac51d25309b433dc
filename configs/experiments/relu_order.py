r"""python -m bnjax_examples.experiments --config=configs/experiments/relu_order.py \
    --workdir=workdir/experiments/relu_order

Claim 5: batch norm before vs after the ReLU (and none), MLP and a small CNN, 5 seeds, and the
post-ReLU mean and std the next layer sees against 0.399 and 0.584. ``:smoke`` runs tiny networks
for a few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "relu_order"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2, 3, 4)
  config.models = ("mlp", "cnn")
  config.hidden = (100, 100, 100)
  config.cnn_features = (8, 16)
  config.batch_size = 64
  config.learning_rate = 0.1
  config.num_steps = 2000  # MLP.
  config.cnn_num_steps = 1000
  config.eval_every = 50
  config.momentum = 0.9  # Of the running averages, used at test time.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.seeds = (0, 1)
    config.hidden = (16,)
    config.cnn_features = (4,)
    config.num_steps = 40
    config.cnn_num_steps = 40
    config.eval_every = 20
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

r"""python -m bnjax_examples.experiments --config=configs/experiments/whitening.py \
    --workdir=workdir/experiments/whitening

Claim 11: whitening (ZCA, IterNorm, PCA) vs batch norm in the harness CNN: test accuracy over 3
seeds, the channels' correlation after each normalisation, how much the whitening matrix changes
between batches, and the time of a training step. ``:smoke`` runs a tiny MLP for a few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  config = ml_collections.ConfigDict()
  config.experiment = "whitening"
  config.smoke = arg == "smoke"
  config.seeds = (0, 1, 2)
  config.model = "cnn"  # The harness CNN; 'mlp' (the smoke test's) compiles faster.
  config.features = (8, 16)  # CNN channels per stage (MLP: hidden widths).
  config.group_size = 16  # Every layer is whitened as one group.
  config.iterations = 5  # IterNorm's Newton–Schulz steps (its paper's default T).
  config.epsilon = 1e-5
  config.momentum = 0.9  # Of the running statistics, used at test time.
  config.batch_size = 64
  config.learning_rate = 0.1
  config.num_steps = 500
  config.eval_every = 50
  config.probe_batches = 8  # Consecutive training batches for the whitening-matrix change.
  config.timing_rounds = 7  # Interleaved rounds over the arms ...
  config.timing_steps = 20  # ... of this many training steps each.
  config.fast_compile = False  # True: compile without LLVM optimisation (see `harness.jit`).
  if arg == "smoke":
    config.model = "mlp"
    config.features = (6, 6)
    config.group_size = 4  # Two groups in the second layer, the last one smaller.
    config.num_steps = 10
    config.eval_every = 5
    config.probe_batches = 3
    config.timing_rounds = 2
    config.timing_steps = 2
    config.fast_compile = True
  elif arg:
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  return config

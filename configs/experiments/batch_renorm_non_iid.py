r"""python -m bnjax_examples.experiments --config=configs/experiments/batch_renorm_non_iid.py \
    --workdir=workdir/experiments/batch_renorm_non_iid

Claim 10, non-i.i.d. batches: batch norm, batch renorm and group norm at batch m = 4, each trained
with i.i.d. batches and with batches from two classes (m/2 examples each), EMA statistics.
``:smoke`` runs one epoch of a narrow network.
"""

import ml_collections

from configs.experiments import batch_renorm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with ``arg='smoke'`` a tiny version for the tests."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"Unknown config option {arg!r}; the only one is 'smoke'.")
  # The network, learning rate, momentum, groups and renorm schedule of `batch_renorm`.
  config = batch_renorm.get_config(arg)
  config.experiment = "batch_renorm_non_iid"
  config.seeds = (0, 1, 2, 3, 4)  # A paired difference over seeds: five for its standard error.
  config.batch_size = 4  # Even: two classes, m/2 examples each.
  del config.batch_sizes, config.small_batches, config.test_batch_multiple
  if arg == "smoke":
    config.seeds = (0,)
  return config

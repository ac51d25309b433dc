r"""python -m bnjax_examples.main --config=configs/renorm_small_batch.py --workdir=workdir/renorm

Batch Renormalization (Ioffe 2017) with batches of 4: the default CNN, every `bnjax.BatchNorm`
taking ``renorm_r_max``/``renorm_d_max`` from Ioffe's schedule with its step counts scaled to the
run's length (`bnjax_examples.steps.renorm_bounds`: batch norm for the first 1/16 of the steps,
``d_max`` reaching 5 at 5/16 and ``r_max`` reaching 3 at mid-run). The batch of 4 must split over
the devices: run it on one (or two, or four). ``:smoke`` shrinks it for tests (batch 8, one example
per simulated device).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config with batches of 4, Batch Renormalization and a smaller step."""
  config = default.get_config()
  config.batch_size = 4
  config.learning_rate = 0.01
  config.num_epochs = 5
  config.batch_renorm = True
  if arg:
    default.apply_option(config, arg)
    config.batch_size = 8
  return config

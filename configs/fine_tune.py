r"""python -m bnjax_examples.main --config=configs/fine_tune.py --workdir=workdir/fine_tune --config.init_from=workdir/default

Fine-tunes a finished run with frozen batch norm: the params and batch_stats of the newest
checkpoint in ``init_from`` (the --workdir of a run of ``configs/default.py``) start the run, every
norm layer normalises with its loaded running statistics and never updates them, and its
``scale``/``bias`` are left out of the optimizer (`bnjax.tools.norm_params_labels` with
``optax.multi_transform``); the convolutions and dense layers train, from a tenth of the default
learning rate, without warm-up, for 5 epochs. The model fields (``model``, ``norm``, ``cnn``,
``resnet``) must be those of the run in ``init_from``. ``:smoke`` shrinks it for tests (then
``init_from`` must be a smoke run too).
"""

import ml_collections
from ml_collections import config_dict

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config set up for fine-tuning; ``init_from`` is to be given."""
  config = default.get_config()
  # Required: --config.init_from=<workdir of the run to fine-tune> (None fails the config check).
  config.init_from = config_dict.placeholder(str)
  config.learning_rate = 0.01
  config.warmup_epochs = 0.0
  config.num_epochs = 5
  if arg:
    default.apply_option(config, arg)
  return config

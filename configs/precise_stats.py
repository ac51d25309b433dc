r"""python -m bnjax_examples.main --config=configs/precise_stats.py --workdir=workdir/precise_stats

Precise population statistics after training (Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
2021): the default CNN trained with dropout before its classifier, then every `bnjax.BatchNorm`
layer's running averages replaced by the exact mean and variance of what its input took over 16
training batches (1,024 examples) with dropout off (`bnjax.tools.precise_batch_stats`). The test
loss and accuracy before and after are logged and written to ``workdir/precise_stats.json``.
``:smoke`` shrinks it for tests.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config with dropout 0.3 and 16 batches of precise statistics."""
  config = default.get_config()
  config.dropout_rate = 0.3
  config.precise_stats_batches = 16
  if arg:
    default.apply_option(config, arg)
    config.precise_stats_batches = 2
  return config

r"""python -m bnjax_examples.main --config=configs/whitening.py --workdir=workdir/whitening

Batch norm against whitening: trains the default CNN twice, with `bnjax.BatchNorm` and with
`bnjax.linen.WhiteningBatchNorm` (IterNorm, groups of 16 channels, ``config.whitening``), each in
its own subdirectory of the work directory, and draws both on ``comparison.png``. Then

  python -m bnjax_examples.correlation --workdir=workdir/whitening

draws the channel correlations of a trained layer's normalised output (the next layer's input)
for both runs side by side, ``correlation.png``. Try ``--config.whitening.method=zca`` or
``--config.whitening.group_size=32``; ``:smoke`` shrinks it for tests.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config with ``compare_norms=('bnjax', 'whitening')``."""
  config = default.get_config()
  config.compare_norms = ("bnjax", "whitening")
  if arg:
    default.apply_option(config, arg)
  return config

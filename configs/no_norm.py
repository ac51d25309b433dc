r"""python -m bnjax_examples.main --config=configs/no_norm.py --workdir=workdir/no_norm

The baseline: the default config (CNN on the bundled digits) with no normalisation at all. The
layers get their biases back; everything else, the learning rate included, is the default's, so the
difference from ``configs/default.py`` is what batch norm does. ``:smoke`` shrinks it for tests.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config with ``norm='none'``."""
  config = default.get_config()
  config.norm = "none"
  if arg:
    default.apply_option(config, arg)
  return config

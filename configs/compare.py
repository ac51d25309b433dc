r"""python -m bnjax_examples.main --config=configs/compare.py --workdir=workdir/compare

Comparison mode: trains the default model twice, with `bnjax.BatchNorm` and without normalisation,
each in its own subdirectory of the work directory, and draws both on ``comparison.png``. Add
``flax.linen.BatchNorm`` with ``--config.compare_norms="('bnjax', 'flax', 'none')"``, or compare
the normalization family with
``--config.compare_norms="('bnjax', 'layer', 'group', 'instance', 'rms')"``.
``:smoke`` shrinks it for tests.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config with ``compare_norms=('bnjax', 'none')``."""
  config = default.get_config()
  config.compare_norms = ("bnjax", "none")
  if arg:
    default.apply_option(config, arg)
  return config

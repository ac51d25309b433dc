"""Tools around the batch-norm core.

Folding into the previous layer for inference (`fold_batch_norm`, `fold_batch_norms`), frozen batch
norm for fine-tuning (`norm_params_mask`,
`norm_params_labels`, `norm_layer_paths` for linen; `norm_params_filter`, `params_except_norms`
for NNX).

The folding tools import no flax; the freezing tools need flax and are imported on first use, so
`import bnjax.tools` alone does not import flax.
"""

import importlib
from typing import TYPE_CHECKING, Any

from bnjax.tools.fold import FoldPair as FoldPair
from bnjax.tools.fold import fold_batch_norm as fold_batch_norm
from bnjax.tools.fold import fold_batch_norms as fold_batch_norms

if TYPE_CHECKING:  # Served on first access (they import flax), typed for type checkers.
  from bnjax.tools.freeze import norm_layer_paths as norm_layer_paths
  from bnjax.tools.freeze import norm_params_filter as norm_params_filter
  from bnjax.tools.freeze import norm_params_labels as norm_params_labels
  from bnjax.tools.freeze import norm_params_mask as norm_params_mask
  from bnjax.tools.freeze import params_except_norms as params_except_norms

_FREEZE = ("norm_layer_paths", "norm_params_filter", "norm_params_labels", "norm_params_mask",
           "params_except_norms")

__all__ = [
  "FoldPair",
  "fold_batch_norm",
  "fold_batch_norms",
  "norm_layer_paths",
  "norm_params_filter",
  "norm_params_labels",
  "norm_params_mask",
  "params_except_norms",
]


def __getattr__(name: str) -> Any:
  if name in _FREEZE:
    return getattr(importlib.import_module("bnjax.tools.freeze"), name)
  raise AttributeError(f"module 'bnjax.tools' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_FREEZE))

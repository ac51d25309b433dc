"""Tools around the batch-norm core, for inference, fine-tuning and after training.

Folding into the previous layer for inference (`fold_batch_norm`, `fold_batch_norms`); frozen batch
norm for fine-tuning (`norm_params_mask`, `norm_params_labels`, `norm_layer_paths` for linen;
`norm_params_filter`, `params_except_norms` for NNX); precise population statistics after training
(`precise_batch_stats` for linen, `nnx_precise_batch_stats` for NNX; the building blocks
`population_moments`, `merge_population`, `population_state`); the Batch Renormalization schedule
(`renorm_schedule`); one update of the running statistics per optimizer step under gradient
accumulation (`update_from_micro_batches`, `pool_batch_stats`); drift of the batch statistics from
the running ones (`drift`; `linen_drift` and `nnx_drift` for every layer of a linen or NNX model;
`drift_summary` for a metrics log).

The folding, precise-statistics, schedule, accumulation and drift tools import no flax; the freezing
tools need flax and are imported on first use, so `import bnjax.tools` alone does not import flax.
"""

import importlib
from typing import TYPE_CHECKING, Any

from bnjax.tools.accumulate import pool_batch_stats as pool_batch_stats
from bnjax.tools.accumulate import update_from_micro_batches as update_from_micro_batches
from bnjax.tools.drift import DRIFT_COLLECTIONS as DRIFT_COLLECTIONS
from bnjax.tools.drift import Drift as Drift
from bnjax.tools.drift import drift as drift
from bnjax.tools.drift import drift_summary as drift_summary
from bnjax.tools.drift import linen_drift as linen_drift
from bnjax.tools.drift import nnx_drift as nnx_drift
from bnjax.tools.fold import FoldPair as FoldPair
from bnjax.tools.fold import fold_batch_norm as fold_batch_norm
from bnjax.tools.fold import fold_batch_norms as fold_batch_norms
from bnjax.tools.precise import merge_population as merge_population
from bnjax.tools.precise import nnx_precise_batch_stats as nnx_precise_batch_stats
from bnjax.tools.precise import population_moments as population_moments
from bnjax.tools.precise import population_state as population_state
from bnjax.tools.precise import precise_batch_stats as precise_batch_stats
from bnjax.tools.renorm import renorm_schedule as renorm_schedule

if TYPE_CHECKING:  # Served on first access (they import flax), typed for type checkers.
  from bnjax.tools.freeze import norm_layer_paths as norm_layer_paths
  from bnjax.tools.freeze import norm_params_filter as norm_params_filter
  from bnjax.tools.freeze import norm_params_labels as norm_params_labels
  from bnjax.tools.freeze import norm_params_mask as norm_params_mask
  from bnjax.tools.freeze import params_except_norms as params_except_norms

_FREEZE = ("norm_layer_paths", "norm_params_filter", "norm_params_labels", "norm_params_mask",
           "params_except_norms")

__all__ = [
  "DRIFT_COLLECTIONS",
  "Drift",
  "FoldPair",
  "drift",
  "drift_summary",
  "fold_batch_norm",
  "fold_batch_norms",
  "linen_drift",
  "merge_population",
  "nnx_drift",
  "nnx_precise_batch_stats",
  "norm_layer_paths",
  "norm_params_filter",
  "norm_params_labels",
  "norm_params_mask",
  "params_except_norms",
  "pool_batch_stats",
  "population_moments",
  "population_state",
  "precise_batch_stats",
  "renorm_schedule",
  "update_from_micro_batches",
]


def __getattr__(name: str) -> Any:
  if name in _FREEZE:
    return getattr(importlib.import_module("bnjax.tools.freeze"), name)
  raise AttributeError(f"module 'bnjax.tools' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_FREEZE))

"""bnjax: exact, fast normalization for JAX and Flax.

The pure core (`batch_norm`, `init`, the pytrees) needs only JAX; the Flax wrappers live in
`bnjax.linen` (and `bnjax.nnx`) and are imported on first use, so ``import bnjax`` does not
import Flax. `bnjax.BatchNorm` is the documented alias of `bnjax.linen.BatchNorm`.
"""

import importlib
from typing import TYPE_CHECKING, Any

from bnjax.functional import batch_norm as batch_norm
from bnjax.functional import from_torch_momentum as from_torch_momentum
from bnjax.functional import init as init
from bnjax.functional import update_running_stats as update_running_stats
from bnjax.norms import group_norm as group_norm
from bnjax.norms import init_params as init_params
from bnjax.norms import instance_norm as instance_norm
from bnjax.norms import layer_norm as layer_norm
from bnjax.norms import rms_norm as rms_norm
from bnjax.types import BatchNormParams as BatchNormParams
from bnjax.types import BatchNormState as BatchNormState
from bnjax.types import BatchStats as BatchStats
from bnjax.types import CumulativeState as CumulativeState
from bnjax.whitening import WhiteningState as WhiteningState
from bnjax.whitening import WhiteningStats as WhiteningStats
from bnjax.whitening import init_whitening as init_whitening
from bnjax.whitening import whitening_batch_norm as whitening_batch_norm

if TYPE_CHECKING:  # What the lazy names are, for type checkers.
  from bnjax import interop as interop
  from bnjax import linen as linen
  from bnjax import nnx as nnx
  from bnjax import tools as tools
  from bnjax.linen import BatchNorm as BatchNorm
  from bnjax.linen import WhiteningBatchNorm as WhiteningBatchNorm

__version__ = "0.1.0"

# Names served on first access, so that the pure core never imports Flax.
_LAZY = {"BatchNorm": ("bnjax.linen", "BatchNorm"),
         "WhiteningBatchNorm": ("bnjax.linen", "WhiteningBatchNorm")}
_SUBMODULES = ("interop", "linen", "nnx", "tools")

__all__ = [
    "BatchNorm",
    "BatchNormParams",
    "BatchNormState",
    "BatchStats",
    "CumulativeState",
    "WhiteningBatchNorm",
    "WhiteningState",
    "WhiteningStats",
    "batch_norm",
    "from_torch_momentum",
    "group_norm",
    "init",
    "init_params",
    "init_whitening",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    "update_running_stats",
    "whitening_batch_norm",
]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"bnjax.{name}")
  else:
    raise AttributeError(f"module 'bnjax' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))

"""One batch-norm layer's variables as `BatchNormParams`/`BatchNormState`.

From either those NamedTuples or the dicts a Flax variable tree holds (``{'scale', 'bias'}``,
``{'mean', 'var'}``).

Imports no flax: the deployment and interop tools use it.
"""

from collections.abc import Mapping
from typing import Any

from bnjax.types import BatchNormParams
from bnjax.types import BatchNormState


def as_params(params: Any, where: str) -> BatchNormParams:
  """``BatchNormParams`` from itself, a mapping with optional ``scale``/``bias``, or None."""
  if params is None:
    return BatchNormParams(None, None)
  if isinstance(params, BatchNormParams):
    return params
  if isinstance(params, Mapping):
    unknown = set(params) - {"scale", "bias"}
    if unknown:
      raise ValueError(f"{where}: `params` may hold only 'scale' and 'bias'; got extra keys "
                       f"{sorted(unknown)}.")
    return BatchNormParams(params.get("scale"), params.get("bias"))
  raise TypeError(f"{where}: `params` must be a BatchNormParams, a dict with 'scale'/'bias' (a "
                  f"linen layer's params) or None; got {type(params).__name__}.")


def as_state(state: Any, where: str) -> BatchNormState:
  """``BatchNormState`` from itself or a mapping with ``mean`` and ``var``."""
  if isinstance(state, BatchNormState):
    return state
  if isinstance(state, Mapping):
    if set(state) != {"mean", "var"}:
      raise ValueError(f"{where}: `state` must hold exactly 'mean' and 'var' (a linen layer's "
                       f"batch_stats); got keys {sorted(state)}.")
    return BatchNormState(state["mean"], state["var"])
  raise TypeError(f"{where}: `state` must be a BatchNormState or a dict with 'mean' and 'var' (a "
                  f"linen layer's batch_stats); got {type(state).__name__}.")

"""The batch moments every `bnjax.nnx.BatchNorm` of an NNX model measures in one training-mode call.

Shared by `bnjax.tools.nnx_precise_batch_stats` and `bnjax.tools.nnx_drift`: the call runs on a copy
of the model (``nnx.split`` / ``nnx.merge`` under one ``jax.jit``), so the model itself is not
changed, and the moments are collected with ``nnx.capture(..., bnjax.nnx.BatchMoments)``. flax is
imported only when these functions run.
"""

from collections.abc import Mapping
import functools
from typing import Any

import jax


def norm_layers(model: Any, where: str) -> dict[tuple[Any, ...], Any]:
  """``{path: layer}`` for every `bnjax.nnx.BatchNorm` in an NNX model."""
  from flax import nnx

  from bnjax import nnx as bnjax_nnx

  if not isinstance(model, nnx.Module):
    raise TypeError(f"bnjax.tools.{where}: `model` must be an nnx.Module; got "
                    f"{type(model).__name__}.")
  return {path: module for path, module in nnx.iter_modules(model)
          if isinstance(module, bnjax_nnx.BatchNorm)}


def split_call_kwargs(call_kwargs: Mapping[str, Any]
                      ) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
  """Hashable keyword arguments (static, sorted items) and the rest (traced)."""
  static, traced = [], {}
  for name, value in sorted(call_kwargs.items()):
    try:
      hash(value)
    except TypeError:
      traced[name] = value
    else:
      static.append((name, value))
  return tuple(static), traced


@functools.partial(jax.jit, static_argnums=(0, 1))
def measure(graphdef: Any, static_kwargs: tuple[tuple[str, Any], ...], rng_state: Any,
            other_state: Any, batch: Any, traced_kwargs: Mapping[str, Any]
            ) -> tuple[dict[Any, Any], Any]:
  """One training-mode call of a copy of the model: its sown moments and advanced random state."""
  from flax import nnx

  from bnjax import nnx as bnjax_nnx

  model = nnx.merge(graphdef, rng_state, other_state)
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "use_running_average"):
      setattr(module, "use_running_average", False)  # noqa: B010  (any norm layer's switch)

  def call(module: Any, batch: Any) -> Any:
    return module(batch, **dict(static_kwargs), **traced_kwargs)

  _, sown = nnx.capture(call, bnjax_nnx.BatchMoments)(model, batch)
  return nnx.to_pure_dict(sown), nnx.state(model, nnx.RngState)

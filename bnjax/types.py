"""Pytrees for batch-norm parameters, running statistics and batch statistics."""

from typing import NamedTuple

import jax

__all__ = ["BatchNormParams", "BatchNormState", "BatchStats"]


class BatchNormParams(NamedTuple):
  """The learned affine part, ``y = scale * x_hat + bias``.

  Either field may be ``None`` to switch that half of the affine transform off (PyTorch's
  ``affine=False`` is ``BatchNormParams(None, None)``).
  """

  #: γ, of the feature shape; the parameter dtype (float32 by default), or None.
  scale: jax.Array | None
  #: β, of the feature shape; the parameter dtype (float32 by default), or None.
  bias: jax.Array | None


class BatchNormState(NamedTuple):
  """Exponential running averages of the batch statistics, used at test time."""

  #: Running mean, of the feature shape; float32 from `bnjax.init`; starts at 0.
  mean: jax.Array
  #: Running (biased, or with ``unbiased_running_var`` unbiased) variance; starts at 1.
  var: jax.Array


class BatchStats(NamedTuple):
  """What one training step measured, returned by ``batch_norm(..., return_stats=True)``.

  Every field is global: combined over ``axis_name`` when one is given.
  """

  #: Batch mean, of the feature shape; float32 (float64 for float64 input).
  mean: jax.Array
  #: Biased batch variance (÷ count), of the feature shape; same dtype as ``mean``.
  var: jax.Array
  #: Number of valid values per channel; int32 (int64 under ``jax_enable_x64``), exact.
  count: jax.Array
  #: bool; False where the running statistics were kept (non-finite or no valid value).
  updated: jax.Array

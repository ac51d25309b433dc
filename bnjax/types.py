"""Pytrees for batch-norm parameters, running statistics and batch statistics."""

from typing import NamedTuple

import jax

__all__ = ["BatchNormParams", "BatchNormState", "BatchStats"]


class BatchNormParams(NamedTuple):
  """The learned affine part, ``y = scale * x_hat + bias``.

  Either field may be ``None`` to switch that half of the affine transform off
  (``affine=False`` in the lecture's terms is ``BatchNormParams(None, None)``).
  """

  scale: jax.Array | None  # shape=feature_shape, dtype=param dtype (float32 by default); γ.
  bias: jax.Array | None  # shape=feature_shape, dtype=param dtype (float32 by default); β.


class BatchNormState(NamedTuple):
  """Exponential running averages of the batch statistics, used at test time."""

  mean: jax.Array  # shape=feature_shape, dtype=float32; starts at 0.
  var: jax.Array  # shape=feature_shape, dtype=float32; starts at 1.


class BatchStats(NamedTuple):
  """What one training step measured, returned by ``batch_norm(..., return_stats=True)``.

  Every field is global: combined over ``axis_name`` when one is given.
  """

  mean: jax.Array  # shape=feature_shape, dtype=float32 (float64 for float64 input); batch mean.
  var: jax.Array  # shape=feature_shape, same dtype; biased batch variance (÷ count).
  count: jax.Array  # shape=feature_shape, same dtype; number of valid values per channel.
  updated: jax.Array  # shape=feature_shape, dtype=bool; False where the running statistics were kept.

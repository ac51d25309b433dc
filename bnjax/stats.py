"""Batch moments: the one place bnjax computes statistics.

Moments are kept in a shifted form, ``mean = pivot + delta``, where ``pivot`` is one valid value of
the channel taken from the data (under `stop_gradient`). Then

* ``x - pivot`` is exact in floating point for data far from zero (a mean offset of 1e6 standard
  deviations in float32 loses nothing), and ``(x - pivot) - delta`` centres the data without ever
  rounding the mean to the input's precision;
* a constant channel gives ``x - pivot == 0`` exactly, so its variance is exactly 0 and its output
  exactly ``bias``;
* ``delta`` and the centred second moment ``m2`` are computed in two passes over the shifted data,
  so no large sums cancel (unlike the fast ``E[x^2] - E[x]^2``).

Masked-out values are replaced before any arithmetic, so NaN or Inf there reach neither the
statistics nor any gradient.
"""

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


class Moments(NamedTuple):
  """Per-channel moments of the valid values; every field has the shape of `x` with reduced axes kept as 1."""

  count: jax.Array  # number of valid values, in the statistics dtype.
  pivot: jax.Array  # one valid value of the channel (0 where there is none); no gradient.
  delta: jax.Array  # mean - pivot.
  m2: jax.Array  # sum over valid values of (x - mean)^2.

  @property
  def mean(self) -> jax.Array:
    return self.pivot + self.delta

  @property
  def var(self) -> jax.Array:
    """The biased variance, m2 / count (0 where count is 0)."""
    return self.m2 / jnp.maximum(self.count, 1)


def _first_valid(x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...]) -> jax.Array:
  """One value per channel at the first valid position, with reduced axes kept as size 1.

  The position is found on the mask's own (un-broadcast) shape, so this costs a gather of one
  value per channel plus an argmax over the mask, never a pass over `x`.
  """
  ndim = x.ndim
  varying = [a for a in reduce_axes if mask is not None and mask.shape[a] > 1]
  index = []
  if varying:
    others = [a for a in range(ndim) if a not in varying]
    flat = jnp.transpose(mask, varying + others).reshape((-1,) + tuple(mask.shape[a] for a in others))
    first = jnp.argmax(flat, axis=0)  # shape: mask's other axes.
    coords = jnp.unravel_index(first, tuple(mask.shape[a] for a in varying))
    full_shape = tuple(1 if a in varying else mask.shape[a] for a in range(ndim))
    coord_of = {a: c.reshape(full_shape) for a, c in zip(varying, coords)}
  for a in range(ndim):
    if a in reduce_axes:
      index.append(coord_of[a] if a in varying else jnp.zeros((1,) * ndim, jnp.int32))
    else:
      index.append(lax.broadcasted_iota(jnp.int32, tuple(x.shape[a] if b == a else 1
                                                         for b in range(ndim)), a))
  return x[tuple(index)]


def local_moments(x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...]) -> Moments:
  """Moments of `x` over `reduce_axes`, counting only positions where `mask` is True.

  Args:
    x: array in the statistics dtype (at least float32).
    mask: None, or a bool array of `x`'s rank whose dimensions are 1 or `x`'s size.
    reduce_axes: the axes to reduce over.

  Returns:
    `Moments` with every field of `x`'s rank, size 1 along `reduce_axes`.
  """
  pivot = lax.stop_gradient(_first_valid(x, mask, reduce_axes))
  pivot = jnp.where(jnp.isfinite(pivot), pivot, jnp.zeros_like(pivot))
  if mask is None:
    count = np.prod([x.shape[a] for a in reduce_axes])
    count = jnp.full(pivot.shape, count, x.dtype)
    shifted = x - pivot
  else:
    repeats = int(np.prod([x.shape[a] for a in reduce_axes if mask.shape[a] == 1]))
    count = jnp.sum(mask, axis=reduce_axes, keepdims=True, dtype=x.dtype) * repeats
    count = jnp.broadcast_to(count, pivot.shape)
    shifted = jnp.where(mask, x - pivot, jnp.zeros((), x.dtype))
  delta = jnp.sum(shifted, axis=reduce_axes, keepdims=True) / jnp.maximum(count, 1)
  centred = shifted - delta
  if mask is not None:
    centred = jnp.where(mask, centred, jnp.zeros((), x.dtype))
  m2 = jnp.sum(centred * centred, axis=reduce_axes, keepdims=True)
  return Moments(count, pivot, delta, m2)

"""Batch moments: the one place bnjax computes statistics.

Moments are kept in a shifted form, ``mean = pivot + delta``, where ``pivot`` comes from the data
itself (under `stop_gradient`): the mean of the first 1, 2, 4 or 8 values of each channel, or with a
mask its first valid value. Then

* ``x - pivot`` is exact in floating point for data far from zero (a mean offset of 1e6 standard
  deviations in float32 loses nothing), and ``(x - pivot) - delta`` centres the data without ever
  rounding the mean to the input's precision;
* a constant channel gives ``x - pivot == 0`` exactly, so its variance is exactly 0 and its output
  exactly ``bias``;
* one pass sums ``d = x - pivot`` and ``d * d``; as the pivot is close to the mean, the centred sum
  of squares ``sum(d * d) - sum(d)**2 / n`` loses almost nothing (unlike the fast
  ``E[x^2] - E[x]^2``, which cancels the whole offset). Where the pivot happens to sit far from the
  mean, an exact second pass ``sum((d - delta) ** 2)`` runs instead.

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


def _first_valid(x: jax.Array, mask: jax.Array, reduce_axes: tuple[int, ...]) -> jax.Array:
  """One value per channel at the first valid position, with reduced axes kept as size 1.

  The position is found on the mask's own (un-broadcast) shape, so this costs a gather of one
  value per channel plus an argmax over the mask, never a pass over `x`.
  """
  ndim = x.ndim
  varying = [a for a in reduce_axes if mask.shape[a] > 1]
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


def _sharded_along(x: jax.Array, axes: tuple[int, ...]) -> bool:
  """Whether `x`'s type says it is explicitly sharded along any of `axes` (explicit mesh axes)."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(a < len(spec) and spec[a] is not None for a in axes)


def _first_valid_by_reduction(x: jax.Array, mask: jax.Array | None,
                              reduce_axes: tuple[int, ...]) -> jax.Array:
  """`_first_valid` for inputs explicitly sharded along a reduced axis, where slicing and gathers
  of a few rows are not allowed: the value is selected by a sum of one value and zeros (exact)."""
  linear = jnp.zeros((1,) * x.ndim, jnp.int32)
  for a in reduce_axes:
    iota = lax.broadcasted_iota(jnp.int32, tuple(x.shape[a] if b == a else 1
                                                 for b in range(x.ndim)), a)
    linear = linear * x.shape[a] + iota
  if mask is None:
    chosen = linear == 0
  else:
    candidates = jnp.where(mask, linear, jnp.iinfo(jnp.int32).max)
    chosen = linear == jnp.min(candidates, axis=reduce_axes, keepdims=True)
  return jnp.sum(jnp.where(chosen, x, jnp.zeros((), x.dtype)), axis=reduce_axes, keepdims=True)


def _leading_mean(x: jax.Array, reduce_axes: tuple[int, ...]) -> jax.Array:
  """The mean of the first 1, 2, 4 or 8 values along the first reduced axis, by pairwise sums.

  Pairwise sums of equal values and the final power-of-two scaling are exact, so for a constant
  channel this is exactly the constant; for other data it is a pivot a few times closer to the
  mean (in standard deviations) than a single value.
  """
  axis = reduce_axes[0]
  k = 1
  while k * 2 <= min(8, x.shape[axis]):
    k *= 2
  start = [0] * x.ndim
  limit = [1 if a in reduce_axes else x.shape[a] for a in range(x.ndim)]
  limit[axis] = k
  values = lax.slice(x, start, limit)
  while values.shape[axis] > 1:
    half = values.shape[axis] // 2
    values = (lax.slice_in_dim(values, 0, half, axis=axis)
              + lax.slice_in_dim(values, half, 2 * half, axis=axis))
  return values * jnp.asarray(1.0 / k, x.dtype)


# The one-pass variance m2 = sum(d^2) - sum(d)^2 / n of d = x - pivot loses about
# log2(sum(d^2) / m2) bits. Up to this ratio (a pivot within ~4 standard deviations of the mean) it
# is accepted; past it a better pivot, or an exact second pass, is used.
MAX_CANCELLATION = 16.0


def _one_pass(shifted: jax.Array, count: jax.Array, reduce_axes: tuple[int, ...]):
  """(delta, m2, precise) from the sums of `shifted` and its square, read in one pass."""
  zero = jnp.zeros((), shifted.dtype)
  sum_d = jnp.sum(shifted, axis=reduce_axes, keepdims=True)
  sum_dd = jnp.sum(shifted * shifted, axis=reduce_axes, keepdims=True)
  delta = sum_d / jnp.maximum(count, 1)
  m2 = jnp.maximum(sum_dd - sum_d * delta, zero)
  precise = jnp.all(sum_dd <= MAX_CANCELLATION * m2)  # False for NaN, so NaN takes the exact path.
  return delta, m2, precise


def _shifted_moments(x, mask, reduce_axes, pivot, count):
  """(delta, m2) around a data pivot: one pass, and an exact second pass if the pivot is far."""
  zero = jnp.zeros((), x.dtype)
  shifted = x - pivot if mask is None else jnp.where(mask, x - pivot, zero)
  delta, m2_one_pass, precise = _one_pass(shifted, count, reduce_axes)

  def two_pass(_):
    centred = (x - pivot) - delta  # From x again, so that `shifted` is never written out.
    if mask is not None:
      centred = jnp.where(mask, centred, zero)
    return jnp.sum(centred * centred, axis=reduce_axes, keepdims=True)

  return delta, lax.cond(precise, lambda _: m2_one_pass, two_pass, None)


def local_moments(x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...]) -> Moments:
  """Moments of `x` over `reduce_axes`, counting only positions where `mask` is True.

  Without a mask, the raw sums ``sum(x)`` and ``sum(x * x)`` are tried first (pivot 0): XLA:CPU's
  fused reductions read them straight from ``x``, and they are exact enough whenever the mean is
  within ~4 standard deviations of 0 in every channel, as for most activations. Otherwise, and
  with a mask, the sums are shifted by a pivot taken from the data, with an exact second pass if
  that pivot is far from the mean (`lax.cond`: on CPU and GPU only the taken branch runs).

  Args:
    x: array in the statistics dtype (at least float32).
    mask: None, or a bool array of `x`'s rank whose dimensions are 1 or `x`'s size.
    reduce_axes: the axes to reduce over.

  Returns:
    `Moments` with every field of `x`'s rank, size 1 along `reduce_axes`.
  """
  keep_shape = tuple(1 if a in reduce_axes else x.shape[a] for a in range(x.ndim))
  if mask is None:
    count = jnp.full(keep_shape, np.prod([x.shape[a] for a in reduce_axes]), x.dtype)
  else:
    repeats = int(np.prod([x.shape[a] for a in reduce_axes if mask.shape[a] == 1]))
    count = jnp.sum(mask, axis=reduce_axes, keepdims=True, dtype=x.dtype) * repeats
    count = jnp.broadcast_to(count, keep_shape)

  def data_pivot(_):
    if _sharded_along(x, reduce_axes):
      pivot = _first_valid_by_reduction(x, mask, reduce_axes)
    elif mask is None:
      pivot = _leading_mean(x, reduce_axes)
    else:
      pivot = _first_valid(x, mask, reduce_axes)
    pivot = lax.stop_gradient(pivot)
    pivot = jnp.where(jnp.isfinite(pivot), pivot, jnp.zeros_like(pivot))
    return (pivot, *_shifted_moments(x, mask, reduce_axes, pivot, count))

  if mask is not None:
    return Moments(count, *data_pivot(None))
  delta, m2, precise = _one_pass(x, count, reduce_axes)
  # A zero pivot typed like `delta` (under `shard_map`, varying over the same mesh axes).
  zero = jnp.where(jnp.zeros(keep_shape, bool), delta, jnp.zeros((), x.dtype))
  zero_pivot = lambda _: (zero, delta, m2)
  return Moments(count, *lax.cond(precise, zero_pivot, data_pivot, None))

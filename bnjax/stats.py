"""Moments: the one place bnjax computes statistics.

Moments are kept in a shifted form, ``mean = pivot + delta``, where ``pivot`` comes from the data
itself (under `stop_gradient`): the mean of the first 1, 2, 4 or 8 values of each channel, or with a
mask its first valid value. Then

* ``x - pivot`` is exact in floating point for data far from zero (a mean offset of 1e6 standard
  deviations in float32 loses nothing), and ``(x - pivot) - delta`` centres the data without ever
  rounding the mean to the input's precision;
* a constant channel gives ``x - pivot == 0`` exactly, so its variance is exactly 0 and its output
  exactly ``bias``;
* one pass sums ``d = x - pivot`` and ``d * d``. The centred sum of squares
  ``m2 = sum(d * d) - sum(d) ** 2 / n`` then loses ``log2(sum(d * d) / m2) = log2(1 + k**2)`` bits
  when the pivot is ``k`` standard deviations from the mean (the fast ``E[x^2] - E[x]^2`` of Flax
  is the case ``pivot = 0``, which cancels the whole offset).

Two routes use these sums (see `local_moments`):

* ``"adaptive"``: raw sums first (pivot 0: on XLA:CPU the cheapest reductions, read straight from
  ``x``), then a data pivot, then an exact second pass, each taken only when the one before would
  lose more than ``log2(MAX_CANCELLATION)`` bits, chosen with `lax.cond`. Exact for any data.
* ``"one_pass"``: one pass shifted by the data pivot and no data-dependent control flow: what
  accelerators and `vmap` prefer. Its loss is at most ``log2(1 + k**2)`` bits, ``k`` the pivot's
  distance from the mean in standard deviations (about 1 bit for i.i.d. rows).

``"auto"`` takes the adaptive route on CPU and the one-pass route on GPU and TPU
(`lax.platform_dependent`) and under `vmap` (`jax.custom_batching.custom_vmap`), where a `lax.cond`
would run every branch.

Masked-out values are replaced before any arithmetic, so NaN or Inf there reach neither the
statistics nor any gradient. Counts are integers (int32; int64 with ``jax_enable_x64``), exact.

Moments of several parts of a batch (devices, ghost batches, micro-batches, a stream of batches)
merge exactly with `merge_moments` (Chan et al.'s pairwise formula, weighted by counts), or, when
all parts share a pivot, through their power sums (`power_sums`, `from_power_sums`): the form the
cross-device combine reduces with one all-reduce.
"""

from collections.abc import Callable
import math
from typing import Any, NamedTuple

import jax
from jax import lax
from jax.custom_batching import custom_vmap
import jax.numpy as jnp

# The one-pass centred sum of squares m2 = sum(d^2) - sum(d)^2 / n of d = x - pivot loses about
# log2(sum(d^2) / m2) bits. Up to this ratio (a pivot within sqrt(15) ~ 3.9 standard deviations of
# the mean, at most 4 bits) it is accepted; past it the adaptive route uses a better pivot, or an
# exact second pass.
MAX_CANCELLATION = 16.0

ROUTES = ("auto", "adaptive", "one_pass")


class Moments(NamedTuple):
  """Per-channel moments of the valid values.

  Every field has the shape of `x` with the reduced axes kept as size 1.
  """

  count: jax.Array  # number of valid values; int32 (int64 under x64).
  pivot: jax.Array  # a reference value near the mean (0 where there is no data); no gradient.
  delta: jax.Array  # mean - pivot, in the statistics dtype.
  m2: jax.Array  # sum over valid values of (x - mean)^2, in the statistics dtype.

  @property
  def mean(self) -> jax.Array:
    """The mean, ``pivot + delta``."""
    return self.pivot + self.delta

  @property
  def var(self) -> jax.Array:
    """The biased variance, m2 / count (0 where count is 0)."""
    return self.m2 / jnp.maximum(self.count, 1).astype(self.m2.dtype)


def count_dtype() -> Any:
  """The integer dtype of counts: int32, or int64 when ``jax_enable_x64`` is set."""
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.int64))


def is_precise(sum_sq: jax.Array, centred_sq: jax.Array) -> jax.Array:
  """Whether a one-pass ``centred_sq = sum_sq - (sum)**2 / n`` is precise enough.

  Precise: at most log2(MAX_CANCELLATION) bits lost. A scalar bool over all channels; False
  where either is NaN, so NaN takes the careful path.
  """
  return jnp.all(sum_sq <= MAX_CANCELLATION * centred_sq)


# ----------------------------------------------------------------------------- pivots


def _first_valid(x: jax.Array, mask: jax.Array, reduce_axes: tuple[int, ...]) -> jax.Array:
  """One value per channel at the first valid position, with reduced axes kept as size 1.

  The position is found on the mask's own (un-broadcast) shape, so this costs a gather of one
  value per channel plus an argmax over the mask, never a pass over `x`.
  """
  ndim = x.ndim
  varying = [a for a in reduce_axes if mask.shape[a] > 1]
  coord_of = {}
  if varying:
    others = [a for a in range(ndim) if a not in varying]
    flat = jnp.transpose(mask, varying + others).reshape(
        (-1, *tuple(mask.shape[a] for a in others)))
    first = jnp.argmax(flat, axis=0)  # shape: mask's other axes.
    coords = jnp.unravel_index(first, tuple(mask.shape[a] for a in varying))
    full_shape = tuple(1 if a in varying else mask.shape[a] for a in range(ndim))
    coord_of = {a: c.reshape(full_shape) for a, c in zip(varying, coords, strict=True)}
  index = []
  for a in range(ndim):
    if a in reduce_axes:
      index.append(coord_of[a] if a in varying else jnp.zeros((1,) * ndim, jnp.int32))
    else:
      index.append(lax.broadcasted_iota(jnp.int32, tuple(x.shape[a] if b == a else 1
                                                         for b in range(ndim)), a))
  return x[tuple(index)]


def align(value: jax.Array, like: jax.Array) -> jax.Array:
  """`value` resharded to `like`'s sharding along the dimensions they share.

  Only where the types carry Explicit mesh axes (`jax.make_mesh`'s default), so that
  `jnp.where` and friends accept them together; a no-op everywhere else. Both have the same
  rank; dimensions of `value` that are 1 while `like`'s are not stay unsharded.
  """
  sharding = getattr(jax.typeof(like), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if sharding is None or spec is None or all(s is None for s in spec):
    return value
  target = tuple(s if value.shape[d] == like.shape[d] else None for d, s in enumerate(spec))
  current = getattr(getattr(jax.typeof(value), "sharding", None), "spec", None)
  if current is not None and tuple(current) + (None,) * (value.ndim - len(current)) == target:
    return value
  return jax.sharding.reshard(value, jax.sharding.NamedSharding(sharding.mesh,
                                                                jax.sharding.PartitionSpec(*target)))


def _on_a_mesh(x: jax.Array) -> bool:
  """Whether `x`'s type places it on a mesh of several devices.

  That is sharded `jit`, with Auto or Explicit axes, where gathering a few leading rows would
  move data between devices (or, with Explicit axes, is a type error): there the pivot is
  selected by a reduction instead.
  """
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or getattr(mesh, "empty", True):
    return False
  return any(size > 1 and kind != jax.sharding.AxisType.Manual
             for size, kind in zip(mesh.axis_sizes, mesh.axis_types, strict=True))


def _first_valid_by_reduction(x: jax.Array, mask: jax.Array | None,
                              reduce_axes: tuple[int, ...]) -> jax.Array:
  """`_first_valid` (or the first value) for explicitly sharded inputs.

  Without gathers or slices: the value is selected by an exact sum of one value and zeros.
  """
  linear = jnp.zeros((1,) * x.ndim, jnp.int32)
  for a in reduce_axes:
    iota = lax.broadcasted_iota(jnp.int32, tuple(x.shape[a] if b == a else 1
                                                 for b in range(x.ndim)), a)
    linear = linear * x.shape[a] + iota
  if mask is None:
    chosen = linear == 0
  else:
    candidates = jnp.where(mask, align(linear, mask), jnp.iinfo(jnp.int32).max)
    chosen = linear == jnp.min(candidates, axis=reduce_axes, keepdims=True)
  chosen = align(jnp.broadcast_to(chosen, x.shape), x)
  return jnp.sum(jnp.where(chosen, x, jnp.zeros((), x.dtype)), axis=reduce_axes, keepdims=True)


def _leading_rows(size: Any) -> int:
  """The largest of 1, 2, 4, 8 that is at most `size` (a symbolic size: as far as is decidable)."""
  k = 1
  for candidate in (2, 4, 8):
    try:
      if size >= candidate:
        k = candidate
    except Exception:  # noqa: BLE001  (an undecidable symbolic comparison: keep the smaller k).
      break
  return k


def _leading_mean(x: jax.Array, reduce_axes: tuple[int, ...]) -> jax.Array:
  """The mean of the first 1, 2, 4 or 8 values along the first reduced axis, by pairwise sums.

  Pairwise sums of equal values and the final power-of-two scaling are exact, so for a constant
  channel this is exactly the constant; for other data it is a pivot a few times closer to the
  mean (in standard deviations) than a single value.
  """
  axis = reduce_axes[0]
  k = _leading_rows(x.shape[axis])
  start = [0] * x.ndim
  limit = [1 if a in reduce_axes else x.shape[a] for a in range(x.ndim)]
  limit[axis] = k
  values = lax.slice(x, start, limit)
  while values.shape[axis] > 1:
    half = values.shape[axis] // 2
    values = (lax.slice_in_dim(values, 0, half, axis=axis)
              + lax.slice_in_dim(values, half, 2 * half, axis=axis))
  return values * jnp.asarray(1.0 / k, x.dtype)


def data_pivot(x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...]) -> jax.Array:
  """A value near each channel's mean, taken from the data, without gradient (0 where not finite).

  The mean of the leading values (`_leading_mean`) or, with a mask, the first valid value; for
  explicitly sharded inputs an exact selection by reduction.
  """
  if _on_a_mesh(x):
    pivot = _first_valid_by_reduction(x, mask, reduce_axes)
  elif mask is None:
    pivot = _leading_mean(x, reduce_axes)
  else:
    pivot = _first_valid(x, mask, reduce_axes)
  pivot = lax.stop_gradient(pivot)
  return jnp.where(jnp.isfinite(pivot), pivot, jnp.zeros_like(pivot))


# ----------------------------------------------------------------------------- local moments


def valid_count(x_shape: tuple[Any, ...], mask: jax.Array | None,
                reduce_axes: tuple[int, ...]) -> jax.Array:
  """The number of valid values per channel (integer), of `x`'s rank with reduced axes as 1."""
  keep_shape = tuple(1 if a in reduce_axes else x_shape[a] for a in range(len(x_shape)))
  if mask is None:
    return jnp.full(keep_shape, math.prod(x_shape[a] for a in reduce_axes), count_dtype())
  repeats = math.prod(x_shape[a] for a in reduce_axes if mask.shape[a] == 1)
  count = jnp.sum(mask, axis=reduce_axes, keepdims=True, dtype=count_dtype()) * repeats
  return jnp.broadcast_to(count, keep_shape)


def _valid_count_like(x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...]
                      ) -> jax.Array:
  """`valid_count`, sharded like the statistics of `x` (under Explicit mesh axes)."""
  return align(valid_count(x.shape, mask, reduce_axes), x)


def _shifted_sums(x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...],
                  pivot: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(delta, m2, precise) from one pass of sums of ``x - pivot`` and its square."""
  zero = jnp.zeros((), x.dtype)
  shifted = x - pivot if mask is None else jnp.where(mask, x - pivot, zero)
  sum_d = jnp.sum(shifted, axis=reduce_axes, keepdims=True)
  sum_dd = jnp.sum(shifted * shifted, axis=reduce_axes, keepdims=True)
  delta = sum_d / jnp.maximum(count, 1).astype(x.dtype)
  m2 = jnp.maximum(sum_dd - sum_d * delta, zero)
  return delta, m2, is_precise(sum_dd, m2)


def _exact_m2(x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...],
              pivot: jax.Array, delta: jax.Array) -> jax.Array:
  """The second pass: sum of ``((x - pivot) - delta)**2`` over the valid values."""
  centred = (x - pivot) - delta  # From x again, so that the shifted data is never written out.
  if mask is not None:
    centred = jnp.where(mask, centred, jnp.zeros((), x.dtype))
  return jnp.sum(centred * centred, axis=reduce_axes, keepdims=True)


def _no_reduction(x: jax.Array, mask: jax.Array | None, count: jax.Array) -> Moments:
  """Moments when no axis is reduced (one value per channel and device, e.g. per-example `vmap`)."""
  valid = jnp.isfinite(x) if mask is None else mask & jnp.isfinite(x)
  pivot = lax.stop_gradient(jnp.where(valid, x, jnp.zeros((), x.dtype)))
  delta = x - pivot if mask is None else jnp.where(mask, x - pivot, jnp.zeros((), x.dtype))
  return Moments(count, pivot, delta, jnp.zeros_like(delta))


def one_pass_moments(x: jax.Array, mask: jax.Array | None,
                     reduce_axes: tuple[int, ...]) -> Moments:
  """Moments from one pass of sums shifted by a data pivot: no data-dependent control flow.

  Loses at most ``log2(1 + k**2)`` bits of the variance, ``k`` the pivot's distance from the mean
  in standard deviations.
  """
  count = _valid_count_like(x, mask, reduce_axes)
  if not reduce_axes:
    return _no_reduction(x, mask, count)
  pivot = data_pivot(x, mask, reduce_axes)
  delta, m2, _ = _shifted_sums(x, mask, reduce_axes, pivot, count)
  return Moments(count, pivot, delta, m2)


def adaptive_moments(x: jax.Array, mask: jax.Array | None,
                     reduce_axes: tuple[int, ...]) -> Moments:
  """Exact moments by the cheapest route that loses at most log2(MAX_CANCELLATION) bits.

  Without a mask, raw sums ``sum(x)`` and ``sum(x * x)`` first (pivot 0): XLA:CPU's fused
  reductions read them straight from ``x``. Where a channel's mean is more than ~4 standard
  deviations from 0, sums shifted by a data pivot; where that pivot is far from the mean, an exact
  second pass. Each step is a `lax.cond`, so only the taken branch runs (outside `vmap`).
  """
  count = _valid_count_like(x, mask, reduce_axes)
  if not reduce_axes:
    return _no_reduction(x, mask, count)

  def with_data_pivot(_: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    pivot = data_pivot(x, mask, reduce_axes)
    delta, m2, precise = _shifted_sums(x, mask, reduce_axes, pivot, count)
    m2 = lax.cond(precise, lambda _: m2,
                  lambda _: _exact_m2(x, mask, reduce_axes, pivot, delta), None)
    return pivot, delta, m2

  if mask is not None:
    return Moments(count, *with_data_pivot(None))
  delta, m2, precise = _shifted_sums(x, None, reduce_axes, jnp.zeros((), x.dtype), count)
  # A zero pivot typed like `delta` (under `shard_map`, varying over the same mesh axes).
  zero = jnp.where(align(jnp.zeros(delta.shape, bool), delta), delta, jnp.zeros((), x.dtype))
  return Moments(count, *lax.cond(precise, lambda _: (zero, delta, m2), with_data_pivot, None))


def route_dispatch(adaptive: Callable[..., Any], one_pass: Callable[..., Any], route: str,
                   tangents: Callable[..., Any] | None = None) -> Callable[..., Any]:
  """Returns a function of arrays that runs `adaptive` or `one_pass` as `route` says.

  ``"auto"`` runs `adaptive` on CPU and `one_pass` on other platforms (`lax.platform_dependent`),
  and `one_pass` under `vmap` (a `custom_vmap` rule), where `adaptive`'s `lax.cond`s would become
  selects that run every branch. `custom_vmap` has no derivative of its own, so the result is a
  `custom_jvp` whose tangents are those of `tangents` (default `one_pass`): a cond-free function
  with the same mathematical value, so derivatives of every order, under `vmap` too, are exact.
  """
  if route == "adaptive":
    return adaptive
  if route == "one_pass":
    return one_pass

  def by_platform(*args: Any) -> Any:
    return lax.platform_dependent(*args, cpu=adaptive, default=one_pass)

  batched = custom_vmap(by_platform)

  @batched.def_vmap
  def _vmap_rule(axis_size: int, in_batched: Any, *args: Any) -> tuple[Any, Any]:
    del axis_size
    in_axes = tuple(jax.tree.map(lambda b: 0 if b else None, flags) for flags in in_batched)
    out = jax.vmap(one_pass, in_axes=in_axes)(*args)
    return out, jax.tree.map(lambda _: True, out)

  @jax.custom_jvp
  def dispatched(*args: Any) -> Any:
    return batched(*args)

  @dispatched.defjvp
  def _jvp(primals: Any, tangents_in: Any) -> tuple[Any, Any]:
    _, tangents_out = jax.jvp(tangents or one_pass, primals, tangents_in)
    return dispatched(*primals), tangents_out

  return dispatched


def _two_pass_moments(x: jax.Array, mask: jax.Array | None,
                      reduce_axes: tuple[int, ...]) -> Moments:
  """Moments by a data pivot and two passes.

  The differentiable reference whose tangents are exact (``d m2 = 2 sum((x - mean) dx)``,
  nothing cancels).
  """
  count = _valid_count_like(x, mask, reduce_axes)
  if not reduce_axes:
    return _no_reduction(x, mask, count)
  pivot = data_pivot(x, mask, reduce_axes)
  shifted = x - pivot if mask is None else jnp.where(mask, x - pivot, jnp.zeros((), x.dtype))
  delta = (jnp.sum(shifted, axis=reduce_axes, keepdims=True)
           / jnp.maximum(count, 1).astype(x.dtype))
  return Moments(count, pivot, delta, _exact_m2(x, mask, reduce_axes, pivot, delta))


def local_moments(x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...],
                  route: str = "auto") -> Moments:
  """Moments of `x` over `reduce_axes`, counting only positions where `mask` is True.

  Args:
    x: array in the statistics dtype (at least float32).
    mask: None, or a bool array of `x`'s rank whose dimensions are 1 or `x`'s size.
    reduce_axes: the axes to reduce over (may be empty: then each value is its own moment).
    route: ``"auto"``, ``"adaptive"`` or ``"one_pass"`` (see the module docstring).

  Returns:
    `Moments` with every field of `x`'s rank, size 1 along `reduce_axes`.
  """
  fn = route_dispatch(lambda x, mask: adaptive_moments(x, mask, reduce_axes),
                      lambda x, mask: one_pass_moments(x, mask, reduce_axes), route,
                      tangents=lambda x, mask: _two_pass_moments(x, mask, reduce_axes))
  return fn(x, mask)


# ----------------------------------------------------------------------------- merging


def merge_moments(parts: Moments, axis: int = 0) -> Moments:
  """Merges moments of disjoint parts of a batch, stacked along `axis`, into those of the union.

  Chan, Golub & LeVeque's pairwise formula, generalised to N parts: with ``a_i`` each part's mean
  measured from a common reference (the pivot of the first part with data),

      count = sum(n_i),   delta = sum(n_i a_i) / count,
      m2 = sum(m2_i) + sum(n_i (a_i - delta)**2).

  Both sums run over parts already in memory, so nothing cancels: exact for unequal counts, parts
  without data (count 0, ignored) and pivots far apart. Means are never averaged.

  Args:
    parts: `Moments` whose fields are stacked along `axis`.
    axis: the stacking axis.

  Returns:
    `Moments` without the stacking axis.
  """
  count = jnp.moveaxis(parts.count, axis, 0)
  pivot, delta, m2 = (jnp.moveaxis(v, axis, 0) for v in (parts.pivot, parts.delta, parts.m2))
  dtype = m2.dtype
  has_data = count > 0
  weight = count.astype(dtype)
  total = jnp.sum(count, axis=0, keepdims=True)
  first = jnp.argmax(has_data, axis=0, keepdims=True)
  reference = jnp.take_along_axis(pivot, first, axis=0)
  offset = jnp.where(has_data, (pivot - reference) + delta, jnp.zeros((), dtype))
  global_delta = (jnp.sum(weight * offset, axis=0, keepdims=True)
                  / jnp.maximum(total, 1).astype(dtype))
  spread = offset - global_delta
  global_m2 = (jnp.sum(jnp.where(has_data, m2, jnp.zeros((), dtype)), axis=0)
               + jnp.sum(weight * spread * spread, axis=0))
  return Moments(total[0], reference[0], global_delta[0], global_m2)


def power_sums(moments: Moments, pivot: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(n * a, m2 + n * a**2)`` with ``a = mean - pivot``: sums that add up across parts.

  Parts that share `pivot` are merged by summing these (and their counts), then
  `from_power_sums`. ``a = (moments.pivot - pivot) + moments.delta`` never rounds the mean.
  """
  dtype = moments.m2.dtype
  weight = moments.count.astype(dtype)
  offset = jnp.where(moments.count > 0, (moments.pivot - pivot) + moments.delta,
                     jnp.zeros((), dtype))
  return weight * offset, moments.m2 + weight * offset * offset


def from_power_sums(count: jax.Array, pivot: jax.Array, sum_a: jax.Array,
                    sum_sq: jax.Array) -> tuple[Moments, jax.Array]:
  """Moments from summed `power_sums` around a shared `pivot`, and whether they are precise.

  ``m2 = sum_sq - sum_a**2 / count`` loses ``log2(sum_sq / m2)`` bits, that is
  ``log2(1 + k**2)`` for a pivot ``k`` standard deviations from the merged mean; ``precise`` is
  `is_precise` of that (a scalar bool).
  """
  dtype = sum_sq.dtype
  delta = sum_a / jnp.maximum(count, 1).astype(dtype)
  m2 = jnp.maximum(sum_sq - sum_a * delta, jnp.zeros((), dtype))
  pivot = jnp.broadcast_to(pivot.astype(dtype), delta.shape)
  return Moments(count, pivot, delta, m2), is_precise(sum_sq, m2)


__all__ = [
  "MAX_CANCELLATION",
  "ROUTES",
  "Moments",
  "adaptive_moments",
  "count_dtype",
  "data_pivot",
  "from_power_sums",
  "is_precise",
  "local_moments",
  "merge_moments",
  "one_pass_moments",
  "power_sums",
  "route_dispatch",
  "valid_count",
]


# ============================================================================ covariance moments
#
# Whitening (`bnjax.whitening`) needs, per group of d channels, the mean and the centred
# cross-product matrix of the valid rows. They are kept in the same shifted form as `Moments`:
# ``mean = pivot + delta`` with a data pivot, so that data far from zero loses nothing, and they
# merge across parts of a batch with Chan's formula, which holds for matrices as it does for
# scalars (the outer product replaces the square). Rows are the positions of the batch; a row is
# valid or not as a whole (the mask does not vary along the channels), so every group has the same
# count.
#
# The local statistics take one pass over the rows shifted by the data pivot (sums and cross
# products), and a second over the rows centred by their mean only where the first would lose
# precision (`local_covariance`).


class CovarianceMoments(NamedTuple):
  """Per-group mean and centred cross products of the valid rows of a ``[m, G, d]`` batch."""

  count: jax.Array  # shape=[G], int32 (int64 under x64); valid rows behind each group.
  pivot: jax.Array  # shape=[G, d]; a value near each channel's mean; no gradient.
  delta: jax.Array  # shape=[G, d]; mean - pivot, in the statistics dtype.
  cross: jax.Array  # shape=[G, d, d]; sum over valid rows of (x - mean)(x - mean)^T.

  @property
  def mean(self) -> jax.Array:
    """``pivot + delta``, shape [G, d]."""
    return self.pivot + self.delta

  @property
  def covariance(self) -> jax.Array:
    """The biased covariance ``cross / count`` (0 where count is 0), shape [G, d, d]."""
    return self.cross / jnp.maximum(self.count, 1).astype(self.cross.dtype)[..., None, None]


def group_gram(a_GxMxD: jax.Array, b_GxMxD: jax.Array | None = None) -> jax.Array:
  """``sum_m a[g, m, :]^T b[g, m, :]`` for every group g: shape [G, d, d], at full precision.

  ``b`` defaults to ``a`` (the cross products of one array). The group axis leads, as batched
  matrix products want it (with it in the middle XLA:CPU copies both operands first).
  """
  b_GxMxD = a_GxMxD if b_GxMxD is None else b_GxMxD
  return jnp.einsum("gmi,gmj->gij", a_GxMxD, b_GxMxD, precision=lax.Precision.HIGHEST)


def shifted_rows(x_MxGxD: jax.Array, mask_M: jax.Array | None, pivot_GxD: jax.Array,
                 base_GxD: jax.Array) -> jax.Array:
  """``(x - pivot) - base`` at valid rows and 0 elsewhere, transposed to [G, m, d].

  The group axis leads, as batched matrix products want it; the subtraction and the transposition
  are one pass.
  """
  shifted = (x_MxGxD - pivot_GxD[None]) - base_GxD[None]
  if mask_M is not None:
    shifted = jnp.where(mask_M[:, None, None], shifted, jnp.zeros((), x_MxGxD.dtype))
  return jnp.transpose(shifted, (1, 0, 2))


def local_covariance(x_MxGxD: jax.Array, mask_M: jax.Array | None, route: str = "auto"
                     ) -> tuple[CovarianceMoments, jax.Array]:
  """Covariance moments of the valid rows of `x`, and those rows shifted by the data pivot.

  One pass over the rows shifted by the data pivot, ``r = x - pivot``, gives their sums and
  cross products, ``cross = sum(r r^T) - n delta delta^T``; it loses ``log2(1 + k**2)`` bits of a
  variance for a pivot ``k`` standard deviations from the mean (about 0.2 bits for the mean of
  the leading 8 rows of i.i.d. data). Where that exceeds ``log2(MAX_CANCELLATION)`` bits, the
  ``"adaptive"`` route takes a second pass over the rows centred by that mean, where nothing
  cancels; ``"one_pass"`` never does; ``"auto"`` is adaptive on CPU and one-pass elsewhere. Both
  routes are differentiable (the second pass is a `lax.cond` branch with its own derivative).

  Args:
    x_MxGxD: rows of channels split into G groups of d, in the statistics dtype.
    mask_M: None, or a bool array of shape [m]: the valid rows.
    route: ``"auto"``, ``"adaptive"`` or ``"one_pass"``.

  Returns:
    ``(moments, shifted)``: `CovarianceMoments` (count [G], pivot and delta [G, d], cross
    [G, d, d]) and ``x - pivot`` at valid rows, 0 elsewhere, transposed to [G, m, d]
    (`shifted_rows`), from which the one-pass sums were taken.
  """
  rows, groups, _ = x_MxGxD.shape
  dtype = x_MxGxD.dtype
  if mask_M is None:
    count = jnp.full((groups,), rows, count_dtype())
    mask3 = None
  else:
    count = jnp.full((groups,), jnp.sum(mask_M, dtype=count_dtype()), count_dtype())
    mask3 = mask_M[:, None, None]
  pivot = data_pivot(x_MxGxD, mask3, (0,))[0]
  shifted = shifted_rows(x_MxGxD, mask_M, pivot, jnp.zeros(pivot.shape, dtype))
  delta = jnp.sum(shifted, axis=1) / jnp.maximum(count, 1).astype(dtype)[:, None]
  products = group_gram(shifted)
  cross = products - _outer(delta, delta) * count.astype(dtype)[:, None, None]
  cross = cross - _diag_embed(jnp.minimum(jnp.diagonal(cross, axis1=-2, axis2=-1), 0.0))

  def adaptive() -> jax.Array:
    precise = is_precise(jnp.diagonal(products, axis1=-2, axis2=-1),
                         jnp.diagonal(cross, axis1=-2, axis2=-1))
    return lax.cond(precise, lambda: cross,
                    lambda: group_gram(shifted_rows(x_MxGxD, mask_M, pivot, delta)))

  if route == "adaptive":
    cross = adaptive()
  elif route != "one_pass":
    cross = lax.platform_dependent(cpu=adaptive, default=lambda: cross)
  return CovarianceMoments(count, pivot, delta, cross), shifted


def _outer(a: jax.Array, b: jax.Array) -> jax.Array:
  return a[..., :, None] * b[..., None, :]


def merge_covariances(parts: CovarianceMoments, axis: int = 0) -> CovarianceMoments:
  """Merges covariance moments of disjoint parts of a batch, stacked along `axis`.

  Chan's formula for matrices: with ``a_k`` each part's mean measured from a common reference
  (the pivot of the first part with data),

      count = sum(n_k),   delta = sum(n_k a_k) / count,
      cross = sum(cross_k) + sum(n_k (a_k - delta)(a_k - delta)^T).

  Exact for unequal counts, parts without data (ignored) and pivots far apart: both sums run over
  values already in memory, so nothing cancels.

  Args:
    parts: `CovarianceMoments` whose fields are stacked along `axis`.
    axis: the stacking axis (of the count; the other fields have it at the same position).

  Returns:
    `CovarianceMoments` of the union, without the stacking axis.
  """
  count = jnp.moveaxis(parts.count, axis, 0)
  pivot, delta, cross = (jnp.moveaxis(v, axis, 0) for v in (parts.pivot, parts.delta, parts.cross))
  dtype = cross.dtype
  has_data = count > 0  # [P, G]
  weight = count.astype(dtype)[..., None]  # [P, G, 1]
  total = jnp.sum(count, axis=0)
  first = jnp.argmax(has_data, axis=0)  # [G]
  reference = jnp.take_along_axis(pivot, first[None, :, None], axis=0)  # [1, G, d]
  offset = jnp.where(has_data[..., None], (pivot - reference) + delta, jnp.zeros((), dtype))
  global_delta = (jnp.sum(weight * offset, axis=0)
                  / jnp.maximum(total, 1).astype(dtype)[:, None])
  spread = offset - global_delta[None]
  global_cross = (jnp.sum(jnp.where(has_data[..., None, None], cross, jnp.zeros((), dtype)), axis=0)
                  + jnp.sum(weight[..., None] * _outer(spread, spread), axis=0))
  return CovarianceMoments(total, reference[0], global_delta, global_cross)


def covariance_power_sums(moments: CovarianceMoments, pivot: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
  """``(n a, cross + n a a^T)`` with ``a = mean - pivot``: sums that add up across parts.

  Parts that share `pivot` (shape [G, d]) merge by summing these and their counts, then
  `covariance_from_power_sums`.
  """
  dtype = moments.cross.dtype
  weight = moments.count.astype(dtype)[:, None]
  offset = jnp.where(moments.count[:, None] > 0, (moments.pivot - pivot) + moments.delta,
                     jnp.zeros((), dtype))
  return weight * offset, moments.cross + weight[..., None] * _outer(offset, offset)


def covariance_from_power_sums(count: jax.Array, pivot: jax.Array, sum_a: jax.Array,
                               sum_cross: jax.Array) -> tuple[CovarianceMoments, jax.Array]:
  """Covariance moments from summed `covariance_power_sums` around a shared `pivot`.

  ``cross = sum_cross - n delta delta^T`` loses ``log2(1 + k**2)`` bits on the diagonal for a
  pivot ``k`` standard deviations from the merged mean; ``precise`` (a scalar bool) says whether
  that stayed within ``log2(MAX_CANCELLATION)`` bits for every channel. Leading axes (a table of
  groups of devices) broadcast.
  """
  dtype = sum_cross.dtype
  delta = sum_a / jnp.maximum(count, 1).astype(dtype)[..., None]
  # (delta_i * delta_j) * n is symmetric bit for bit.
  cross = sum_cross - _outer(delta, delta) * count.astype(dtype)[..., None, None]
  diagonal = jnp.diagonal(cross, axis1=-2, axis2=-1)
  cross = cross - _diag_embed(jnp.minimum(diagonal, jnp.zeros((), dtype)))  # no negative variance.
  pivot = jnp.broadcast_to(pivot.astype(dtype), delta.shape)
  precise = is_precise(jnp.diagonal(sum_cross, axis1=-2, axis2=-1),
                       jnp.diagonal(cross, axis1=-2, axis2=-1))
  return CovarianceMoments(count, pivot, delta, cross), precise


def _diag_embed(v: jax.Array) -> jax.Array:
  eye = jnp.eye(v.shape[-1], dtype=v.dtype).reshape((1,) * (v.ndim - 1) + (v.shape[-1],) * 2)
  return v[..., :, None] * eye



__all__ += [
    "CovarianceMoments", "covariance_from_power_sums", "covariance_power_sums", "group_gram",
    "local_covariance", "merge_covariances", "shifted_rows",
]


# ----------------------------------------------------------------------------- moments about zero


def uncentred_moments(x: jax.Array, mask: jax.Array | None,
                      reduce_axes: tuple[int, ...]) -> Moments:
  """Moments about zero: ``pivot = delta = 0`` and ``m2 = sum(x**2)`` over the valid values.

  What RMS normalisation divides by: ``var`` is then the mean square ``E[x**2]``, not the
  variance. A sum of squares cancels nothing, so one pass is exact whatever the data's offset.
  Being `Moments` with a zero pivot, they merge across parts and devices by the same
  count-weighted rules (`merge_moments`, `power_sums` around a zero pivot), and stay moments about
  zero. Masked-out values are replaced by 0 before they are squared, so NaN or Inf there reach
  neither the result nor its gradient.

  Args:
    x: array in the statistics dtype (at least float32).
    mask: None, or a bool array of `x`'s rank whose dimensions are 1 or `x`'s size.
    reduce_axes: the axes to reduce over (may be empty).

  Returns:
    `Moments` with every field of `x`'s rank, size 1 along `reduce_axes`.
  """
  count = _valid_count_like(x, mask, reduce_axes)
  valid = x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))
  m2 = jnp.sum(valid * valid, axis=reduce_axes, keepdims=True)
  zero = jnp.zeros_like(m2)
  return Moments(count, zero, zero, m2)


__all__ += ["uncentred_moments"]

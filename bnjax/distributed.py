"""The one place bnjax talks across devices: every `lax` collective of the library is here.

Per-device moments are combined with all-reduces of per-channel power sums around a pivot that
every device provably shares, so the bytes on the wire do not grow with the device count:

1. Each device measures its mean from the shared pivot ``p`` without another pass over its data,
   ``a = (pivot - p) + delta`` (`stats.power_sums`), and one all-reduce sums ``n * a`` and
   ``m2 + n * a**2`` (and the count, when a mask makes counts differ): 2C values, 8 bytes per
   channel in float32, the same as Flax's ``pmean`` of ``E[x]`` and ``E[x^2]``.
2. Chan's formula gives the global ``delta`` and ``m2`` (`stats.from_power_sums`). It loses
   ``log2(1 + k**2)`` bits for a pivot ``k`` standard deviations from the global mean. Every
   device checks this on the same all-reduced values, so all take the same branch: when more than
   ``log2(stats.MAX_CANCELLATION)`` bits would be lost, a second all-reduce of the same size
   repeats step 1 around the first estimate of the mean, where nothing cancels.

The shared pivot is the running mean where JAX's types show it is replicated over the named axes
(`shard_map` with ``check_vma``), so in steady-state training one all-reduce suffices; otherwise 0.
On GPU and TPU (and with ``route="one_pass"``) the second round always runs instead of a
data-dependent `lax.cond`: two small all-reduces, and no device-to-host read of a predicate.

Counts are exact integers: they travel in the same float all-reduce split into two parts,
``count = high * 4096 + low``, each of whose sums is exact in float32 below 2**24.

`axis_index_groups` combine within each group: each device writes its values into its group's row
of a ``[groups, ...]`` array and one all-reduce sums it (exact for unequal group sizes, and the
same under `shard_map`, `pmap` and `vmap`, where `psum`'s own groups are unsupported or inexact).
The bytes grow with the number of groups, not the number of devices; a mesh axis per group
(a 2-D mesh, statistics over one of its axes) costs nothing extra and is the better layout.
"""

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from bnjax import _checks
from bnjax import stats
from bnjax.stats import Moments

_COUNT_SPLIT = 4096  # count = high * 4096 + low: both parts sum exactly in float32 (see above).


def axis_names(axis_name: Any) -> tuple[Any, ...]:
  """`axis_name` as a tuple of axis names (a single name becomes a 1-tuple)."""
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def axis_size(axis_name: Any) -> int:
  """The static number of devices along `axis_name` (a name or a tuple of names)."""
  return lax.axis_size(axis_names(axis_name))


def varying_axes(value: Any) -> frozenset:
  """The mesh axes over which JAX's type system says `value` varies (empty outside `shard_map`)."""
  return frozenset(jax.typeof(value).manual_axis_type.varying)


def typed_invariant(value: Any, axis_name: Any, reference: Any) -> bool:
  """Whether JAX's types prove `value` identical on every device along `axis_name`.

  True only under `shard_map` with ``check_vma=True`` (where `reference`, e.g. the input, is
  typed as varying over those axes) and `value` is not; never under `vmap` or `pmap`, whose
  values carry no such type.
  """
  names = axis_names(axis_name)
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  typed = varying_axes(reference)
  return (all(name in manual and name in typed for name in names)
          and not varying_axes(value) & frozenset(names))


def partition_matrix(groups: Any, size: int, where: str) -> np.ndarray:
  """The [groups, size] 0/1 matrix whose row g marks the members of group g.

  Raises a `ValueError` naming `axis_index_groups` unless the groups split ``range(size)``.
  """
  try:
    groups = [[int(i) for i in g] for g in groups]
  except TypeError:
    _checks.fail(where, f"`axis_index_groups` must be a list of lists of device indices; got "
                 f"{groups!r}.", TypeError)
  members = sorted(i for g in groups for i in g)
  if members != list(range(size)) or any(not g for g in groups):
    _checks.fail(where, f"`axis_index_groups` must split the {size} indices of the named axis "
                 f"into non-empty groups, each index in exactly one group; got {groups!r}.")
  matrix = np.zeros((len(groups), size), np.float32)
  for row, g in enumerate(groups):
    matrix[row, g] = 1.0
  return matrix


def _membership(groups: Any) -> np.ndarray:
  """`partition_matrix` of already validated groups.

  The axis size is their total size, so no axis lookup is needed (a custom VJP's backward may run
  after a `vmap` axis is gone).
  """
  return partition_matrix(groups, sum(len(g) for g in groups), "bnjax")


def smallest_group(groups: Sequence[Sequence[int]] | None, size: int) -> int:
  """The number of devices in the smallest group (`size`, the axis size, without groups)."""
  return size if groups is None else min(len(g) for g in groups)


def group_index(axis_name: Any, groups: Any) -> jax.Array | None:
  """This device's group number (an int32 scalar), or None without groups.

  Computed where the named axis is bound (the forward pass) and kept: a custom VJP's backward
  may run after a `vmap` axis is gone, where `lax.axis_index` cannot be called.
  """
  if groups is None:
    return None
  row_of_device = np.argmax(_membership(groups), axis=0).astype(np.int32)
  return jnp.asarray(row_of_device)[lax.axis_index(axis_names(axis_name))]


def _sum_table(values: jax.Array, axis_name: Any, groups: Any, index: jax.Array | None
               ) -> jax.Array:
  """All-reduces `values`.

  With groups, a ``[groups, ...]`` table of each group's sum (one all-reduce, every device
  receives every group's sum).
  """
  if groups is None:
    return lax.psum(values, axis_names(axis_name))
  rows = jnp.arange(len(groups), dtype=jnp.int32) == index
  table = jnp.where(rows.reshape((-1,) + (1,) * values.ndim), values[None],
                    jnp.zeros((), values.dtype))
  return lax.psum(table, axis_names(axis_name))


def _my_group(table: jax.Array, groups: Any, index: jax.Array | None) -> jax.Array:
  return table if groups is None else table[index]


def sum_over_devices(values: jax.Array, axis_name: Any, axis_index_groups: Any = None,
                     index: jax.Array | None = None) -> jax.Array:
  """Sums `values` over `axis_name` (within each group) with one all-reduce; identity without.

  With groups, `index` is this device's `group_index` (computed here when not given).
  """
  if axis_name is None:
    return values
  if axis_index_groups is not None and index is None:
    index = group_index(axis_name, axis_index_groups)
  table = _sum_table(values, axis_name, axis_index_groups, index)
  return _my_group(table, axis_index_groups, index)


def sum_over_axes(values: Any, axes: tuple[Any, ...]) -> Any:
  """`lax.psum` of a pytree over mesh `axes` (a parameter's cotangent over its replicated axes)."""
  return lax.psum(values, axes) if axes else values


def _split_count(count: jax.Array, dtype: Any) -> list[jax.Array]:
  high = count // _COUNT_SPLIT
  return [high.astype(dtype), (count - high * _COUNT_SPLIT).astype(dtype)]


def _join_count(high: jax.Array, low: jax.Array) -> jax.Array:
  dtype = stats.count_dtype()
  return high.astype(dtype) * _COUNT_SPLIT + low.astype(dtype)


def _round(moments: Moments, pivot: jax.Array, axis_name: Any, groups: Any,
           index: jax.Array | None, count_shape: tuple[int, ...] | None, static_total: Any
           ) -> tuple[Moments, jax.Array]:
  """One all-reduce of power sums around `pivot`.

  Returns the merged moments and `precise` (a scalar identical on every device: with groups, every
  group's check together).
  """
  sum_a, sum_sq = stats.power_sums(moments, pivot)
  dtype = sum_sq.dtype
  parts = [sum_a, sum_sq]
  if count_shape is not None:  # counts differ between devices: they travel with the sums.
    count = moments.count[tuple(slice(0, size) for size in count_shape)]
    parts += _split_count(count, dtype)
  shapes = [p.shape for p in parts]
  sizes = [int(np.prod(s)) for s in shapes]
  table = _sum_table(jnp.concatenate([p.reshape(-1) for p in parts]), axis_name, groups, index)
  flat_parts = jnp.split(table, np.cumsum(sizes)[:-1], axis=-1)
  lead = table.shape[:-1]  # (groups,) or ().
  parts = [p.reshape(lead + s) for p, s in zip(flat_parts, shapes, strict=True)]
  if count_shape is None:
    if isinstance(static_total, jax.Array):
      total = jnp.broadcast_to(static_total, lead + sum_a.shape)
    else:
      total = jnp.full(lead + sum_a.shape, static_total, stats.count_dtype())
  else:
    total = jnp.broadcast_to(_join_count(parts[2], parts[3]), lead + sum_a.shape)
  every_group, precise = stats.from_power_sums(total, pivot, parts[0], parts[1])
  merged = jax.tree.map(lambda v: _my_group(v, groups, index), every_group)
  # The pivot typed like delta (under `shard_map`, varying over the same mesh axes), so that
  # both rounds return the same types.
  typed_pivot = jnp.where(jnp.zeros(merged.delta.shape, bool), merged.delta, merged.pivot)
  return merged._replace(pivot=typed_pivot), precise


def _count_totals(moments: Moments, axis_name: Any, axis_index_groups: Any, uniform_count: Any,
                  count_shape: tuple[int, ...] | None
                  ) -> tuple[Any, tuple[int, ...] | None]:
  """How a combine learns the global counts: ``(static_total, count_shape)``.

  With `uniform_count` (the same number of values on every device) the total is known without a
  collective: ``uniform_count`` times the axis size, or a ``[groups, 1, ...]`` table of each
  group's total. Otherwise `static_total` is None and counts travel with the sums in
  `count_shape` (by default the shape of ``moments.count``).
  """
  if uniform_count is None:
    return None, moments.count.shape if count_shape is None else count_shape
  if axis_index_groups is None:
    return uniform_count * axis_size(axis_name), count_shape
  sizes = _membership(axis_index_groups).sum(axis=1)
  table = jnp.asarray(sizes.astype(np.int64), stats.count_dtype())
  return uniform_count * table.reshape((-1,) + (1,) * moments.delta.ndim), count_shape


def combine_moments(moments: Moments, axis_name: Any, axis_index_groups: Any = None, *,
                    shared_pivot: jax.Array | None = None, uniform_count: Any = None,
                    count_shape: tuple[int, ...] | None = None,
                    route: str = "auto") -> Moments:
  """Merges per-device moments over `axis_name` (within each group) into global moments.

  Args:
    moments: this device's `Moments`.
    axis_name: a named axis bound by `shard_map`, `pmap` or `vmap`, a tuple of them, or None
      (returns `moments`).
    axis_index_groups: None, or a partition of the axis indices into groups combined separately.
    shared_pivot: a value of `moments.delta`'s shape that is identical on every device (the
      running mean where it is provably replicated), or None for 0.
    uniform_count: the number of values per channel on every device when it is the same on all
      (no mask; a Python int or a symbolic size): then counts need no collective. None sends
      counts with the sums.
    count_shape: the shape in which counts travel when they differ (of the feature shape, or of
      size 1 along the features when the mask does not vary along them).
    route: ``"adaptive"`` takes the second round only when the first lost precision (a
      `lax.cond` on all-reduced values); ``"one_pass"`` always takes it; ``"auto"`` is adaptive on
      CPU and ``"one_pass"`` elsewhere.

  Returns:
    `Moments` of the union of the group's data, bit-identical on every member.
  """
  if axis_name is None:
    return moments
  dtype = moments.m2.dtype
  pivot = (jnp.zeros(moments.delta.shape, dtype) if shared_pivot is None
           else lax.stop_gradient(shared_pivot).astype(dtype))
  static_total, count_shape = _count_totals(moments, axis_name, axis_index_groups,
                                            uniform_count, count_shape)
  index = group_index(axis_name, axis_index_groups)

  def run(pivot: jax.Array) -> tuple[Moments, jax.Array]:
    return _round(moments, pivot, axis_name, axis_index_groups, index, count_shape, static_total)


  def adaptive() -> Moments:
    first, precise = run(pivot)
    return lax.cond(precise, lambda: first, lambda: run(first.mean)[0])

  def always_twice() -> Moments:
    first, _ = run(pivot)
    return run(first.mean)[0]

  if route == "adaptive":
    return adaptive()
  if route == "one_pass":
    return always_twice()
  return lax.platform_dependent(cpu=adaptive, default=always_twice)



# ----------------------------------------------------------------------------- moments about zero


def combine_uncentred_moments(moments: Moments, axis_name: Any, axis_index_groups: Any = None, *,
                              uniform_count: Any = None,
                              count_shape: tuple[int, ...] | None = None) -> Moments:
  """Merges per-device moments about zero (`stats.uncentred_moments`) over `axis_name`.

  Their pivot is 0 on every device, a provably shared pivot, and sums of squares around it cancel
  nothing, so the first round of `combine_moments` (one all-reduce of the power sums around 0,
  i.e. of ``sum(x**2)``, and of the counts when they differ) is exact on every platform: no second
  round and no `lax.cond`.

  Args:
    moments: this device's moments about zero.
    axis_name: a named axis bound by `shard_map`, `pmap` or `vmap`, a tuple of them, or None
      (returns `moments`).
    axis_index_groups: None, or a partition of the axis indices into groups combined separately.
    uniform_count: as in `combine_moments`: the number of values per channel on every device when
      it is the same on all, or None to send counts with the sums.
    count_shape: as in `combine_moments`: the shape in which counts travel when they differ.

  Returns:
    Moments about zero of the union of the group's data, bit-identical on every member.
  """
  if axis_name is None:
    return moments
  static_total, count_shape = _count_totals(moments, axis_name, axis_index_groups,
                                            uniform_count, count_shape)
  index = group_index(axis_name, axis_index_groups)
  zero = jnp.zeros(moments.delta.shape, moments.m2.dtype)
  merged, _ = _round(moments, zero, axis_name, axis_index_groups, index, count_shape,
                     static_total)
  return merged  # delta = sum(n * 0) / count = 0 exactly: still moments about zero.


# =========================================================================== covariance (whitening)
#
# Whitening combines per-group covariance moments the way `combine_moments` combines variances:
# every device measures its mean from a pivot that all devices share, and one all-reduce sums
# ``n a`` and ``cross + n a a^T`` (Chan's formula for matrices, `stats.covariance_power_sums`).
# The cross products are symmetric, so only their upper triangles travel: G d (d + 1) / 2 + G d
# values per device (plus two per group for the counts when a mask makes them differ), whatever
# the number of devices. An all-gather of every device's (count, mean, cross products) would merge
# without any cancellation, but its bytes grow with the device count; the shared pivot keeps them
# fixed, and the rare imprecise case (a pivot far from the global mean, e.g. 0 for data with a
# large offset) is detected on the all-reduced values, identically on every device, and repaired
# by a second all-reduce of the same size around the first estimate of the mean.


def _symmetric_pack(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Row and column indices of the upper triangle of a d x d matrix, and where each entry is.

  The third array gives, for every (i, j), the position of (min(i, j), max(i, j)) among them.
  """
  rows, cols = np.triu_indices(d)
  position = np.zeros((d, d), np.int32)
  position[rows, cols] = np.arange(rows.size)
  position[cols, rows] = np.arange(rows.size)
  return rows, cols, position


def _covariance_round(moments: stats.CovarianceMoments, pivot: jax.Array, axis_name: Any,
                      groups: Any, index: jax.Array | None, static_total: Any
                      ) -> tuple[stats.CovarianceMoments, jax.Array]:
  """One all-reduce of covariance power sums around `pivot`: the merged moments and `precise`."""
  sum_a, sum_cross = stats.covariance_power_sums(moments, pivot)
  dtype = sum_cross.dtype
  d = sum_a.shape[-1]
  rows, cols, position = _symmetric_pack(d)
  parts = [sum_a, sum_cross[:, rows, cols]]
  if static_total is None:  # counts differ between devices: they travel with the sums.
    parts += _split_count(moments.count, dtype)
  shapes = [p.shape for p in parts]
  sizes = [int(np.prod(s)) for s in shapes]
  table = _sum_table(jnp.concatenate([p.reshape(-1) for p in parts]), axis_name, groups, index)
  lead = table.shape[:-1]  # (groups,) or ().
  parts = [p.reshape(lead + s)
           for p, s in zip(jnp.split(table, np.cumsum(sizes)[:-1], axis=-1), shapes,
                           strict=True)]
  total_shape = lead + moments.count.shape
  if static_total is None:
    total = _join_count(parts[2], parts[3])
  elif isinstance(static_total, jax.Array):
    total = jnp.broadcast_to(static_total, total_shape)
  else:
    total = jnp.full(total_shape, static_total, stats.count_dtype())
  every_group, precise = stats.covariance_from_power_sums(total, pivot, parts[0],
                                                          parts[1][..., position])
  merged = jax.tree.map(lambda v: _my_group(v, groups, index), every_group)
  # The pivot typed like delta (varying over the same mesh axes under `shard_map`), so that both
  # rounds return the same types.
  typed_pivot = jnp.where(jnp.zeros(merged.delta.shape, bool), merged.delta, merged.pivot)
  return merged._replace(pivot=typed_pivot), precise


def combine_covariances(moments: stats.CovarianceMoments, axis_name: Any,
                        axis_index_groups: Any = None, *, shared_pivot: jax.Array | None = None,
                        uniform_count: Any = None, route: str = "auto"
                        ) -> stats.CovarianceMoments:
  """Merges per-device covariance moments over `axis_name` (within each group).

  One all-reduce of ``G d (d + 1) / 2 + G d`` values around a shared pivot (see above); a second
  of the same size only where the first would lose more than ``log2(stats.MAX_CANCELLATION)``
  bits of a variance.

  Args:
    moments: this device's `stats.CovarianceMoments` (count [G], pivot and delta [G, d], cross
      [G, d, d]).
    axis_name: a named axis bound by `shard_map`, `pmap` or `vmap`, a tuple of them, or None
      (returns `moments`).
    axis_index_groups: None, or a partition of the axis indices into groups combined separately.
    shared_pivot: a [G, d] value identical on every device (the running mean where JAX's types
      prove it replicated), or None for 0.
    uniform_count: the number of rows on every device when it is the same on all (no mask): then
      counts need no collective. None sends the counts with the sums.
    route: ``"adaptive"`` takes the second round only when the first lost precision (a
      `lax.cond` on all-reduced values); ``"one_pass"`` always takes it; ``"auto"`` is adaptive
      on CPU and one-pass elsewhere, as in `combine_moments`.

  Returns:
    `stats.CovarianceMoments` of the union of the group's rows, identical on every member.
  """
  if axis_name is None:
    return moments
  dtype = moments.cross.dtype
  pivot = (jnp.zeros(moments.delta.shape, dtype) if shared_pivot is None
           else lax.stop_gradient(shared_pivot).astype(dtype))
  if uniform_count is None:
    static_total = None
  elif axis_index_groups is None:
    static_total = uniform_count * axis_size(axis_name)
  else:  # every group's total, as a [groups, 1] table.
    sizes = _membership(axis_index_groups).sum(axis=1)
    static_total = uniform_count * jnp.asarray(sizes.astype(np.int64),
                                               stats.count_dtype()).reshape(-1, 1)
  index = group_index(axis_name, axis_index_groups)

  def run(pivot: jax.Array) -> tuple[stats.CovarianceMoments, jax.Array]:
    return _covariance_round(moments, pivot, axis_name, axis_index_groups, index, static_total)

  def adaptive() -> stats.CovarianceMoments:
    first, precise = run(pivot)
    return lax.cond(precise, lambda: first,
                    lambda: run(lax.stop_gradient(first.mean))[0])

  def always_twice() -> stats.CovarianceMoments:
    first, _ = run(pivot)
    return run(lax.stop_gradient(first.mean))[0]

  if route == "adaptive":
    return adaptive()
  if route == "one_pass":
    return always_twice()
  return lax.platform_dependent(cpu=adaptive, default=always_twice)

"""The one place bnjax talks across devices.

Per-device moments are combined with a single `lax.all_gather` of (count, pivot, delta, m2) over the
named axis, then merged on every device with Chan's parallel formula, weighted by counts. That is
exact for unequal valid counts (means are never averaged), keeps the shifted form (so large offsets
stay exact), and gives every device bit-identical statistics.

`axis_index_groups` is honoured by weighting the gathered moments with a static membership matrix,
so groups of unequal size are exact and work the same under `shard_map`, `pmap` and
`vmap(axis_name=...)`.
"""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from bnjax import _checks
from bnjax.stats import Moments


def axis_size(axis_name: Any) -> int:
  """The static number of devices along `axis_name` (a name or a tuple of names)."""
  return lax.axis_size(axis_name)


def _typed_manual(value: jax.Array, axis_name: Any) -> bool:
  """Whether every named axis is a manual mesh axis whose variance JAX tracks for `value`.

  That is `shard_map` with `check_vma=True` (and `pmap`): there an invariant gather is exact under
  autodiff, because JAX sums cotangents of per-device losses itself. Under `vmap`, or `shard_map`
  with `check_vma=False`, the plain gather (which transposes to a reduce-scatter) is the exact one.
  """
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  typed = varying_axes(value)
  return all(name in manual and name in typed for name in names)


def varying_axes(value: Any) -> frozenset:
  """The mesh axes over which JAX's type system says `value` varies (empty outside `shard_map`)."""
  aval = jax.typeof(value)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # earlier releases


def combine_moments(moments: Moments, axis_name: Any, axis_index_groups: Any = None,
                    *, where: str = "bnjax.batch_norm") -> Moments:
  """Merges per-device moments over `axis_name` (within each group) into global moments.

  Args:
    moments: this device's `Moments`.
    axis_name: a named axis bound by `shard_map`, `pmap` or `vmap`, or None (returns `moments`).
    axis_index_groups: None, or a partition of the axis indices into groups that are combined
      separately.
    where: the public function to name in errors.

  Returns:
    `Moments` of the union of the group's data, identical on every member.
  """
  if axis_name is None:
    return moments
  stacked = jnp.stack([moments.count, moments.pivot, moments.delta, moments.m2])
  # Without groups every device computes the same statistics: gather them as invariant values so
  # that, under `shard_map`, the new running statistics can leave with `out_specs=P()`.
  to = "invarying" if axis_index_groups is None and _typed_manual(stacked, axis_name) else "varying"
  gathered = lax.all_gather(stacked, axis_name, to=to)  # [devices, 4, ...]
  count, pivot, delta, m2 = (gathered[:, i] for i in range(4))
  if axis_index_groups is not None:
    weight = _group_weights(axis_name, axis_index_groups, count.dtype, where)
    count = count * weight.reshape((-1,) + (1,) * (count.ndim - 1))
  has_data = count > 0
  total = jnp.sum(count, axis=0, keepdims=True)
  # A common reference: the pivot of the first member with data (any member's pivot is a data value).
  first = jnp.argmax(has_data, axis=0, keepdims=True)
  reference = jnp.take_along_axis(pivot, first, axis=0)
  offset = jnp.where(has_data, (pivot - reference) + delta, jnp.zeros((), pivot.dtype))
  global_delta = jnp.sum(count * offset, axis=0, keepdims=True) / jnp.maximum(total, 1)
  spread = offset - global_delta
  global_m2 = (jnp.sum(jnp.where(has_data, m2, jnp.zeros((), m2.dtype)), axis=0)
               + jnp.sum(count * spread * spread, axis=0))
  return Moments(total[0], reference[0], global_delta[0], global_m2)


def sum_over_devices(values: jax.Array, axis_name: Any, axis_index_groups: Any = None
                     ) -> jax.Array:
  """Sums `values` over `axis_name` (within each group) with one collective; identity without."""
  if axis_name is None:
    return values
  if axis_index_groups is None:
    return lax.psum(values, axis_name)
  # `psum` with groups is unavailable under `shard_map`: gather and sum the group's members.
  weight = _group_weights(axis_name, axis_index_groups, values.dtype, "bnjax.batch_norm")
  gathered = lax.all_gather(values, axis_name)
  return jnp.tensordot(weight, gathered, axes=1)


def _group_weights(axis_name: Any, axis_index_groups: Any, dtype: Any, where: str) -> jax.Array:
  """[devices] 0/1 weights: 1 for the members of this device's group (static membership)."""
  membership = _checks.partition_matrix(axis_index_groups, axis_size(axis_name), where)
  return jnp.asarray(membership, dtype)[lax.axis_index(axis_name)]

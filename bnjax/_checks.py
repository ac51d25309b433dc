"""Trace-time validation: every check runs on static shapes and dtypes, so it is free under `jit`.

Each error names the argument, the value expected and the value received, and says how to fix it.
"""

from collections.abc import Sequence
import math
import numbers
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _fail(where: str, message: str, exception_type: type[Exception] = ValueError):
  raise exception_type(f"{where}: {message}")


def canonical_axes(ndim: int, axis: int | Sequence[int], where: str) -> tuple[int, ...]:
  """Returns `axis` as a sorted tuple of non-negative ints, or raises naming `axis`."""
  if isinstance(axis, numbers.Integral):
    axes = (axis,)
  elif isinstance(axis, Sequence):
    axes = tuple(axis)
  else:
    _fail(where, f"`axis` must be an int or a tuple of ints; got {axis!r}.", TypeError)
  if not axes:
    _fail(where, "`axis` must name at least one feature axis; got an empty tuple.")
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, numbers.Integral):
      _fail(where, f"`axis` must be an int or a tuple of ints; got {axis!r}.", TypeError)
    if not -ndim <= a < ndim:
      _fail(where, f"`axis` {a} is out of range for `x` of rank {ndim}; "
            f"expected a value in [{-ndim}, {ndim - 1}].")
  canonical = tuple(sorted({int(a) % ndim for a in axes}))
  if len(canonical) != len(axes):
    _fail(where, f"`axis` {axis!r} names the same axis twice for `x` of rank {ndim}.")
  return canonical


def check_train(train: Any, where: str) -> bool:
  """`train` selects a different computation, so it must be a Python bool, not a traced value."""
  if isinstance(train, (bool, np.bool_)):
    return bool(train)
  if isinstance(train, jax.core.Tracer):
    _fail(where, "`train` must be a static Python bool but got a traced value. Mark it static, "
          "e.g. `jax.jit(step, static_argnames='train')`, or close over it.", TypeError)
  _fail(where, f"`train` must be a Python bool; got {train!r} of type {type(train).__name__}.",
        TypeError)


def check_floating(x: jax.Array, name: str, where: str) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    _fail(where, f"`{name}` must have a floating dtype; got {dtype}. Cast it, e.g. "
          f"`{name}.astype(jnp.float32)`.", TypeError)


def check_hyperparameters(momentum: Any, epsilon: Any, where: str) -> None:
  """Checks `momentum` and `epsilon` when they are concrete numbers (traced values pass)."""
  if _is_concrete_scalar(momentum):
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
      _fail(where, f"`momentum` must be in [0, 1] (the decay of the running average, Flax's "
            f"convention); got {m}. For a PyTorch momentum p use `bnjax.from_torch_momentum(p)`.")
  if _is_concrete_scalar(epsilon):
    e = float(epsilon)
    if not e > 0.0:
      _fail(where, f"`epsilon` must be > 0 so that 1/sqrt(var + epsilon) is finite; got {e}.")


def _is_concrete_scalar(v: Any) -> bool:
  if isinstance(v, jax.core.Tracer):
    return False
  return np.ndim(v) == 0


def check_feature_shapes(params, state, feature_shape: tuple[int, ...], x_shape, axes,
                         where: str) -> None:
  """Every parameter and statistic must have exactly the feature shape of `x`."""
  fix = (f"Create them with `bnjax.init({feature_shape if len(feature_shape) > 1 else feature_shape[0]})` "
         f"or pass the `axis` they were made for.")
  named = [("params.scale", params.scale), ("params.bias", params.bias),
           ("state.mean", state.mean), ("state.var", state.var)]
  for name, value in named:
    if value is None:
      if name.startswith("state"):
        _fail(where, f"`{name}` is None; the running statistics are required. {fix}")
      continue
    chex.assert_shape(
        value, feature_shape, exception_type=ValueError,
        custom_message=(f"{where}: `{name}` has shape {tuple(np.shape(value))} but `x` of shape "
                        f"{tuple(x_shape)} has feature shape {feature_shape} (axis={axes}). {fix}"))
    check_floating(value, name, where)


def mask_to_rank(mask: Any, x_shape: tuple[int, ...], where: str) -> jax.Array:
  """Returns `mask` as a bool array of `x`'s rank, with each dimension 1 or `x`'s size."""
  mask = jnp.asarray(mask)
  if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
    _fail(where, f"`mask` must be boolean (True where a value is valid); got dtype {mask.dtype}. "
          "Use `mask.astype(bool)`.", TypeError)
  if mask.ndim > len(x_shape):
    _fail(where, f"`mask` of shape {mask.shape} has more dimensions than `x` of shape "
          f"{tuple(x_shape)}; expected a shape broadcastable to {tuple(x_shape)}.")
  shape = (1,) * (len(x_shape) - mask.ndim) + tuple(mask.shape)
  for m, s in zip(shape, x_shape):
    if m not in (1, s):
      _fail(where, f"`mask` of shape {tuple(mask.shape)} does not broadcast to `x` of shape "
            f"{tuple(x_shape)}; expected each dimension to be 1 or the size of `x`'s.")
  mask = mask.reshape(shape)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def check_values_per_channel(local_count: int, devices: int, where: str) -> None:
  """Training needs more than one value per channel (PyTorch raises too; Flax returns `bias`)."""
  if local_count * devices <= 1:
    _fail(where, f"expected more than 1 value per channel when training, got {local_count * devices} "
          f"({local_count} per device x {devices} device(s)). The variance of one value is 0, so "
          "the output would be `bias` whatever the input: use a larger batch, or `train=False`.")


def partition_matrix(groups: Any, axis_size: int, where: str) -> np.ndarray:
  """Returns the [axis_size, axis_size] 0/1 matrix whose row i marks the members of i's group."""
  try:
    groups = [[int(i) for i in g] for g in groups]
  except TypeError:
    _fail(where, f"`axis_index_groups` must be a list of lists of device indices; got {groups!r}.",
          TypeError)
  members = sorted(i for g in groups for i in g)
  if members != list(range(axis_size)) or any(not g for g in groups):
    _fail(where, f"`axis_index_groups` must split the {axis_size} indices of the named axis into "
          f"non-empty groups, each index in exactly one group; got {groups!r}.")
  matrix = np.zeros((axis_size, axis_size), np.float32)
  for g in groups:
    for i in g:
      matrix[i, g] = 1.0
  return matrix


def smallest_group(groups: Any, axis_size: int) -> int:
  if groups is None:
    return axis_size
  return min(len(g) for g in groups)


def static_count(x_shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> int:
  return math.prod(x_shape[a] for a in reduce_axes)

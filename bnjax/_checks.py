"""Trace-time validation: every check runs on static shapes and dtypes, so it is free under `jit`.

Each error names the argument, the value expected and the value received, and says how to fix it.
"""

from collections.abc import Callable, Sequence
import math
import numbers
from typing import Any, NoReturn

import chex
import jax
import jax.core
import jax.numpy as jnp
import numpy as np


def fail(where: str, message: str, exception_type: type[Exception] = ValueError) -> NoReturn:
  """Raises `exception_type` with the message prefixed by the public function's name."""
  raise exception_type(f"{where}: {message}")



def canonical_axes(ndim: int, axis: int | Sequence[int], where: str) -> tuple[int, ...]:
  """Returns `axis` as a sorted tuple of non-negative ints, or raises naming `axis`."""
  axes: tuple[Any, ...]
  if isinstance(axis, numbers.Integral):
    axes = (axis,)
  elif isinstance(axis, Sequence):
    axes = tuple(axis)
  else:
    fail(where, f"`axis` must be an int or a tuple of ints; got {axis!r}.", TypeError)
  if not axes:
    fail(where, "`axis` must name at least one feature axis; got an empty tuple.")
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, numbers.Integral):
      fail(where, f"`axis` must be an int or a tuple of ints; got {axis!r}.", TypeError)
    if not -ndim <= int(a) < ndim:
      fail(where, f"`axis` {a} is out of range for `x` of rank {ndim}; "
            f"expected a value in [{-ndim}, {ndim - 1}].")
  canonical = tuple(sorted({int(a) % ndim for a in axes}))
  if len(canonical) != len(axes):
    fail(where, f"`axis` {axis!r} names the same axis twice for `x` of rank {ndim}.")
  return canonical


def check_train(train: Any, where: str) -> bool:
  """`train` selects a different computation, so it must be a Python bool, not a traced value."""
  if isinstance(train, (bool, np.bool_)):
    return bool(train)
  if isinstance(train, jax.core.Tracer):
    fail(where, "`train` must be a static Python bool but got a traced value. Mark it static, "
          "e.g. `jax.jit(step, static_argnames='train')`, or close over it.", TypeError)
  fail(where, f"`train` must be a Python bool; got {train!r} of type {type(train).__name__}.",
        TypeError)


def check_floating(x: Any, name: str, where: str) -> None:
  """`x` must be a real floating array (complex input is refused: see the message)."""
  try:
    dtype = jnp.result_type(x)
  except TypeError:
    fail(where, f"`{name}` must be a floating array; got {type(x).__name__}.", TypeError)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    fail(where, f"`{name}` has the complex dtype {dtype}, which bnjax does not normalise: a "
          "complex mean and a variance of |x|^2 treat the real and imaginary parts as one "
          "channel. Normalise them as separate channels instead, e.g. "
          f"`jnp.concatenate([{name}.real, {name}.imag], axis=-1)`.", TypeError)
  if not jnp.issubdtype(dtype, jnp.floating):
    fail(where, f"`{name}` must have a floating dtype; got {dtype}. Cast it, e.g. "
          f"`{name}.astype(jnp.float32)`.", TypeError)


def check_hyperparameters(momentum: Any, epsilon: Any, where: str) -> None:
  """Checks `momentum` and `epsilon` (scalars or per-channel arrays); traced values pass."""
  _check_number(momentum, "momentum", where, "a number in [0, 1] (the decay of the running "
                "average, Flax's convention; for a PyTorch momentum p use "
                "`bnjax.from_torch_momentum(p)`)", lambda v: (v >= 0.0) & (v <= 1.0))
  _check_number(epsilon, "epsilon", where, "a number > 0, so that 1/sqrt(var + epsilon) is "
                "finite (Flax and PyTorch use 1e-5)", lambda v: v > 0.0)


def _check_number(value: Any, name: str, where: str, expected: str,
                  in_range: Callable[[np.ndarray], np.ndarray]) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  if value is None or isinstance(value, (str, bytes, bool, dict)):
    fail(where, f"`{name}` must be {expected}; got {value!r}.", TypeError)
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    fail(where, f"`{name}` must be {expected}; got {value!r} of type {type(value).__name__}.",
          TypeError)
  bad = ~in_range(array)
  if np.any(bad):
    shown = array if array.ndim == 0 else array[bad][:4]
    fail(where, f"`{name}` must be {expected}; got {shown.tolist()}"
          f"{'' if array.ndim == 0 else f' among its {array.size} entries'}.")


def check_params_and_state(params: Any, state: Any, where: str) -> None:
  """`params` must have ``scale``/``bias`` and `state` ``mean``/``var`` (the bnjax NamedTuples)."""
  for name, value, fields, make in (
      ("params", params, ("scale", "bias"), "bnjax.BatchNormParams(scale=..., bias=...)"),
      ("state", state, ("mean", "var"), "bnjax.BatchNormState(mean=..., var=...)")):
    if all(hasattr(value, f) for f in fields):
      continue
    if isinstance(value, dict):
      hint = (f"a dict with keys {sorted(value)}; convert it with `{make.split('(')[0]}(**d)` "
              f"or build it as `{make}`")
    else:
      hint = f"{value!r}; create both with `bnjax.init(num_features)` or as `{make}`"
    fail(where, f"`{name}` must have the fields {fields}; got {hint}.", TypeError)


def check_feature_shapes(params: Any, state: Any, feature_shape: tuple[int, ...],
                         x_shape: tuple[int, ...], axes: Any, where: str) -> None:
  """Every parameter and statistic must have exactly the feature shape of `x`."""
  shown = feature_shape[0] if len(feature_shape) == 1 else feature_shape
  fix = (f"Create them with `bnjax.init({shown})` "
         f"or pass the `axis` they were made for.")
  named = [("params.scale", params.scale), ("params.bias", params.bias),
           ("state.mean", state.mean), ("state.var", state.var)]
  for name, value in named:
    if value is None:
      if name.startswith("state"):
        fail(where, f"`{name}` is None; the running statistics are required. {fix}")
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
    fail(where, f"`mask` must be boolean (True where a value is valid); got dtype {mask.dtype}. "
          "Use `mask.astype(bool)`.", TypeError)
  if mask.ndim > len(x_shape):
    fail(where, f"`mask` of shape {mask.shape} has more dimensions than `x` of shape "
          f"{tuple(x_shape)}; expected a shape broadcastable to {tuple(x_shape)}.")
  shape = (1,) * (len(x_shape) - mask.ndim) + tuple(mask.shape)
  for m, s in zip(shape, x_shape, strict=True):
    if m not in (1, s):
      fail(where, f"`mask` of shape {tuple(mask.shape)} does not broadcast to `x` of shape "
            f"{tuple(x_shape)}; expected each dimension to be 1 or the size of `x`'s.")
  mask = mask.reshape(shape)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def check_values_per_channel(local_count: Any, devices: int, where: str) -> None:
  """Training needs more than one value per channel (PyTorch raises too; Flax returns `bias`).

  `local_count` may be a symbolic size (`jax.export`); the check must then be decidable from the
  shape's constraints.
  """
  try:
    too_few = local_count * devices <= 1
  except Exception as e:  # noqa: BLE001  (jax's InconclusiveDimensionOperation is not public.)
    fail(where, f"cannot decide whether the symbolic shape gives more than 1 value per channel "
         f"when training ({local_count} per device x {devices} device(s)): {e.__class__.__name__}. "
         "Export with a constraint that makes it decidable, e.g. "
         "`jax.export.symbolic_shape('b', constraints=['b >= 2'])`.")
  if too_few:
    fail(where, "expected more than 1 value per channel when training, got "
         f"{local_count * devices} ({local_count} per device x {devices} device(s)). "
         "The variance of one value is 0, so the output would be `bias` whatever the input: "
         "use a larger batch, or `train=False`.")


def static_count(x_shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> int:
  return math.prod(x_shape[a] for a in reduce_axes)


# --- Running-statistics variants (cumulative average, Batch Renormalization, ghost batches) -----


def check_cumulative_state(state: Any, where: str) -> None:
  """``momentum=None`` (the cumulative average) needs a state with an integer ``count``."""
  count = update_counter(state)
  if count is None:
    fields = getattr(state, "_fields", "?")
    fail(where, "`momentum` must be a number in [0, 1], or None for the cumulative average of "
         "all batch statistics (PyTorch's `momentum=None`), which needs a counter of updates in "
         f"the running statistics; got None, and this state has none ({type(state).__name__} "
         f"with fields {fields}). Create it with `bnjax.init(num_features, cumulative=True)` (a "
         "`bnjax.CumulativeState`); the modules add a `count` to their statistics themselves "
         "when `momentum=None`. Otherwise pass a number in [0, 1] as `momentum`.", TypeError)
  if not jnp.issubdtype(jnp.result_type(count), jnp.integer):
    fail(where, f"`state.count` must be an integer array (updates per channel); got dtype "
         f"{jnp.result_type(count)}.", TypeError)
  if np.shape(count) != np.shape(state.mean):
    fail(where, f"`state.count` must have the shape of `state.mean`, {np.shape(state.mean)}; got "
         f"{np.shape(count)}. Create the state with `bnjax.init(num_features, cumulative=True)`.")


def update_counter(state: Any) -> Any:
  """The ``count`` field of a running state, or None (a NamedTuple's ``count`` method is not it)."""
  return state.count if "count" in getattr(state, "_fields", ()) else None


def check_renorm(r_max: Any, d_max: Any, where: str) -> tuple[Any, Any] | None:
  """Batch Renormalization's clipping bounds: both or neither; concrete values in range."""
  if r_max is None and d_max is None:
    return None
  if r_max is None or d_max is None:
    fail(where, "Batch Renormalization needs both `renorm_r_max` and `renorm_d_max`; got "
         f"renorm_r_max={r_max!r}, renorm_d_max={d_max!r}. `renorm_r_max=1, renorm_d_max=0` is "
         "batch norm, the paper's start; `inf` switches a clip off.")
  _check_number(r_max, "renorm_r_max", where, "a scalar >= 1 (r is clipped to [1/r_max, r_max])",
                lambda v: v >= 1.0)
  _check_number(d_max, "renorm_d_max", where, "a scalar >= 0 (d is clipped to [-d_max, d_max])",
                lambda v: v >= 0.0)
  for name, value in (("renorm_r_max", r_max), ("renorm_d_max", d_max)):
    if np.ndim(value) != 0:
      fail(where, f"`{name}` must be a scalar; got shape {np.shape(value)}.")
  return r_max, d_max


def check_ghost_batch_size(ghost_batch_size: Any, x_shape: tuple[Any, ...],
                           feature_axes: tuple[int, ...], where: str) -> int:
  """The ghost batch size: a positive int, ghosts along axis 0, which must be a batch axis."""
  if (isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, numbers.Integral)
      or ghost_batch_size < 1):
    fail(where, f"`ghost_batch_size` must be a positive int (examples per ghost batch) or None; "
         f"got {ghost_batch_size!r}.", TypeError if not isinstance(ghost_batch_size, numbers.Real)
         else ValueError)
  if 0 in feature_axes:
    fail(where, f"ghost batches split the leading batch axis 0, but `axis`={feature_axes} makes "
         "axis 0 a feature axis. Put the batch first, or leave `ghost_batch_size` None.")
  if not isinstance(x_shape[0], numbers.Integral):
    fail(where, f"`ghost_batch_size` needs a static batch size; `x` has the symbolic leading "
         f"size {x_shape[0]}.")
  return int(ghost_batch_size)


# ----------------------------------------------------------------------------- normalisation family


def canonical_named_axes(ndim: int, axes: Any, name: str, where: str) -> tuple[int, ...]:
  """`axes` (an int or a sequence of ints) as a sorted tuple of non-negative ints.

  Raises naming the argument `name` (``reduction_axes``, ``feature_axes``).
  """
  if isinstance(axes, numbers.Integral) and not isinstance(axes, bool):
    items = (axes,)
  elif isinstance(axes, Sequence) and not isinstance(axes, str):
    items = tuple(axes)
  else:
    fail(where, f"`{name}` must be an int or a sequence of ints; got {axes!r}.", TypeError)
  if not items:
    fail(where, f"`{name}` must name at least one axis; got {axes!r}.")
  for a in items:
    if isinstance(a, bool) or not isinstance(a, numbers.Integral):
      fail(where, f"`{name}` must be an int or a sequence of ints; got {axes!r}.", TypeError)
    if not -ndim <= int(a) < ndim:
      fail(where, f"`{name}` {axes!r} is out of range for `x` of rank {ndim}; expected values "
           f"in [{-ndim}, {ndim - 1}].")
  canonical = tuple(sorted({int(a) % ndim for a in items}))
  if len(canonical) != len(items):
    fail(where, f"`{name}` {axes!r} names the same axis twice for `x` of rank {ndim}.")
  return canonical


def check_epsilon(epsilon: Any, where: str) -> None:
  """`epsilon` must be a scalar > 0 (a traced value passes)."""
  if np.ndim(epsilon) != 0:
    fail(where, f"`epsilon` must be a scalar > 0; got an array of shape {np.shape(epsilon)}.")
  _check_number(epsilon, "epsilon", where, "a number > 0, so that 1/sqrt(var + epsilon) is "
                "finite (Flax's layer, group and RMS norms use 1e-6)", lambda v: v > 0.0)


def check_params(params: Any, feature_shape: tuple[int, ...], x_shape: tuple[int, ...],
                 described: str, where: str) -> None:
  """`params` must have ``scale`` and ``bias``, each None or a floating array of `feature_shape`.

  `described` says where that shape comes from, for the message.
  """
  if not all(hasattr(params, f) for f in ("scale", "bias")):
    hint = (f"a dict with keys {sorted(params)}; convert it with `bnjax.BatchNormParams(**d)`"
            if isinstance(params, dict) else repr(params))
    fail(where, f"`params` must have the fields ('scale', 'bias'); got {hint}. Create it with "
         f"`bnjax.init_params({_shape_hint(feature_shape)})`.", TypeError)
  for name in ("scale", "bias"):
    value = getattr(params, name)
    if value is None:
      continue
    if tuple(np.shape(value)) != tuple(feature_shape):
      fail(where, f"`params.{name}` has shape {tuple(np.shape(value))} but `x` of shape "
           f"{tuple(x_shape)} needs {tuple(feature_shape)} ({described}). Create the parameters "
           f"with `bnjax.init_params({_shape_hint(feature_shape)})`.")
    check_floating(value, f"params.{name}", where)


def _shape_hint(shape: tuple[int, ...]) -> str:
  return str(shape[0]) if len(shape) == 1 else str(tuple(shape))

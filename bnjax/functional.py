"""The pure batch-norm core: `init`, `batch_norm` and the running-statistics update."""

from collections.abc import Sequence
import functools
import math
import numbers
from typing import Any, Literal, overload

import jax
from jax import lax
import jax.core
import jax.numpy as jnp

from bnjax import _checks
from bnjax import _standardize
from bnjax import distributed
from bnjax import stats
from bnjax.types import BatchNormParams
from bnjax.types import BatchNormState
from bnjax.types import BatchStats

_WHERE = "bnjax.batch_norm"


def init(num_features: int | Sequence[int], *, dtype: Any = jnp.float32, use_scale: bool = True,
         use_bias: bool = True) -> tuple[BatchNormParams, BatchNormState]:
  """Creates the parameters and running statistics of a batch-norm layer.

  Args:
    num_features: the number of channels, or a tuple of feature-axis sizes (the shape of ``x``
      along ``axis``, in increasing axis order).
    dtype: the dtype of ``scale`` and ``bias``. The running statistics are always float32.
    use_scale: if False, ``params.scale`` is None (no γ).
    use_bias: if False, ``params.bias`` is None (no β).

  Returns:
    ``(params, state)``: scale ones and bias zeros; running mean zeros and running variance ones.

  Raises:
    ValueError: if a feature size is not a positive int.

  Examples:
    >>> params, state = bnjax.init(3)
    >>> params.scale, state.var
    (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
  """
  shape = (num_features,) if not isinstance(num_features, Sequence) else tuple(num_features)
  if not shape or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1
                      for n in shape):
    raise ValueError(f"bnjax.init: `num_features` must be a positive int or a non-empty tuple of "
                     f"positive ints; got {num_features!r}.")
  shape = tuple(int(n) for n in shape)
  params = BatchNormParams(
      scale=jnp.ones(shape, dtype) if use_scale else None,
      bias=jnp.zeros(shape, dtype) if use_bias else None,
  )
  state = BatchNormState(mean=jnp.zeros(shape, jnp.float32), var=jnp.ones(shape, jnp.float32))
  return params, state


def from_torch_momentum(torch_momentum: float) -> float:
  """Converts a PyTorch ``momentum`` (weight of the new batch) to bnjax's decay, ``1 - m``.

  PyTorch updates ``running = (1 - m) * running + m * batch``; bnjax, Flax and Keras update
  ``running = momentum * running + (1 - momentum) * batch``. PyTorch also stores the unbiased
  variance: pass ``unbiased_running_var=True`` to match its running statistics.

  Raises:
    TypeError: if ``torch_momentum`` is not a number (PyTorch's ``momentum=None``, a cumulative
      average, has no decay equivalent).
    ValueError: if it is outside [0, 1].

  Examples:
    >>> bnjax.from_torch_momentum(0.1)
    0.9
  """
  where = "bnjax.from_torch_momentum"
  if isinstance(torch_momentum, bool) or not isinstance(torch_momentum, numbers.Real):
    _checks.fail(where, f"`torch_momentum` must be a number in [0, 1] (PyTorch's `momentum`, the "
                 f"weight of the new batch); got {torch_momentum!r}. PyTorch's `momentum=None` "
                 "(a cumulative average) has no exponential-decay equivalent.", TypeError)
  m = float(torch_momentum)
  if not 0.0 <= m <= 1.0:
    _checks.fail(where, f"`torch_momentum` must be in [0, 1]; got {m}.")
  return round(1.0 - m, 12)


def update_running_stats(state: BatchNormState, mean: jax.Array, var: jax.Array,
                         count: jax.Array, momentum: Any, unbiased: bool
                         ) -> tuple[BatchNormState, jax.Array]:
  """Moves the running averages toward one batch's statistics, channel by channel.

  ``new = momentum * old + (1 - momentum) * batch``, computed in at least float32 and returned in
  the state's own dtype (a bfloat16 state moves as a float32 one would, then rounds; it still
  stops moving once ``(1 - momentum) * |batch - running|`` is below half its spacing, e.g. 0.78
  away near 3.0 at momentum 0.99, so keep running statistics in float32 as `init` makes them).
  Channels
  whose batch statistics are not finite (a NaN or Inf in the batch), that had no valid value, or
  (with ``unbiased``) only one, keep their old values, so a bad batch never poisons the state.

  Args:
    state: the running statistics, of the feature shape.
    mean: the batch mean, of the feature shape.
    var: the biased batch variance, of the feature shape.
    count: the number of values behind each channel's statistics.
    momentum: the decay of the running average (a scalar or per-channel values in [0, 1]).
    unbiased: if True, the variance is scaled by ``count / (count - 1)`` before averaging.

  Returns:
    ``(new_state, updated)``, where ``updated`` is a bool array that is False where the old values
    were kept.
  """
  dtype = jnp.dtype(jnp.float64 if jnp.finfo(state.mean.dtype).bits > 32 else jnp.float32)
  mean = lax.stop_gradient(mean).astype(dtype)
  var = lax.stop_gradient(var).astype(dtype)
  count = jnp.asarray(count)
  if unbiased:
    n = count.astype(dtype)
    var = var * (n / jnp.maximum(n - 1, 1))
  updated = jnp.isfinite(mean) & jnp.isfinite(var) & (count > (1 if unbiased else 0))
  momentum = jnp.asarray(momentum, dtype)
  old_mean, old_var = state.mean.astype(dtype), state.var.astype(dtype)
  new_mean = momentum * old_mean + (1 - momentum) * mean
  new_var = momentum * old_var + (1 - momentum) * var
  new_state = BatchNormState(
      mean=jnp.where(updated, new_mean, old_mean).astype(state.mean.dtype),
      var=jnp.where(updated, new_var, old_var).astype(state.var.dtype),
  )
  return new_state, updated


_Returns = tuple[jax.Array, BatchNormState]
_ReturnsWithStats = tuple[jax.Array, BatchNormState, BatchStats]


@overload
def batch_norm(params: BatchNormParams, state: BatchNormState, x: jax.Array, train: bool, *,
               axis: int | Sequence[int] = ..., momentum: Any = ..., epsilon: Any = ...,
               axis_name: Any = ..., axis_index_groups: Any = ..., mask: jax.Array | None = ...,
               unbiased_running_var: bool = ..., dtype: Any = ...,
               return_stats: Literal[False] = ..., custom_vjp: bool = ...,
               stats_route: str = ...) -> _Returns: ...


@overload
def batch_norm(params: BatchNormParams, state: BatchNormState, x: jax.Array, train: bool, *,
               axis: int | Sequence[int] = ..., momentum: Any = ..., epsilon: Any = ...,
               axis_name: Any = ..., axis_index_groups: Any = ..., mask: jax.Array | None = ...,
               unbiased_running_var: bool = ..., dtype: Any = ..., return_stats: Literal[True],
               custom_vjp: bool = ..., stats_route: str = ...) -> _ReturnsWithStats: ...


@overload
def batch_norm(params: BatchNormParams, state: BatchNormState, x: jax.Array, train: bool, *,
               axis: int | Sequence[int] = ..., momentum: Any = ..., epsilon: Any = ...,
               axis_name: Any = ..., axis_index_groups: Any = ..., mask: jax.Array | None = ...,
               unbiased_running_var: bool = ..., dtype: Any = ..., return_stats: bool,
               custom_vjp: bool = ..., stats_route: str = ...
               ) -> _Returns | _ReturnsWithStats: ...


def batch_norm(params: BatchNormParams, state: BatchNormState, x: jax.Array, train: bool, *,
               axis: int | Sequence[int] = -1, momentum: Any = 0.99, epsilon: Any = 1e-5,
               axis_name: Any = None, axis_index_groups: Any = None, mask: jax.Array | None = None,
               unbiased_running_var: bool = False, dtype: Any = None, return_stats: bool = False,
               custom_vjp: bool = True, stats_route: str = "auto"
               ) -> _Returns | _ReturnsWithStats:
  r"""Batch normalization, as a pure function of parameters, running statistics and input.

  .. math::

     y = \gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  In training (``train=True``), :math:`\mu` and :math:`\sigma^2` are the mean and biased variance of
  ``x`` over every axis except ``axis`` (and across devices along ``axis_name``), and the running
  statistics move toward them: ``new = momentum * old + (1 - momentum) * batch`` (the Flax/Keras
  decay convention; PyTorch's ``momentum=p`` is ``momentum=1 - p``, see `from_torch_momentum`).
  In evaluation (``train=False``), the running statistics are used and ``state`` is returned as is.

  Statistics are computed in at least float32 (float64 input stays float64) from sums shifted by a
  pivot taken from the data (see `bnjax.stats`), exact for data far from zero; the output has the
  input's dtype (or ``dtype``); the running statistics keep their dtype (float32 from `init`), and
  their update is computed in at least float32.

  Warning:
    A channel whose batch statistics are not finite (NaN or Inf in its valid values), or that has
    no valid value under ``mask``, keeps its old running statistics; ``return_stats=True`` reports
    which channels were updated. Channels with no valid value are normalised with the running
    statistics.

  Args:
    params: ``BatchNormParams``; ``scale`` and ``bias`` of the feature shape, or None.
    state: ``BatchNormState``; ``mean`` and ``var`` of the feature shape.
    x: a real floating array of any rank; the feature axes are ``axis``. Complex and integer
      input is refused (cast integers, e.g. ``x.astype(jnp.float32)``).
    train: a static Python bool: batch statistics (True) or running statistics (False).
    axis: the feature axis or axes; every other axis is reduced over (possibly none, e.g. one
      example per `vmap` member, whose statistics then come from across ``axis_name``).
    momentum: decay of the running averages, in [0, 1]: a scalar or per-channel values.
    epsilon: added to the variance, > 0: a scalar or per-channel values. Differentiable.
    axis_name: a named axis (``shard_map``, ``pmap``, ``vmap``) or tuple of them to compute
      statistics over, as if the batches of all devices were concatenated. The combine sends
      O(channels) bytes per device, whatever the number of devices (see `bnjax.distributed`).
    axis_index_groups: a partition of the named axis's indices; statistics are combined within each
      group. Groups may have different sizes.
    mask: bool array broadcastable to ``x``; statistics use only True positions. Values at False
      positions never enter the statistics, and a non-finite value there is replaced by the mean
      before any arithmetic, so it reaches neither the valid outputs nor any gradient. The output
      at a False position is the normalised value (``bias`` where it was not finite).
    unbiased_running_var: store the unbiased variance ``m / (m - 1) * var`` in the running average
      (the paper's inference rule and PyTorch's); normalisation in training always uses the biased
      variance.
    dtype: the output dtype; defaults to ``x.dtype``.
    return_stats: also return the step's ``BatchStats`` (training only).
    custom_vjp: differentiate training mode with bnjax's closed-form backward pass, which keeps
      ``x``, the mask and per-channel values for the backward and needs one all-reduce; False uses
      JAX's autodiff, which also supports forward mode (``jax.jvp``, ``jax.jacfwd``,
      ``jax.hessian``).
    stats_route: how the batch moments are computed (see `bnjax.stats`): ``"adaptive"`` (exact:
      raw sums, a data pivot or an exact second pass, chosen by `lax.cond`), ``"one_pass"`` (one
      pass around a data pivot, no data-dependent control flow, at most ``log2(1 + k**2)`` bits lost
      for a pivot ``k`` standard deviations from the mean), or ``"auto"``: adaptive on CPU,
      one-pass on GPU and TPU and (with ``custom_vjp``) under `vmap`.

  Returns:
    ``(y, new_state)``, or ``(y, new_state, batch_stats)`` with ``return_stats=True``.

  Raises:
    TypeError: if ``train`` is not a Python bool (e.g. traced), ``x`` is not real floating,
      ``mask`` is not boolean, ``params``/``state`` are not bnjax's pytrees, or ``momentum`` or
      ``epsilon`` is not a number.
    ValueError: on mismatched shapes, a bad ``axis``, ``momentum``, ``epsilon`` or
      ``stats_route``, or one value per channel in training.

  Examples:
    >>> params, state = bnjax.init(2)
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, state = bnjax.batch_norm(params, state, x, train=True)
    >>> y.round(3)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> [round(m, 4) for m in state.mean.tolist()]  # 0.99 * 0 + 0.01 * batch mean
    [0.02, 0.2]
  """
  train = _checks.check_train(train, _WHERE)
  _checks.check_params_and_state(params, state, _WHERE)
  _checks.check_floating(x, "x", _WHERE)
  x = jnp.asarray(x)
  feature_axes = _checks.canonical_axes(x.ndim, axis, _WHERE)
  reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  _checks.check_feature_shapes(params, state, feature_shape, x.shape, axis, _WHERE)
  _checks.check_hyperparameters(momentum, epsilon, _WHERE)
  if stats_route not in stats.ROUTES:
    _checks.fail(_WHERE, f"`stats_route` must be one of {stats.ROUTES}; got {stats_route!r}.")
  if mask is not None:
    mask = _checks.mask_to_rank(mask, x.shape, _WHERE)
  if return_stats and not train:
    _checks.fail(_WHERE, "`return_stats=True` needs `train=True`; evaluation measures no batch "
                 "statistics.")
  if train and axis_name is None and not _any_tracer((params, state, x, mask, momentum, epsilon)):
    # An eager call (outside jit and every transformation) would build and compile its
    # `lax.cond`s anew each time: run it through one compiled program per configuration.
    return _eager_train(params, state, x, mask, momentum, epsilon, axis=feature_axes,
                        unbiased_running_var=unbiased_running_var, dtype=dtype,
                        return_stats=return_stats, custom_vjp=custom_vjp, stats_route=stats_route)

  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  stats_dtype = jnp.dtype(jnp.float64 if jnp.finfo(x.dtype).bits > 32 else jnp.float32)
  keep_shape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))

  def expand(v: Any) -> jax.Array:  # feature shape -> x's rank, reduced axes as 1.
    return jnp.asarray(v).astype(stats_dtype).reshape(keep_shape)

  def squeeze(v: jax.Array) -> jax.Array:  # x's rank -> feature shape.
    return v.reshape(feature_shape)

  scale = None if params.scale is None else expand(params.scale)
  bias = None if params.bias is None else expand(params.bias)
  running_mean, running_var = expand(state.mean), expand(state.var)
  epsilon = _per_channel(epsilon, feature_shape, keep_shape, stats_dtype, "epsilon")
  if not train:
    y = _standardize.normalize(x.astype(stats_dtype), mask, running_mean, None, running_var, scale,
                               bias, epsilon).astype(out_dtype)
    return y, state
  _per_channel(momentum, feature_shape, keep_shape, stats_dtype, "momentum")

  devices = 1
  if axis_name is not None:
    size = distributed.axis_size(axis_name)
    if axis_index_groups is not None:
      distributed.partition_matrix(axis_index_groups, size, _WHERE)
      axis_index_groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    devices = distributed.smallest_group(axis_index_groups, size)
  local_count = math.prod(x.shape[a] for a in reduce_axes)
  _checks.check_values_per_channel(local_count, devices, _WHERE)
  _check_count_fits(local_count, size if axis_name is not None else 1)

  def sum_axes(value: Any) -> tuple[Any, ...]:
    # Mesh axes over which `x` varies but `value` does not (under `shard_map`): the cotangent of
    # `value` must be summed over them, as autodiff's transpose would.
    if value is None:
      return ()
    return tuple(sorted(distributed.varying_axes(x) - distributed.varying_axes(value), key=str))

  count_shape = None
  if mask is not None:  # Counts travel per channel, or once when the mask is the same for all.
    count_shape = tuple(1 if a in feature_axes and mask.shape[a] == 1 else s
                        for a, s in enumerate(keep_shape))
  config = _standardize.TrainConfig(
      reduce_axes=reduce_axes, axis_name=axis_name, axis_index_groups=axis_index_groups,
      stats_dtype=stats_dtype, out_dtype=out_dtype, route=stats_route,
      scale_sum_axes=sum_axes(scale), bias_sum_axes=sum_axes(bias),
      epsilon_sum_axes=sum_axes(epsilon),
      scale_invariant=(scale is None or axis_name is None
                       or distributed.typed_invariant(scale, axis_name, x)),
      pivot_shared=(axis_name is not None
                    and distributed.typed_invariant(running_mean, axis_name, x)),
      count_shape=count_shape, where=_WHERE)
  train_fn = _standardize.jitted_train(custom_vjp)
  y, moments = train_fn(config, x, mask, scale, bias, lax.stop_gradient(running_mean),
                        lax.stop_gradient(running_var), epsilon)
  new_state, updated = update_running_stats(
      state, squeeze(moments.mean), squeeze(moments.var), squeeze(moments.count), momentum,
      unbiased_running_var)

  if return_stats:
    batch = BatchStats(mean=squeeze(moments.mean), var=squeeze(moments.var),
                       count=squeeze(moments.count), updated=updated)
    return y, new_state, batch
  return y, new_state


def _any_tracer(tree: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnames=("axis", "unbiased_running_var", "dtype",
                                             "return_stats", "custom_vjp", "stats_route"))
def _eager_train(params: Any, state: Any, x: jax.Array, mask: jax.Array | None, momentum: Any,
                 epsilon: Any, **static: Any) -> Any:
  return batch_norm(params, state, x, True, mask=mask, momentum=momentum, epsilon=epsilon,
                    **static)


def _per_channel(value: Any, feature_shape: tuple[int, ...], keep_shape: tuple[int, ...],
                 dtype: Any, name: str) -> jax.Array:
  """A scalar hyper-parameter as is; per-channel values (of the feature shape) at `x`'s rank."""
  value = jnp.asarray(value, dtype)
  if value.ndim == 0:
    return value
  if value.shape != tuple(feature_shape):
    _checks.fail(_WHERE, f"`{name}` must be a scalar or have the feature shape "
                 f"{tuple(feature_shape)}; "
                 f"got shape {value.shape}.")
  return value.reshape(keep_shape)


def _check_count_fits(local_count: Any, devices: int) -> None:
  """Counts are int32 without x64: more than 2**31 - 1 values per channel cannot be counted."""
  if jax.config.read("jax_enable_x64"):
    return
  try:
    too_many = local_count * devices > jnp.iinfo(jnp.int32).max
  except Exception:  # noqa: BLE001  (a symbolic size: checked when it is known.)
    return
  if too_many:
    _checks.fail(_WHERE, f"{local_count} values per channel on each of {devices} device(s) "
                 "exceed the int32 count (2**31 - 1); enable 64-bit counts with "
                 "`jax.config.update('jax_enable_x64', True)`.")

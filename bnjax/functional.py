"""The pure batch-norm core: `init`, `batch_norm` and the running-statistics update."""

from collections.abc import Sequence
import functools
import numbers
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from bnjax import _checks
from bnjax import distributed
from bnjax import stats
from bnjax.types import BatchNormParams, BatchNormState, BatchStats

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

  Examples:
    >>> bnjax.from_torch_momentum(0.1)
    0.9
  """
  m = float(torch_momentum)
  if not 0.0 <= m <= 1.0:
    raise ValueError(f"bnjax.from_torch_momentum: `torch_momentum` must be in [0, 1]; got {m}.")
  return round(1.0 - m, 12)


def update_running_stats(state: BatchNormState, mean: jax.Array, var: jax.Array,
                         count: jax.Array, momentum: Any, unbiased: bool
                         ) -> tuple[BatchNormState, jax.Array]:
  """Moves the running averages toward one batch's statistics, channel by channel.

  ``new = momentum * old + (1 - momentum) * batch``. Channels whose batch statistics are not finite
  (a NaN or Inf in the batch), that had no valid value, or (with ``unbiased``) only one, keep their
  old values, so a bad batch never poisons the state.

  Args:
    state: the running statistics, float32, of the feature shape.
    mean: the batch mean, of the feature shape.
    var: the biased batch variance, of the feature shape.
    count: the number of values behind each channel's statistics.
    momentum: the decay of the running average.
    unbiased: if True, the variance is scaled by ``count / (count - 1)`` before averaging.

  Returns:
    ``(new_state, updated)``, where ``updated`` is a bool array that is False where the old values
    were kept.
  """
  mean = lax.stop_gradient(mean)
  var = lax.stop_gradient(var)
  if unbiased:
    var = var * (count / jnp.maximum(count - 1, 1))
  updated = jnp.isfinite(mean) & jnp.isfinite(var) & (count > (1 if unbiased else 0))
  new_mean = momentum * state.mean + (1 - momentum) * mean.astype(state.mean.dtype)
  new_var = momentum * state.var + (1 - momentum) * var.astype(state.var.dtype)
  new_state = BatchNormState(
      mean=jnp.where(updated, new_mean, state.mean).astype(state.mean.dtype),
      var=jnp.where(updated, new_var, state.var).astype(state.var.dtype),
  )
  return new_state, updated


def batch_norm(params: BatchNormParams, state: BatchNormState, x: jax.Array, train: bool, *,
               axis: int | Sequence[int] = -1, momentum: Any = 0.99, epsilon: Any = 1e-5,
               axis_name: Any = None, axis_index_groups: Any = None, mask: jax.Array | None = None,
               unbiased_running_var: bool = False, dtype: Any = None, return_stats: bool = False,
               custom_vjp: bool = True):
  r"""Batch normalization, as a pure function of parameters, running statistics and input.

  .. math::

     y = \gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  In training (``train=True``), :math:`\mu` and :math:`\sigma^2` are the mean and biased variance of
  ``x`` over every axis except ``axis`` (and across devices along ``axis_name``), and the running
  statistics move toward them: ``new = momentum * old + (1 - momentum) * batch`` (the Flax/Keras
  decay convention; PyTorch's ``momentum=p`` is ``momentum=1 - p``, see `from_torch_momentum`).
  In evaluation (``train=False``), the running statistics are used and ``state`` is returned as is.

  Statistics are computed in at least float32 (float64 input stays float64) from sums shifted by a
  pivot taken from the data (see `bnjax.stats`), exact for data far from zero; the output has the input's dtype (or ``dtype``); the
  running statistics keep their float32 dtype.

  Warning:
    A channel whose batch statistics are not finite (NaN or Inf in its valid values), or that has
    no valid value under ``mask``, keeps its old running statistics; ``return_stats=True`` reports
    which channels were updated. Channels with no valid value are normalised with the running
    statistics.

  Args:
    params: ``BatchNormParams``; ``scale`` and ``bias`` of the feature shape, or None.
    state: ``BatchNormState``; float32 ``mean`` and ``var`` of the feature shape.
    x: array of shape ``[..., C]`` (any rank); the feature axes are ``axis``.
    train: a static Python bool: batch statistics (True) or running statistics (False).
    axis: the feature axis or axes; every other axis is reduced over.
    momentum: decay of the running averages, in [0, 1].
    epsilon: added to the variance, > 0.
    axis_name: a named axis (``shard_map``, ``pmap``, ``vmap``) or tuple of them to compute
      statistics over, as if the batches of all devices were concatenated.
    axis_index_groups: a partition of the named axis's indices; statistics are combined within each
      group. Groups may have different sizes.
    mask: bool array broadcastable to ``x``; statistics use only True positions. Values at False
      positions never enter any arithmetic: if they are NaN or Inf the output there is ``bias``.
    unbiased_running_var: store the unbiased variance ``m / (m - 1) * var`` in the running average
      (the paper's inference rule and PyTorch's); normalisation in training always uses the biased
      variance.
    dtype: the output dtype; defaults to ``x.dtype``.
    return_stats: also return the step's ``BatchStats`` (training only).
    custom_vjp: differentiate training mode with bnjax's closed-form backward pass, which keeps
      only ``x`` for the backward and needs one collective; False uses JAX's autodiff, which also
      supports forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``).

  Returns:
    ``(y, new_state)``, or ``(y, new_state, batch_stats)`` with ``return_stats=True``.

  Raises:
    TypeError: if ``train`` is not a Python bool (e.g. traced), ``x`` is not floating, or ``mask``
      is not boolean.
    ValueError: on mismatched shapes, a bad ``axis``, ``momentum`` or ``epsilon``, or one value per
      channel in training.

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
  _checks.check_floating(x, "x", _WHERE)
  x = jnp.asarray(x)
  feature_axes = _checks.canonical_axes(x.ndim, axis, _WHERE)
  reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  _checks.check_feature_shapes(params, state, feature_shape, x.shape, axis, _WHERE)
  _checks.check_hyperparameters(momentum, epsilon, _WHERE)
  if mask is not None:
    mask = _checks.mask_to_rank(mask, x.shape, _WHERE)
  if return_stats and not train:
    raise ValueError(f"{_WHERE}: `return_stats=True` needs `train=True`; evaluation measures "
                     "no batch statistics.")

  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  stats_dtype = jnp.dtype(jnp.float64 if jnp.finfo(x.dtype).bits > 32 else jnp.float32)
  keep_shape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))

  def expand(v):  # feature shape -> x's rank, reduced axes as 1, statistics dtype.
    return None if v is None else v.astype(stats_dtype).reshape(keep_shape)

  def squeeze(v):  # x's rank -> feature shape.
    return v.reshape(feature_shape)

  scale, bias = expand(params.scale), expand(params.bias)
  running_mean, running_var = expand(state.mean), expand(state.var)
  epsilon = jnp.asarray(epsilon, stats_dtype)
  if not train:
    y = _normalize(x.astype(stats_dtype), mask, running_mean, None, running_var, scale, bias,
                   epsilon).astype(out_dtype)
    return y, state

  devices = 1
  if axis_name is not None:
    size = distributed.axis_size(axis_name)
    if axis_index_groups is not None:
      _checks.partition_matrix(axis_index_groups, size, _WHERE)
      axis_index_groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    devices = _checks.smallest_group(axis_index_groups, size)
  _checks.check_values_per_channel(_checks.static_count(x.shape, reduce_axes), devices, _WHERE)
  # Mesh axes over which `x` varies but the parameters do not (under `shard_map`): the parameters'
  # cotangents must be summed over them, as autodiff's transpose would.
  param_sum_axes = tuple(sorted(distributed.varying_axes(x) - frozenset().union(
      *(distributed.varying_axes(p) for p in (params.scale, params.bias) if p is not None))))
  config = _TrainConfig(reduce_axes, axis_name, axis_index_groups, stats_dtype, out_dtype,
                        param_sum_axes)
  train_fn = _train_custom_vjp if custom_vjp else _train
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


def _normalize(x, mask, centre, delta, var, scale, bias, epsilon):
  """``scale * ((x - centre) - delta) / sqrt(var + epsilon) + bias``, masked values made safe.

  ``delta`` may be None (evaluation). Non-finite values at masked positions are replaced by the
  mean before any arithmetic, so they reach neither the output's valid part nor any gradient.
  """
  x_hat = _centre(x, mask, centre, delta) * lax.rsqrt(var + epsilon)
  y = x_hat if scale is None else x_hat * scale
  return y if bias is None else y + bias


def _centre(x, mask, centre, delta):
  if mask is not None:
    fill = centre if delta is None else centre + delta
    x = jnp.where(mask | jnp.isfinite(x), x, fill)
  return x - centre if delta is None else (x - centre) - delta


class _TrainConfig(NamedTuple):
  """The static part of a training call (hashable, so it can be a `nondiff_argnums` argument)."""

  reduce_axes: tuple[int, ...]
  axis_name: Any
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  stats_dtype: Any
  out_dtype: Any
  param_sum_axes: tuple[Any, ...]


def _train_statistics(config, x, mask, running_mean, running_var):
  """Global moments, and the centre, delta and variance to normalise with.

  Channels without any valid value are normalised with the running statistics.
  """
  moments = stats.local_moments(x, mask, config.reduce_axes)
  moments = distributed.combine_moments(moments, config.axis_name, config.axis_index_groups,
                                        where=_WHERE)
  has_data = moments.count > 0
  centre = jnp.where(has_data, moments.pivot, running_mean)
  delta = jnp.where(has_data, moments.delta, jnp.zeros((), x.dtype))
  var = jnp.where(has_data, moments.var, running_var)
  return moments, centre, delta, var


def _train(config, x, mask, scale, bias, running_mean, running_var, epsilon):
  """Training-mode batch norm, differentiated by JAX's autodiff. Returns ``(y, moments)``."""
  x = x.astype(config.stats_dtype)
  moments, centre, delta, var = _train_statistics(config, x, mask, running_mean, running_var)
  y = _normalize(x, mask, centre, delta, var, scale, bias, epsilon)
  return y.astype(config.out_dtype), jax.tree.map(lax.stop_gradient, moments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train_custom_vjp(config, x, mask, scale, bias, running_mean, running_var, epsilon):
  """`_train` with the closed-form backward; the statistics it returns carry no gradient."""
  return _train(config, x, mask, scale, bias, running_mean, running_var, epsilon)


def _train_fwd(config, x, mask, scale, bias, running_mean, running_var, epsilon):
  xs = x.astype(config.stats_dtype)
  moments, centre, delta, var = _train_statistics(config, xs, mask, running_mean, running_var)
  y = _normalize(xs, mask, centre, delta, var, scale, bias, epsilon)
  inv_std = lax.rsqrt(var + epsilon)
  # Only x (in its own dtype) and per-channel values are kept for the backward pass.
  mean = centre + delta
  raw_sums_ok = jnp.all(mean * mean * (inv_std * inv_std) <= stats.MAX_CANCELLATION - 1)
  residuals = (x, mask, scale, bias, centre, delta, inv_std, moments.count, raw_sums_ok)
  return (y.astype(config.out_dtype), moments), residuals


def _train_bwd(config, residuals, cotangents):
  """dx = scale * inv_std * (dy - [valid] (sum(dy) + x_hat * sum(dy * x_hat)) / count).

  The two per-channel sums are global (one collective over the named axis); the parameter
  gradients are this device's own sums, as autodiff gives them.
  """
  x, mask, scale, bias, centre, delta, inv_std, count, raw_sums_ok = residuals
  dy = cotangents[0].astype(config.stats_dtype)
  xs = x.astype(config.stats_dtype)
  axes = config.reduce_axes

  def centred_sums(_):
    x_hat = _centre(xs, mask, centre, delta) * inv_std
    return jnp.sum(dy, axis=axes, keepdims=True), jnp.sum(dy * x_hat, axis=axes, keepdims=True)

  def raw_sums(_):
    # sum(dy * x_hat) = inv_std * (sum(dy * x) - mean * sum(dy)): no per-channel operand in the
    # reductions, so XLA:CPU reads dy and x without writing x_hat out. Used only where the mean is
    # within ~4 standard deviations of 0, so the subtraction cancels at most a few bits.
    sum_dy = jnp.sum(dy, axis=axes, keepdims=True)
    sum_dy_x = jnp.sum(dy * xs, axis=axes, keepdims=True)
    return sum_dy, inv_std * (sum_dy_x - (centre + delta) * sum_dy)

  if mask is None:
    sum_dy, sum_dy_xhat = lax.cond(raw_sums_ok, raw_sums, centred_sums, None)
  else:
    sum_dy, sum_dy_xhat = centred_sums(None)
  x_hat = _centre(xs, mask, centre, delta) * inv_std
  global_sums = distributed.sum_over_devices(
      jnp.stack([sum_dy, sum_dy_xhat]), config.axis_name, config.axis_index_groups)
  d_scale = None if scale is None else _param_cotangent(sum_dy_xhat, global_sums[1], config)
  d_bias = None if bias is None else _param_cotangent(sum_dy, global_sums[0], config)
  factor = inv_std if scale is None else inv_std * scale
  coefficient = jnp.where(count > 0, 1 / jnp.maximum(count, 1), jnp.zeros((), count.dtype))
  correction = coefficient * (global_sums[0] + x_hat * global_sums[1])
  if mask is None:
    dx = factor * (dy - correction)
  else:
    direct = jnp.where(mask | jnp.isfinite(xs), dy, jnp.zeros((), dy.dtype))
    dx = factor * (direct - jnp.where(mask, correction, jnp.zeros((), dy.dtype)))
  return (dx.astype(x.dtype), None, d_scale, d_bias, None, None, None)


def _param_cotangent(local_sum, global_sum, config):
  """A parameter's cotangent: this device's sum, or under `shard_map` the sum over the mesh axes
  the parameter is replicated on, as autodiff's transpose gives it.

  When those axes are exactly the statistics' axis, that sum is the global sum the backward pass
  computed already, so no collective is added.
  """
  extra = config.param_sum_axes
  if not extra:
    return local_sum
  named = config.axis_name if isinstance(config.axis_name, tuple) else (config.axis_name,)
  if config.axis_index_groups is None and set(extra) == set(named):
    return global_sum
  return lax.psum(local_sum, extra)


_train_custom_vjp.defvjp(_train_fwd, _train_bwd)

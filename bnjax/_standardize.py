"""Standardisation over any set of axes, and its closed-form custom VJP.

    y = scale * ((x - centre) - delta) / sqrt(var + epsilon) + bias

In training, ``centre + delta`` and ``var`` are the moments of the valid values of ``x`` over the
reduced axes (and across devices along a named axis): `bnjax.stats` computes them and
`bnjax.distributed` combines them. The same code serves every norm whose statistics are moments over
a set of axes; batch norm reduces over every axis but the features.

The custom VJP keeps ``x`` (in its own dtype), the mask and per-channel values for the backward
pass, and needs one all-reduce of two per-channel sums. With ``g = scale * dy`` (the cotangent of
``x_hat``) and sums over the valid values of the whole (global) batch,

    dx = inv_std * (g - [valid] (sum(g) + x_hat * sum(g * x_hat)) / count),

where the sums of ``g`` are sums of each device's own ``scale`` times its own sums, so parameters
that differ across the named axis (`vmap` ensembles, per-device parameters) are differentiated
exactly as autodiff would.
"""

from collections.abc import Callable
import functools
import math
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from bnjax import distributed
from bnjax import stats

Array = jax.Array


class TrainConfig(NamedTuple):
  """The static part of a training call (hashable, so it can be a `nondiff_argnums` argument)."""

  reduce_axes: tuple[int, ...]
  axis_name: Any
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  stats_dtype: Any
  out_dtype: Any
  route: str  # "auto", "adaptive" or "one_pass" (see `bnjax.stats`).
  # Mesh axes over which `x` varies but `scale`, `bias`, `epsilon` do not (under `shard_map`):
  # each one's cotangent is summed over them, as autodiff's transpose would.
  scale_sum_axes: tuple[Any, ...]
  bias_sum_axes: tuple[Any, ...]
  epsilon_sum_axes: tuple[Any, ...]
  scale_invariant: bool  # `scale` provably equal on every device along `axis_name` (or None).
  pivot_shared: bool  # the fallback mean is provably equal on every device: a shared pivot.
  count_shape: tuple[int, ...] | None  # how counts travel across devices; None: uniform, no mask.
  where: str  # the public function's name, for errors.
  # Batch Renormalization: `train`'s `renorm_clip` is ``(r_max, d_max)`` (see the module doc).
  renorm: bool = False
  # Axis 0 of `x` indexes ghost batches, each normalised with its own (device-local) statistics.
  ghost: bool = False


def centre(x: Array, mask: Array | None, centre_: Array, delta: Array | None) -> Array:
  """``(x - centre) - delta``; a non-finite masked value is replaced by the mean first."""
  if mask is not None:
    fill = centre_ if delta is None else centre_ + delta
    x = jnp.where(mask | jnp.isfinite(x), x, fill)
  return x - centre_ if delta is None else (x - centre_) - delta


def normalize(x: Array, mask: Array | None, centre_: Array, delta: Array | None, var: Array,
              scale: Array | None, bias: Array | None, epsilon: Array) -> Array:
  """``scale * ((x - centre) - delta) / sqrt(var + epsilon) + bias``, masked values made safe.

  ``delta`` may be None (evaluation), ``scale`` and ``bias`` None (no affine part). Every
  per-channel operand has `x`'s rank.
  """
  x_hat = centre(x, mask, centre_, delta) * lax.rsqrt(var + epsilon)
  y = x_hat if scale is None else x_hat * scale
  return y if bias is None else y + bias


def _statistics(config: TrainConfig, x: Array, mask: Array | None, fallback_mean: Array,
                fallback_var: Array) -> tuple[stats.Moments, Array, Array, Array, Array]:
  """The moments for the running update; the count, centre, delta and variance to normalise with.

  With ghost batches, the last four are per ghost batch: its own, on this device.

  Channels without any valid value are normalised with the fallback (running) statistics.
  """
  moments = stats.local_moments(x, mask, config.reduce_axes, config.route)
  uniform = None if mask is not None else math.prod(x.shape[a] for a in config.reduce_axes)
  per_ghost = moments
  if config.ghost:  # the update takes the exact statistics of the whole batch.
    moments = jax.tree.map(lambda v: v[None], stats.merge_moments(per_ghost, axis=0))
    uniform = None if uniform is None else uniform * x.shape[0]
  moments = distributed.combine_moments(
      moments, config.axis_name, config.axis_index_groups,
      shared_pivot=fallback_mean if config.pivot_shared else None, uniform_count=uniform,
      count_shape=config.count_shape, route=config.route)
  normalising = per_ghost if config.ghost else moments
  has_data = normalising.count > 0
  fallback_mean = stats.align(fallback_mean, normalising.pivot)
  fallback_var = stats.align(fallback_var, normalising.pivot)
  centre_ = jnp.where(has_data, normalising.pivot, fallback_mean)
  delta = jnp.where(has_data, normalising.delta, jnp.zeros((), x.dtype))
  var = jnp.where(has_data, normalising.var, fallback_var)
  return moments, normalising.count, centre_, delta, var


def renorm_correction(mean: Array, var: Array, running_mean: Array, running_var: Array,
                      epsilon: Array, r_max: Array | None = None, d_max: Array | None = None
                      ) -> tuple[Array, Array]:
  """Batch Renormalization's corrections, without gradient (Ioffe 2017, Algorithm 1).

      r = clip(sqrt(var + epsilon) / sqrt(running_var + epsilon), 1 / r_max, r_max)
      d = clip((mean - running_mean) / sqrt(running_var + epsilon), -d_max, d_max)

  ``x_hat * r + d`` is the input standardised with the running statistics wherever no clip is
  active. The running standard deviation is that of the running variance (which evaluation uses),
  not a separate average of standard deviations as in the paper. Without `r_max` (`d_max`), ``r``
  (``d``) is not clipped: the drift of the batch from the running statistics.
  """
  inv_running_std = lax.rsqrt(running_var + epsilon)
  r = jnp.sqrt(var + epsilon) * inv_running_std
  d = (mean - running_mean) * inv_running_std
  if r_max is not None:
    r = jnp.clip(r, 1 / r_max, r_max)
  if d_max is not None:
    d = jnp.clip(d, -d_max, d_max)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def _renormalized(scale: Array | None, bias: Array | None, centre_: Array, delta: Array,
                  var: Array, fallback_mean: Array, fallback_var: Array, epsilon: Array,
                  renorm_clip: tuple[Array, Array] | None
                  ) -> tuple[Array, Array, Array, Array]:
  """The scale and bias of ``scale * (x_hat * r + d) + bias``, and ``(r, d)``."""
  r_max, d_max = (None, None) if renorm_clip is None else renorm_clip
  r, d = renorm_correction(centre_ + delta, var, fallback_mean, fallback_var, epsilon, r_max,
                           d_max)
  shift = d if scale is None else scale * d
  return (r if scale is None else scale * r), (shift if bias is None else bias + shift), r, d


def train(config: TrainConfig, x: Array, mask: Array | None, scale: Array | None,
          bias: Array | None, fallback_mean: Array, fallback_var: Array,
          epsilon: Array, renorm_clip: tuple[Array, Array] | None = None
          ) -> tuple[Array, stats.Moments]:
  """Training-mode standardisation, differentiated by JAX's autodiff. Returns ``(y, moments)``."""
  x = x.astype(config.stats_dtype)
  moments, _, centre_, delta, var = _statistics(config, x, mask, fallback_mean, fallback_var)
  if config.renorm:
    scale, bias, _, _ = _renormalized(scale, bias, centre_, delta, var, fallback_mean,
                                      fallback_var, epsilon, renorm_clip)
  y = normalize(x, mask, centre_, delta, var, scale, bias, epsilon)
  return y.astype(config.out_dtype), jax.tree.map(lax.stop_gradient, moments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def train_custom_vjp(config: TrainConfig, x: Array, mask: Array | None, scale: Array | None,
                     bias: Array | None, fallback_mean: Array, fallback_var: Array,
                     epsilon: Array, renorm_clip: tuple[Array, Array] | None = None
                     ) -> tuple[Array, stats.Moments]:
  """`train` with the closed-form backward; the statistics it returns carry no gradient.

  `fallback_mean`, `fallback_var` and `renorm_clip` must carry no gradient (the caller stops it).
  """
  return train(config, x, mask, scale, bias, fallback_mean, fallback_var, epsilon, renorm_clip)


def _train_fwd(config: TrainConfig, x: Array, mask: Array | None, scale: Array | None,
               bias: Array | None, fallback_mean: Array, fallback_var: Array,
               epsilon: Array, renorm_clip: tuple[Array, Array] | None = None
               ) -> tuple[tuple[Array, stats.Moments], tuple[Any, ...]]:
  xs = x.astype(config.stats_dtype)
  moments, count, centre_, delta, var = _statistics(config, xs, mask, fallback_mean, fallback_var)
  r = d = None
  y_scale, y_bias = scale, bias
  if config.renorm:
    y_scale, y_bias, r, d = _renormalized(scale, bias, centre_, delta, var, fallback_mean,
                                          fallback_var, epsilon, renorm_clip)
  y = normalize(xs, mask, centre_, delta, var, y_scale, y_bias, epsilon)
  inv_std = lax.rsqrt(var + epsilon)
  # x (in its own dtype), the mask and per-channel values are kept for the backward pass.
  mean = centre_ + delta
  raw_sums_ok = stats.is_precise(var + epsilon + mean * mean, var + epsilon)
  group = (None if config.axis_name is None
           else distributed.group_index(config.axis_name, config.axis_index_groups))
  residuals = (x, mask, scale, bias, epsilon, centre_, delta, inv_std, count, raw_sums_ok,
               group, r, d)
  return (y.astype(config.out_dtype), moments), residuals


def _local_sums(config: TrainConfig, xs: Array, dy: Array, mask: Array | None, centre_: Array,
                delta: Array, inv_std: Array, raw_sums_ok: Array) -> tuple[Array, Array]:
  """This device's ``(sum(dy), sum(dy * x_hat))`` over the reduced axes, cheapest exact route."""
  axes = config.reduce_axes

  def centred_sums(xs: Array, dy: Array, centre_: Array, delta: Array,
                   inv_std: Array) -> tuple[Array, Array]:
    x_hat = centre(xs, mask, centre_, delta) * inv_std
    return jnp.sum(dy, axis=axes, keepdims=True), jnp.sum(dy * x_hat, axis=axes, keepdims=True)

  if mask is not None:
    return centred_sums(xs, dy, centre_, delta, inv_std)

  def adaptive(xs: Array, dy: Array, centre_: Array, delta: Array, inv_std: Array,
               raw_sums_ok: Array) -> tuple[Array, Array]:
    def raw_sums(_: Any) -> tuple[Array, Array]:
      # sum(dy * x_hat) = inv_std * (sum(dy * x) - mean * sum(dy)): no per-channel operand in the
      # reductions, so XLA:CPU reads dy and x without writing x_hat out. Used only where the mean
      # is within ~4 standard deviations of 0, so the subtraction cancels at most a few bits.
      sum_dy = jnp.sum(dy, axis=axes, keepdims=True)
      sum_dy_x = jnp.sum(dy * xs, axis=axes, keepdims=True)
      return sum_dy, inv_std * (sum_dy_x - (centre_ + delta) * sum_dy)

    return lax.cond(raw_sums_ok, raw_sums,
                    lambda _: centred_sums(xs, dy, centre_, delta, inv_std), None)

  def one_pass(xs: Array, dy: Array, centre_: Array, delta: Array, inv_std: Array,
               raw_sums_ok: Array) -> tuple[Array, Array]:
    del raw_sums_ok
    return centred_sums(xs, dy, centre_, delta, inv_std)

  fn = stats.route_dispatch(adaptive, one_pass, config.route)
  return fn(xs, dy, centre_, delta, inv_std, raw_sums_ok)


def _train_bwd(config: TrainConfig, residuals: tuple[Any, ...],
               cotangents: tuple[Any, ...]) -> tuple[Any, ...]:
  """Dx = inv_std * (g - [valid] (sum(g) + x_hat * sum(g * x_hat)) / count), g = scale * dy.

  The sums of ``g`` are global (one all-reduce over the named axis). The cotangents of `scale`,
  `bias` and `epsilon` are this device's own sums, summed over the mesh axes they are replicated
  on (`shard_map`), as autodiff gives them.
  """
  (x, mask, scale, bias, epsilon, centre_, delta, inv_std, count, raw_sums_ok, group, r,
   d) = residuals
  has_scale = scale is not None
  if config.renorm:  # y = scale * (x_hat * r + d) + bias, r and d constant: x_hat's is scale * r.
    scale = r if scale is None else scale * r
  dy = cotangents[0].astype(config.stats_dtype)
  xs = x.astype(config.stats_dtype)
  sum_dy, sum_dy_xhat = _local_sums(config, xs, dy, mask, centre_, delta, inv_std, raw_sums_ok)
  local = jnp.stack([sum_dy, sum_dy_xhat])
  # Ghost batches are normalised on their own device: their sums are not all-reduced.
  axis_name = None if config.ghost else config.axis_name
  named = frozenset(distributed.axis_names(axis_name)) if axis_name else frozenset()
  reuse = config.axis_index_groups is None and axis_name is not None
  if config.scale_invariant:
    # scale is the same on every device: sum first, scale after, and the parameters' sums (over
    # the same axes) come for free.
    unscaled = distributed.sum_over_devices(local, axis_name, config.axis_index_groups, group)
    # Split before scaling: without a named axis the split undoes the stack, so no per-element
    # slice of a stacked array reaches the full-size kernels (XLA:CPU recomputes per-channel
    # factors inside each element's loop, and a slice there costs the loop its vectorisation).
    global_g = [unscaled[i] if scale is None else unscaled[i] * scale for i in range(2)]
  else:
    table = distributed.sum_over_devices(local if scale is None else local * scale[None],
                                         axis_name, config.axis_index_groups, group)
    global_g = [table[0], table[1]]
    unscaled = None

  def param_sum(local_sum: Array, from_global: Callable[[Array], Array],
                sum_axes: tuple[Any, ...]) -> Array:
    if config.ghost:  # one sum over every ghost batch.
      local_sum = jnp.sum(local_sum, axis=0, keepdims=True)
    if not sum_axes:
      return local_sum
    if reuse and unscaled is not None and frozenset(sum_axes) == named:
      return from_global(unscaled)
    return distributed.sum_over_axes(local_sum, sum_axes)

  if not has_scale:
    d_scale = None
  elif config.renorm:  # d scale = sum(dy * (x_hat * r + d)); r, d as invariant as scale here.
    d_scale = param_sum(r * sum_dy_xhat + d * sum_dy, lambda u: r * u[1] + d * u[0],
                        config.scale_sum_axes)
  else:
    d_scale = param_sum(sum_dy_xhat, lambda u: u[1], config.scale_sum_axes)
  d_bias = None if bias is None else param_sum(sum_dy, lambda u: u[0], config.bias_sum_axes)
  # dy/d(epsilon) = -scale * x_hat * inv_std**2 / 2 at every position.
  scaled_sum = sum_dy_xhat if scale is None else sum_dy_xhat * scale
  d_eps_channels = -0.5 * inv_std * inv_std * scaled_sum
  if config.ghost:
    d_eps_channels = jnp.sum(d_eps_channels, axis=0, keepdims=True)
  # epsilon is a scalar or has x's rank (per channel).
  d_eps = d_eps_channels if epsilon.ndim else jnp.sum(d_eps_channels)
  d_eps = distributed.sum_over_axes(d_eps.astype(epsilon.dtype), config.epsilon_sum_axes)

  # dx = inv_std * (g - (sum(g) + x_hat * sum(g * x_hat)) / count), with per-channel factors
  # taken out first: dx = k_dy * dy - (k_x * centred + k_0), centred = (x - centre) - delta exact.
  # The last operation has two full-size operands, so XLA materialises dx once: a form ending in
  # per-channel * full-size (or + per-channel) counts as "effectively unary", and XLA:CPU then
  # recomputes all of dx inside each consumer it can fuse into (in a model: the transposed copy
  # that the next convolution's weight gradient reads), reading dy and x twice.
  zero = jnp.zeros((), dy.dtype)
  coefficient = jnp.where(count > 0, 1 / jnp.maximum(count, 1).astype(dy.dtype), zero)
  k_dy = inv_std if scale is None else inv_std * scale
  k_x = inv_std * inv_std * coefficient * global_g[1]
  k_0 = inv_std * coefficient * global_g[0]
  correction = k_x * centre(xs, mask, centre_, delta) + k_0
  if mask is None:
    dx = k_dy * dy - correction
  else:
    direct = jnp.where(mask | jnp.isfinite(xs), k_dy * dy, zero)
    dx = direct - jnp.where(mask, correction, zero)
  return (dx.astype(x.dtype), None, d_scale, d_bias, None, None, d_eps, None)


train_custom_vjp.defvjp(_train_fwd, _train_bwd)


# One compiled program per configuration for the whole training computation: inside an outer `jit`
# it is inlined (no cost); called eagerly, and differentiated eagerly, it runs as one compiled
# program forward and one backward instead of op by op.
_JITTED = {True: jax.jit(train_custom_vjp, static_argnums=0),
           False: jax.jit(train, static_argnums=0)}


def jitted_train(custom_vjp: bool) -> Any:
  """`train_custom_vjp` (closed-form backward) or `train` (autodiff), compiled as one program."""
  return _JITTED[bool(custom_vjp)]

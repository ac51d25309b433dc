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
  # False: moments about zero (`stats.uncentred_moments`), so ``var`` is the mean square and
  # nothing is subtracted (RMS normalisation); only with `train_norm_custom_vjp` or `train`.
  centred: bool = True


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
  uniform = None if mask is not None else math.prod(x.shape[a] for a in config.reduce_axes)
  if config.centred:
    moments = stats.local_moments(x, mask, config.reduce_axes, config.route)
  else:
    moments = stats.uncentred_moments(x, mask, config.reduce_axes)
  per_ghost = moments
  if config.ghost:  # the update takes the exact statistics of the whole batch.
    moments = jax.tree.map(lambda v: v[None], stats.merge_moments(per_ghost, axis=0))
    uniform = None if uniform is None else uniform * x.shape[0]
  if config.centred:
    moments = distributed.combine_moments(
        moments, config.axis_name, config.axis_index_groups,
        shared_pivot=fallback_mean if config.pivot_shared else None, uniform_count=uniform,
        count_shape=config.count_shape, route=config.route)
  else:
    moments = distributed.combine_uncentred_moments(
        moments, config.axis_name, config.axis_index_groups, uniform_count=uniform,
        count_shape=config.count_shape)
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
                delta: Array, inv_std: Array, raw_sums_ok: Array,
                scale: Array | None = None) -> tuple[Array, Array]:
  """This device's ``(sum(g), sum(g * x_hat))``, ``g = dy * scale`` (or ``dy``): cheapest route."""
  axes = config.reduce_axes

  def centred_sums(xs: Array, dy: Array, centre_: Array, delta: Array, inv_std: Array,
                   scale: Array | None) -> tuple[Array, Array]:
    x_hat = centre(xs, mask, centre_, delta) * inv_std
    g = dy if scale is None else dy * scale
    return jnp.sum(g, axis=axes, keepdims=True), jnp.sum(g * x_hat, axis=axes, keepdims=True)

  if mask is not None:
    return centred_sums(xs, dy, centre_, delta, inv_std, scale)

  def adaptive(xs: Array, dy: Array, centre_: Array, delta: Array, inv_std: Array,
               raw_sums_ok: Array, scale: Array | None) -> tuple[Array, Array]:
    def raw_sums(_: Any) -> tuple[Array, Array]:
      # sum(dy * x_hat) = inv_std * (sum(dy * x) - mean * sum(dy)): no per-channel operand in the
      # reductions, so XLA:CPU reads dy and x without writing x_hat out. Used only where the mean
      # is within ~4 standard deviations of 0, so the subtraction cancels at most a few bits.
      g = dy if scale is None else dy * scale
      sum_dy = jnp.sum(g, axis=axes, keepdims=True)
      sum_dy_x = jnp.sum(g * xs, axis=axes, keepdims=True)
      return sum_dy, inv_std * (sum_dy_x - (centre_ + delta) * sum_dy)

    return lax.cond(raw_sums_ok, raw_sums,
                    lambda _: centred_sums(xs, dy, centre_, delta, inv_std, scale), None)

  def one_pass(xs: Array, dy: Array, centre_: Array, delta: Array, inv_std: Array,
               raw_sums_ok: Array, scale: Array | None) -> tuple[Array, Array]:
    del raw_sums_ok
    return centred_sums(xs, dy, centre_, delta, inv_std, scale)

  fn = stats.route_dispatch(adaptive, one_pass, config.route)
  return fn(xs, dy, centre_, delta, inv_std, raw_sums_ok, scale)


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


# ----------------------------------------------------------------------------- any affine layout


def _sum_to_shape(value: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `value` over the axes where `shape` is 1 and `value` is not.

  The transpose of broadcasting an array of `shape` to `value`'s shape (both have the same rank).
  """
  axes = tuple(a for a, (size, full) in enumerate(zip(shape, value.shape, strict=True))
               if size == 1 != full)
  return jnp.sum(value, axis=axes, keepdims=True) if axes else value


def _norm_bwd(config: TrainConfig, residuals: Any, cotangents: Any) -> tuple[Any, ...]:
  """The backward of `train_norm_custom_vjp`: `_train_bwd`'s formula, for any affine layout.

  With ``g = scale * dy`` and sums over the reduced axes (across devices along the named axis),

      dx = inv_std * (g - [valid] (c * sum(g) + x_hat * sum(g * x_hat)) / count),

  ``c = 1`` for centred moments and ``c = 0`` for moments about zero (nothing was subtracted, so
  the mean has no cotangent); ``d_scale`` and ``d_bias`` sum ``dy * x_hat`` and ``dy`` over the
  axes along which each is broadcast, then over the mesh axes it is replicated on.

  The reduced axes along which ``scale`` and ``bias`` are constant (instance norm's ``(H, W)``,
  group norm's ``(H, W)`` but not its channels) are reduced first, by `_local_sums`' cheapest exact
  route: every other sum, the parameters' included, then comes from these partial sums of ``dy``
  and ``dy * x_hat``, so ``dy`` and ``x`` are read once for all of them. Where the parameters vary
  along every reduced axis (layer norm over its features), the per-row sums take ``g`` and the
  parameters' sums are reductions of their own, across the rows.
  """
  (x, mask, scale, bias, epsilon, centre_, delta, inv_std, count, raw_sums_ok, group, _,
   _) = residuals  # The last two, Batch Renormalization's r and d, are None here.
  dy = cotangents[0].astype(config.stats_dtype)
  xs = x.astype(config.stats_dtype)
  axes = config.reduce_axes
  params = [p for p in (scale, bias) if p is not None]
  inner = tuple(a for a in axes if all(p.shape[a] == 1 for p in params))
  outer = tuple(a for a in axes if a not in inner)
  x_hat = centre(xs, mask, centre_, delta) * inv_std

  if inner:
    if config.centred:
      partial = _local_sums(config._replace(reduce_axes=inner), xs, dy, mask, centre_, delta,
                            inv_std, raw_sums_ok)
    else:  # nothing was subtracted: sum(dy * x_hat) cancels nothing, one plain reduction.
      partial = (jnp.sum(dy, axis=inner, keepdims=True),
                 jnp.sum(dy * x_hat, axis=inner, keepdims=True))
    # Each device's own scale times its own sums: exact when scale differs across devices.
    scaled = [v if scale is None else v * scale for v in partial]
    sum_g, sum_g_xhat = (jnp.sum(v, axis=outer, keepdims=True) if outer else v for v in scaled)
    d_scale_local = None if scale is None else _sum_to_shape(partial[1], scale.shape)
    d_bias_local = None if bias is None else _sum_to_shape(partial[0], bias.shape)
  else:
    if config.centred:
      sum_g, sum_g_xhat = _local_sums(config, xs, dy, mask, centre_, delta, inv_std, raw_sums_ok,
                                      scale)
    else:
      g = dy if scale is None else dy * scale
      sum_g, sum_g_xhat = None, jnp.sum(g * x_hat, axis=axes, keepdims=True)
    d_scale_local = None if scale is None else _sum_to_shape(dy * x_hat, scale.shape)
    d_bias_local = None if bias is None else _sum_to_shape(dy, bias.shape)
  # Centred moments always have sum(g); moments about zero need only sum(g * x_hat).
  if config.centred and sum_g is not None:
    local = jnp.stack([sum_g, sum_g_xhat])
  else:
    local = sum_g_xhat[None]
  global_g = distributed.sum_over_devices(local, config.axis_name, config.axis_index_groups,
                                          group)
  global_g = lax.optimization_barrier(global_g)

  def param_cotangent(local_sum: jax.Array | None, param: jax.Array | None,
                      sum_axes: tuple[Any, ...]) -> jax.Array | None:
    if local_sum is None or param is None:
      return None
    return distributed.sum_over_axes(local_sum.astype(param.dtype), sum_axes)

  d_scale = param_cotangent(d_scale_local, scale, config.scale_sum_axes)
  d_bias = param_cotangent(d_bias_local, bias, config.bias_sum_axes)
  # dy/d(epsilon) = -scale * x_hat * inv_std**2 / 2 at every position; this device's own part.
  d_eps_rows = -0.5 * inv_std * inv_std * sum_g_xhat
  d_eps = _sum_to_shape(d_eps_rows, epsilon.shape) if epsilon.ndim else jnp.sum(d_eps_rows)
  d_eps = distributed.sum_over_axes(d_eps.astype(epsilon.dtype), config.epsilon_sum_axes)

  coefficient = jnp.where(count > 0, 1 / jnp.maximum(count, 1).astype(dy.dtype),
                          jnp.zeros((), dy.dtype))
  correction = (global_g[0] + x_hat * global_g[1] if config.centred
                else x_hat * global_g[0])
  correction = coefficient * correction
  g = dy if scale is None else dy * scale
  if mask is None:
    dx = inv_std * (g - correction)
  else:
    direct = jnp.where(mask | jnp.isfinite(xs), g, jnp.zeros((), g.dtype))
    dx = inv_std * (direct - jnp.where(mask, correction, jnp.zeros((), g.dtype)))
  return (dx.astype(x.dtype), None, d_scale, d_bias, None, None, d_eps, None)


train_norm_custom_vjp = jax.custom_vjp(train, nondiff_argnums=(0,))
train_norm_custom_vjp.__doc__ = """`train` with a closed-form backward for any affine layout.

Layer, group, instance and RMS norm: the statistics are taken over `config.reduce_axes` as for
batch norm (the forward pass and its residuals are `train_custom_vjp`'s), but `scale` and `bias`
(of `x`'s rank) may vary along the reduced axes and be broadcast along others, and
``config.centred=False`` normalises by the root mean square. `fallback_mean` and `fallback_var`
must carry no gradient.
"""
train_norm_custom_vjp.defvjp(_train_fwd, _norm_bwd)

# One compiled program per configuration for the whole training computation: inside an outer `jit`
# it is inlined (no cost); called eagerly, and differentiated eagerly, it runs as one compiled
# program forward and one backward instead of op by op.
_JITTED = {True: jax.jit(train_custom_vjp, static_argnums=0),
           False: jax.jit(train, static_argnums=0)}


def jitted_train(custom_vjp: bool) -> Any:
  """`train_custom_vjp` (closed-form backward) or `train` (autodiff), compiled as one program."""
  return _JITTED[bool(custom_vjp)]


# As `jitted_train`, for layer, group, instance and RMS norm (`train_norm_custom_vjp`).
_JITTED_NORM = {True: jax.jit(train_norm_custom_vjp, static_argnums=0), False: _JITTED[False]}


def jitted_norm_train(custom_vjp: bool) -> Callable[..., Any]:
  """`train_norm_custom_vjp` (closed-form backward) or `train` (autodiff), as one program."""
  return _JITTED_NORM[bool(custom_vjp)]

r"""Layer, group, instance and RMS normalisation: batch norm's statistics over other sets of values.

Batch norm and its variants differ only in the set of values each mean and variance is taken over
(Wu & He, "Group Normalization", 2018, §3). For an ``[N, H, W, C]`` input:

==============  =====================================  =======================================
norm            statistics over                        one mean and variance per
==============  =====================================  =======================================
batch norm      ``(N, H, W)``                          channel
layer norm      the features of one example            example
instance norm   ``(H, W)``                             example and channel
group norm      ``(H, W)`` and the ``C/G`` channels    example and group of channels
RMS norm        as layer norm, mean square, no centre  example
==============  =====================================  =======================================

Every one of them is computed here by the code batch norm uses: moments from `bnjax.stats` (a data
pivot, shifted sums and an exact second pass where they would cancel, masks that keep NaN out),
combined across devices by counts in `bnjax.distributed`, and normalised by `bnjax._standardize`
with its closed-form backward pass. RMS norm takes moments about zero (`stats.uncentred_moments`):
its ``var`` is the mean square, and nothing is subtracted. None of these norms keeps running
statistics, so they take only ``params``, the ``(scale, bias)`` of `init_params`.

Flax computes these norms by default with ``E[x^2] - E[x]^2`` in float32, which cancels whole
offsets: for features of mean 1e4 and standard deviation 1, its layer and group norms output a
standard deviation of hundreds instead of 1. bnjax's variance is within 1e-5 of a float64
reference there, and a constant row or group outputs exactly ``bias``.
"""

from collections.abc import Sequence
import math
import numbers
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from bnjax import _checks
from bnjax import _standardize
from bnjax import distributed
from bnjax import stats
from bnjax.types import BatchNormParams

__all__ = ["group_norm", "init_params", "instance_norm", "layer_norm", "rms_norm"]

Axes = int | Sequence[int]


def init_params(num_features: int | Sequence[int], *, dtype: Any = jnp.float32,
                use_scale: bool = True, use_bias: bool = True) -> BatchNormParams:
  """Creates the ``(scale, bias)`` of a layer, group, instance or RMS norm: ones and zeros.

  These norms keep no running statistics, so this is all their state; it is the same
  `BatchNormParams` pytree as batch norm's (``bnjax.init(n)[0]``).

  Args:
    num_features: the size of the feature axis, or a tuple of sizes (the shape of ``x`` along
      ``feature_axes``, in increasing axis order).
    dtype: the dtype of ``scale`` and ``bias``.
    use_scale: if False, ``scale`` is None (no γ).
    use_bias: if False, ``bias`` is None (no β; RMS norm has none in Flax).

  Returns:
    `BatchNormParams` with ``scale`` ones and ``bias`` zeros of the feature shape.

  Raises:
    ValueError: if a feature size is not a positive int.

  Examples:
    >>> params = bnjax.init_params(3)
    >>> params.scale, params.bias
    (Array([1., 1., 1.], dtype=float32), Array([0., 0., 0.], dtype=float32))
    >>> bnjax.init_params(4, use_bias=False).bias is None
    True
  """
  shape = tuple(num_features) if isinstance(num_features, Sequence) else (num_features,)
  if not shape or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1
                      for n in shape):
    raise ValueError(f"bnjax.init_params: `num_features` must be a positive int or a non-empty "
                     f"tuple of positive ints; got {num_features!r}.")
  shape = tuple(int(n) for n in shape)
  return BatchNormParams(scale=jnp.ones(shape, dtype) if use_scale else None,
                         bias=jnp.zeros(shape, dtype) if use_bias else None)


def layer_norm(params: BatchNormParams, x: jax.Array, *, reduction_axes: Axes = -1,
               feature_axes: Axes = -1, epsilon: float = 1e-6, mask: jax.Array | None = None,
               axis_name: Any = None, axis_index_groups: Any = None, dtype: Any = None,
               custom_vjp: bool = True, stats_route: str = "auto") -> jax.Array:
  r"""Layer normalization (Ba et al., 2016): each example standardised over its own features.

  .. math::

     y = \gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  :math:`\mu` and :math:`\sigma^2` are the mean and biased variance of ``x`` over
  ``reduction_axes`` (by default the last axis: one pair per example, or per token), of the valid
  values under ``mask``, and across devices along ``axis_name``; :math:`\gamma, \beta` have the
  shape of ``x`` along ``feature_axes`` and broadcast over the rest. The statistics are exact
  (see `bnjax.stats`) and computed in at least float32; the output has ``x``'s dtype (or
  ``dtype``).

  Args:
    params: ``BatchNormParams`` from `init_params`: ``scale`` and ``bias`` (either may be None)
      of the shape of ``x`` along ``feature_axes``.
    x: a real floating array.
    reduction_axes: the axis or axes the statistics are taken over.
    feature_axes: the axis or axes ``scale`` and ``bias`` vary along.
    epsilon: added to the variance, a scalar > 0.
    mask: bool array broadcastable to ``x``; statistics use only True positions. A non-finite value
      at a False position reaches neither the valid outputs nor any gradient. A row with no valid
      value outputs ``bias``.
    axis_name: a named axis (``shard_map``, ``pmap``, ``vmap``) along which ``reduction_axes`` are
      split across devices (tensor parallelism: a hidden dimension sharded on a ``'model'`` axis);
      the statistics are those of the concatenated rows, on every device.
    axis_index_groups: a partition of the named axis's indices; statistics are combined within
      each group.
    dtype: the output dtype; defaults to ``x.dtype``.
    custom_vjp: differentiate with bnjax's closed-form backward pass (it keeps only ``x`` and
      per-row values); False uses JAX's autodiff, which also supports forward mode (``jax.jvp``).
    stats_route: ``"auto"``, ``"adaptive"`` or ``"one_pass"``, as in `bnjax.batch_norm`.

  Returns:
    The normalised ``x``, of its shape.

  Raises:
    TypeError: if ``x`` is not real floating, ``mask`` is not boolean or ``params`` is not a
      ``(scale, bias)`` pytree.
    ValueError: on bad axes, a parameter shape that is not the feature shape, ``epsilon <= 0``,
      or a single value per row (whose output would be ``bias`` whatever the input).

  Examples:
    >>> params = bnjax.init_params(3)
    >>> x = jnp.array([[1.0, 2.0, 3.0], [10000.0, 10001.0, 10002.0]])
    >>> bnjax.layer_norm(params, x).round(4)
    Array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]], dtype=float32)
  """
  where = "bnjax.layer_norm"
  x = _checked_input(x, where)
  reduce_axes = _checks.canonical_named_axes(x.ndim, reduction_axes, "reduction_axes", where)
  param_axes = _checks.canonical_named_axes(x.ndim, feature_axes, "feature_axes", where)
  return _normalize_over(params, x, reduce_axes=reduce_axes, param_axes=param_axes,
                         epsilon=epsilon, mask=mask, axis_name=axis_name,
                         axis_index_groups=axis_index_groups, dtype=dtype, centred=True,
                         custom_vjp=custom_vjp, stats_route=stats_route, where=where,
                         described=f"feature_axes={feature_axes!r}")


def rms_norm(params: BatchNormParams, x: jax.Array, *, reduction_axes: Axes = -1,
             feature_axes: Axes = -1, epsilon: float = 1e-6, mask: jax.Array | None = None,
             axis_name: Any = None, axis_index_groups: Any = None, dtype: Any = None,
             custom_vjp: bool = True) -> jax.Array:
  r"""RMS normalization (Zhang & Sennrich, 2019): divides by the root mean square, no centring.

  .. math::

     y = \gamma \, \frac{x}{\sqrt{\overline{x^2} + \epsilon}} \;(+ \beta)

  :math:`\overline{x^2}` is the mean of :math:`x^2` over ``reduction_axes`` (by default the last
  axis), of the valid values under ``mask``, and across devices along ``axis_name``; ``epsilon``
  is inside the square root, as in Flax. It is computed as moments about zero
  (`bnjax.stats.uncentred_moments`) in at least float32: a sum of squares cancels nothing, so one
  pass is exact. Flax's RMS norm has no ``bias``: create the parameters with
  ``init_params(n, use_bias=False)`` (a ``bias`` that is not None is added).

  Args:
    params: ``BatchNormParams``: ``scale`` (or None) and usually ``bias=None``, of the shape of
      ``x`` along ``feature_axes``.
    x: a real floating array.
    reduction_axes: the axis or axes the mean square is taken over.
    feature_axes: the axis or axes ``scale`` varies along.
    epsilon: added to the mean square, a scalar > 0.
    mask: bool array broadcastable to ``x``; the mean square uses only True positions. A row with
      no valid value outputs 0 (``bias`` when there is one).
    axis_name: a named axis along which ``reduction_axes`` are split across devices.
    axis_index_groups: a partition of the named axis's indices, combined separately.
    dtype: the output dtype; defaults to ``x.dtype``.
    custom_vjp: use bnjax's closed-form backward pass; False uses JAX's autodiff (forward mode
      too).

  Returns:
    The normalised ``x``, of its shape.

  Raises:
    TypeError: if ``x`` is not real floating, ``mask`` is not boolean or ``params`` is not a
      ``(scale, bias)`` pytree.
    ValueError: on bad axes, a parameter shape that is not the feature shape or ``epsilon <= 0``.

  Examples:
    >>> params = bnjax.init_params(2, use_bias=False)
    >>> x = jnp.array([[6.4, 44.8], [-102.4, 716.8]])   # root mean squares 32 and 512
    >>> bnjax.rms_norm(params, x)
    Array([[ 0.2,  1.4],
           [-0.2,  1.4]], dtype=float32)
  """
  where = "bnjax.rms_norm"
  x = _checked_input(x, where)
  reduce_axes = _checks.canonical_named_axes(x.ndim, reduction_axes, "reduction_axes", where)
  param_axes = _checks.canonical_named_axes(x.ndim, feature_axes, "feature_axes", where)
  return _normalize_over(params, x, reduce_axes=reduce_axes, param_axes=param_axes,
                         epsilon=epsilon, mask=mask, axis_name=axis_name,
                         axis_index_groups=axis_index_groups, dtype=dtype, centred=False,
                         custom_vjp=custom_vjp, stats_route="auto", where=where,
                         described=f"feature_axes={feature_axes!r}")


def group_norm(params: BatchNormParams, x: jax.Array, *, num_groups: int | None = 32,
               group_size: int | None = None, reduction_axes: Axes | None = None,
               epsilon: float = 1e-6, mask: jax.Array | None = None, axis_name: Any = None,
               axis_index_groups: Any = None, dtype: Any = None, custom_vjp: bool = True,
               stats_route: str = "auto") -> jax.Array:
  r"""Group normalization (Wu & He, 2018): statistics per example and group of channels.

  .. math::

     y = \gamma \, \frac{x - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}} + \beta

  The ``C`` channels (the last axis, as in Flax) are split into ``G`` consecutive groups of
  ``C/G``; :math:`\mu_g, \sigma_g^2` are taken over the group's channels and the other
  ``reduction_axes`` (by default every axis but the first, the batch: ``(H, W, C/G)`` per example
  for NHWC), of the valid values under ``mask``, and across devices along ``axis_name``. ``scale``
  and ``bias`` have shape ``(C,)``. One group is layer norm over ``(H, W, C)``; groups of one
  channel are instance norm. Exact statistics in at least float32; the output has ``x``'s dtype.

  Args:
    params: ``BatchNormParams`` from ``init_params(C)``.
    x: a real floating array ``[..., C]``.
    num_groups: the number of groups ``G``; pass None to give ``group_size`` instead.
    group_size: the number of channels per group, with ``num_groups=None``.
    reduction_axes: the axes the statistics are taken over; they must include the last (the
      channels, split into groups). None: every axis but the first.
    epsilon: added to the variance, a scalar > 0.
    mask: bool array broadcastable to ``x``; statistics use only True positions. A group with no
      valid value outputs ``bias``.
    axis_name: a named axis along which ``reduction_axes`` are split across devices (e.g. a
      spatially sharded image).
    axis_index_groups: a partition of the named axis's indices, combined separately.
    dtype: the output dtype; defaults to ``x.dtype``.
    custom_vjp: use bnjax's closed-form backward pass; False uses JAX's autodiff (forward mode
      too).
    stats_route: ``"auto"``, ``"adaptive"`` or ``"one_pass"``, as in `bnjax.batch_norm`.

  Returns:
    The normalised ``x``, of its shape.

  Raises:
    TypeError: if ``x`` is not real floating, ``mask`` is not boolean or ``params`` is not a
      ``(scale, bias)`` pytree.
    ValueError: if both or neither of ``num_groups`` and ``group_size`` are given, the group count
      does not divide the channels, ``reduction_axes`` leaves out the last axis, or a group holds
      a single value.

  Examples:
    >>> params = bnjax.init_params(4)
    >>> x = jnp.array([[10.0, 30.0, 100.0, 300.0]])    # two groups: (10, 30), (100, 300)
    >>> bnjax.group_norm(params, x, num_groups=2)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """
  where = "bnjax.group_norm"
  x = _checked_input(x, where)
  channels = x.shape[-1]
  groups = group_count(num_groups, group_size, channels, where)
  if reduction_axes is None:
    reduce_axes = (*range(1, x.ndim - 1), x.ndim - 1)
  else:
    reduce_axes = _checks.canonical_named_axes(x.ndim, reduction_axes, "reduction_axes", where)
  if x.ndim - 1 not in reduce_axes:
    _checks.fail(where, f"`reduction_axes` {reduction_axes!r} must include the last axis of `x` "
                 f"(rank {x.ndim}): it holds the channels that are split into groups.")
  _checks.check_params(params, (channels,), x.shape, "the channels, the last axis", where)
  # [..., C] -> [..., G, C/G]: reduce over the other reduction axes and the last (C/G).
  grouped_shape = (*x.shape[:-1], groups, channels // groups)
  grouped_reduce = (*(a for a in reduce_axes if a != x.ndim - 1), x.ndim)
  if mask is not None:
    mask = _checks.mask_to_rank(mask, x.shape, where)
    mask = mask.reshape((*mask.shape[:-1],
                         *((1, 1) if mask.shape[-1] == 1 else grouped_shape[-2:])))
  grouped_params = BatchNormParams(
      *(None if p is None else jnp.reshape(p, grouped_shape[-2:]) for p in params))
  y = _normalize_over(grouped_params, x.reshape(grouped_shape), reduce_axes=grouped_reduce,
                      param_axes=(x.ndim - 1, x.ndim), epsilon=epsilon, mask=mask,
                      axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
                      centred=True, custom_vjp=custom_vjp, stats_route=stats_route, where=where,
                      described="the channels, the last axis", checked=True)
  return y.reshape(x.shape)


def instance_norm(params: BatchNormParams, x: jax.Array, *, feature_axes: Axes = -1,
                  epsilon: float = 1e-6, mask: jax.Array | None = None, axis_name: Any = None,
                  axis_index_groups: Any = None, dtype: Any = None, custom_vjp: bool = True,
                  stats_route: str = "auto") -> jax.Array:
  r"""Instance normalization (Ulyanov et al., 2016): statistics per example and channel.

  .. math::

     y = \gamma \, \frac{x - \mu_{n,c}}{\sqrt{\sigma_{n,c}^2 + \epsilon}} + \beta

  :math:`\mu_{n,c}, \sigma_{n,c}^2` are taken over every axis but the first (the batch) and
  ``feature_axes``: ``(H, W)`` for NHWC, of the valid values under ``mask``, and across devices
  along ``axis_name``. ``scale`` and ``bias`` have the shape of ``x`` along ``feature_axes``.
  Exact statistics in at least float32; the output has ``x``'s dtype (or ``dtype``).

  Args:
    params: ``BatchNormParams`` from `init_params`, of the shape of ``x`` along
      ``feature_axes``.
    x: a real floating array ``[N, ...]`` with at least one axis besides the batch and features.
    feature_axes: the channel axis or axes (not 0, the batch).
    epsilon: added to the variance, a scalar > 0.
    mask: bool array broadcastable to ``x``; statistics use only True positions. An example and
      channel with no valid value outputs ``bias``.
    axis_name: a named axis along which the reduced (spatial) axes are split across devices.
    axis_index_groups: a partition of the named axis's indices, combined separately.
    dtype: the output dtype; defaults to ``x.dtype``.
    custom_vjp: use bnjax's closed-form backward pass; False uses JAX's autodiff (forward mode
      too).
    stats_route: ``"auto"``, ``"adaptive"`` or ``"one_pass"``, as in `bnjax.batch_norm`.

  Returns:
    The normalised ``x``, of its shape.

  Raises:
    TypeError: if ``x`` is not real floating, ``mask`` is not boolean or ``params`` is not a
      ``(scale, bias)`` pytree.
    ValueError: if ``feature_axes`` includes the batch axis 0, nothing is left to reduce over, or
      an example's channel holds a single value.

  Examples:
    >>> params = bnjax.init_params(2)
    >>> x = jnp.array([[[10.0, 100.0], [30.0, 300.0]]])   # N=1, W=2, C=2
    >>> bnjax.instance_norm(params, x)
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)
  """
  where = "bnjax.instance_norm"
  x = _checked_input(x, where)
  param_axes = _checks.canonical_named_axes(x.ndim, feature_axes, "feature_axes", where)
  if 0 in param_axes:
    _checks.fail(where, f"`feature_axes` {feature_axes!r} includes axis 0, which instance norm "
                 "takes as the batch axis (one set of statistics per example).")
  reduce_axes = tuple(a for a in range(1, x.ndim) if a not in param_axes)
  if not reduce_axes:
    _checks.fail(where, f"`x` of shape {tuple(x.shape)} with feature_axes={feature_axes!r} leaves "
                 "no axis to take the statistics over (every axis but the batch, 0, and the "
                 "features); instance norm needs e.g. [N, H, W, C].")
  return _normalize_over(params, x, reduce_axes=reduce_axes, param_axes=param_axes,
                         epsilon=epsilon, mask=mask, axis_name=axis_name,
                         axis_index_groups=axis_index_groups, dtype=dtype, centred=True,
                         custom_vjp=custom_vjp, stats_route=stats_route, where=where,
                         described=f"feature_axes={feature_axes!r}")


# ----------------------------------------------------------------------------- shared core


def _checked_input(x: Any, where: str) -> jax.Array:
  _checks.check_floating(x, "x", where)
  x = jnp.asarray(x)
  if x.ndim == 0:
    _checks.fail(where, "`x` is a scalar; expected an array with at least one axis to normalise "
                 "over.")
  return x


def group_count(num_groups: Any, group_size: Any, channels: int, where: str) -> int:
  """The number of groups, from exactly one of `num_groups` and `group_size`."""
  if (num_groups is None) == (group_size is None):
    _checks.fail(where, "exactly one of `num_groups` and `group_size` must be given; got "
                 f"num_groups={num_groups!r} and group_size={group_size!r}. To give "
                 "`group_size`, pass `num_groups=None` (its default is 32).")
  name, value = ("num_groups", num_groups) if group_size is None else ("group_size", group_size)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    _checks.fail(where, f"`{name}` must be a positive int; got {value!r}.")
  if channels % value:
    kind = "group count" if name == "num_groups" else "group size"
    _checks.fail(where, f"the {kind} `{name}`={value} does not divide the {channels} channels "
                 f"(the last axis of `x`); choose a divisor of {channels}.")
  return int(value) if name == "num_groups" else channels // int(value)


def _normalize_over(params: Any, x: jax.Array, *, reduce_axes: tuple[int, ...],
                    param_axes: tuple[int, ...], epsilon: Any, mask: Any, axis_name: Any,
                    axis_index_groups: Any, dtype: Any, centred: bool, custom_vjp: bool,
                    stats_route: str, where: str, described: str,
                    checked: bool = False) -> jax.Array:
  """Standardises `x` over `reduce_axes` with `scale`/`bias` along `param_axes` (sorted)."""
  feature_shape = tuple(x.shape[a] for a in param_axes)
  if not checked:
    _checks.check_params(params, feature_shape, x.shape, described, where)
    if mask is not None:
      mask = _checks.mask_to_rank(mask, x.shape, where)
  _checks.check_epsilon(epsilon, where)
  if stats_route not in stats.ROUTES:
    _checks.fail(where, f"`stats_route` must be one of {stats.ROUTES}; got {stats_route!r}.")

  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  stats_dtype = jnp.dtype(jnp.float64 if jnp.finfo(x.dtype).bits > 32 else jnp.float32)
  param_shape = tuple(x.shape[a] if a in param_axes else 1 for a in range(x.ndim))
  stats_shape = tuple(1 if a in reduce_axes else x.shape[a] for a in range(x.ndim))
  scale, bias = (None if p is None else jnp.asarray(p).astype(stats_dtype).reshape(param_shape)
                 for p in (params.scale, params.bias))
  epsilon = jnp.asarray(epsilon, stats_dtype)

  devices = 1
  if isinstance(axis_name, list):  # a static key of the compiled program: hashable.
    axis_name = tuple(axis_name)
  if axis_name is not None:
    size = distributed.axis_size(axis_name)
    if axis_index_groups is not None:
      distributed.partition_matrix(axis_index_groups, size, where)
      axis_index_groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    devices = distributed.smallest_group(axis_index_groups, size)
  local_count = math.prod(x.shape[a] for a in reduce_axes)
  if centred and local_count * devices <= 1:
    _checks.fail(where, f"expected more than 1 value per set of statistics, got "
                 f"{local_count * devices} ({local_count} per device over axes {reduce_axes} of "
                 f"`x` of shape {tuple(x.shape)}, x {devices} device(s)). The variance of one "
                 "value is 0, so the output would be `bias` whatever the input.")

  def sum_axes(value: Any) -> tuple[Any, ...]:
    # Mesh axes over which `x` varies but `value` does not (under `shard_map`): the cotangent of
    # `value` is summed over them, as autodiff's transpose would.
    if value is None:
      return ()
    return tuple(sorted(distributed.varying_axes(x) - distributed.varying_axes(value), key=str))

  count_shape = None
  if mask is not None:  # counts travel per row, once along the axes where the mask is uniform.
    count_shape = tuple(1 if mask.shape[a] == 1 else s for a, s in enumerate(stats_shape))
  config = _standardize.TrainConfig(
      reduce_axes=reduce_axes, axis_name=axis_name, axis_index_groups=axis_index_groups,
      stats_dtype=stats_dtype, out_dtype=out_dtype, route=stats_route,
      scale_sum_axes=sum_axes(scale), bias_sum_axes=sum_axes(bias),
      epsilon_sum_axes=sum_axes(epsilon), scale_invariant=False, pivot_shared=False,
      count_shape=count_shape, where=where, centred=centred)
  # A row with no valid value is normalised with mean 0 and an infinite variance: x_hat = 0, so
  # its output is `bias` and its gradients are finite (0 for x).
  no_data_mean = jnp.zeros(stats_shape, stats_dtype)
  no_data_var = jnp.full(stats_shape, jnp.inf, stats_dtype)
  # One compiled program per configuration: eager calls do not dispatch op by op; inside an outer
  # `jit` it is inlined.
  train_fn = _standardize.jitted_norm_train(custom_vjp)
  y, _ = train_fn(config, x, mask, scale, bias, lax.stop_gradient(no_data_mean),
                  lax.stop_gradient(no_data_var), epsilon)
  return y

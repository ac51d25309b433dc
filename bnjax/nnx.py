"""Drop-ins for Flax NNX's norm layers whose math is bnjax's pure core.

`LayerNorm`, `RMSNorm`, `GroupNorm` and `InstanceNorm` have the constructors, calls and variables
of their `flax.nnx` namesakes (flax 0.12.8) and call `bnjax.norms`. They keep ``scale`` and
``bias`` as ``nnx.Param`` (or None) and no other state.
"""

from collections.abc import Callable, Mapping
import functools
import numbers
from types import MappingProxyType
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
import jax
import jax.numpy as jnp

from bnjax import _checks
from bnjax import norms
from bnjax.types import BatchNormParams

__all__ = ["GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]

Initializer = Callable[..., jax.Array]
# Flax's defaults for LayerNorm and GroupNorm (its InstanceNorm and RMSNorm use the bare functions).
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()

# NNX layers are often called eagerly (outside `nnx.jit`). There the norms would dispatch op by op;
# compiled once per configuration they cost what one fused call costs. Inside `nnx.jit`,
# `shard_map`, `vmap` or `scan` the inner `jit` is inlined: same program, same numbers.
_NORM_SETTINGS = ("reduction_axes", "feature_axes", "epsilon", "axis_name", "axis_index_groups",
                  "dtype", "custom_vjp", "stats_route", "num_groups", "group_size")


@functools.cache
def _compiled(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  settings = [name for name in _NORM_SETTINGS if name in fn.__code__.co_varnames]
  return jax.jit(fn, static_argnames=settings)


def _call(fn: Callable[..., jax.Array], params: BatchNormParams, x: jax.Array,
          mask: jax.Array | None, **settings: Any) -> jax.Array:
  """`fn(params, x, mask=mask, **settings)`, compiled once per (hashable) configuration."""
  try:
    hash(tuple(settings.values()))
  except TypeError:  # e.g. axes given as a list: run uncompiled (the same numbers).
    return fn(params, x, mask=mask, **settings)
  return _compiled(fn)(params, x, mask=mask, **settings)


def _hashable(value: Any) -> Any:
  """Lists (of lists) as tuples, so that settings can key `jit`'s cache and `nnx.jit`'s."""
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


def _feature_size(num_features: Any, where: str) -> int:
  if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or (
      num_features < 1):
    raise ValueError(f"{where}: `num_features` must be a positive int; got {num_features!r}.")
  return int(num_features)


def _make_params(module: Any, shape: tuple[int, ...], *, use_scale: bool, use_bias: bool,
                 scale_init: Initializer, bias_init: Initializer, param_dtype: Any, rngs: nnx.Rngs,
                 scale_metadata: Mapping[str, Any], bias_metadata: Mapping[str, Any],
                 empty: Callable[[Any], Any] = nnx.data) -> None:
  """Sets ``module.scale`` then ``module.bias``.

  Each is an ``nnx.Param`` (one ``params`` key each, drawn in Flax's order), or `empty` (None).
  """
  module.scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
                  if use_scale else empty(None))
  module.bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
                 if use_bias else empty(None))


def _promoted(module: Any, x: Any, with_bias: bool = True
              ) -> tuple[jax.Array, BatchNormParams]:
  """``x``, ``scale`` and ``bias`` through ``module.promote_dtype``, as Flax promotes them."""
  scale = None if module.scale is None else module.scale[...]
  bias = None if not with_bias or module.bias is None else module.bias[...]
  with jax.numpy_dtype_promotion("standard"):  # Flax's inference rule, whatever the config.
    if with_bias:
      x, scale, bias = module.promote_dtype((x, scale, bias), dtype=module.dtype)
    else:
      x, scale = module.promote_dtype((x, scale), dtype=module.dtype)
  return jnp.asarray(x), BatchNormParams(scale, bias)


def _check_features(x: jax.Array, axes: Any, expected: tuple[int, ...], where: str,
                    name: str = "feature_axes") -> None:
  feature_axes = _checks.canonical_named_axes(x.ndim, axes, name, where)
  actual = tuple(x.shape[a] for a in feature_axes)
  if actual != expected:
    _checks.fail(where, f"`x` of shape {tuple(x.shape)} has {actual} along {name}={axes!r}, but "
                 f"the layer was built with num_features={_size(expected)}. Build it with "
                 f"`num_features={_size(actual)}`.")


def _size(shape: tuple[int, ...]) -> Any:
  return shape[0] if len(shape) == 1 else shape


class LayerNorm(nnx.Module):
  r"""Layer normalization for Flax NNX, with the constructor, call and variables of Flax's.

  The constructor, call and variables of `nnx.LayerNorm`:

  .. math::

     y = \gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  with :math:`\mu, \sigma^2` over ``reduction_axes`` of each example (`bnjax.layer_norm`). The
  module holds ``scale`` and ``bias`` as ``nnx.Param`` and no arithmetic. Compared with Flax, the
  variance is exact for data far from zero (Flax's default ``E[x^2] - E[x]^2`` cancels whole
  offsets), masks keep NaN out of the valid outputs and gradients, and ``axis_name`` combines the
  statistics by counts. ``x``, ``scale`` and ``bias`` go through ``promote_dtype`` as in Flax;
  statistics are computed in at least float32. ``use_fast_variance`` is accepted so existing code
  runs unchanged: bnjax's variance is always exact.

  Args:
    num_features: the size of ``x`` along ``feature_axes``.
    epsilon: added to the variance.
    dtype: the output dtype (default: inferred by ``promote_dtype``).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    reduction_axes: the axes the statistics are taken over.
    feature_axes: the axis ``scale`` and ``bias`` vary along.
    axis_name: named axis (or axes) along which ``reduction_axes`` are split across devices.
    axis_index_groups: partition of that axis into groups combined separately.
    use_fast_variance: accepted for compatibility; bnjax's variance is always exact.
    promote_dtype: called as ``promote_dtype((x, scale, bias), dtype=dtype)``, as in Flax.
    rngs: an ``nnx.Rngs`` with a ``params`` stream (split for ``scale`` then ``bias``).
    bias_metadata: metadata for the ``bias`` ``nnx.Param``.
    scale_metadata: metadata for the ``scale`` ``nnx.Param``.
    custom_vjp: use bnjax's closed-form backward pass (False: JAX's autodiff, forward mode too).
    stats_route: how moments are computed: ``"auto"``, ``"adaptive"`` or ``"one_pass"``.

  Examples:
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> layer = bnjax.nnx.LayerNorm(3, rngs=nnx.Rngs(0))
    >>> x = jnp.array([[1.0, 2.0, 3.0], [1e4, 1e4 + 1.0, 1e4 + 2.0]])
    >>> layer(x).round(4)
    Array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]], dtype=float32)
    >>> sorted(nnx.state(layer, nnx.Param))
    ['bias', 'scale']
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = _ZEROS,
      scale_init: Initializer = _ONES,
      reduction_axes: Any = -1,
      feature_axes: Any = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      custom_vjp: bool = True,
      stats_route: str = "auto",
  ):
    """Creates ``scale`` and ``bias`` of shape ``(num_features,)``; see the class docstring."""
    size = _feature_size(num_features, "bnjax.nnx.LayerNorm")
    self.scale: nnx.Param[jax.Array] | None
    self.bias: nnx.Param[jax.Array] | None
    _make_params(self, (size,), use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
                 bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
                 scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = _hashable(reduction_axes)
    self.feature_axes = _hashable(feature_axes)
    self.axis_name = axis_name
    self.axis_index_groups = _hashable(axis_index_groups)
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.custom_vjp = custom_vjp
    self.stats_route = stats_route

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalises each example of `x` over `reduction_axes`.

    Args:
      x: the input; ``num_features`` along ``feature_axes``.
      mask: bool array broadcastable to ``x``; statistics use only True positions.

    Returns:
      The normalised input, of the shape of ``x``.
    """
    x, params = _promoted(self, x)
    _check_features(x, self.feature_axes, (self.num_features,), "bnjax.nnx.LayerNorm")
    return _call(norms.layer_norm, params, x, mask, reduction_axes=self.reduction_axes,
                 feature_axes=self.feature_axes, epsilon=self.epsilon, axis_name=self.axis_name,
                 axis_index_groups=self.axis_index_groups, custom_vjp=self.custom_vjp,
                 stats_route=self.stats_route)


class RMSNorm(nnx.Module):
  r"""RMS normalization for Flax NNX, with the constructor, call and variables of `nnx.RMSNorm`.

  .. math::

     y = \gamma \, \frac{x}{\sqrt{\overline{x^2} + \epsilon}}

  with the mean square over ``reduction_axes`` (`bnjax.rms_norm`), computed in at least float32
  with masks that keep NaN out and combined across devices by counts. The module holds ``scale``
  as an ``nnx.Param``, as Flax does (no ``bias``). ``use_fast_variance`` is accepted for
  compatibility (no effect).

  Args:
    num_features: the size of ``x`` along ``feature_axes``.
    epsilon: added to the mean square, inside the square root.
    dtype: the output dtype (default: inferred by ``promote_dtype``).
    param_dtype: the dtype of ``scale``.
    use_scale: whether to learn γ.
    scale_init: initializer for γ.
    reduction_axes: the axes the mean square is taken over.
    feature_axes: the axis ``scale`` varies along.
    axis_name: named axis (or axes) along which ``reduction_axes`` are split across devices.
    axis_index_groups: partition of that axis into groups combined separately.
    use_fast_variance: accepted for compatibility (no effect).
    promote_dtype: called as ``promote_dtype((x, scale), dtype=dtype)``, as in Flax.
    rngs: an ``nnx.Rngs`` with a ``params`` stream.
    scale_metadata: metadata for the ``scale`` ``nnx.Param``.
    custom_vjp: use bnjax's closed-form backward pass (False: JAX's autodiff, forward mode too).

  Examples:
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> layer = bnjax.nnx.RMSNorm(2, rngs=nnx.Rngs(0))
    >>> layer(jnp.array([[6.4, 44.8]]))               # root mean square 32
    Array([[0.2, 1.4]], dtype=float32)
    >>> sorted(nnx.state(layer, nnx.Param))
    ['scale']
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_scale: bool = True,
      scale_init: Initializer = nnx.initializers.ones,
      reduction_axes: Any = -1,
      feature_axes: Any = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      custom_vjp: bool = True,
  ):
    """Creates ``scale`` of shape ``(num_features,)``; see the class docstring."""
    size = _feature_size(num_features, "bnjax.nnx.RMSNorm")
    self.scale: nnx.Param[jax.Array] | None
    self.scale = (nnx.Param(scale_init(rngs.params(), (size,), param_dtype), **scale_metadata)
                  if use_scale else nnx.data(None))
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = _hashable(reduction_axes)
    self.feature_axes = _hashable(feature_axes)
    self.axis_name = axis_name
    self.axis_index_groups = _hashable(axis_index_groups)
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.custom_vjp = custom_vjp

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Divides each example of `x` by its root mean square over `reduction_axes`.

    Args:
      x: the input; ``num_features`` along ``feature_axes``.
      mask: bool array broadcastable to ``x``; the mean square uses only True positions
        (positional too, as in Flax's `nnx.RMSNorm`).

    Returns:
      The normalised input, of the shape of ``x``.
    """
    x, params = _promoted(self, x, with_bias=False)
    _check_features(x, self.feature_axes, (self.num_features,), "bnjax.nnx.RMSNorm")
    return _call(norms.rms_norm, params, x, mask, reduction_axes=self.reduction_axes,
                 feature_axes=self.feature_axes, epsilon=self.epsilon, axis_name=self.axis_name,
                 axis_index_groups=self.axis_index_groups, custom_vjp=self.custom_vjp)


class GroupNorm(nnx.Module):
  r"""Group normalization for Flax NNX, with the constructor, call and variables of Flax's.

  The constructor, call and variables of `nnx.GroupNorm`:

  .. math::

     y = \gamma \, \frac{x - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}} + \beta

  with :math:`\mu_g, \sigma_g^2` per example and group of ``C/G`` channels (the last axis), over
  the group's channels and the other ``reduction_axes`` (`bnjax.group_norm`). Exactly one of
  ``num_groups`` and ``group_size`` is set (pass ``num_groups=None`` to give ``group_size``); the
  constructor checks it, as Flax's does, and stores both. Compared with Flax, the variance is
  exact for data far from zero and masks keep NaN out. ``use_fast_variance`` is accepted for
  compatibility (no effect).

  Args:
    num_features: the number of channels ``C``.
    num_groups: the number of channel groups (32, as proposed by Wu & He).
    group_size: the number of channels per group, with ``num_groups=None``.
    epsilon: added to the variance.
    dtype: the output dtype (default: inferred by ``promote_dtype``).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    reduction_axes: the axes the statistics are taken over, including the last; None: every axis
      but the first.
    axis_name: named axis (or axes) along which ``reduction_axes`` are split across devices.
    axis_index_groups: partition of that axis into groups combined separately.
    use_fast_variance: accepted for compatibility; bnjax's variance is always exact.
    promote_dtype: called as ``promote_dtype((x, scale, bias), dtype=dtype)``, as in Flax.
    rngs: an ``nnx.Rngs`` with a ``params`` stream (split for ``scale`` then ``bias``).
    bias_metadata: metadata for the ``bias`` ``nnx.Param``.
    scale_metadata: metadata for the ``scale`` ``nnx.Param``.
    custom_vjp: use bnjax's closed-form backward pass (False: JAX's autodiff, forward mode too).
    stats_route: how moments are computed: ``"auto"``, ``"adaptive"`` or ``"one_pass"``.

  Raises:
    ValueError: if both or neither of ``num_groups`` and ``group_size`` are given, or the group
      count does not divide ``num_features``.

  Examples:
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> layer = bnjax.nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))
    >>> layer(jnp.array([[10.0, 30.0, 100.0, 300.0]]))
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
    >>> layer.num_groups, layer.group_size
    (2, 2)
  """

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = _ZEROS,
      scale_init: Initializer = _ONES,
      reduction_axes: Any = None,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      custom_vjp: bool = True,
      stats_route: str = "auto",
  ):
    """Checks the groups and creates ``scale`` and ``bias``; see the class docstring."""
    where = "bnjax.nnx.GroupNorm"
    size = _feature_size(num_features, where)
    groups = norms.group_count(num_groups, group_size, size, where)
    self.feature_axis = -1
    self.num_groups = groups
    self.group_size = size // groups
    self.scale: nnx.Param[jax.Array] | None
    self.bias: nnx.Param[jax.Array] | None
    _make_params(self, (size,), use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
                 bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
                 scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = _hashable(reduction_axes)
    self.axis_name = axis_name
    self.axis_index_groups = _hashable(axis_index_groups)
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.custom_vjp = custom_vjp
    self.stats_route = stats_route

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalises `x` per example and group of channels.

    Args:
      x: the input ``[..., num_features]``; every axis but the first is reduced unless
        ``reduction_axes`` says otherwise.
      mask: bool array broadcastable to ``x``; statistics use only True positions.

    Returns:
      The normalised input, of the shape of ``x``.
    """
    x, params = _promoted(self, x)
    _check_features(x, -1, (self.num_features,), "bnjax.nnx.GroupNorm", "the last axis")
    return _call(norms.group_norm, params, x, mask, num_groups=self.num_groups,
                 reduction_axes=self.reduction_axes, epsilon=self.epsilon,
                 axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                 custom_vjp=self.custom_vjp, stats_route=self.stats_route)


class InstanceNorm(nnx.Module):
  r"""Instance normalization for Flax NNX, with the constructor, call and variables of Flax's.

  The constructor, call and variables of `nnx.InstanceNorm`:

  .. math::

     y = \gamma \, \frac{x - \mu_{n,c}}{\sqrt{\sigma_{n,c}^2 + \epsilon}} + \beta

  with :math:`\mu_{n,c}, \sigma_{n,c}^2` per example and channel, over every axis but the first
  and ``feature_axes`` (`bnjax.instance_norm`). The module holds ``scale`` and ``bias`` as
  ``nnx.Param`` (None when switched off, as in Flax). ``use_fast_variance`` is accepted for
  compatibility (no effect).

  Args:
    num_features: the number of channels, the size of ``x`` along ``feature_axes``.
    epsilon: added to the variance.
    dtype: the output dtype (default: inferred by ``promote_dtype``).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    feature_axes: the channel axis (not 0, the batch).
    axis_name: named axis (or axes) along which the reduced axes are split across devices.
    axis_index_groups: partition of that axis into groups combined separately.
    use_fast_variance: accepted for compatibility; bnjax's variance is always exact.
    promote_dtype: called as ``promote_dtype((x, scale, bias), dtype=dtype)``, as in Flax.
    rngs: an ``nnx.Rngs`` with a ``params`` stream (split for ``scale`` then ``bias``).
    bias_metadata: metadata for the ``bias`` ``nnx.Param``.
    scale_metadata: metadata for the ``scale`` ``nnx.Param``.
    custom_vjp: use bnjax's closed-form backward pass (False: JAX's autodiff, forward mode too).
    stats_route: how moments are computed: ``"auto"``, ``"adaptive"`` or ``"one_pass"``.

  Examples:
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> layer = bnjax.nnx.InstanceNorm(2, rngs=nnx.Rngs(0))
    >>> layer(jnp.array([[[10.0, 100.0], [30.0, 300.0]]]))
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros,
      scale_init: Initializer = nnx.initializers.ones,
      feature_axes: Any = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      custom_vjp: bool = True,
      stats_route: str = "auto",
  ):
    """Creates ``scale`` and ``bias`` of shape ``(num_features,)``; see the class docstring."""
    size = _feature_size(num_features, "bnjax.nnx.InstanceNorm")
    self.scale: nnx.Param[jax.Array] | None
    self.bias: nnx.Param[jax.Array] | None
    _make_params(self, (size,), use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
                 bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
                 scale_metadata=scale_metadata, bias_metadata=bias_metadata,
                 empty=lambda none: none)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = _hashable(feature_axes)
    self.axis_name = axis_name
    self.axis_index_groups = _hashable(axis_index_groups)
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.custom_vjp = custom_vjp
    self.stats_route = stats_route

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalises `x` per example and channel.

    Args:
      x: the input ``[N, ..., C]``; ``num_features`` along ``feature_axes``.
      mask: bool array broadcastable to ``x``; statistics use only True positions.

    Returns:
      The normalised input, of the shape of ``x``.
    """
    x, params = _promoted(self, x)
    _check_features(x, self.feature_axes, (self.num_features,), "bnjax.nnx.InstanceNorm")
    return _call(norms.instance_norm, params, x, mask, feature_axes=self.feature_axes,
                 epsilon=self.epsilon, axis_name=self.axis_name,
                 axis_index_groups=self.axis_index_groups, custom_vjp=self.custom_vjp,
                 stats_route=self.stats_route)

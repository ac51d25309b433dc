"""`bnjax.nnx.BatchNorm`: a drop-in for `flax.nnx.BatchNorm` whose math is `bnjax.batch_norm`."""

from collections.abc import Callable, Mapping, Sequence
import numbers
from types import MappingProxyType
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from bnjax import _checks
from bnjax import whitening
from bnjax.functional import batch_norm
from bnjax.types import BatchNormParams
from bnjax.types import BatchNormState

__all__ = ["BatchNorm"]

_WHERE = "bnjax.nnx.BatchNorm"
# Flax's default initialisers, built once (a call in a default argument would run at import anyway).
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()

# NNX layers are often called eagerly (outside `nnx.jit`). There, `batch_norm` would dispatch op by
# op; compiled once per configuration it costs what one fused call costs. Inside `nnx.jit`,
# `shard_map`, `vmap` or `scan` the inner `jit` is inlined: same program, same numbers.
_STATIC_ARGNAMES = ("train", "axis", "momentum", "epsilon", "axis_name", "axis_index_groups",
                    "unbiased_running_var", "custom_vjp")
_compiled_batch_norm = jax.jit(batch_norm, static_argnames=_STATIC_ARGNAMES)


class BatchNorm(nnx.Module):
  r"""Batch normalization for Flax NNX, with the constructor, call and variables of `nnx.BatchNorm`.

  .. math::

     y = \gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  In training (``use_running_average=False``), :math:`\mu, \sigma^2` are the batch mean and biased
  variance over every axis but ``axis`` (and across devices along ``axis_name``), and the running
  statistics move toward them, ``new = momentum * old + (1 - momentum) * batch``; in evaluation the
  running statistics are used. The module holds no arithmetic: it keeps ``scale``/``bias`` as
  ``nnx.Param`` and ``mean``/``var`` as ``nnx.BatchStat`` (as Flax does), calls `bnjax.batch_norm`
  and writes the new running statistics back. So ``model.train()``/``model.eval()``,
  ``nnx.view(model, use_running_average=...)``, ``nnx.state(model, nnx.BatchStat)``,
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``nnx.split``/``nnx.merge``, ``nnx.jit``,
  ``nnx.vmap``/``nnx.scan`` and checkpointing ``nnx.state(model)`` work as with Flax's layer.

  Compared with Flax, the statistics are exact (shifted by a data pivot, count-weighted across
  devices, NaN-safe masks), a channel whose batch statistics are not finite keeps its running
  statistics, and training with one value per channel raises. Inputs, ``scale`` and ``bias`` go
  through ``promote_dtype`` as in Flax (integer input becomes float32; by default the output dtype
  is that of ``x``, the parameters and the float32 running statistics together); the statistics are
  computed in at least float32 and the running statistics stay float32. ``use_fast_variance`` is
  accepted so existing code runs unchanged; bnjax's variance is always exact.

  Sources: Ioffe & Szegedy, "Batch Normalization" (2015), for the formula; ``flax.nnx.BatchNorm``
  (flax 0.12.8, ``flax/nnx/nn/normalization.py``) for the interface it reproduces.

  Args:
    num_features: the number of channels (the size of ``x`` along ``axis``), or a tuple of sizes
      when ``axis`` is a tuple.
    use_running_average: if True, normalise with the running statistics (evaluation). ``None``
      requires the call to say.
    axis: the feature axis or axes.
    momentum: decay of the running averages (Flax's convention; PyTorch's ``p`` is ``1 - p``).
    epsilon: added to the variance.
    dtype: the output dtype (default: inferred by ``promote_dtype``).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    axis_name: named axis (or axes) to combine statistics over, e.g. under ``jax.shard_map``.
    axis_index_groups: partition of that axis into groups combined separately (any sizes).
    use_fast_variance: accepted for compatibility; bnjax's variance is always exact.
    promote_dtype: called as ``promote_dtype((x, mean, var, scale, bias), dtype=dtype)``, as in
      Flax; the promoted ``x``, ``scale`` and ``bias`` are used and the output has ``x``'s promoted
      dtype. The running statistics stay float32 whatever it returns for them.
    rngs: an ``nnx.Rngs`` with a ``params`` stream, split for ``scale`` then ``bias`` as in Flax.
    bias_metadata: metadata for the ``bias`` ``nnx.Param``.
    scale_metadata: metadata for the ``scale`` ``nnx.Param``.
    unbiased_running_var: store the unbiased variance ``m / (m - 1) * var`` in the running average
      (PyTorch's rule).
    custom_vjp: differentiate training mode with bnjax's closed-form backward; False uses JAX's
      autodiff, which also supports forward mode (``jax.jvp``, ``jax.hessian``).

  Raises:
    ValueError: at the call, if the input's feature shape is not ``num_features``, neither the
      constructor nor the call sets ``use_running_average``, or training sees one value per channel.
    TypeError: at the call, if ``use_running_average`` is traced or ``mask`` is not boolean.

  Examples:
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> layer = bnjax.nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> layer(x)                                   # training: batch statistics
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> layer.mean[...]                            # 0.9 * 0 + 0.1 * batch mean
    Array([0.2, 2. ], dtype=float32)
    >>> layer.eval()                               # or layer(x, use_running_average=True)
    >>> bool(layer.use_running_average)
    True
    >>> sorted(nnx.state(layer, nnx.BatchStat))
    ['mean', 'var']
  """

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      use_running_average: bool | None = False,
      axis: int | Sequence[int] = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Callable[..., jax.Array] = _ZEROS,
      scale_init: Callable[..., jax.Array] = _ONES,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      unbiased_running_var: bool = False,
      custom_vjp: bool = True,
  ) -> None:
    """Creates the parameters and running statistics (arguments: see the class docstring)."""
    feature_shape = _feature_shape(num_features)
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    self.scale: nnx.Param[jax.Array] | None
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype),
                             **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param[jax.Array] | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
    else:
      self.bias = nnx.data(None)

    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    # Static attributes must be hashable (they key `nnx.jit`'s cache): lists become tuples.
    self.axis_index_groups = _hashable_groups(axis_index_groups)
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.unbiased_running_var = unbiased_running_var
    self.custom_vjp = custom_vjp

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Normalises ``x`` with batch statistics (training) or running statistics (evaluation).

    Args:
      x: the input, any rank; features along ``self.axis``.
      use_running_average: overrides the attribute of the same name for this call.
      mask: bool array broadcastable to ``x``; statistics use only True positions.

    Returns:
      The normalised input, of the shape of ``x``.
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          f"{_WHERE}: `use_running_average` is None in both the constructor and the call; set it "
          "in one of them, call `model.train()` / `model.eval()`, or use "
          "`nnx.view(model, use_running_average=...)`.")
    if isinstance(use_running_average, jax.core.Tracer):
      raise TypeError(
          f"{_WHERE}: `use_running_average` must be a Python bool, not a traced value: it selects "
          "a different computation. Pass it as a static argument (e.g. "
          "`nnx.jit(step, static_argnames='use_running_average')`) or set it with `model.eval()`.")
    x = jnp.asarray(x)
    feature_axes = _checks.canonical_axes(x.ndim, self.axis, _WHERE)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    shown = feature_shape[0] if len(feature_shape) == 1 else feature_shape
    if feature_shape != tuple(self.mean.shape):
      raise ValueError(
          f"{_WHERE}: `x` of shape {tuple(x.shape)} has feature shape {feature_shape} along "
          f"axis={self.axis}, but the layer was built with num_features={self.num_features!r}. "
          f"Build it with `num_features={shown}` "
          "or pass the `axis` it was made for.")

    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    running = BatchNormState(self.mean[...], self.var[...])
    with jax.numpy_dtype_promotion("standard"):  # Flax's inference rule, whatever the config.
      x, _, _, scale, bias = self.promote_dtype(
          (x, running.mean, running.var, scale, bias), dtype=self.dtype)

    static: dict[str, Any] = dict(
        train=not use_running_average, axis=feature_axes, momentum=self.momentum,
        epsilon=self.epsilon, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        unbiased_running_var=self.unbiased_running_var, custom_vjp=self.custom_vjp)
    # Unhashable settings (e.g. a traced `use_running_average`) go to `batch_norm` directly, which
    # raises the error that says how to fix them, or runs uncompiled.
    call = _compiled_batch_norm if _hashable(static.values()) else batch_norm
    train = static.pop("train")
    y, new_state = call(BatchNormParams(scale, bias), running, x, train, mask=mask, **static)
    if train:
      self.mean[...] = new_state.mean
      self.var[...] = new_state.var
    return y

  def set_view(self, use_running_average: bool | None = None) -> None:
    """Used by ``nnx.view``.

    Args:
      use_running_average: if True, normalise with the running statistics (evaluation).
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


def _feature_shape(num_features: Any) -> tuple[int, ...]:
  shape = tuple(num_features) if isinstance(num_features, Sequence) else (num_features,)
  if not shape or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1
                      for n in shape):
    raise ValueError(f"{_WHERE}: `num_features` must be a positive int (or a non-empty tuple of "
                     f"them for a tuple `axis`); got {num_features!r}.")
  return tuple(int(n) for n in shape)


def _hashable(values: Any) -> bool:
  try:
    hash(tuple(values))
  except TypeError:
    return False
  return True


def _hashable_groups(groups: Any) -> Any:
  if groups is None or isinstance(groups, tuple):
    return groups
  try:
    return tuple(tuple(g) for g in groups)
  except TypeError:
    return groups  # Left for `bnjax.batch_norm` to reject with its message.


# ============================================================================ whitening

# Eager calls compiled once per configuration, as for `BatchNorm` above.
_WHITENING_STATIC = ("train", "group_size", "method", "iterations", "axis", "momentum", "epsilon",
                     "axis_name", "axis_index_groups", "running_estimate",
                     "unbiased_running_cov", "dtype", "stats_route")
_compiled_whitening = jax.jit(whitening.whitening_batch_norm, static_argnames=_WHITENING_STATIC)
_ZEROS_INIT = nnx.initializers.zeros_init()
_ONES_INIT = nnx.initializers.ones_init()


class WhiteningBatchNorm(nnx.Module):
  """Whitening batch normalization for Flax NNX: `bnjax.whitening_batch_norm` as a module.

  The channels are split into groups of ``group_size``, each group is whitened (zero mean,
  identity covariance) by ``method`` (``"zca"``, ``"pca"``, ``"cholesky"`` or ``"iterative"``),
  then the per-channel ``scale`` and ``bias`` apply. The arguments mirror `flax.nnx.BatchNorm`'s
  and the function's keywords; the module holds no arithmetic.

  Variables (C = ``num_features`` channels, G groups of d = min(group_size, C), the last group
  padded with the identity): ``scale`` and ``bias`` (`nnx.Param`, [C]); ``mean`` ([C]),
  ``covariance`` ([G, d, d], the running batch covariance without ε) and ``whitening``
  ([G, d, d], the running batch whitening matrix), all `nnx.BatchStat`. Both running estimates
  are updated in training; ``running_estimate`` says which one evaluation uses.

  Args:
    num_features: the number of channels C.
    group_size: channels per whitening group (IterNorm's default, 64).
    method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"iterative"``.
    iterations: Newton–Schulz steps of ``"iterative"``.
    running_estimate: ``"covariance"`` or ``"whitening"``: what evaluation whitens with.
    unbiased_running_cov: average the unbiased batch covariance into the running covariance.
    use_running_average: if True, normalise with the running statistics (evaluation).
    axis: the one feature axis.
    momentum: decay of the running averages (Flax's convention).
    epsilon: added to the diagonal of every covariance.
    dtype: the output dtype (default: inferred from the input and parameters, as in Flax).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    axis_name: named axis (or axes) to combine statistics over.
    axis_index_groups: partition of that axis into groups combined separately.
    stats_route: how statistics are computed (see `bnjax.whitening_batch_norm`).
    rngs: an ``nnx.Rngs`` with a ``params`` stream, split for ``scale`` then ``bias``.

  Examples:
    >>> from flax import nnx
    >>> layer = bnjax.nnx.WhiteningBatchNorm(3, group_size=2, rngs=nnx.Rngs(0))
    >>> layer.covariance.shape
    (2, 2, 2)
    >>> y = layer(jax.random.normal(jax.random.key(0), (64, 3)))
  """

  def __init__(self, num_features: int, *, group_size: int = 64, method: str = "zca",
               iterations: int = 5, running_estimate: str = "covariance",
               unbiased_running_cov: bool = False, use_running_average: bool | None = False,
               axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-5,
               dtype: Any = None, param_dtype: Any = jnp.float32, use_bias: bool = True,
               use_scale: bool = True,
               bias_init: Callable[..., Any] = _ZEROS_INIT,
               scale_init: Callable[..., Any] = _ONES_INIT,
               axis_name: Any = None, axis_index_groups: Any = None,
               stats_route: str = "auto", rngs: nnx.Rngs) -> None:
    """Creates the parameters and running statistics (see the class docstring)."""
    where = "bnjax.nnx.WhiteningBatchNorm"
    if method not in whitening.METHODS:
      _checks.fail(where, f"`method` must be one of {whitening.METHODS}; got {method!r}.")
    if running_estimate not in whitening.RUNNING_ESTIMATES:
      _checks.fail(where, f"`running_estimate` must be one of {whitening.RUNNING_ESTIMATES}; "
                   f"got {running_estimate!r}.")
    _, state = whitening.init_whitening(num_features, group_size=group_size)
    self.mean = nnx.BatchStat(state.mean)
    self.covariance = nnx.BatchStat(state.covariance)
    self.whitening = nnx.BatchStat(state.whitening)
    shape = (num_features,)
    self.scale: nnx.Param[jax.Array] | None
    self.scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale
                  else nnx.data(None))
    self.bias: nnx.Param[jax.Array] | None
    self.bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias
                 else nnx.data(None))
    self.num_features = num_features
    self.group_size = group_size
    self.method = method
    self.iterations = iterations
    self.running_estimate = running_estimate
    self.unbiased_running_cov = unbiased_running_cov
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.axis_name = axis_name
    self.axis_index_groups = _hashable_groups(axis_index_groups)
    self.stats_route = stats_route

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Whitens `x` with batch statistics (training) or running statistics (evaluation).

    Args:
      x: the input; channels along ``self.axis``.
      use_running_average: overrides the attribute of the same name for this call.
      mask: bool array broadcastable to ``x``, of size 1 along ``axis``: the valid rows.

    Returns:
      The whitened input, of the shape of ``x``.
    """
    where = "bnjax.nnx.WhiteningBatchNorm"
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      _checks.fail(where, "`use_running_average` is None in both the constructor and the call; "
                   "set it in one of them, or call `model.train()` / `model.eval()`.")
    if not isinstance(use_running_average, (bool, np.bool_)):
      _checks.fail(where, "`use_running_average` must be a Python bool (it selects a different "
                   f"computation); got {type(use_running_average).__name__}. Set it with "
                   "`model.eval()` / `model.train()` or pass it as a static argument.", TypeError)
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):  # integer input becomes float32, as in Flax.
      x = x.astype(jnp.float32)
    with jax.numpy_dtype_promotion("standard"):  # Flax's inference rule, whatever the config.
      dtype = nnx_dtypes.canonicalize_dtype(
          x, *(p for p in (scale, bias) if p is not None), dtype=self.dtype)
    state = whitening.WhiteningState(self.mean[...], self.covariance[...], self.whitening[...])
    train = not use_running_average
    settings = (self.group_size, self.method, self.iterations, self.axis, self.momentum,
                self.epsilon, self.axis_name, self.axis_index_groups, self.running_estimate,
                self.unbiased_running_cov, dtype, self.stats_route)
    # Unhashable settings go to the function itself, which rejects them with its message.
    call = _compiled_whitening if _hashable(settings) else whitening.whitening_batch_norm
    y, new_state = call(
        BatchNormParams(scale, bias), state, x, train, group_size=self.group_size,
        method=self.method, iterations=self.iterations, axis=self.axis, momentum=self.momentum,
        epsilon=self.epsilon, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        mask=mask, running_estimate=self.running_estimate,
        unbiased_running_cov=self.unbiased_running_cov, dtype=dtype, stats_route=self.stats_route)
    if train:
      self.mean[...] = new_state.mean
      self.covariance[...] = new_state.covariance
      self.whitening[...] = new_state.whitening
    return y

  def set_view(self, use_running_average: bool | None = None) -> None:
    """Used by ``nnx.view``.

    Args:
      use_running_average: if True, normalise with the running statistics (evaluation).
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


__all__ += ["WhiteningBatchNorm"]

"""Drop-ins for Flax NNX's norm layers whose math is bnjax's pure core.

`BatchNorm` (`bnjax.batch_norm`), `WhiteningBatchNorm` (`bnjax.whitening_batch_norm`), and
`LayerNorm`, `RMSNorm`, `GroupNorm` and `InstanceNorm` (`bnjax.norms`): the constructors, calls and
variables of their `flax.nnx` namesakes (flax 0.12.8). The normalization family keeps ``scale`` and
``bias`` as ``nnx.Param`` (or None) and no other state.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import numbers
from types import MappingProxyType
from typing import Any, cast

from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from bnjax import _checks
from bnjax import norms
from bnjax import whitening
from bnjax.functional import batch_norm
from bnjax.types import BatchNormParams
from bnjax.types import BatchNormState
from bnjax.types import BatchStats
from bnjax.types import CumulativeState

__all__ = ["BatchMoments", "BatchNorm"]

_WHERE = "bnjax.nnx.BatchNorm"
# Flax's default initialisers, built once (a call in a default argument would run at import anyway).
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()

# NNX layers are often called eagerly (outside `nnx.jit`). There, `batch_norm` would dispatch op by
# op; compiled once per configuration it costs what one fused call costs. Inside `nnx.jit`,
# `shard_map`, `vmap` or `scan` the inner `jit` is inlined: same program, same numbers.
_STATIC_ARGNAMES = ("train", "axis", "momentum", "epsilon", "axis_name", "axis_index_groups",
                    "unbiased_running_var", "custom_vjp", "ghost_batch_size", "return_stats")
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
    momentum: decay of the running averages (Flax's convention; PyTorch's ``p`` is ``1 - p``), or
      None for the cumulative average of all batch statistics (PyTorch's ``momentum=None``): the
      layer then also keeps ``count``, an int32 ``nnx.BatchStat`` of updates per channel.
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
    ghost_batch_size: normalise each run of this many examples along axis 0 with its own
      statistics in training (ghost batch norm, see `bnjax.batch_norm`), or None.
    renorm_r_max: Batch Renormalization's bound on ``r`` (>= 1), or None for batch norm. Set the
      attribute between steps (``layer.renorm_r_max = r``) to follow a schedule; an array is
      passed to `bnjax.batch_norm` as a traced value, so changing it does not recompile.
    renorm_d_max: Batch Renormalization's bound on ``|d|`` (>= 0), set with ``renorm_r_max``.

  Raises:
    ValueError: at the call, if the input's feature shape is not ``num_features``, neither the
      constructor nor the call sets ``use_running_average``, or training sees one value per channel.
    TypeError: at the call, if ``use_running_average`` is traced or ``mask`` is not boolean.

  Examples:
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> layer = bnjax.nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> layer(x).round(4)                          # training: batch statistics
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
      momentum: float | None = 0.99,
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
      ghost_batch_size: int | None = None,
      renorm_r_max: float | None = None,
      renorm_d_max: float | None = None,
  ) -> None:
    """Creates the parameters and running statistics (arguments: see the class docstring)."""
    feature_shape = _feature_shape(num_features)
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    if momentum is None:  # only the cumulative average counts updates: Flax's state otherwise.
      self.count = nnx.BatchStat(jnp.zeros(feature_shape, jnp.int32))
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
    self.ghost_batch_size = ghost_batch_size
    # Data, not static: a schedule may assign arrays (traced under `nnx.jit`, no recompilation).
    self.renorm_r_max = nnx.data(renorm_r_max)
    self.renorm_d_max = nnx.data(renorm_d_max)

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
    if self.momentum is None:
      running = CumulativeState(*running, count=self.count[...])
    with jax.numpy_dtype_promotion("standard"):  # Flax's inference rule, whatever the config.
      x, _, _, scale, bias = self.promote_dtype(
          (x, running.mean, running.var, scale, bias), dtype=self.dtype)

    static: dict[str, Any] = dict(
        train=not use_running_average, axis=feature_axes, momentum=self.momentum,
        epsilon=self.epsilon, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        unbiased_running_var=self.unbiased_running_var, custom_vjp=self.custom_vjp,
        ghost_batch_size=self.ghost_batch_size if not use_running_average else None)
    # Unhashable settings (e.g. a traced `use_running_average`) go to `batch_norm` directly, which
    # raises the error that says how to fix them, or runs uncompiled.
    call = _compiled_batch_norm if _hashable(static.values()) else batch_norm
    train = static.pop("train")
    # Inside `nnx.capture(..., BatchMoments)` (what `bnjax.tools` uses) the step's global batch
    # moments are sown; otherwise nothing is measured beyond what the update needs.
    capturing = train and _captures(self, BatchMoments)
    outputs = call(BatchNormParams(scale, bias), running, x, train, mask=mask, **static,
                   return_stats=capturing,
                   renorm_r_max=self.renorm_r_max if train else None,
                   renorm_d_max=self.renorm_d_max if train else None)
    y, new_state = outputs[0], outputs[1]
    if capturing:
      batch_stats = cast(BatchStats, cast(tuple[Any, ...], outputs)[2])
      self.sow(BatchMoments, "moments", {
          "mean": batch_stats.mean, "var": batch_stats.var, "count": batch_stats.count,
          "updated": batch_stats.updated, "unbiased": jnp.asarray(self.unbiased_running_var),
          "epsilon": jnp.asarray(self.epsilon, jnp.float32)})
    if train:
      self.mean[...] = new_state.mean
      self.var[...] = new_state.var
      if self.momentum is None:
        self.count[...] = new_state.count
    return y

  def set_view(self, use_running_average: bool | None = None) -> None:
    """Used by ``nnx.view``.

    Args:
      use_running_average: if True, normalise with the running statistics (evaluation).
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchMoments(nnx.Intermediate):
  """What a training-mode `BatchNorm` sows inside ``nnx.capture(..., BatchMoments)``.

  Under the name ``moments``, one dict per call: the global batch ``mean``, biased ``var`` and
  int ``count`` per channel (combined over ``axis_name``, as `bnjax.BatchStats`), the ``updated``
  flags, and the layer's ``unbiased`` (``unbiased_running_var``) and ``epsilon``. Outside such a
  capture a layer sows nothing, and its state is Flax's. `bnjax.tools.nnx_precise_batch_stats`
  and `bnjax.tools.nnx_drift` read it.

  Examples:
    >>> from flax import nnx
    >>> layer = bnjax.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    >>> _, sown = nnx.capture(layer, bnjax.nnx.BatchMoments)(jnp.array([[1.0], [3.0]]))
    >>> moments, = sown['moments'].get_value()  # one call
    >>> moments['mean'], moments['var'], moments['count']
    (Array([2.], dtype=float32), Array([1.], dtype=float32), Array([2], dtype=int32))
  """



def _captures(module: nnx.Module, variable_type: type[nnx.Variable[Any]]) -> bool:
  """Whether `module` runs inside ``nnx.capture`` of `variable_type` (so `sow` would store)."""
  captures = getattr(module, "__captures__", ())
  return any(type(variable) is variable_type for variable in captures)


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


# ======================================================================= the normalization family
# Layer, RMS, group and instance norm (`bnjax.norms`): only ``scale`` and ``bias``, no statistics.

__all__ += ["GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]

Initializer = Callable[..., jax.Array]

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


def _as_tuples(value: Any) -> Any:
  """Lists (of lists) as tuples, so that settings can key `jit`'s cache and `nnx.jit`'s."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(v) for v in value)
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
    self.reduction_axes = _as_tuples(reduction_axes)
    self.feature_axes = _as_tuples(feature_axes)
    self.axis_name = axis_name
    self.axis_index_groups = _as_tuples(axis_index_groups)
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
    self.reduction_axes = _as_tuples(reduction_axes)
    self.feature_axes = _as_tuples(feature_axes)
    self.axis_name = axis_name
    self.axis_index_groups = _as_tuples(axis_index_groups)
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
    self.reduction_axes = _as_tuples(reduction_axes)
    self.axis_name = axis_name
    self.axis_index_groups = _as_tuples(axis_index_groups)
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
    self.feature_axes = _as_tuples(feature_axes)
    self.axis_name = axis_name
    self.axis_index_groups = _as_tuples(axis_index_groups)
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

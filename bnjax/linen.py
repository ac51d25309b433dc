"""Drop-ins for Flax's linen norm layers whose math is bnjax's pure core.

`BatchNorm` (`bnjax.batch_norm`), `WhiteningBatchNorm` (`bnjax.whitening_batch_norm`), and
`LayerNorm`, `RMSNorm`, `GroupNorm`, `InstanceNorm` (`bnjax.norms`): the fields, call and variables
of their `flax.linen` namesakes.
"""

from collections.abc import Sequence
from typing import Any

from flax import linen as nn
from flax.linen import dtypes as flax_dtypes
from flax.linen import initializers
import jax
import jax.numpy as jnp

from bnjax import _checks
from bnjax import norms
from bnjax import whitening
from bnjax.functional import batch_norm
from bnjax.types import BatchNormParams
from bnjax.types import BatchNormState
from bnjax.types import CumulativeState

# The collection that per-layer diagnostics are written to, when it is made mutable by name.
DIAGNOSTICS = "diagnostics"
# The collection each layer's batch moments (mean, variance, count) are sown to in training, when it
# is made mutable by name; `bnjax.tools.precise_batch_stats` reads it.
BATCH_MOMENTS = "batch_moments"


class BatchNorm(nn.Module):
  """Batch normalization for `flax.linen`, with the fields, call and variables of `nn.BatchNorm`.

  It declares ``params`` (``scale``, ``bias``) and ``batch_stats`` (``mean``, ``var``) exactly as
  Flax does, calls `bnjax.batch_norm` and writes the new running statistics back. Compared with
  Flax, the statistics are exact (shifted by a data pivot, count-weighted across devices, NaN-safe
  masks,
  running statistics that a bad batch cannot poison), and training with one value per channel
  raises. ``use_fast_variance`` and ``force_float32_reductions`` are accepted so existing code
  runs unchanged; bnjax always computes exact statistics in at least float32.

  As in Flax, ``init`` does not update the running statistics and uses no collective, so the named
  axis need not exist while initialising, and integer input is promoted to float32. A channel whose
  batch statistics are not finite keeps its running statistics. The variable tree is exactly
  Flax's (also with ``mutable=True``); the per-channel flags of which channels were updated are
  recorded only when asked for by name, ``mutable=['batch_stats', DIAGNOSTICS]``, as
  ``diagnostics/.../batch_stats_updated``.

  Attributes:
    use_running_average: if True, normalise with the running statistics (evaluation).
    axis: the feature axis or axes.
    momentum: decay of the running averages (Flax's convention), or None for the cumulative
      average of all batch statistics (PyTorch's ``momentum=None``): ``batch_stats`` then also
      holds ``count``, the int32 number of updates per channel (only then).
    epsilon: added to the variance.
    dtype: the output dtype (default: inferred from input and params, as in Flax).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    axis_name: named axis (or axes) to combine statistics over.
    axis_index_groups: partition of that axis into groups combined separately.
    use_fast_variance: accepted for compatibility; bnjax's variance is always exact.
    force_float32_reductions: accepted for compatibility; statistics are always at least float32.
    unbiased_running_var: store the unbiased variance in the running average (PyTorch's rule).
    custom_vjp: use bnjax's closed-form backward pass (False: JAX's autodiff, which also supports
      forward mode, e.g. ``jax.jvp`` through the model).
    stats_route: how batch moments are computed: ``"auto"``, ``"adaptive"`` or ``"one_pass"``
      (see `bnjax.batch_norm`).
    ghost_batch_size: normalise each run of this many examples along axis 0 with its own
      statistics in training (ghost batch norm, see `bnjax.batch_norm`), or None.
    renorm_r_max: Batch Renormalization's bound on ``r`` (>= 1), or None for batch norm; a call's
      ``renorm_r_max`` argument (which may be traced, e.g. a schedule of the step) overrides it.
    renorm_d_max: Batch Renormalization's bound on ``|d|`` (>= 0), set with ``renorm_r_max``.

  Examples:
    >>> model = bnjax.BatchNorm(use_running_average=False)
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> variables = model.init(jax.random.key(0), x)
    >>> y, updates = model.apply(variables, x, mutable=['batch_stats'])
    >>> updates['batch_stats']['mean']
    Array([0.02, 0.03], dtype=float32)
  """

  use_running_average: bool | None = None
  axis: int | Sequence[int] = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  unbiased_running_var: bool = False
  custom_vjp: bool = True
  stats_route: str = "auto"
  ghost_batch_size: int | None = None
  renorm_r_max: Any = None
  renorm_d_max: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None, renorm_r_max: Any = None,
               renorm_d_max: Any = None) -> jax.Array:
    """Normalises `x` with batch statistics (training) or running statistics (evaluation).

    Args:
      x: the input, any rank; features along ``self.axis``.
      use_running_average: overrides the field of the same name (one of them must be set).
      mask: bool array broadcastable to ``x``; statistics use only True positions.
      renorm_r_max: overrides the field (a traced scalar is allowed, e.g. from a schedule).
      renorm_d_max: overrides the field (a traced scalar is allowed).

    Returns:
      The normalised input, of the shape of ``x``.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    x = _promote_integers(x)
    feature_axes = _checks.canonical_axes(jnp.ndim(x), self.axis, "bnjax.BatchNorm")
    feature_shape = tuple(jnp.shape(x)[a] for a in feature_axes)

    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                            feature_shape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                           feature_shape)
    # Only the cumulative average counts updates, so the default variable tree stays Flax's.
    ra_count = (self.variable("batch_stats", "count", lambda s: jnp.zeros(s, jnp.int32),
                              feature_shape) if self.momentum is None else None)
    state = (BatchNormState(ra_mean.value, ra_var.value) if ra_count is None
             else CumulativeState(ra_mean.value, ra_var.value, ra_count.value))
    r_max = self.renorm_r_max if renorm_r_max is None else renorm_r_max
    d_max = self.renorm_d_max if renorm_d_max is None else renorm_d_max
    scale = (self.param("scale", self.scale_init, feature_shape, self.param_dtype)
             if self.use_scale else None)
    bias = (self.param("bias", self.bias_init, feature_shape, self.param_dtype)
            if self.use_bias else None)
    with jax.numpy_dtype_promotion("standard"):  # Flax's inference rule, whatever the config.
      dtype = flax_dtypes.canonicalize_dtype(
          x, *(p for p in (scale, bias) if p is not None), dtype=self.dtype)

    initializing = self.is_initializing()
    train = not use_running_average
    if train and initializing:
      # Flax initialises with a single example all the time; statistics of one value are
      # meaningless and are not stored during init, so normalise with the initial state instead.
      reduce_axes = tuple(a for a in range(jnp.ndim(x)) if a not in feature_axes)
      train = _checks.static_count(jnp.shape(x), reduce_axes) > 1
    outputs: tuple[Any, ...] = batch_norm(
        BatchNormParams(scale, bias), state, x, train,
        axis=feature_axes, momentum=self.momentum, epsilon=self.epsilon,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        mask=mask, unbiased_running_var=self.unbiased_running_var, dtype=dtype,
        return_stats=train, custom_vjp=self.custom_vjp, stats_route=self.stats_route,
        ghost_batch_size=self.ghost_batch_size if train else None,
        renorm_r_max=r_max if train else None, renorm_d_max=d_max if train else None)
    if train and not initializing:
      y, new_state, batch_stats = outputs
      ra_mean.value, ra_var.value = new_state.mean, new_state.var
      if ra_count is not None:
        ra_count.value = new_state.count
      if requested(self, DIAGNOSTICS):
        # Which channels took this batch's statistics (False: non-finite or no valid value).
        self.sow(DIAGNOSTICS, "batch_stats_updated", batch_stats.updated)
      if requested(self, BATCH_MOMENTS):
        # The global batch moments, whether this layer stores the unbiased variance, and its ε
        # (`bnjax.tools.linen_drift` compares the moments with the running statistics).
        self.sow(BATCH_MOMENTS, "moments", {
            "mean": batch_stats.mean, "var": batch_stats.var, "count": batch_stats.count,
            "unbiased": jnp.asarray(self.unbiased_running_var),
            "epsilon": jnp.asarray(self.epsilon, jnp.float32)})
      return y
    return outputs[0]


def requested(module: nn.Module, collection: str) -> bool:
  """Whether `collection` was made mutable by name (not merely by ``mutable=True``).

  So that diagnostics never change the variable tree of code written for Flax.
  """
  mutable = module.scope.mutable if module.scope is not None else False
  if isinstance(mutable, str):
    return mutable == collection
  if isinstance(mutable, (list, tuple)):
    return collection in mutable
  return False


def _promote_integers(x: Any) -> jax.Array:
  """Integer (and bool) input becomes float32, as Flax's norms compute it; floats pass as is."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    return x.astype(jnp.float32)
  return x


# ============================================================================ whitening


class WhiteningBatchNorm(nn.Module):
  """Whitening batch normalization for `flax.linen`: `bnjax.whitening_batch_norm` as a module.

  The channels are split into groups of ``group_size`` and each group is whitened (zero mean,
  identity covariance) by ``method``: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"iterative"``
  (IterNorm, ``iterations`` Newton–Schulz steps); then the per-channel ``scale`` and ``bias``
  apply. The fields mirror `flax.linen.BatchNorm`'s and the function's keywords.

  Variables (C channels, G groups of d = min(group_size, C), the last group padded with the
  identity):

  * ``params/scale``, ``params/bias``: shape [C];
  * ``batch_stats/mean``: [C], the running mean;
  * ``batch_stats/covariance``: [G, d, d], the running batch covariance (without ε);
  * ``batch_stats/whitening``: [G, d, d], the running batch whitening matrix.

  Both running estimates are always updated; ``running_estimate`` says which one evaluation uses
  (``"covariance"``: ``W`` computed from the running covariance, the consistent estimate;
  ``"whitening"``: the running matrix, as DBN and IterNorm keep it). As in `BatchNorm`, ``init``
  does not update the running statistics and uses no collective.

  Attributes:
    use_running_average: if True, normalise with the running statistics (evaluation).
    axis: the one feature axis.
    momentum: decay of the running averages (Flax's convention).
    epsilon: added to the diagonal of every covariance.
    group_size: channels per whitening group (IterNorm's default, 64).
    method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"iterative"``.
    iterations: Newton–Schulz steps of ``"iterative"``.
    running_estimate: ``"covariance"`` or ``"whitening"``: what evaluation whitens with.
    unbiased_running_cov: average the unbiased batch covariance into the running covariance.
    dtype: the output dtype (default: inferred from input and params, as in Flax).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    axis_name: named axis (or axes) to combine statistics over.
    axis_index_groups: partition of that axis into groups combined separately.
    stats_route: how statistics merge across devices (see `bnjax.whitening_batch_norm`).

  Examples:
    >>> model = bnjax.linen.WhiteningBatchNorm(use_running_average=False, group_size=2)
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> variables = model.init(jax.random.key(1), x)
    >>> jax.tree.map(jnp.shape, variables['batch_stats'])
    {'covariance': (2, 2, 2), 'mean': (3,), 'whitening': (2, 2, 2)}
    >>> y, updates = model.apply(variables, x, mutable=['batch_stats'])
  """

  use_running_average: bool | None = None
  axis: int = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  group_size: int = 64
  method: str = "zca"
  iterations: int = 5
  running_estimate: str = "covariance"
  unbiased_running_cov: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  stats_route: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Whitens `x` with batch statistics (training) or running statistics (evaluation).

    Args:
      x: the input; channels along ``self.axis``.
      use_running_average: overrides the field of the same name (one of them must be set).
      mask: bool array broadcastable to ``x``, of size 1 along ``axis``: the valid rows.

    Returns:
      The whitened input, of the shape of ``x``.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    x = _promote_integers(x)
    where = "bnjax.linen.WhiteningBatchNorm"
    if isinstance(self.axis, bool) or not isinstance(self.axis, int):
      _checks.fail(where, f"`axis` must be one int; got {self.axis!r}.", TypeError)
    feature_axis = _checks.canonical_axes(jnp.ndim(x), self.axis, where)[0]
    channels = jnp.shape(x)[feature_axis]
    _, initial = whitening.init_whitening(channels, group_size=self.group_size)

    ra_mean = self.variable("batch_stats", "mean", lambda: initial.mean)
    ra_cov = self.variable("batch_stats", "covariance", lambda: initial.covariance)
    ra_w = self.variable("batch_stats", "whitening", lambda: initial.whitening)
    scale = (self.param("scale", self.scale_init, (channels,), self.param_dtype)
             if self.use_scale else None)
    bias = (self.param("bias", self.bias_init, (channels,), self.param_dtype)
            if self.use_bias else None)
    with jax.numpy_dtype_promotion("standard"):  # Flax's inference rule, whatever the config.
      dtype = flax_dtypes.canonicalize_dtype(
          x, *(p for p in (scale, bias) if p is not None), dtype=self.dtype)

    initializing = self.is_initializing()
    train = not use_running_average
    if train and initializing:  # statistics of one row are meaningless and never stored.
      train = jnp.size(x) // channels > 1
    state = whitening.WhiteningState(ra_mean.value, ra_cov.value, ra_w.value)
    y, new_state = whitening.whitening_batch_norm(
        BatchNormParams(scale, bias), state, x, train, group_size=self.group_size,
        method=self.method, iterations=self.iterations, axis=feature_axis, momentum=self.momentum,
        epsilon=self.epsilon, axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups, mask=mask,
        running_estimate=self.running_estimate, unbiased_running_cov=self.unbiased_running_cov,
        dtype=dtype, stats_route=self.stats_route)
    if train and not initializing:
      ra_mean.value, ra_cov.value, ra_w.value = new_state
    return y


# ======================================================================= the normalization family
# Layer, RMS, group and instance norm: statistics over other sets of values than batch norm's,
# computed by the same core (`bnjax.norms`). They keep no running statistics: only ``params``.


def _declare_params(module: nn.Module, feature_shape: tuple[int, ...], *, use_scale: bool,
                    use_bias: bool, scale_init: Any, bias_init: Any, param_dtype: Any
                    ) -> BatchNormParams:
  """Declares ``params/scale`` then ``params/bias`` (Flax's order and names) of `feature_shape`."""
  scale = (module.param("scale", scale_init, feature_shape, param_dtype) if use_scale else None)
  bias = (module.param("bias", bias_init, feature_shape, param_dtype) if use_bias else None)
  return BatchNormParams(scale, bias)


def _output_dtype(x: jax.Array, params: BatchNormParams, dtype: Any) -> Any:
  """Flax's rule: ``dtype``, or the promoted type of the input and the parameters."""
  with jax.numpy_dtype_promotion("standard"):  # Flax's inference rule, whatever the config.
    return flax_dtypes.canonicalize_dtype(x, *(p for p in params if p is not None), dtype=dtype)


def _feature_shape(x: jax.Array, axes: Any, name: str, where: str) -> tuple[int, ...]:
  feature_axes = _checks.canonical_named_axes(jnp.ndim(x), axes, name, where)
  return tuple(jnp.shape(x)[a] for a in feature_axes)


class LayerNorm(nn.Module):
  r"""Layer normalization for `flax.linen`, with the fields, call and variables of `nn.LayerNorm`.

  .. math::

     y = \gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  with :math:`\mu, \sigma^2` over ``reduction_axes`` of each example (`bnjax.layer_norm`).
  It declares ``params/scale`` and ``params/bias`` of the shape of ``x`` along ``feature_axes``, as
  Flax does, and calls `bnjax.layer_norm`. Compared with Flax, the variance is exact for data far
  from zero (Flax's default ``E[x^2] - E[x]^2`` cancels whole offsets), masks keep NaN out of the
  valid outputs and gradients, and ``axis_name`` combines the statistics by counts. As in Flax,
  integer input is promoted to float32 and the output dtype is inferred from the input and the
  parameters. ``use_fast_variance`` and ``force_float32_reductions`` are accepted so existing code
  runs unchanged: bnjax's statistics are always exact and at least float32. No collective runs
  while initialising, so a model with ``axis_name`` initialises outside ``shard_map``.

  Attributes:
    epsilon: added to the variance.
    dtype: the output dtype (default: inferred from input and params, as in Flax).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    reduction_axes: the axes the statistics are taken over.
    feature_axes: the axes ``scale`` and ``bias`` vary along.
    axis_name: named axis (or axes) along which ``reduction_axes`` are split across devices.
    axis_index_groups: partition of that axis into groups combined separately.
    use_fast_variance: accepted for compatibility; bnjax's variance is always exact.
    force_float32_reductions: accepted for compatibility; statistics are always at least float32.
    custom_vjp: use bnjax's closed-form backward pass (False: JAX's autodiff, forward mode too).
    stats_route: how moments are computed: ``"auto"``, ``"adaptive"`` or ``"one_pass"``.

  Examples:
    >>> x = jnp.array([[1.0, 2.0, 3.0], [1e4, 1e4 + 1.0, 1e4 + 2.0]])
    >>> layer = bnjax.linen.LayerNorm()
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (3,), 'scale': (3,)}}
    >>> layer.apply(variables, x).round(4)
    Array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]], dtype=float32)
  """

  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  reduction_axes: Any = -1
  feature_axes: Any = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  custom_vjp: bool = True
  stats_route: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalises each example of `x` over `reduction_axes`.

    Args:
      x: the input.
      mask: bool array broadcastable to ``x``; statistics use only True positions.

    Returns:
      The normalised input, of the shape of ``x``.
    """
    x = _promote_integers(x)
    params = _declare_params(
        self, _feature_shape(x, self.feature_axes, "feature_axes", "bnjax.linen.LayerNorm"),
        use_scale=self.use_scale, use_bias=self.use_bias, scale_init=self.scale_init,
        bias_init=self.bias_init, param_dtype=self.param_dtype)
    initializing = self.is_initializing()
    return norms.layer_norm(
        params, x, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
        epsilon=self.epsilon, mask=mask, axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        dtype=_output_dtype(x, params, self.dtype), custom_vjp=self.custom_vjp,
        stats_route=self.stats_route)


class RMSNorm(nn.Module):
  r"""RMS normalization for `flax.linen`, with the fields, call and variables of `nn.RMSNorm`.

  .. math::

     y = \gamma \, \frac{x}{\sqrt{\overline{x^2} + \epsilon}}

  with the mean square over ``reduction_axes`` (`bnjax.rms_norm`). It declares ``params/scale``
  only, as Flax does. The mean square is computed in at least float32 with masks that keep NaN
  out, and combined across devices by counts. ``use_fast_variance`` and
  ``force_float32_reductions`` are accepted for compatibility (no-ops). No collective runs while
  initialising.

  Attributes:
    epsilon: added to the mean square, inside the square root.
    dtype: the output dtype (default: inferred from input and params, as in Flax).
    param_dtype: the dtype of ``scale``.
    use_scale: whether to learn γ.
    scale_init: initializer for γ.
    reduction_axes: the axes the mean square is taken over.
    feature_axes: the axes ``scale`` varies along.
    axis_name: named axis (or axes) along which ``reduction_axes`` are split across devices.
    axis_index_groups: partition of that axis into groups combined separately.
    use_fast_variance: accepted for compatibility (no effect).
    force_float32_reductions: accepted for compatibility; the mean square is at least float32.
    custom_vjp: use bnjax's closed-form backward pass (False: JAX's autodiff, forward mode too).

  Examples:
    >>> x = jnp.array([[6.4, 44.8]])                  # root mean square 32
    >>> layer = bnjax.linen.RMSNorm()
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'scale': (2,)}}
    >>> layer.apply(variables, x)
    Array([[0.2, 1.4]], dtype=float32)
  """

  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  scale_init: Any = initializers.ones
  reduction_axes: Any = -1
  feature_axes: Any = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Divides each example of `x` by its root mean square over `reduction_axes`.

    Args:
      x: the input.
      mask: bool array broadcastable to ``x``; the mean square uses only True positions.

    Returns:
      The normalised input, of the shape of ``x``.
    """
    x = _promote_integers(x)
    params = _declare_params(
        self, _feature_shape(x, self.feature_axes, "feature_axes", "bnjax.linen.RMSNorm"),
        use_scale=self.use_scale, use_bias=False, scale_init=self.scale_init,
        bias_init=initializers.zeros, param_dtype=self.param_dtype)
    initializing = self.is_initializing()
    return norms.rms_norm(
        params, x, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
        epsilon=self.epsilon, mask=mask, axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        dtype=_output_dtype(x, params, self.dtype), custom_vjp=self.custom_vjp)


class GroupNorm(nn.Module):
  r"""Group normalization for `flax.linen`, with the fields, call and variables of `nn.GroupNorm`.

  .. math::

     y = \gamma \, \frac{x - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}} + \beta

  with :math:`\mu_g, \sigma_g^2` per example and group of ``C/G`` channels, over the group's
  channels and the other ``reduction_axes`` (`bnjax.group_norm`; channels last, as in Flax). It
  declares ``params/scale`` and ``params/bias`` of shape ``(C,)``. Exactly one of ``num_groups``
  and ``group_size`` is set (pass ``num_groups=None`` to give ``group_size``). Compared with Flax,
  the variance is exact for data far from zero and masks keep NaN out. ``use_fast_variance`` and
  ``force_float32_reductions`` are accepted for compatibility (no-ops). No collective runs while
  initialising.

  Attributes:
    num_groups: the number of channel groups (32, as proposed by Wu & He).
    group_size: the number of channels per group, with ``num_groups=None``.
    epsilon: added to the variance.
    dtype: the output dtype (default: inferred from input and params, as in Flax).
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
    force_float32_reductions: accepted for compatibility; statistics are always at least float32.
    custom_vjp: use bnjax's closed-form backward pass (False: JAX's autodiff, forward mode too).
    stats_route: how moments are computed: ``"auto"``, ``"adaptive"`` or ``"one_pass"``.

  Examples:
    >>> x = jnp.array([[10.0, 30.0, 100.0, 300.0]])
    >>> layer = bnjax.linen.GroupNorm(num_groups=2)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  reduction_axes: Any = None
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  custom_vjp: bool = True
  stats_route: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalises `x` per example and group of channels.

    Args:
      x: the input ``[..., C]``; every axis but the first is reduced unless ``reduction_axes``
        says otherwise.
      mask: bool array broadcastable to ``x``; statistics use only True positions.

    Returns:
      The normalised input, of the shape of ``x``.
    """
    x = _promote_integers(x)
    params = _declare_params(
        self, _feature_shape(x, -1, "x", "bnjax.linen.GroupNorm"), use_scale=self.use_scale,
        use_bias=self.use_bias, scale_init=self.scale_init, bias_init=self.bias_init,
        param_dtype=self.param_dtype)
    initializing = self.is_initializing()
    return norms.group_norm(
        params, x, num_groups=self.num_groups, group_size=self.group_size,
        reduction_axes=self.reduction_axes, epsilon=self.epsilon, mask=mask,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        dtype=_output_dtype(x, params, self.dtype), custom_vjp=self.custom_vjp,
        stats_route=self.stats_route)


class InstanceNorm(nn.Module):
  r"""Instance normalization for `flax.linen`, with the fields, call and variables of Flax's.

  The fields, call and variables of `nn.InstanceNorm`:

  .. math::

     y = \gamma \, \frac{x - \mu_{n,c}}{\sqrt{\sigma_{n,c}^2 + \epsilon}} + \beta

  with :math:`\mu_{n,c}, \sigma_{n,c}^2` per example and channel, over every axis but the first
  and ``feature_axes`` (`bnjax.instance_norm`). It declares ``params/scale`` and ``params/bias``
  of the shape of ``x`` along ``feature_axes``. ``use_fast_variance`` and
  ``force_float32_reductions`` are accepted for compatibility (no-ops). No collective runs while
  initialising.

  Attributes:
    epsilon: added to the variance.
    dtype: the output dtype (default: inferred from input and params, as in Flax).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    feature_axes: the channel axes (not 0, the batch).
    axis_name: named axis (or axes) along which the reduced axes are split across devices.
    axis_index_groups: partition of that axis into groups combined separately.
    use_fast_variance: accepted for compatibility; bnjax's variance is always exact.
    force_float32_reductions: accepted for compatibility; statistics are always at least float32.
    custom_vjp: use bnjax's closed-form backward pass (False: JAX's autodiff, forward mode too).
    stats_route: how moments are computed: ``"auto"``, ``"adaptive"`` or ``"one_pass"``.

  Examples:
    >>> x = jnp.array([[[10.0, 100.0], [30.0, 300.0]]])
    >>> layer = bnjax.linen.InstanceNorm()
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x)
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)
  """

  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  feature_axes: Any = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  custom_vjp: bool = True
  stats_route: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalises `x` per example and channel.

    Args:
      x: the input ``[N, ..., C]``.
      mask: bool array broadcastable to ``x``; statistics use only True positions.

    Returns:
      The normalised input, of the shape of ``x``.
    """
    x = _promote_integers(x)
    params = _declare_params(
        self, _feature_shape(x, self.feature_axes, "feature_axes", "bnjax.linen.InstanceNorm"),
        use_scale=self.use_scale, use_bias=self.use_bias, scale_init=self.scale_init,
        bias_init=self.bias_init, param_dtype=self.param_dtype)
    initializing = self.is_initializing()
    return norms.instance_norm(
        params, x, feature_axes=self.feature_axes, epsilon=self.epsilon, mask=mask,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        dtype=_output_dtype(x, params, self.dtype), custom_vjp=self.custom_vjp,
        stats_route=self.stats_route)

"""Flax NNX modules whose math is bnjax's pure core: they hold the variables and call it."""

from typing import Any

from flax import nnx
from flax.linen import dtypes as flax_dtypes
from flax.nnx import initializers
import jax
import jax.numpy as jnp

from bnjax import _checks
from bnjax import whitening
from bnjax.types import BatchNormParams


class WhiteningBatchNorm(nnx.Module):
  """Whitening batch normalization for `flax.nnx`: `bnjax.whitening_batch_norm` as a module.

  The channels are split into groups of ``group_size``, each group is whitened (zero mean,
  identity covariance) by ``method`` (``"zca"``, ``"pca"``, ``"cholesky"`` or ``"iterative"``),
  then the per-channel ``scale`` and ``bias`` apply. The arguments mirror `flax.nnx.BatchNorm`'s
  and the function's keywords.

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
    dtype: the output dtype (default: inferred from input and parameters).
    param_dtype: the dtype of ``scale`` and ``bias``.
    use_bias: whether to learn β.
    use_scale: whether to learn γ.
    bias_init: initializer for β.
    scale_init: initializer for γ.
    axis_name: named axis (or axes) to combine statistics over.
    axis_index_groups: partition of that axis into groups combined separately.
    stats_route: how statistics merge across devices (see `bnjax.whitening_batch_norm`).
    rngs: the `nnx.Rngs` the parameter initializers draw from.

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
               use_scale: bool = True, bias_init: Any = initializers.zeros_init(),
               scale_init: Any = initializers.ones_init(), axis_name: Any = None,
               axis_index_groups: Any = None, stats_route: str = "auto", rngs: nnx.Rngs):
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
    self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale else None
    self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else None
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
    self.axis_index_groups = axis_index_groups
    self.stats_route = stats_route

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Whitens `x` with batch statistics (training) or running statistics (evaluation).

    Args:
      x: the input; channels along ``self.axis``.
      use_running_average: overrides the attribute of the same name.
      mask: bool array broadcastable to ``x``, of size 1 along ``axis``: the valid rows.

    Returns:
      The whitened input, of the shape of ``x``.
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      _checks.fail("bnjax.nnx.WhiteningBatchNorm", "`use_running_average` is None: pass it to "
                   "the constructor or the call (True to evaluate, False to train).")
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    with jax.numpy_dtype_promotion("standard"):  # Flax's inference rule, whatever the config.
      dtype = flax_dtypes.canonicalize_dtype(
          x, *(p for p in (scale, bias) if p is not None), dtype=self.dtype)
    state = whitening.WhiteningState(self.mean[...], self.covariance[...], self.whitening[...])
    train = not use_running_average
    y, new_state = whitening.whitening_batch_norm(
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

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view`: sets ``use_running_average``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

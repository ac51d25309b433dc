"""Models for the examples: a small CNN and a small ResNet, each taking a `norm` factory.

The factory decides the normalisation, so the same network runs with `bnjax.BatchNorm`,
`flax.linen.BatchNorm`, `bnjax.linen.WhiteningBatchNorm`, one of bnjax's per-example norms (layer,
group, instance, RMS: see `PerExampleNorm`) or none at all (see `norm_factory`). The variables a
model declares:

  >>> images_NHWC = jnp.zeros((2, 8, 8, 1))
  >>> init = lambda model: jax.eval_shape(
  ...     functools.partial(model.init, train=False), jax.random.key(0), images_NHWC)
  >>> variables = init(CNN(num_classes=10, norm=norm_factory('bnjax')))
  >>> jax.tree.map(jnp.shape, variables['batch_stats']['BatchNorm_0'])
  {'mean': (32,), 'var': (32,)}
  >>> sorted(init(CNN(num_classes=10, norm=norm_factory('none'))))
  ['params']
"""

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import bnjax
import bnjax.linen

NORMS = ("bnjax", "flax", "whitening", "layer", "group", "instance", "rms", "none")
PER_EXAMPLE_NORMS = ("layer", "group", "instance", "rms")

# A module class or a partial of one; called with keyword arguments, it returns a module.
ModuleDef = Callable[..., nn.Module]


def norm_factory(kind: str, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 axis_name: Any = None, whitening: Any = None) -> ModuleDef | None:
  """The normalisation layer for `kind`, as a factory the models call once per layer.

  Args:
    kind: ``'bnjax'`` (`bnjax.BatchNorm`), ``'flax'`` (`flax.linen.BatchNorm`, the reference the
      drop-in replaces), ``'whitening'`` (`bnjax.linen.WhiteningBatchNorm`), ``'layer'``,
      ``'group'``, ``'instance'``, ``'rms'`` (`PerExampleNorm`: statistics of each example, no
      running statistics) or ``'none'``.
    momentum: decay of the running averages.
    epsilon: added to the variance (to the covariance's diagonal for whitening).
    axis_name: the mesh axis to combine batch statistics over, so every device normalises with the
      statistics of the global batch; None on a single device. The per-example norms ignore it:
      their statistics never span examples, so data parallelism needs no collective.
    whitening: for ``'whitening'``, a mapping with its ``method``, ``group_size`` and
      ``iterations`` (``config.whitening``); None for the layer's defaults.

  Returns:
    A partial of the layer class (it still takes ``use_running_average`` and per-layer options such
    as ``scale_init``), or None for no normalisation.

  Raises:
    ValueError: if `kind` is not one of ``NORMS``.
  """
  if kind == "bnjax":
    return functools.partial(bnjax.BatchNorm, momentum=momentum, epsilon=epsilon,
                             axis_name=axis_name)
  if kind == "flax":
    return functools.partial(nn.BatchNorm, momentum=momentum, epsilon=epsilon,
                             axis_name=axis_name)
  if kind == "whitening":
    options = dict(whitening or {})
    return functools.partial(bnjax.linen.WhiteningBatchNorm, momentum=momentum, epsilon=epsilon,
                             axis_name=axis_name, **options)
  if kind in PER_EXAMPLE_NORMS:
    return functools.partial(PerExampleNorm, kind=kind, epsilon=epsilon)
  if kind == "none":
    return None
  raise ValueError(f"Unknown norm {kind!r}; expected one of {NORMS}.")


class PerExampleNorm(nn.Module):
  """Layer, group, instance or RMS norm of each example, for convolutional and dense layers alike.

  For ``[N, H, W, C]`` activations (Wu & He, "Group Normalization", 2018, §3): ``'layer'``
  standardises each example over ``(H, W, C)``, ``'group'`` over ``(H, W)`` and each group of
  channels (``num_groups``, or the largest count that divides ``C`` and ``num_groups``: their gcd;
  for ``[N, C]``, groups of at least two features),
  ``'instance'`` over ``(H, W)`` per channel and ``'rms'`` divides by the root mean square over
  ``(H, W, C)``. For ``[N, C]`` (after a dense layer) there is no spatial extent: ``'instance'``
  then standardises over the features, as ``'layer'`` does. ``scale`` and ``bias`` (none for RMS)
  have shape ``(C,)``; the statistics come from `bnjax.layer_norm`, `bnjax.group_norm`,
  `bnjax.instance_norm` or `bnjax.rms_norm`, exact and per example, so there are no running
  statistics and training and evaluation compute the same function.

  Attributes:
    kind: ``'layer'``, ``'group'``, ``'instance'`` or ``'rms'``.
    epsilon: added to the variance (to the mean square for RMS).
    num_groups: the most groups for ``'group'`` (32, as Wu & He propose).
    scale_init: initializer for γ (ResNet blocks start their last norm at zero).
    use_running_average: accepted, so the models call every norm alike; it has no effect.

  Examples:
    >>> layer = PerExampleNorm(kind='group', num_groups=2)
    >>> x_NC = jnp.array([[10.0, 30.0, 100.0, 300.0]])
    >>> layer.apply(layer.init(jax.random.key(0), x_NC), x_NC)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  kind: str = "layer"
  epsilon: float = 1e-6
  num_groups: int = 32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  use_running_average: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises each example of `x` (``[N, ..., C]``)."""
    if self.kind not in PER_EXAMPLE_NORMS:
      raise ValueError(f"PerExampleNorm: `kind` must be one of {PER_EXAMPLE_NORMS}; got "
                       f"{self.kind!r}.")
    channels = x.shape[-1]
    scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
    bias = (None if self.kind == "rms"
            else self.param("bias", nn.initializers.zeros, (channels,), jnp.float32))
    params = bnjax.BatchNormParams(scale, bias)
    every_axis_but_the_batch = tuple(range(1, x.ndim))
    if self.kind == "group":
      # Groups of at least two features when there is no spatial extent (a dense layer).
      divisible = channels if math.prod(x.shape[1:-1]) > 1 else channels // 2
      return bnjax.group_norm(params, x, num_groups=math.gcd(self.num_groups, divisible),
                              epsilon=self.epsilon)
    if self.kind == "instance" and x.ndim > 2:
      return bnjax.instance_norm(params, x, epsilon=self.epsilon)
    if self.kind == "rms":
      return bnjax.rms_norm(params, x, reduction_axes=every_axis_but_the_batch,
                            epsilon=self.epsilon)
    return bnjax.layer_norm(params, x, reduction_axes=every_axis_but_the_batch,
                            epsilon=self.epsilon)


def _bind_train(norm: ModuleDef | None, train: bool) -> ModuleDef | None:
  """Fixes `use_running_average`: batch statistics in training, running statistics otherwise."""
  return None if norm is None else functools.partial(norm, use_running_average=not train)


def average_pool_2x2(x_NHWC: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2 ("SAME" padding, zeros counted as in `nn.avg_pool`).

  `nn.avg_pool` divides by an integer NumPy count, which strict dtype promotion rejects.
  """
  summed_NHWC = nn.pool(x_NHWC, np.zeros((), x_NHWC.dtype), lax.add, (2, 2), strides=(2, 2),
                        padding="SAME")
  return summed_NHWC / jnp.asarray(4, x_NHWC.dtype)


class CNN(nn.Module):
  """The Flax MNIST CNN with a normalisation layer after every convolution and the hidden layer.

  ``[conv 3x3 -> norm -> relu -> avg-pool 2x2] per entry of features -> dense -> norm -> relu ->
  dense``. Layers followed by a normalisation have no bias (the norm's β replaces it).

  Attributes:
    num_classes: the number of logits.
    features: channels of each convolution stage; each stage halves the height and width.
    hidden: width of the hidden dense layer.
    norm: the normalisation factory (`norm_factory`), or None for no normalisation.
    dropout_rate: dropout before the classifier in training (then ``apply`` needs a
      ``'dropout'`` key); 0 for none.
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  hidden: int = 256
  norm: ModuleDef | None = None
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x_NHWC: jax.Array, train: bool, deterministic: bool | None = None,
               renorm: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Returns float32 logits of shape [N, num_classes] for images of shape [N, H, W, C].

    ``deterministic`` switches dropout off (default: off unless ``train``); ``train=True,
    deterministic=True`` is batch statistics without dropout, for `bnjax.tools.precise_batch_stats`.
    ``renorm``: Batch Renormalization's ``(r_max, d_max)`` for every `bnjax.BatchNorm` (traced
    values allowed, e.g. `bnjax.tools.renorm_schedule` of the step), or None for batch norm.
    """
    norm = _bind_train(self.norm, train)
    bounds = {} if renorm is None else {"renorm_r_max": renorm[0], "renorm_d_max": renorm[1]}
    x = x_NHWC
    for width in self.features:
      x = nn.Conv(width, (3, 3), use_bias=norm is None)(x)
      x = nn.relu(x if norm is None else norm()(x, **bounds))
      x = average_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, use_bias=norm is None)(x)
    x = nn.relu(x if norm is None else norm()(x, **bounds))
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate,
                     deterministic=not train if deterministic is None else deterministic)(x)
    return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
  """``relu(x + norm(conv(relu(norm(conv(x))))))``, with a projected shortcut when shapes change.

  The second norm's γ starts at zero, so each block starts as the identity (Goyal et al., 2017).
  """

  features: int
  strides: int = 1
  norm: ModuleDef | None = None

  @nn.compact
  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    norm = self.norm
    conv = functools.partial(nn.Conv, use_bias=norm is None)
    y = conv(self.features, (3, 3), strides=self.strides)(x_NHWC)
    y = nn.relu(y if norm is None else norm()(y))
    y = conv(self.features, (3, 3))(y)
    if norm is not None:
      y = norm(scale_init=nn.initializers.zeros)(y)
    shortcut = x_NHWC
    if x_NHWC.shape[-1] != self.features or self.strides != 1:
      shortcut = conv(self.features, (1, 1), strides=self.strides, name="shortcut_conv")(x_NHWC)
      if norm is not None:
        shortcut = norm(name="shortcut_norm")(shortcut)
    return nn.relu(shortcut + y)


class ResNet(nn.Module):
  """A CIFAR-style ResNet: a 3x3 stem, then stages of `ResidualBlock`, global pooling, a classifier.

  With ``stage_sizes=(3, 3, 3)`` and ``num_filters=16`` this is ResNet-20 of He et al. (2016).

  Attributes:
    num_classes: the number of logits.
    stage_sizes: residual blocks per stage; every stage after the first halves the resolution and
      doubles the channels.
    num_filters: channels of the stem and the first stage.
    norm: the normalisation factory (`norm_factory`), or None for no normalisation.
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2)
  num_filters: int = 16
  norm: ModuleDef | None = None

  @nn.compact
  def __call__(self, x_NHWC: jax.Array, train: bool) -> jax.Array:
    """Returns float32 logits of shape [N, num_classes] for images of shape [N, H, W, C]."""
    norm = _bind_train(self.norm, train)
    x = nn.Conv(self.num_filters, (3, 3), use_bias=norm is None, name="stem_conv")(x_NHWC)
    x = nn.relu(x if norm is None else norm(name="stem_norm")(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(self.num_filters * 2**stage, strides=strides, norm=norm)(x)
    x_NC = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x_NC)

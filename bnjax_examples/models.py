"""Models for the examples: a small CNN and a small ResNet, each taking a `norm` factory.

The factory decides the normalisation, so the same network runs with `bnjax.BatchNorm`,
`flax.linen.BatchNorm` or none at all (see `norm_factory`). The variables a model declares:

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
from typing import Any

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import bnjax

NORMS = ("bnjax", "flax", "none")

# A module class or a partial of one; called with keyword arguments, it returns a module.
ModuleDef = Callable[..., nn.Module]


def norm_factory(kind: str, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 axis_name: Any = None) -> ModuleDef | None:
  """The normalisation layer for `kind`, as a factory the models call once per layer.

  Args:
    kind: ``'bnjax'`` (`bnjax.BatchNorm`), ``'flax'`` (`flax.linen.BatchNorm`, the reference the
      drop-in replaces) or ``'none'``.
    momentum: decay of the running averages.
    epsilon: added to the variance.
    axis_name: the mesh axis to combine batch statistics over, so every device normalises with the
      statistics of the global batch; None on a single device.

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
  if kind == "none":
    return None
  raise ValueError(f"Unknown norm {kind!r}; expected one of {NORMS}.")


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
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  hidden: int = 256
  norm: ModuleDef | None = None

  @nn.compact
  def __call__(self, x_NHWC: jax.Array, train: bool) -> jax.Array:
    """Returns float32 logits of shape [N, num_classes] for images of shape [N, H, W, C]."""
    norm = _bind_train(self.norm, train)
    x = x_NHWC
    for width in self.features:
      x = nn.Conv(width, (3, 3), use_bias=norm is None)(x)
      x = nn.relu(x if norm is None else norm()(x))
      x = average_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, use_bias=norm is None)(x)
    x = nn.relu(x if norm is None else norm()(x))
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

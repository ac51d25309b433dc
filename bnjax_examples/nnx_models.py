"""The example's CNN in Flax NNX, with `bnjax.nnx.BatchNorm` (or Flax's, or none).

The network is `models.CNN` layer for layer: ``[conv 3x3 -> norm -> relu -> avg-pool 2x2] per
entry of features -> dense -> norm -> relu -> dense``, with no bias on a layer that a norm follows.
Its sub-modules carry the names linen gives them (``Conv_0``, ``BatchNorm_0``, ``Dense_0``, ...), so
``nnx.state(model, nnx.Param)`` and ``nnx.state(model, nnx.BatchStat)`` have the structure of the
linen model's ``params`` and ``batch_stats``, and `load_linen_variables` copies a linen
initialisation (or checkpoint) into the NNX model:

  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> model = CNN(num_classes=10, image_shape=(8, 8, 1), features=(4, 8), hidden=16,
  ...             norm='bnjax', rngs=nnx.Rngs(0))
  >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))['BatchNorm_0']
  {'mean': (4,), 'var': (4,)}
  >>> model(jnp.zeros((2, 8, 8, 1)), train=False).shape
  (2, 10)
"""

from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx
import jax

import bnjax.nnx
from bnjax_examples import models

# The norms the NNX CNN offers (`models.NORMS` minus whitening, which the NNX path does not build).
NORMS = ("bnjax", "flax", "none")


def _norm_class(norm: str) -> Any:
  if norm == "bnjax":
    return bnjax.nnx.BatchNorm
  if norm == "flax":
    return nnx.BatchNorm
  if norm == "none":
    return None
  raise ValueError(f"Unknown norm {norm!r} for the NNX CNN; expected one of {NORMS}.")


def _pooled_size(size: int, num_pools: int) -> int:
  """The size of an axis after `num_pools` 2x2 poolings with "SAME" padding: ceil(size / 2) each."""
  for _ in range(num_pools):
    size = -(-size // 2)
  return size


class CNN(nnx.Module):
  """`models.CNN` as an NNX module, its layers named as linen names them.

  Args:
    num_classes: the number of logits.
    image_shape: ``(H, W, C)`` of one input image (NNX layers are built with their input sizes).
    features: channels of each convolution stage; each stage halves the height and width.
    hidden: width of the hidden dense layer.
    norm: ``'bnjax'`` (`bnjax.nnx.BatchNorm`), ``'flax'`` (`flax.nnx.BatchNorm`) or ``'none'``.
    momentum: decay of the running averages.
    epsilon: added to the variance.
    axis_name: the mapped axis the norm layers combine their statistics over (under
      `jax.shard_map`); None: the local batch only.
    rngs: the ``params`` stream of the initialisers.

  Raises:
    ValueError: if `norm` is not one of `NORMS`.
  """

  def __init__(self, *, num_classes: int, image_shape: Sequence[int],
               features: Sequence[int] = (32, 64), hidden: int = 256, norm: str = "bnjax",
               momentum: float = 0.9, epsilon: float = 1e-5, axis_name: Any = None,
               rngs: nnx.Rngs) -> None:
    """Creates the layers (arguments: see the class docstring)."""
    norm_class = _norm_class(norm)
    height, width, channels = image_shape
    self.features = tuple(features)
    self.has_norm = norm_class is not None
    widths = (*self.features, hidden)
    for index, out_features in enumerate(self.features):
      in_features = channels if index == 0 else self.features[index - 1]
      setattr(self, f"Conv_{index}", nnx.Conv(in_features, out_features, (3, 3),
                                              use_bias=not self.has_norm, rngs=rngs))
    flat = (_pooled_size(height, len(self.features)) * _pooled_size(width, len(self.features))
            * self.features[-1])
    self.Dense_0 = nnx.Linear(flat, hidden, use_bias=not self.has_norm, rngs=rngs)
    self.Dense_1 = nnx.Linear(hidden, num_classes, rngs=rngs)
    if norm_class is not None:
      for index, num_features in enumerate(widths):
        setattr(self, f"BatchNorm_{index}", norm_class(
            num_features, momentum=momentum, epsilon=epsilon, axis_name=axis_name, rngs=rngs))

  def _norm(self, index: int, x: jax.Array, train: bool) -> jax.Array:
    if not self.has_norm:
      return x
    return getattr(self, f"BatchNorm_{index}")(x, use_running_average=not train)

  def __call__(self, x_NHWC: jax.Array, train: bool) -> jax.Array:
    """Returns float32 logits of shape [N, num_classes] for images of shape [N, H, W, C]."""
    x = x_NHWC
    for index in range(len(self.features)):
      x = getattr(self, f"Conv_{index}")(x)
      x = nnx.relu(self._norm(index, x, train))
      x = models.average_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self._norm(len(self.features), self.Dense_0(x), train))
    return self.Dense_1(x)


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> None:
  """Copies a linen model's ``params`` and ``batch_stats`` into `model`, in place.

  The linen model must be the one `model` mirrors (e.g. `models.CNN` for `CNN`, same sizes and
  norm): its variables are looked up by the same names.

  Args:
    model: the NNX model.
    variables: ``{'params': ..., 'batch_stats': ...}`` of the linen model (``batch_stats`` may be
      absent when there is no norm).

  Raises:
    ValueError: if the two models' variables differ in names or shapes.
  """
  for collection, variable_type in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    state = nnx.state(model, variable_type)
    source = variables.get(collection, {})
    expected = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(state))
    given = jax.tree.map(lambda x: x.shape, dict(source))
    if expected != given:
      raise ValueError(f"load_linen_variables: the linen {collection} do not match the NNX "
                       f"model's: linen {given}, NNX {expected}.")
    nnx.replace_by_pure_dict(state, source)
    nnx.update(model, state)

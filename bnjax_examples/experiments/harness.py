"""What every experiment shares: the data, a functional MLP, training under `jit` + `lax.scan`.

Data: scikit-learn's bundled 8x8 digits with one fixed train/test split (`SPLIT_SEED`), flattened
to 64 standardised features. A run's seed varies only the initialisation and the batch order.

The MLP is a pure function of ``(params, states, x)``; a normalisation is any callable
``norm(norm_params, norm_state, x, train) -> (y, new_norm_state)``, so one network runs with
`bnjax.batch_norm`, with a deliberately broken batch norm, or with none. Training is plain SGD, one
compiled program per configuration: a `lax.scan` over evaluation points, each a `lax.scan` over
steps, and `jax.vmap` over seeds (and learning rates), so a whole grid is one compilation.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax_examples import input_pipeline

SPLIT_SEED = 0  # The digits' train/test split is the same for every run and every seed.
PLACEMENTS = ("before", "after", "none")  # Normalisation before the activation, after it, none.

# norm(norm_params, norm_state, x, train) -> (y, new_norm_state).
Norm = Callable[[Any, Any, jax.Array, bool], tuple[jax.Array, Any]]


class Data(NamedTuple):
  """The digits as flat features: float32 [N, 64] images, int32 [N] labels."""

  train_x: jax.Array
  train_y: jax.Array
  test_x: jax.Array
  test_y: jax.Array


@functools.cache
def digits(train_examples: int = 0) -> Data:
  """The fixed split of scikit-learn's digits (1,438 train, 359 test), standardised, flattened.

  Args:
    train_examples: if > 0, keep only the first this many training examples (a harder setting).
  """
  dataset = input_pipeline.load_dataset("digits", seed=SPLIT_SEED)
  def flat(images: np.ndarray) -> jax.Array:
    return jnp.asarray(images.reshape(len(images), -1))
  train_x, train_y = flat(dataset.train_images), jnp.asarray(dataset.train_labels)
  if train_examples > 0:
    train_x, train_y = train_x[:train_examples], train_y[:train_examples]
  return Data(train_x, train_y, flat(dataset.test_images), jnp.asarray(dataset.test_labels))


def bnjax_norm(**options: Any) -> Norm:
  """`bnjax.batch_norm` as a `Norm`, with `options` (momentum, epsilon, ...) passed through."""
  def norm(params, state, x, train):
    return bnjax.batch_norm(params, state, x, train, **options)
  return norm


@dataclasses.dataclass(frozen=True)
class MLP:
  """A fully connected network ``[dense -> (norm) -> activation] * len(hidden) -> dense``.

  Attributes:
    hidden: the width of each hidden layer.
    activation: ``'relu'`` or ``'sigmoid'``.
    placement: ``'before'`` (dense -> norm -> activation, the original paper's order), ``'after'``
      (dense -> activation -> norm) or ``'none'``.
    dense_bias: whether the hidden dense layers have a bias (by default only without a norm right
      after them, as the norm's β replaces it).
    num_classes: the number of logits.
  """

  hidden: Sequence[int] = (100, 100, 100)
  activation: str = "relu"
  placement: str = "before"
  dense_bias: bool | None = None
  num_classes: int = 10

  def __post_init__(self):
    """Checks the placement and the activation."""
    if self.placement not in PLACEMENTS:
      raise ValueError(f"MLP: `placement` must be one of {PLACEMENTS}; got {self.placement!r}.")
    if self.activation not in ("relu", "sigmoid"):
      raise ValueError(f"MLP: `activation` must be 'relu' or 'sigmoid'; got {self.activation!r}.")

  @property
  def has_bias(self) -> bool:
    """Whether the hidden dense layers have a bias."""
    return self.placement != "before" if self.dense_bias is None else self.dense_bias

  def init(self, key: jax.Array, in_features: int, norm_state: Callable[[int], Any] | None = None
           ) -> tuple[dict[str, Any], list[Any]]:
    """Returns ``(params, states)``: LeCun-normal weights, zero biases, fresh norm layers.

    Args:
      key: the initialisation key.
      in_features: the input width.
      norm_state: maps a width to the norm layer's initial state (default: `bnjax.init`'s).
    """
    widths = (in_features, *self.hidden, self.num_classes)
    keys = jax.random.split(key, len(widths) - 1)
    dense = []
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, widths[:-1], widths[1:], strict=True)):
      layer = {"w": jax.random.normal(k, (fan_in, fan_out)) / np.sqrt(fan_in).astype(np.float32)}
      if self.has_bias or i == len(widths) - 2:
        layer["b"] = jnp.zeros((fan_out,))
      dense.append(layer)
    norms, states = [], []
    if self.placement != "none":
      for width in self.hidden:
        norm_params, state = bnjax.init(width)
        norms.append(norm_params)
        states.append(state if norm_state is None else norm_state(width))
    return {"dense": dense, "norm": norms}, states

  def apply(self, params: Mapping[str, Any], states: Sequence[Any], x: jax.Array, train: bool,
            norm: Norm) -> tuple[jax.Array, list[Any], list[jax.Array]]:
    """Returns ``(logits, new_states, taps)``.

    ``taps[i]`` is what hidden layer ``i`` hands on: the input of the next dense layer. The
    pre-activations (the input of each activation) are ``taps[len(hidden) + i]``.
    """
    act = jax.nn.relu if self.activation == "relu" else jax.nn.sigmoid
    new_states, outputs, pre_activations = [], [], []
    for i in range(len(self.hidden)):
      layer = params["dense"][i]
      x = x @ layer["w"] + layer["b"][None] if "b" in layer else x @ layer["w"]
      if self.placement == "before":
        x, state = norm(params["norm"][i], states[i], x, train)
        new_states.append(state)
      pre_activations.append(x)
      x = act(x)
      if self.placement == "after":
        x, state = norm(params["norm"][i], states[i], x, train)
        new_states.append(state)
      outputs.append(x)
    last = params["dense"][-1]
    return x @ last["w"] + last["b"][None], new_states, outputs + pre_activations


@dataclasses.dataclass(frozen=True)
class CNN:
  """A small convolutional network on the 8x8 digits, with the same interface as `MLP`.

  ``[conv 3x3 -> (norm) -> relu -> (norm) -> avg-pool 2x2] * len(features) -> dense``; the flat
  64-pixel input is reshaped to ``[N, 8, 8, 1]``. Batch norm reduces over ``N, H, W`` (``m = N·H·W``
  values per channel).

  Attributes:
    features: channels of each convolution stage.
    placement: ``'before'``, ``'after'`` or ``'none'``, as in `MLP`.
    num_classes: the number of logits.
  """

  features: Sequence[int] = (16, 32)
  placement: str = "before"
  num_classes: int = 10
  image_shape: tuple[int, int, int] = (8, 8, 1)

  def __post_init__(self):
    """Checks the placement."""
    if self.placement not in PLACEMENTS:
      raise ValueError(f"CNN: `placement` must be one of {PLACEMENTS}; got {self.placement!r}.")

  def init(self, key: jax.Array, in_features: int, norm_state: Callable[[int], Any] | None = None
           ) -> tuple[dict[str, Any], list[Any]]:
    """Returns ``(params, states)`` as `MLP.init` does (`in_features` must be H·W·C)."""
    height, width, channels = self.image_shape
    if in_features != height * width * channels:
      raise ValueError(f"CNN: expected {height * width * channels} input features "
                       f"({self.image_shape}), got {in_features}.")
    keys = jax.random.split(key, len(self.features) + 1)
    convs, norms, states = [], [], []
    for k, out_channels in zip(keys[:-1], self.features, strict=False):
      fan_in = 9 * channels
      layer = {"w": jax.random.normal(k, (3, 3, channels, out_channels))
                    / np.sqrt(fan_in).astype(np.float32)}
      if self.placement != "before":
        layer["b"] = jnp.zeros((out_channels,))
      convs.append(layer)
      if self.placement != "none":
        norm_params, state = bnjax.init(out_channels)
        norms.append(norm_params)
        states.append(state if norm_state is None else norm_state(out_channels))
      channels = out_channels
      height, width = (height + 1) // 2, (width + 1) // 2
    fan_in = height * width * channels
    dense = {"w": jax.random.normal(keys[-1], (fan_in, self.num_classes))
                  / np.sqrt(fan_in).astype(np.float32), "b": jnp.zeros((self.num_classes,))}
    return {"conv": convs, "norm": norms, "dense": dense}, states

  def apply(self, params: Mapping[str, Any], states: Sequence[Any], x: jax.Array, train: bool,
            norm: Norm) -> tuple[jax.Array, list[Any], list[jax.Array]]:
    """Returns ``(logits, new_states, taps)`` as `MLP.apply` does (taps are [N, H, W, C])."""
    x = x.reshape((x.shape[0], *self.image_shape))
    new_states, outputs, pre_activations = [], [], []
    for i, layer in enumerate(params["conv"]):
      x = lax.conv_general_dilated(x, layer["w"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
      if "b" in layer:
        x = x + layer["b"][None, None, None]
      if self.placement == "before":
        x, state = norm(params["norm"][i], states[i], x, train)
        new_states.append(state)
      pre_activations.append(x)
      x = jax.nn.relu(x)
      if self.placement == "after":
        x, state = norm(params["norm"][i], states[i], x, train)
        new_states.append(state)
      outputs.append(x)
      n, h, w, c = x.shape
      if h % 2 or w % 2:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
      x = jnp.mean(x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c), axis=(2, 4))
    x = x.reshape((x.shape[0], -1))
    dense = params["dense"]
    return x @ dense["w"] + dense["b"][None], new_states, outputs + pre_activations


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy."""
  log_p = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of argmax predictions equal to the labels."""
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def batch_indices(key: jax.Array, step: jax.Array, num_examples: int, batch_size: int
                  ) -> jax.Array:
  """The rows of batch `step`: epoch ``e`` visits a permutation drawn from ``(key, e)``."""
  steps_per_epoch = num_examples // batch_size
  epoch, position = step // steps_per_epoch, step % steps_per_epoch
  order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  return lax.dynamic_slice(order, (position * batch_size,), (batch_size,))


def train(model: "MLP | CNN", norm: Norm, data: Data, key: jax.Array, learning_rate: Any, *,
          batch_size: int, num_steps: int, eval_every: int,
          evaluate: Callable[[Any, Any], Mapping[str, jax.Array]] | None = None,
          cosine_decay: bool = False, norm_state: Callable[[int], Any] | None = None,
          batch_rows: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
          ) -> tuple[Any, Any, dict[str, jax.Array]]:
  """Trains `model` with plain SGD; traceable, so it can be `jax.vmap`-ed over keys and rates.

  Args:
    model: the network.
    norm: its normalisation.
    data: the dataset.
    key: the run's key: ``fold_in(key, 0)`` initialises, ``fold_in(key, 1)`` orders the batches.
    learning_rate: the SGD step size (may be traced).
    batch_size: examples per step.
    num_steps: a multiple of `eval_every`.
    eval_every: steps between evaluations; the history has ``num_steps // eval_every`` entries,
      each taken after its block of steps.
    evaluate: ``(params, states) -> {name: value}`` recorded at each evaluation point; by default
      the test accuracy and loss in evaluation mode.
    cosine_decay: decay the learning rate to zero over the run (else constant).
    norm_state: as in `MLP.init`.
    batch_rows: ``(key, step) -> int32 [batch_size]`` training rows of step ``step``; by default
      `batch_indices` (epochs of i.i.d. shuffled batches).

  Returns:
    ``(params, states, history)``, history values stacked over evaluation points, plus
    ``history['train_loss']``, the mean training loss of each block.
  """
  if num_steps % eval_every:
    raise ValueError(f"train: `num_steps` ({num_steps}) must be a multiple of `eval_every` "
                     f"({eval_every}).")
  params, states = model.init(jax.random.fold_in(key, 0), data.train_x.shape[1], norm_state)
  batch_key = jax.random.fold_in(key, 1)
  num_train = data.train_x.shape[0]

  def default_evaluate(params, states):
    logits, _, _ = model.apply(params, states, data.test_x, False, norm)
    return {"test_accuracy": accuracy(logits, data.test_y),
            "test_loss": cross_entropy(logits, data.test_y)}
  evaluate = default_evaluate if evaluate is None else evaluate

  def loss_fn(params, states, x, y):
    logits, new_states, _ = model.apply(params, states, x, True, norm)
    return cross_entropy(logits, y), new_states

  def step(carry, step_index):
    params, states = carry
    if batch_rows is None:
      rows = batch_indices(batch_key, step_index, num_train, batch_size)
    else:
      rows = batch_rows(batch_key, step_index)
    (loss, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, states, data.train_x[rows], data.train_y[rows])
    rate = learning_rate
    if cosine_decay:
      progress = step_index.astype(jnp.float32) / num_steps
      rate = learning_rate * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    params = jax.tree.map(lambda p, g: p - rate * g, params, grads)
    return (params, states), loss

  def block(carry, block_index):
    steps = block_index * eval_every + jnp.arange(eval_every)
    carry, losses = lax.scan(step, carry, steps)
    record = dict(evaluate(*carry))
    record["train_loss"] = jnp.mean(losses)
    return carry, record

  (params, states), history = lax.scan(block, (params, states),
                                       jnp.arange(num_steps // eval_every))
  return params, states, history


def jit(fn: Callable[..., Any], fast_compile: bool = False) -> Callable[..., Any]:
  """`jax.jit`; on CPU optionally without LLVM optimisation (compiles faster, runs slower)."""
  on_cpu = jax.default_backend() == "cpu"
  options = {"xla_backend_optimization_level": 0} if fast_compile and on_cpu else None
  return jax.jit(fn, compiler_options=options)


def seed_keys(seeds: Sequence[int]) -> jax.Array:
  """One key per seed."""
  return jnp.stack([jax.random.key(s) for s in seeds])


def mean_and_spread(values: Any) -> dict[str, Any]:
  """``{'mean', 'std', 'min', 'max', 'n'}`` over the first axis (std with ddof=1 when n > 1)."""
  values = np.asarray(values, np.float64)
  n = values.shape[0]
  std = values.std(axis=0, ddof=1) if n > 1 else np.zeros_like(values[0])
  return {"mean": values.mean(axis=0).tolist(), "std": std.tolist(),
          "min": values.min(axis=0).tolist(), "max": values.max(axis=0).tolist(), "n": n}


def new_figure(rows: int, columns: int, size: tuple[float, float]):
  """A `Figure` on the Agg canvas (no pyplot, no global backend) and its axes."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=size, layout="constrained")
  FigureCanvasAgg(figure)
  return figure, figure.subplots(rows, columns, squeeze=False)

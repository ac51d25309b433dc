"""Real NNX clients: models from Flax's own examples, with `nnx.BatchNorm` swapped for bnjax's.

Each model is rewritten here (smaller, same structure) from the Flax file cited above it, takes its
batch-norm class as its only new argument, and is trained and evaluated twice: with
`flax.nnx.BatchNorm` and with `bnjax.nnx.BatchNorm`. On these activations (moderate means, where
Flax's default variance is accurate) the losses, metrics, parameters, running statistics and eval
outputs agree to float32 tolerance.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax.nnx

# Three training steps through SGD with momentum: float32 rounding differences between the two
# variance formulas may grow a little; they stay orders of magnitude below the values' scale.
TOL = dict(atol=5e-5, rtol=5e-5)


@pytest.fixture(autouse=True)
def _standard_promotion():
  """Client code (metrics, optimizers) is written for JAX's default promotion, not the suite's
  strict one; both runs of each model use the same setting."""
  with jax.numpy_dtype_promotion("standard"):
    yield


def _build(make_model):
  """``make_model()``, with every value drawn by NumPy instead of by the model's initializers.

  Kernels ~ N(0, 1/fan_in), other parameters and the running statistics as their initializers set
  them (scale and variance 1, the rest 0). Compiling the initializers (truncated normals) would
  cost more than the rest of the test; both runs start from the same values either way.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      scale = float(np.prod(leaf.shape[:-1])) ** -0.5
      return jnp.asarray(rng.normal(0.0, scale, leaf.shape).astype(leaf.dtype))
    return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

  values = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract_state))
  nnx.replace_by_pure_dict(abstract_state, values)
  return nnx.merge(graphdef, abstract_state)


def _assert_states_close(model_a, model_b):
  a, b = (nnx.to_pure_dict(nnx.state(m, nnx.Any(nnx.Param, nnx.BatchStat))) for m in (model_a, model_b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **TOL), a, b)


# --- The MNIST CNN of google/flax examples/mnist/train.py (class CNN) -----------------------------
# conv -> dropout -> batch norm -> relu -> average pool, twice; then linear -> dropout -> linear.
# Trained as there: `nnx.Optimizer(model, optax.sgd(lr, momentum), wrt=nnx.Param)`, an `nnx.jit`
# step with `nnx.value_and_grad(..., has_aux=True)`, `nnx.MultiMetric`, `model.train()` /
# `model.eval()`. Smaller here: 12x12 images, 8 and 16 channels.

class MnistCNN(nnx.Module):

  def __init__(self, batch_norm, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = batch_norm(8, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = batch_norm(16, rngs=rngs)
    self.pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(16 * 3 * 3, 32, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025)
    self.linear2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x, rngs):
    x = self.pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
    x = self.pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    return self.linear2(x)


def _mnist_loss(model, batch, rngs):
  logits = model(batch["image"], rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, logits


@nnx.jit
def _mnist_train_step(model, optimizer, metrics, batch, rngs):
  (loss, logits), grads = nnx.value_and_grad(_mnist_loss, has_aux=True)(model, batch, rngs)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  optimizer.update(model, grads)


@nnx.jit
def _mnist_eval_step(model, metrics, batch):
  loss, logits = _mnist_loss(model, batch, None)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  return logits


def _mnist_batches(count, size=16):
  rng = np.random.default_rng(0)
  return [{"image": jnp.asarray(rng.random((size, 12, 12, 1), np.float32)),
           "label": jnp.asarray(rng.integers(0, 10, size))} for _ in range(count)]


def _run_mnist(batch_norm):
  model = _build(lambda: MnistCNN(batch_norm, rngs=nnx.Rngs(0)))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, 0.9), wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  rngs = nnx.Rngs(0)
  *train_batches, test_batch = _mnist_batches(4)
  model.train()
  for batch in train_batches:
    _mnist_train_step(model, optimizer, metrics, batch, rngs)
  train_metrics = {k: float(v) for k, v in metrics.compute().items()}
  metrics.reset()
  model.eval()
  logits = _mnist_eval_step(model, metrics, test_batch)
  eval_metrics = {k: float(v) for k, v in metrics.compute().items()}
  return model, train_metrics, eval_metrics, logits


def test_flax_mnist_cnn_trains_and_evaluates_the_same():
  ours, theirs = _run_mnist(bnjax.nnx.BatchNorm), _run_mnist(nnx.BatchNorm)
  assert type(ours[0].batch_norm1) is bnjax.nnx.BatchNorm
  assert type(theirs[0].batch_norm1) is nnx.BatchNorm
  _assert_states_close(ours[0], theirs[0])
  for key in ("loss", "accuracy"):
    np.testing.assert_allclose(ours[1][key], theirs[1][key], **TOL)
    np.testing.assert_allclose(ours[2][key], theirs[2][key], **TOL)
  np.testing.assert_allclose(ours[3], theirs[3], **TOL)
  # Training moved the running statistics away from their initial values.
  assert not np.allclose(ours[0].batch_norm2.var[...], 1.0)


# --- The scanned MLP of google/flax examples/nnx_toy_examples/06_scan_over_layers.py ---------------
# A block is linear -> batch norm -> dropout -> gelu; `n_layers` blocks are created at once with
# `nnx.split_rngs` + `nnx.vmap` (every variable gets a leading layer axis) and applied with
# `nnx.scan`. Trained here with a regression loss through `nnx.Optimizer`.

class Block(nnx.Module):

  def __init__(self, dim, batch_norm, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(dim, dim, rngs=rngs)
    self.bn = batch_norm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(self.dropout(self.bn(self.linear(x))))


class ScanMLP(nnx.Module):

  def __init__(self, dim, batch_norm, *, n_layers, rngs: nnx.Rngs):
    self.n_layers = n_layers

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(axis_size=n_layers)
    def create_block(rngs: nnx.Rngs):
      return Block(dim, batch_norm, rngs=rngs)

    self.layers = create_block(rngs)

  def __call__(self, x):
    @nnx.scan
    def scan_fn(x, block):
      return block(x), None

    x, _ = scan_fn(x, self.layers)
    return x


@nnx.jit
def _scan_train_step(model, optimizer, x, y):
  loss_fn = lambda model: jnp.mean((model(x) - y) ** 2)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _run_scan_mlp(batch_norm):
  model = _build(lambda: ScanMLP(6, batch_norm, n_layers=3, rngs=nnx.Rngs(0)))
  # SGD, not Adam: the linear bias before each batch norm has a true gradient of 0, so its
  # computed gradient is rounding noise, which Adam would rescale to full-size steps.
  optimizer = nnx.Optimizer(model, optax.sgd(0.05, 0.9), wrt=nnx.Param)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((24, 6), np.float32))
  y = jnp.asarray(np.sin(3 * rng.standard_normal((24, 6))).astype(np.float32))
  losses = [float(_scan_train_step(model, optimizer, x, y)) for _ in range(3)]
  model.eval()
  return model, np.array(losses), nnx.jit(lambda m, x: m(x))(model, x)


def test_flax_scan_over_layers_mlp_trains_and_evaluates_the_same():
  ours, theirs = _run_scan_mlp(bnjax.nnx.BatchNorm), _run_scan_mlp(nnx.BatchNorm)
  assert type(ours[0].layers.bn) is bnjax.nnx.BatchNorm
  assert ours[0].layers.bn.mean.shape == (3, 6)  # One row of statistics per scanned layer.
  _assert_states_close(ours[0], theirs[0])
  np.testing.assert_allclose(ours[1], theirs[1], **TOL)
  np.testing.assert_allclose(ours[2], theirs[2], **TOL)

"""Model-level programs: a small ResNet-style training step with each normalisation.

`NORMS` pairs bnjax's linen layer with Flax's in the same network (and none, the floor of a step
without normalisation); `resnet_benchmark` times one jitted SGD step with each. A new model-level
row is one more entry in `NORMS` (a factory of a linen layer), or a new network beside `resnet`.
"""

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
import numpy as np

import bnjax
from benchmarks import cases, programs, timing
from benchmarks.cases import ResNetSize

CLASSES = 10
WIDTH = 32
LEARNING_RATE = 0.1

# {norm name: (use_running_average, axis_name) -> linen layer}, or None: no normalisation (and
# the convolutions get a bias instead).
NORMS: dict[str, Callable[[bool, str | None], nn.Module] | None] = {
    "bnjax": lambda use_running_average, axis_name: bnjax.BatchNorm(
        use_running_average=use_running_average, axis_name=axis_name),
    "flax": lambda use_running_average, axis_name: nn.BatchNorm(
        use_running_average=use_running_average, axis_name=axis_name),
    "none": None,
}


def resnet(norm: str, axis_name: str | None = None, blocks: int = 2) -> nn.Module:
  """A conv-norm-relu stem, `blocks` residual blocks of two such layers, mean pool, dense."""
  make_norm = NORMS[norm]

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      def normalise(y):
        return y if make_norm is None else make_norm(not train, axis_name)(y)

      def conv(y):
        return nn.Conv(WIDTH, (3, 3), use_bias=make_norm is None)(y)

      x = jax.nn.relu(normalise(conv(x)))
      for _ in range(blocks):
        y = jax.nn.relu(normalise(conv(x)))
        y = normalise(conv(y))
        x = jax.nn.relu(x + y)
      return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))

  return Net()


def train_step(model: nn.Module, global_batch: int):
  """`(params, batch_stats, images, labels) -> (params, new_batch_stats, loss)`: one SGD step on
  the softmax cross-entropy summed over the local batch and divided by the global batch size."""

  def step(params, batch_stats, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
      log_probs = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=1)
      return jnp.sum(nll) / global_batch, updates.get("batch_stats", {})

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return params, new_stats, loss

  return step


def init_variables(model: nn.Module, images) -> dict:
  """The model's variables for `images`' shape.

  Initialised in one program compiled without LLVM's expensive passes: op by op, every random
  draw would compile on its own, and fully optimised the random-bit generator takes seconds to
  compile for a program that runs once.
  """
  args = (jax.random.key(1), images)
  init = jax.jit(functools.partial(model.init, train=False))
  return programs.compile_program(init, args, fast=True)(*args)


def resnet_inputs(batch: int, image: int):
  """Random images `[batch, image, image, 3]` and integer labels `[batch]`."""
  images = jnp.asarray(cases.normal((batch, image, image, 3), seed=0))
  labels = jnp.asarray(np.random.default_rng(1).integers(0, CLASSES, batch, np.int32))
  return images, labels


def resnet_benchmark(size: ResNetSize, *, fast: bool = False) -> dict:
  """Times one training step with each of `NORMS`, interleaved; the "resnet" entry of a run.

  Args:
    size: batch, image side, residual blocks and rounds.
    fast: compile without LLVM's expensive passes (a smoke run).
  """
  images, labels = resnet_inputs(size.batch, size.image)
  runs, info = {}, {}
  for norm in NORMS:
    model = resnet(norm, blocks=size.blocks)
    variables = init_variables(model, images[:2])
    args = (variables["params"], variables.get("batch_stats", {}), images, labels)
    compiled = programs.compile_or_report(jax.jit(train_step(model, size.batch)), args, info, norm,
                                          fast=fast)
    if compiled is not None:
      runs[norm] = functools.partial(programs.call, compiled, args)
  summary = timing.summarise(timing.round_robin(runs, size.rounds),
                             {"vs_flax": "flax", "vs_none": "none"})
  for norm, entry in info.items():
    summary.setdefault(norm, {}).update(entry)
  return {"batch": size.batch, "image": size.image, "blocks": size.blocks, "rounds": size.rounds,
          "impls": summary}

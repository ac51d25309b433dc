"""The example's NNX path: the model, `nnx.Optimizer`, and one training or evaluation step.

Two forms of the same step:

* `train_step(model, optimizer, batch)` is NNX's stateful form: it updates `model` and
  `optimizer` in place; `jit_train_step` is it under `nnx.jit`, for a single device.
* `functional_train_step(state, batch, axis_name)` runs that same function on a pure `TrainState`
  (``nnx.merge``, step, ``nnx.split``): the form `parallel.data_parallel` (`jax.shard_map` over
  every device) and orbax checkpoints take, as Flax's guide to NNX data parallelism splits a model
  before `shard_map`. The training loop uses it, so the NNX path shares the linen path's data
  pipeline, mesh, checkpoints, metrics file and plot.

`TrainState` keeps the arrays as pure dicts (``nnx.to_pure_dict``: nested dicts of arrays, no
``nnx.Variable`` wrappers) named as the linen model's collections (``params``, ``batch_stats``;
the optimizer's state in ``opt_state``) and the step count, so `checkpointing.Checkpointer`
saves, checks and restores it as it does the linen state.
"""

from collections.abc import Callable
from typing import Any

from flax import nnx
from flax import struct
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

from bnjax_examples import config_check
from bnjax_examples import metrics
from bnjax_examples import nnx_models
from bnjax_examples import steps


class TrainState(struct.PyTreeNode):
  """The NNX model and optimizer, split into arrays and their (static) graph definition.

  Attributes:
    graphdef: the graph definitions of the model and the optimizer (static).
    params: the ``nnx.Param`` state of the model, as a pure dict (``nnx.to_pure_dict``).
    batch_stats: the ``nnx.BatchStat`` state of the model, likewise (empty without norms).
    opt_state: the optimizer's state (its step count and the optax state), likewise.
    step: the number of steps taken; int32 scalar.
  """

  graphdef: Any = struct.field(pytree_node=False)
  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array

  @classmethod
  def from_objects(cls, model: nnx.Module, optimizer: nnx.Optimizer,
                   step: jax.Array) -> "TrainState":
    """Splits `model` and `optimizer` into a `TrainState` at `step`.

    They are split one by one: `nnx.Optimizer` keeps no reference to the model, and the model's
    own tree keeps the names of the linen model's collections (a split of the pair would nest
    them under ``0`` and ``1``).
    """
    model_def, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    optimizer_def, opt_state = nnx.split(optimizer)
    return cls(graphdef=(model_def, optimizer_def), params=nnx.to_pure_dict(params),
               batch_stats=nnx.to_pure_dict(batch_stats), opt_state=nnx.to_pure_dict(opt_state),
               step=step)

  def objects(self) -> tuple[nnx.Module, nnx.Optimizer]:
    """``(model, optimizer)``, merged from this state (new objects; the state is not changed)."""
    model_def, optimizer_def = self.graphdef
    return (nnx.merge(model_def, self.params, self.batch_stats),
            nnx.merge(optimizer_def, self.opt_state))


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 image_shape: tuple[int, int, int], *, rngs: nnx.Rngs,
                 axis_name: str | None = None) -> nnx_models.CNN:
  """The NNX CNN of ``config.cnn`` with ``config.norm`` (see `steps.create_model` for linen).

  Raises:
    config_check.ConfigError: if ``config.model`` is not ``'CNN'``.
  """
  if config.model != "CNN":
    raise config_check.ConfigError(
        f"config.model = {config.model!r}: the NNX path (config.api='nnx') builds the CNN only.")
  return nnx_models.CNN(num_classes=num_classes, image_shape=image_shape,
                        features=tuple(config.cnn.features), hidden=config.cnn.hidden,
                        norm=config.norm, momentum=config.batch_norm_momentum,
                        epsilon=config.batch_norm_epsilon, axis_name=axis_name, rngs=rngs)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, num_classes: int,
                       image_shape: tuple[int, int, int],
                       learning_rate_fn: Callable[[Any], jax.Array], *,
                       axis_name: str | None = None) -> TrainState:
  """Initialises the NNX model with the key `rng` and ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

  The optimizer is the linen path's (`steps.create_optimizer`). Call it under `jax.jit` (as
  `parallel.replicate` does) to place the state.
  """
  model = create_model(config, num_classes, image_shape, rngs=nnx.Rngs(params=rng),
                       axis_name=axis_name)
  optimizer = nnx.Optimizer(model, steps.create_optimizer(config, learning_rate_fn),
                            wrt=nnx.Param)
  return TrainState.from_objects(model, optimizer, jnp.zeros((), jnp.int32))


def _loss(model: nnx.Module, batch: dict[str, jax.Array], train: bool
          ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  logits_NK = model(batch["image"], train=train)
  loss_N = optax.softmax_cross_entropy_with_integer_labels(logits_NK, batch["label"])
  return jnp.mean(loss_N), (logits_NK, loss_N)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict[str, jax.Array],
               axis_name: str | None = None) -> dict[str, jax.Array]:
  """One SGD step on a batch (or this device's share of it), updating `model` and `optimizer`.

  The norm layers update their running statistics (combined over the model's axis) in place; the
  gradients are averaged over `axis_name` here, as in `steps.train_step`.

  Args:
    model: the NNX model (its norm layers are called with batch statistics).
    optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
    batch: ``{'image': [n, H, W, C] float32, 'label': [n] int32}``.
    axis_name: the mapped axis the batch is split along; None on one device.

  Returns:
    The `metrics.batch_sums` of the (global) batch.
  """
  grad_fn = nnx.value_and_grad(_loss, has_aux=True)
  (_, (logits_NK, loss_N)), grads = grad_fn(model, batch, True)
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
  optimizer.update(model, grads)
  step_metrics = metrics.batch_sums(logits_NK, batch["label"], loss_N)
  return step_metrics if axis_name is None else lax.psum(step_metrics, axis_name)


def eval_step(model: nnx.Module, batch: dict[str, jax.Array],
              axis_name: str | None = None) -> dict[str, jax.Array]:
  """Metrics of a test batch with the running statistics (padding has weight 0)."""
  _, (logits_NK, loss_N) = _loss(model, batch, False)
  batch_metrics = metrics.batch_sums(logits_NK, batch["label"], loss_N, batch["weight"])
  return batch_metrics if axis_name is None else lax.psum(batch_metrics, axis_name)


# The stateful step compiled by `nnx.jit`, for one device: ``metrics = jit_train_step(model,
# optimizer, batch)`` updates both in place.
jit_train_step = nnx.jit(train_step)
jit_eval_step = nnx.jit(eval_step)


def functional_train_step(state: TrainState, batch: dict[str, jax.Array],
                          axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` on a pure `TrainState`: ``(new_state, metrics)``, like `steps.train_step`."""
  model, optimizer = state.objects()
  step_metrics = train_step(model, optimizer, batch, axis_name)
  return TrainState.from_objects(model, optimizer, state.step + 1), step_metrics


def functional_eval_step(state: TrainState, batch: dict[str, jax.Array],
                         axis_name: str | None = None) -> dict[str, jax.Array]:
  """`eval_step` on a pure `TrainState`."""
  model, _ = state.objects()
  return eval_step(model, batch, axis_name)

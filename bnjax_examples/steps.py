"""The model, the optimizer, the train state and one training or evaluation step, as pure functions.

Nothing here loops, reads data, places arrays or writes files, so an experiment can call the steps
under `jax.jit`, `lax.scan` or `jax.shard_map` without the example's training loop. On one device
(``axis_name=None``, the default) the steps use no collective; for example, ``k`` steps over a
stack of ``k`` batches of shape ``[k, N, ...]``::

  model = steps.create_model(config, num_classes=10)
  state = steps.create_train_state(jax.random.key(0), config, model, (8, 8, 1), learning_rate_fn)
  train_k = jax.jit(lambda state, batches: lax.scan(steps.train_step, state, batches))
  state, metrics = train_k(state, {'image': images_KNHWC, 'label': labels_KN})

For data parallelism, create the model with ``axis_name=parallel.AXIS`` and run
``functools.partial(train_step, axis_name=parallel.AXIS)`` under `parallel.data_parallel`: the
batch-norm layers then combine their statistics over the devices and the gradients are averaged.
"""

from collections.abc import Callable
from typing import Any

from flax import linen as nn
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

from bnjax import tools
from bnjax_examples import config_check
from bnjax_examples import metrics
from bnjax_examples import models


class TrainState(train_state.TrainState):
  """`flax.training.train_state.TrainState` plus the running statistics of the norm layers."""

  batch_stats: Any  # The 'batch_stats' collection ({} without batch norm); float32.


def create_model(config: ml_collections.ConfigDict, num_classes: int, norm: str | None = None, *,
                 axis_name: str | None = None) -> nn.Module:
  """The model of ``config.model`` with the normalisation of `norm` (default ``config.norm``).

  Args:
    config: the run's config (``model``, ``cnn`` or ``resnet``, ``batch_norm_*``).
    num_classes: the number of logits.
    norm: one of `models.NORMS`; default ``config.norm``.
    axis_name: the mapped axis the batch-norm layers combine their statistics over; then the model
      must be applied under a transform that binds it (`jax.shard_map`, as `parallel.data_parallel`
      does) when training. None: statistics of the local batch only.

  Raises:
    config_check.ConfigError: if ``config.model`` is not one of `config_check.MODELS`.
  """
  norm_layer = models.norm_factory(config.norm if norm is None else norm,
                                   momentum=config.batch_norm_momentum,
                                   epsilon=config.batch_norm_epsilon, axis_name=axis_name,
                                   whitening=config_check.whitening_options(config))
  if config.model == "CNN":
    return models.CNN(num_classes=num_classes, features=tuple(config.cnn.features),
                      hidden=config.cnn.hidden, norm=norm_layer,
                      dropout_rate=config.get("dropout_rate", 0.0))
  if config.model == "ResNet":
    return models.ResNet(num_classes=num_classes, stage_sizes=tuple(config.resnet.stage_sizes),
                         num_filters=config.resnet.num_filters, norm=norm_layer)
  raise config_check.ConfigError(
      f"config.model = {config.model!r}: use one of {', '.join(config_check.MODELS)}.")


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> Callable[[Any], jax.Array]:
  """Linear warm-up for ``config.warmup_epochs``, then cosine decay to 0 at the last step."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=int(config.warmup_epochs * steps_per_epoch),
      decay_steps=config.num_epochs * steps_per_epoch, end_value=0.0)
  # optax's cosine schedule mixes an int32 count with Python floats, which strict dtype promotion
  # rejects; a float32 count gives the same values.
  return lambda step: schedule(jnp.asarray(step, jnp.float32))


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: Callable[[Any], jax.Array]) -> optax.GradientTransformation:
  """SGD with Nesterov momentum, and weight decay on the kernels (not on biases or norm γ, β)."""
  decay_kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_kernels),
      optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.momentum > 0))


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model: nn.Module,
                       image_shape: tuple[int, int, int],
                       learning_rate_fn: Callable[[Any], jax.Array]) -> TrainState:
  """Initialises the model's variables and the optimizer state (`parallel.replicate` places them).

  Args:
    rng: the key of the initialisers.
    config: the run's config (the optimizer's fields).
    model: from `create_model`.
    image_shape: ``(H, W, C)`` of one image.
    learning_rate_fn: the schedule, from `create_learning_rate_fn`.
  """
  images_NHWC = jnp.zeros((2, *image_shape), jnp.float32)
  variables = model.init(rng, images_NHWC, train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=create_optimizer(config, learning_rate_fn),
                           batch_stats=variables.get("batch_stats", {}))


def renorm_bounds(step: Any, num_steps: int) -> tuple[jax.Array, jax.Array]:
  """Batch Renormalization's ``(r_max, d_max)`` at `step` of a run of `num_steps` steps.

  Ioffe's schedule (`bnjax.tools.renorm_schedule`: batch norm for 5k steps, ``d_max`` reaching 5 at
  25k and ``r_max`` reaching 3 at 40k) with its step counts scaled so that 40k falls at mid-run.
  """
  scale = num_steps / 80_000
  return tools.renorm_schedule(
      step, warmup_steps=round(5_000 * scale), r_max_steps=max(round(40_000 * scale), 1),
      d_max_steps=max(round(25_000 * scale), 1))


def train_step(state: TrainState, batch: dict[str, jax.Array], axis_name: str | None = None, *,
               freeze_norms: bool = False, renorm_steps: int = 0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a batch, or on this device's share of it under a mapped `axis_name`.

  The norm layers combine their batch statistics over the model's axis themselves and return
  running statistics that are identical on every device; the gradients are averaged here.

  Args:
    state: the train state (replicated when `axis_name` is given).
    batch: ``{'image': [n, H, W, C] float32, 'label': [n] int32}``.
    axis_name: the mapped axis the batch is split along (the model's); None on one device.
    freeze_norms: call the model in evaluation mode (``train=False``): the norm layers normalise
      with their running statistics and leave ``batch_stats`` unchanged (fine-tuning with frozen
      batch norm, `bnjax_examples.fine_tune`).
    renorm_steps: > 0: train with Batch Renormalization, bounds from `renorm_bounds` for a run of
      this many steps (the CNN with norm 'bnjax'); 0: batch norm.

  Returns:
    ``(new_state, metrics)``, the `metrics.batch_sums` of the (global) batch: ``loss_sum``,
    ``correct`` and ``count``.
  """

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    if freeze_norms:
      logits_NK, updates = state.apply_fn(variables, batch["image"], train=False), {}
    else:
      # A dropout key per step (and per device: each drops its own units); unused without dropout.
      dropout_key = jax.random.fold_in(jax.random.key(0), state.step)
      if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(axis_name))
      renorm = {} if renorm_steps <= 0 else {"renorm": renorm_bounds(state.step, renorm_steps)}
      logits_NK, updates = state.apply_fn(variables, batch["image"], train=True,
                                          mutable=["batch_stats"], rngs={"dropout": dropout_key},
                                          **renorm)
    loss_N = optax.softmax_cross_entropy_with_integer_labels(logits_NK, batch["label"])
    return jnp.mean(loss_N), (logits_NK, loss_N, updates)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (logits_NK, loss_N, updates)), grads = grad_fn(state.params)
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=updates.get("batch_stats", state.batch_stats))
  step_metrics = metrics.batch_sums(logits_NK, batch["label"], loss_N)
  if axis_name is not None:
    step_metrics = lax.psum(step_metrics, axis_name)
  return new_state, step_metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array],
              axis_name: str | None = None) -> dict[str, jax.Array]:
  """Metrics of a test batch (or this device's share of it), with the running statistics.

  Args:
    state: the train state.
    batch: ``{'image', 'label', 'weight'}``; padding examples have weight 0.
    axis_name: the mapped axis the batch is split along; None on one device.

  Returns:
    The `metrics.batch_sums` of the (global) batch, padding excluded.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits_NK = state.apply_fn(variables, batch["image"], train=False)
  loss_N = optax.softmax_cross_entropy_with_integer_labels(logits_NK, batch["label"])
  batch_metrics = metrics.batch_sums(logits_NK, batch["label"], loss_N, batch["weight"])
  return batch_metrics if axis_name is None else lax.psum(batch_metrics, axis_name)

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
import operator
from typing import Any

from flax import linen as nn
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

import bnjax
from bnjax import tools
import bnjax.linen
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
               freeze_norms: bool = False, renorm_steps: int = 0, log_drift: bool = False,
               grad_accum_steps: int = 1, batch_norm_momentum: float | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a batch, or on this device's share of it under a mapped `axis_name`.

  The norm layers combine their batch statistics over the model's axis themselves and return
  running statistics that are identical on every device; the gradients are averaged here.

  With ``grad_accum_steps = k > 1`` the batch (this device's share) is split into ``k`` equal
  micro-batches that run one after another under `lax.scan`, with the running statistics held
  fixed: the gradient is the mean of the micro-batches' gradients, and each `bnjax.BatchNorm`
  updates its running statistics once, with the exact pooled moments of the ``k`` micro-batches
  (`pooled_batch_stats`, after `bnjax.tools.update_from_micro_batches`), not ``k`` times.

  Args:
    state: the train state (replicated when `axis_name` is given).
    batch: ``{'image': [n, H, W, C] float32, 'label': [n] int32}``.
    axis_name: the mapped axis the batch is split along (the model's); None on one device.
    freeze_norms: call the model in evaluation mode (``train=False``): the norm layers normalise
      with their running statistics and leave ``batch_stats`` unchanged (fine-tuning with frozen
      batch norm, `bnjax_examples.fine_tune`).
    renorm_steps: > 0: train with Batch Renormalization, bounds from `renorm_bounds` for a run of
      this many steps (the CNN with norm 'bnjax'); 0: batch norm.
    log_drift: add each `bnjax.BatchNorm`'s drift (`drift_metrics`) to the metrics; the model
      must have such layers.
    grad_accum_steps: ``k``, micro-batches per optimizer step; ``n`` must be a multiple of it.
    batch_norm_momentum: the norm layers' momentum, for the pooled update (needed when ``k > 1``
      and the model keeps running statistics; every layer must be a `bnjax.BatchNorm` that stores
      the biased variance, as `create_model` builds them).

  Returns:
    ``(new_state, metrics)``: the `metrics.batch_sums` of the (global) batch (``loss_sum``,
    ``correct`` and ``count``), with `drift_metrics` if `log_drift`.

  Raises:
    ValueError: if ``n`` is not a multiple of `grad_accum_steps`, or if ``k > 1`` and a layer
      with running statistics sows no batch moments or `batch_norm_momentum` is missing.
  """
  k = grad_accum_steps
  if k < 1 or batch["label"].shape[0] % k:
    raise ValueError(f"steps.train_step: the batch of {batch['label'].shape[0]} examples (per "
                     f"device) must split into grad_accum_steps={k} equal micro-batches.")
  # A dropout key per step (and per device: each drops its own units); unused without dropout.
  dropout_key = jax.random.fold_in(jax.random.key(0), state.step)
  if axis_name is not None:
    dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(axis_name))
  renorm = {} if renorm_steps <= 0 else {"renorm": renorm_bounds(state.step, renorm_steps)}
  # Batch moments (and the per-channel update flags) are sown only when asked for by name.
  sown = (bnjax.linen.BATCH_MOMENTS, bnjax.linen.DIAGNOSTICS) if log_drift or k > 1 else ()
  mutable = ["batch_stats", *sown]

  def loss_fn(params, images, labels, key):
    variables = {"params": params, "batch_stats": state.batch_stats}
    if freeze_norms:
      logits_NK, updates = state.apply_fn(variables, images, train=False), {}
    else:
      logits_NK, updates = state.apply_fn(variables, images, train=True, mutable=mutable,
                                          rngs={"dropout": key}, **renorm)
    loss_N = optax.softmax_cross_entropy_with_integer_labels(logits_NK, labels)
    return jnp.mean(loss_N), (logits_NK, loss_N, updates)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    (_, (logits_NK, loss_N, updates)), grads = grad_fn(state.params, batch["image"],
                                                       batch["label"], dropout_key)
    step_metrics = metrics.batch_sums(logits_NK, batch["label"], loss_N)
    batch_stats = updates.get("batch_stats", state.batch_stats)
  else:
    micro_batches = jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), batch)

    def micro_step(grad_sum, index_and_batch):
      index, micro = index_and_batch
      # The micro-batch's own running-statistics update is discarded: one pooled update below.
      (_, (logits_NK, loss_N, updates)), grads = grad_fn(
          state.params, micro["image"], micro["label"], jax.random.fold_in(dropout_key, index))
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return grad_sum, (metrics.batch_sums(logits_NK, micro["label"], loss_N),
                        {name: updates[name] for name in sown if name in updates})

    grad_sum, (micro_metrics, sown_k) = lax.scan(
        micro_step, jax.tree.map(jnp.zeros_like, state.params),
        (jnp.arange(k, dtype=jnp.int32), micro_batches))
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    step_metrics = jax.tree.map(lambda v: jnp.sum(v, axis=0), micro_metrics)
    # k micro-batches as k calls of each layer, as if the model had called it k times.
    updates = _micro_batches_as_calls(sown_k, k)
    batch_stats = state.batch_stats
    if not freeze_norms:
      batch_stats = pooled_batch_stats(state.batch_stats,
                                       updates.get(bnjax.linen.BATCH_MOMENTS, {}),
                                       batch_norm_momentum)
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
    step_metrics = lax.psum(step_metrics, axis_name)
  if log_drift:  # From the global batch moments: equal on every device, so not summed.
    step_metrics = {**step_metrics,
                    **drift_metrics({"batch_stats": state.batch_stats}, updates)}
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, step_metrics


def drift_metrics(variables: dict[str, Any], updates: dict[str, Any]) -> dict[str, jax.Array]:
  """Each `bnjax.BatchNorm`'s drift from its running statistics, as step metrics.

  Per layer (`bnjax.tools.linen_drift`: the batch's global moments against the running
  statistics the step started from; for micro-batches, their pooled moments), three float32
  scalars: ``drift/<layer>/mean_abs_smd`` (mean over the channels of the standardised mean
  difference's absolute value), ``drift/<layer>/mean_abs_log_var_ratio`` (from
  `bnjax.tools.drift_summary`) and ``drift/<layer>/skipped`` (1 if some channel kept its running
  statistics because the batch's were not finite, else 0).

  Args:
    variables: ``{'batch_stats': ...}`` before the step.
    updates: the ``apply`` updates with the sown ``bnjax.linen.BATCH_MOMENTS`` and
      ``bnjax.linen.DIAGNOSTICS``.

  Raises:
    ValueError: if no batch moments were sown (no `bnjax.BatchNorm` ran in training mode).
  """
  report = tools.linen_drift(variables, updates)
  summary = tools.drift_summary(report)
  found = {}
  for layer, drift in report.items():
    found[f"{metrics.DRIFT_PREFIX}{layer}/mean_abs_smd"] = jnp.mean(jnp.abs(drift.smd))
    found[f"{metrics.DRIFT_PREFIX}{layer}/mean_abs_log_var_ratio"] = (
        summary[f"{layer}/mean_abs_log_var_ratio"])
    skipped = summary.get(f"{layer}/skipped_channels", jnp.zeros((), jnp.int32))
    found[f"{metrics.DRIFT_PREFIX}{layer}/skipped"] = (skipped > 0).astype(jnp.float32)
  return found


def pooled_batch_stats(batch_stats: Any, sown_moments: Any, momentum: float | None) -> Any:
  """The running statistics updated once with the pooled moments of every call of each layer.

  For each layer with running statistics, the moments it sowed (one entry per call: here one per
  micro-batch) are pooled exactly (`bnjax.tools.update_from_micro_batches`, Chan et al.'s merge)
  and ``new = momentum * old + (1 - momentum) * pooled`` is applied once; a channel whose pooled
  statistics are not finite keeps its old values. The variance is stored biased (the example's
  layers do not set ``unbiased_running_var``).

  Args:
    batch_stats: the ``batch_stats`` collection before the step.
    sown_moments: the ``bnjax.linen.BATCH_MOMENTS`` collection, a tuple of calls per layer.
    momentum: the layers' momentum.

  Returns:
    The new ``batch_stats`` collection.

  Raises:
    ValueError: if a layer with running statistics sowed no moments (e.g. `flax.linen.BatchNorm`
      or `bnjax.linen.WhiteningBatchNorm`: they cannot be pooled this way), or `momentum` is None
      while there are running statistics.
  """
  layers = dict(_sown_calls(sown_moments))
  with_stats = _stat_layers(batch_stats)
  missing = [path for path in with_stats if path not in layers]
  if missing:
    raise ValueError(
        "steps.pooled_batch_stats: the layers " + ", ".join("/".join(p) for p in missing)
        + " keep running statistics but sow no batch moments, so one pooled update per optimizer "
        "step cannot be made; gradient accumulation needs bnjax.BatchNorm layers.")
  if with_stats and momentum is None:
    raise ValueError("steps.pooled_batch_stats: pass the norm layers' `batch_norm_momentum` to "
                     "update their running statistics once per optimizer step.")
  new_stats = jax.tree.map(lambda x: x, batch_stats)  # A new tree of dicts to write into.
  for path in with_stats:
    calls = layers[path]
    micro_stats = bnjax.BatchStats(
        mean=jnp.stack([c["mean"] for c in calls]), var=jnp.stack([c["var"] for c in calls]),
        count=jnp.stack([c["count"] for c in calls]),
        updated=jnp.stack([jnp.ones(jnp.shape(c["mean"]), bool) for c in calls]))
    running = _at(batch_stats, path)
    updated = tools.update_from_micro_batches(
        bnjax.BatchNormState(running["mean"], running["var"]), micro_stats, momentum=momentum)
    layer = _at(new_stats, path)
    layer["mean"], layer["var"] = updated.mean, updated.var
  return new_stats


def _micro_batches_as_calls(sown: Any, k: int) -> Any:
  """Sown collections stacked by `lax.scan` over ``k`` micro-batches, as ``k`` calls per layer."""

  def unstack(calls: tuple) -> tuple:
    return tuple(jax.tree.map(operator.itemgetter(i), call) for i in range(k) for call in calls)

  return jax.tree.map(unstack, sown, is_leaf=lambda node: isinstance(node, tuple))


def _sown_calls(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], tuple]]:
  """``(layer path, sown moments of each call)`` for every layer of a sown collection."""
  found = []
  for key, value in tree.items():
    if key == "moments" and isinstance(value, tuple):
      found.append((path, value))
    elif isinstance(value, dict):
      found.extend(_sown_calls(value, (*path, str(key))))
  return found


def _stat_layers(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  """The paths of the layers in a ``batch_stats`` collection (dicts holding arrays)."""
  if any(not isinstance(value, dict) for value in tree.values()):
    return [path]
  return [found for key, value in tree.items() for found in _stat_layers(value, (*path, key))]


def _at(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


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

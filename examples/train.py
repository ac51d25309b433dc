"""Training library for the bnjax examples, in the shape of the Flax examples.

`train_and_evaluate(config, workdir)` trains one model and returns its final `TrainState`;
`compare_norms(config, workdir)` trains the same model once per normalisation and plots the runs
together, so the effect of batch norm is visible.

Data parallelism takes one path. The train state is replicated over a one-axis mesh of every device
of every process (axis ``'data'``) and each global batch is split along that axis; `train_step` runs
on each device's share under `jax.shard_map`. The batch-norm layers combine their statistics over
``'data'`` through their ``axis_name`` (so every device normalises with the statistics of the global
batch), and the gradients are averaged with `lax.pmean`. On one device the mesh has one device and
the same code runs. In a multi-process run every process reads only its own rows of each global
batch (`process_rows`) and the arrays are assembled with `jax.make_array_from_process_local_data`.
"""

from collections.abc import Callable
import functools
import math
import os
import time
from typing import Any

from absl import logging
from flax import linen as nn
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax
import tqdm

from examples import checkpointing
from examples import input_pipeline
from examples import models
from examples import reporting

AXIS = "data"  # The mesh axis that the global batch is split along.
MODELS = ("CNN", "ResNet")
NORM_LABELS = {"bnjax": "bnjax.BatchNorm", "flax": "flax.linen.BatchNorm",
               "whitening": "bnjax.linen.WhiteningBatchNorm", "none": "no normalisation"}


class TrainState(train_state.TrainState):
  """`flax.training.train_state.TrainState` plus the running statistics of the norm layers."""

  batch_stats: Any  # The 'batch_stats' collection ({} without batch norm); float32.


class ConfigError(ValueError):
  """A config value is invalid; the message names the field, the value and the fix."""


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    num_train_examples: int | None = None) -> None:
  """Checks every config value before anything is loaded or trained.

  Args:
    config: the run's config.
    num_devices: devices the global batch is split over (default: `jax.device_count()`).
    num_train_examples: size of the training set, once known, to check the batch size against it.

  Raises:
    ConfigError: listing every invalid field with its value and how to fix it.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  problems = []

  def require(ok: bool, field: str, message: str) -> None:
    if not ok:
      problems.append(f"config.{field} = {config.get(field)!r}: {message}")

  def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

  def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

  require(config.dataset in input_pipeline.DATASETS, "dataset",
          f"unknown dataset; use one of {', '.join(input_pipeline.DATASETS)}, e.g. "
          "--config.dataset=digits.")
  require(config.dataset == "digits" or bool(config.data_dir), "data_dir",
          f"{config.dataset} is read from local files; set --config.data_dir to the directory "
          "that holds them.")
  require(config.model in MODELS, "model", f"unknown model; use one of {', '.join(MODELS)}.")
  require(config.norm in models.NORMS, "norm",
          f"unknown normalisation; use one of {', '.join(models.NORMS)}.")
  compare = tuple(config.compare_norms)
  require(all(n in models.NORMS for n in compare) and len(set(compare)) == len(compare),
          "compare_norms", f"must list distinct values of {', '.join(models.NORMS)}, e.g. "
          "--config.compare_norms=\"('bnjax', 'none')\", or be () to train only config.norm.")
  require(is_number(config.learning_rate) and config.learning_rate > 0, "learning_rate",
          "must be a positive number, e.g. --config.learning_rate=0.1.")
  require(is_number(config.momentum) and 0 <= config.momentum < 1, "momentum",
          "the SGD momentum must be in [0, 1), e.g. --config.momentum=0.9.")
  require(is_number(config.weight_decay) and config.weight_decay >= 0, "weight_decay",
          "must be >= 0 (0 switches it off).")
  require(is_number(config.batch_norm_momentum) and 0 <= config.batch_norm_momentum <= 1,
          "batch_norm_momentum", "the decay of the running averages must be in [0, 1], e.g. 0.9.")
  require(is_number(config.batch_norm_epsilon) and config.batch_norm_epsilon > 0,
          "batch_norm_epsilon", "must be > 0, e.g. 1e-5.")
  whitening = whitening_options(config)
  if whitening.get("method", "zca") not in ("zca", "pca", "cholesky", "iterative"):
    problems.append(f"config.whitening.method = {whitening['method']!r}: use one of zca, pca, "
                    "cholesky, iterative.")
  for field in ("group_size", "iterations"):
    value = whitening.get(field, 1)
    if not (is_int(value) and value >= 1):
      problems.append(f"config.whitening.{field} = {value!r}: must be an int >= 1.")
  for field in ("batch_size", "eval_batch_size"):
    size = config.get(field)
    if not (is_int(size) and size > 0):
      require(False, field, "must be a positive int, e.g. 64.")
    else:
      multiple = max(num_devices, -(-size // num_devices) * num_devices)
      require(size % num_devices == 0, field,
              f"the global batch is split evenly over the {num_devices} devices "
              f"(jax.device_count()), so it must be a multiple of {num_devices}; use e.g. "
              f"--config.{field}={multiple}.")
  if is_int(config.batch_size) and num_train_examples is not None:
    require(config.batch_size <= num_train_examples, "batch_size",
            f"larger than the {num_train_examples} training examples of {config.dataset}; use at "
            f"most {num_train_examples}.")
  require(is_int(config.num_epochs) and config.num_epochs >= 1, "num_epochs",
          "must be an int >= 1.")
  require(is_int(config.steps_per_epoch) and (config.steps_per_epoch == -1
                                              or config.steps_per_epoch >= 1),
          "steps_per_epoch", "must be -1 (one pass over the training set) or an int >= 1.")
  require(is_number(config.warmup_epochs) and config.warmup_epochs >= 0, "warmup_epochs",
          "must be >= 0.")
  require(is_int(config.seed), "seed", "must be an int.")
  require(is_number(config.test_fraction) and 0 < config.test_fraction < 1, "test_fraction",
          "the held-out fraction of the digits must be in (0, 1), e.g. 0.2.")
  require(is_int(config.log_every_steps) and config.log_every_steps >= 1, "log_every_steps",
          "must be an int >= 1.")
  require(is_int(config.checkpoint_every_epochs) and config.checkpoint_every_epochs >= 0,
          "checkpoint_every_epochs", "must be an int >= 0 (0: only at the end).")
  require(is_int(config.stop_at_step) and config.stop_at_step >= 0, "stop_at_step",
          "must be an int >= 0 (0: train to the end).")
  for field in ("augment", "progress_bar", "fast_compile"):
    require(isinstance(config.get(field), bool), field, "must be True or False.")
  if problems:
    raise ConfigError("Invalid config; nothing was trained:\n  " + "\n  ".join(problems))


def whitening_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.whitening`` as keyword arguments of `bnjax.linen.WhiteningBatchNorm` ({} if absent)."""
  whitening = config.get("whitening")
  return {} if whitening is None else dict(whitening.to_dict())


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 norm: str | None = None) -> nn.Module:
  """The model of ``config.model`` with the normalisation of `norm` (default ``config.norm``).

  Its batch-norm layers combine statistics over the mesh axis `AXIS`, so it must be applied under
  `jax.shard_map` over a mesh with that axis (as `parallel_train_step` does) when training.
  """
  norm_layer = models.norm_factory(config.norm if norm is None else norm,
                                   momentum=config.batch_norm_momentum,
                                   epsilon=config.batch_norm_epsilon, axis_name=AXIS,
                                   whitening=whitening_options(config))
  if config.model == "CNN":
    return models.CNN(num_classes=num_classes, features=tuple(config.cnn.features),
                      hidden=config.cnn.hidden, norm=norm_layer)
  if config.model == "ResNet":
    return models.ResNet(num_classes=num_classes, stage_sizes=tuple(config.resnet.stage_sizes),
                         num_filters=config.resnet.num_filters, norm=norm_layer)
  raise ConfigError(f"config.model = {config.model!r}: use one of {', '.join(MODELS)}.")


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
  """Initialises the model's variables and the optimizer state; `replicate` places them on a mesh."""
  images_NHWC = jnp.zeros((2, *image_shape), jnp.float32)
  variables = model.init(rng, images_NHWC, train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=create_optimizer(config, learning_rate_fn),
                           batch_stats=variables.get("batch_stats", {}))


def train_step(state: TrainState, batch: dict[str, jax.Array],
               axis_name: str = AXIS) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's share of the global batch; call it under `jax.shard_map`.

  The norm layers combine their batch statistics over `axis_name` themselves and return running
  statistics that are identical on every device; the gradients are averaged here.

  Args:
    state: the replicated train state.
    batch: ``{'image': [n, H, W, C] float32, 'label': [n] int32}``, this device's rows.
    axis_name: the mesh axis the batch is split along.

  Returns:
    ``(new_state, metrics)``, metrics summed over the global batch: ``loss_sum``, ``correct`` and
    ``count``.
  """

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits_NK, updates = state.apply_fn(variables, batch["image"], train=True,
                                        mutable=["batch_stats"])
    loss_N = optax.softmax_cross_entropy_with_integer_labels(logits_NK, batch["label"])
    return jnp.mean(loss_N), (logits_NK, loss_N, updates)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (logits_NK, loss_N, updates)), grads = grad_fn(state.params)
  grads = lax.pmean(grads, axis_name)
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=updates.get("batch_stats", state.batch_stats))
  correct_N = (jnp.argmax(logits_NK, axis=-1) == batch["label"]).astype(jnp.float32)
  metrics = {"loss_sum": jnp.sum(loss_N), "correct": jnp.sum(correct_N),
             "count": jnp.asarray(loss_N.shape[0], jnp.float32)}
  return new_state, lax.psum(metrics, axis_name)


def eval_step(state: TrainState, batch: dict[str, jax.Array],
              axis_name: str = AXIS) -> dict[str, jax.Array]:
  """Metrics of this device's share of a test batch, normalised with the running statistics.

  Args:
    state: the replicated train state.
    batch: ``{'image', 'label', 'weight'}``; padding examples have weight 0.
    axis_name: the mesh axis the batch is split along.

  Returns:
    ``loss_sum``, ``correct`` and ``count`` over the global batch, padding excluded.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits_NK = state.apply_fn(variables, batch["image"], train=False)
  loss_N = optax.softmax_cross_entropy_with_integer_labels(logits_NK, batch["label"])
  correct_N = (jnp.argmax(logits_NK, axis=-1) == batch["label"]).astype(jnp.float32)
  weight_N = batch["weight"]
  metrics = {"loss_sum": jnp.sum(loss_N * weight_N), "correct": jnp.sum(correct_N * weight_N),
             "count": jnp.sum(weight_N)}
  return lax.psum(metrics, axis_name)


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh (`AXIS`) over `devices`, by default every device of every process."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def _compiler_options(mesh: Mesh, unoptimised: bool) -> dict[str, Any] | None:
  """XLA options that skip LLVM optimisation, on CPU only: much faster to compile, slower to run."""
  on_cpu = all(device.platform == "cpu" for device in mesh.devices.flat)
  return {"xla_backend_optimization_level": 0} if unoptimised and on_cpu else None


def parallel_train_step(mesh: Mesh, *, fast_compile: bool = False
                        ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`train_step` over the mesh: state replicated, batch split along `AXIS`, state donated.

  ``check_vma=False``: the norm layers' statistics and the averaged gradients are equal on every
  device by construction (the collectives say so), which is what the replicated output spec states.

  Args:
    mesh: the devices, with the axis `AXIS`.
    fast_compile: on CPU, compile without LLVM optimisation (about half the compile time, a few
      times slower steps): for runs of a few steps.
  """
  step = jax.shard_map(train_step, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(AXIS)),
                       out_specs=PartitionSpec(), check_vma=False)
  return jax.jit(step, donate_argnums=0, compiler_options=_compiler_options(mesh, fast_compile))


def parallel_eval_step(mesh: Mesh, *, fast_compile: bool = False
                       ) -> Callable[[TrainState, dict], dict]:
  """`eval_step` over the mesh: state replicated, batch split along `AXIS`."""
  step = jax.shard_map(eval_step, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(AXIS)),
                       out_specs=PartitionSpec(), check_vma=False)
  return jax.jit(step, compiler_options=_compiler_options(mesh, fast_compile))


def replicate(create_fn: Callable[[], TrainState], mesh: Mesh) -> TrainState:
  """Runs `create_fn` under `jit` with every output replicated over `mesh` (works multi-process).

  On CPU it is compiled without LLVM optimisation: it runs once, and XLA:CPU otherwise spends
  seconds optimising the random-number code of the initialisers (e.g. 10 s instead of 1 s for the
  small CNN), for the same values.
  """
  return jax.jit(create_fn, out_shardings=NamedSharding(mesh, PartitionSpec()),
                 compiler_options=_compiler_options(mesh, unoptimised=True))()


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of each global batch that this process's devices hold (all rows with one process)."""
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  slices = [index[0] for index in
            sharding.addressable_devices_indices_map((global_batch_size,)).values()]
  start = min(s.start or 0 for s in slices)
  stop = max(global_batch_size if s.stop is None else s.stop for s in slices)
  return slice(start, stop)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                global_batch_size: int) -> dict[str, jax.Array]:
  """Assembles global arrays split along `AXIS` from this process's rows of the batch."""
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  return {name: jax.make_array_from_process_local_data(
      sharding, rows, (global_batch_size, *rows.shape[1:])) for name, rows in local_batch.items()}


def evaluate(eval_fn: Callable, state: TrainState, dataset: input_pipeline.Dataset, mesh: Mesh,
             global_batch_size: int) -> dict[str, float]:
  """Test loss and accuracy over the whole test set, with the running statistics."""
  rows = process_rows(mesh, global_batch_size)
  batch_metrics = [eval_fn(state, shard_batch(batch, mesh, global_batch_size)) for batch in
                   input_pipeline.eval_batches(dataset, global_batch_size=global_batch_size,
                                               rows=rows)]
  totals = jax.tree.map(lambda *values: float(np.sum(values)), *jax.device_get(batch_metrics))
  return {"test_loss": totals["loss_sum"] / totals["count"],
          "test_accuracy": totals["correct"] / totals["count"]}


def run_description(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, Any]:
  """What a checkpoint records of its run: the data stream (must match to resume), the model."""
  model_fields = {"model": config.model, "norm": config.norm}
  model_fields.update(config.cnn.to_dict() if config.model == "CNN" else config.resnet.to_dict())
  return {"data": {"dataset": config.dataset, "seed": config.seed,
                   "batch_size": config.batch_size, "steps_per_epoch": steps_per_epoch,
                   "augment": config.augment},
          "model": model_fields}


class _EpochTotals:
  """Running sums of one epoch's training metrics; part of a checkpoint's progress."""

  def __init__(self, loss_sum: float = 0.0, correct: float = 0.0, count: float = 0.0):
    self.loss_sum, self.correct, self.count = loss_sum, correct, count

  def add(self, step_metrics: list[dict[str, Any]]) -> None:
    for metrics in jax.device_get(step_metrics):
      self.loss_sum += float(metrics["loss_sum"])
      self.correct += float(metrics["correct"])
      self.count += float(metrics["count"])

  def summary(self) -> dict[str, float]:
    count = max(self.count, 1.0)
    return {"train_loss": self.loss_sum / count, "train_accuracy": self.correct / count}

  def as_progress(self) -> dict[str, float]:
    return {"epoch_loss_sum": self.loss_sum, "epoch_correct": self.correct,
            "epoch_count": self.count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains ``config.model`` on ``config.dataset``, evaluating after every epoch.

  Resumes from the newest checkpoint in ``workdir/checkpoints`` when there is one. Writes
  ``workdir/metrics.jsonl`` (one line per epoch) and ``workdir/metrics.png``.

  Args:
    config: the run's config (see ``configs/default.py``); validated before anything starts.
    workdir: the directory for checkpoints, metrics and the plot.

  Returns:
    The final train state (replicated over all devices).

  Raises:
    ConfigError: on an invalid config value.
    input_pipeline.DatasetError: if the dataset's files are missing or malformed.
    checkpointing.CheckpointMismatchError: if the work directory holds a checkpoint of another
      model or data stream.
  """
  validate_config(config)
  dataset = input_pipeline.load_dataset(config.dataset, config.data_dir, seed=config.seed,
                                        test_fraction=config.test_fraction)
  num_train = len(dataset.train_labels)
  validate_config(config, num_train_examples=num_train)
  full_epoch_steps = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  steps_per_epoch = (full_epoch_steps if config.steps_per_epoch == -1
                     else min(config.steps_per_epoch, full_epoch_steps))
  num_steps = config.num_epochs * steps_per_epoch
  stop_step = min(num_steps, config.stop_at_step) if config.stop_at_step else num_steps
  is_chief = jax.process_index() == 0

  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, reporting.METRICS_FILE)
  mesh = create_mesh()
  logging.info("Training %s with %s on %s: %d train / %d test examples, %d steps per epoch, "
               "%d devices in %d process(es).", config.model, NORM_LABELS[config.norm],
               config.dataset, num_train, len(dataset.test_labels), steps_per_epoch,
               jax.device_count(), jax.process_count())

  model = create_model(config, dataset.num_classes)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  state = replicate(functools.partial(
      create_train_state, jax.random.key(config.seed), config, model, dataset.image_shape,
      learning_rate_fn), mesh)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            run_description(config, steps_per_epoch))
  totals = _EpochTotals()
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, progress = restored
    totals = _EpochTotals(progress["epoch_loss_sum"], progress["epoch_correct"],
                          progress["epoch_count"])
    logging.info("Resumed from %s (epoch %d, batch %d of %d).",
                 checkpointer.path(progress["step"]), progress["epoch"] + 1,
                 progress["batch_in_epoch"], steps_per_epoch)
  start_step = int(jax.device_get(state.step))
  if is_chief:
    reporting.truncate_metrics(metrics_path, start_step)
  if start_step >= num_steps:
    logging.info("The checkpoint at step %d already finished the %d steps of this config; delete "
                 "%s to train again.", start_step, num_steps, workdir)

  def progress_at(step: int) -> dict[str, Any]:
    return {"step": step, "epoch": step // steps_per_epoch,
            "batch_in_epoch": step % steps_per_epoch, **totals.as_progress()}

  train_fn = parallel_train_step(mesh, fast_compile=config.fast_compile)
  eval_fn = parallel_eval_step(mesh, fast_compile=config.fast_compile)
  batches = input_pipeline.train_batches(
      dataset, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
      batches_per_epoch=steps_per_epoch, rows=process_rows(mesh, config.batch_size),
      augment=config.augment)
  started = time.time()
  step = start_step
  pending = []  # Metrics of steps not yet added to the epoch's totals.
  try:
    while step < stop_step:
      epoch = step // steps_per_epoch
      epoch_end = min((epoch + 1) * steps_per_epoch, stop_step)
      with tqdm.tqdm(total=steps_per_epoch, initial=step % steps_per_epoch, unit="step",
                     desc=f"epoch {epoch + 1}/{config.num_epochs}",
                     disable=not (config.progress_bar and is_chief)) as bar:
        while step < epoch_end:
          state, metrics = train_fn(state, shard_batch(next(batches), mesh, config.batch_size))
          pending.append(metrics)
          step += 1
          if len(pending) == config.log_every_steps or step == epoch_end:
            fetched, pending = pending, []
            totals.add(fetched)
            bar.update(len(fetched))
            summary = totals.summary()
            bar.set_postfix(loss=f"{summary['train_loss']:.4f}",
                            acc=f"{summary['train_accuracy']:.2%}")
        if step % steps_per_epoch:
          break  # Stopped inside an epoch (config.stop_at_step); checkpointed below.
        record = {"epoch": epoch + 1, "step": step, **totals.summary(),
                  **evaluate(eval_fn, state, dataset, mesh, config.eval_batch_size),
                  "learning_rate": float(learning_rate_fn(step - 1)), "norm": config.norm,
                  "elapsed_s": round(time.time() - started, 3)}
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", acc=f"{record['train_accuracy']:.2%}",
                        test_acc=f"{record['test_accuracy']:.2%}")
      if is_chief:
        reporting.append_metrics(metrics_path, record)
      totals = _EpochTotals()
      every = config.checkpoint_every_epochs
      if step == num_steps or (every and (epoch + 1) % every == 0):
        checkpointer.save(state, progress_at(step))
    if step > start_step:
      checkpointer.save(state, progress_at(step))  # No-op if this step is already saved.
  except KeyboardInterrupt:
    if jax.process_count() == 1:  # Saving is collective: with several processes it would hang.
      totals.add(pending)
      checkpointer.save(state, progress_at(int(jax.device_get(state.step))))
      checkpointer.close()
      logging.warning("Interrupted; saved a checkpoint at step %d. Run the same command to resume.",
                      int(jax.device_get(state.step)))
    raise
  checkpointer.close()
  if is_chief:
    records = reporting.read_metrics(metrics_path)
    if records:
      reporting.plot_learning_curves(
          {NORM_LABELS[config.norm]: records}, os.path.join(workdir, reporting.PLOT_FILE),
          title=f"{config.model} on {config.dataset}")
  return state


def compare_norms(config: ml_collections.ConfigDict, workdir: str) -> dict[str, TrainState]:
  """Trains the same model once per entry of ``config.compare_norms`` and plots them together.

  Each run has its own work directory, ``workdir/<norm>``, and resumes on its own; the comparison
  plot is ``workdir/comparison.png``.

  Returns:
    ``{norm: final train state}``.
  """
  validate_config(config)
  if not config.compare_norms:
    raise ConfigError("config.compare_norms = (): list the normalisations to compare, e.g. "
                      "--config.compare_norms=\"('bnjax', 'none')\".")
  states = {}
  for norm in config.compare_norms:
    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
      run_config.norm = norm
      run_config.compare_norms = ()
    states[norm] = train_and_evaluate(run_config, os.path.join(workdir, norm))
  if jax.process_index() == 0:
    runs = {NORM_LABELS[norm]: reporting.read_metrics(
        os.path.join(workdir, norm, reporting.METRICS_FILE)) for norm in config.compare_norms}
    reporting.plot_learning_curves(
        runs, os.path.join(workdir, reporting.COMPARISON_PLOT_FILE),
        title=f"{config.model} on {config.dataset}: what batch norm does")
  return states


def latest_checkpoint(workdir: str) -> str | None:
  """The directory of the newest checkpoint in ``workdir/checkpoints``, or None."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(
      directory) else []
  return os.path.join(os.path.abspath(directory), str(max(steps))) if steps else None

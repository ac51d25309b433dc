"""Training library for the bnjax example, in the shape of the Flax examples.

`train_and_evaluate(config, workdir)` trains one model and returns its final `TrainState`;
`compare_norms(config, workdir)` trains the same model once per normalisation and plots the runs
together, so the effect of batch norm is visible.

This module puts a run together from its parts, each in its own module: `config_check` (the config
is valid), `input_pipeline` (data), `steps` (model, optimizer, the pure train and eval steps),
`parallel` (the mesh over every device, the batch split along it), `loop` (epochs, metrics,
checkpoints), `checkpointing` and `reporting` (metrics file, plots). ``config.api='nnx'`` swaps
`steps` for `nnx_steps` (the same CNN in Flax NNX), and ``config.init_from`` fine-tunes a
finished run with frozen batch norm (`fine_tune`); the rest is shared.
"""

from collections.abc import Callable
import functools
import itertools
import json
import os
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh
import ml_collections

from bnjax import tools
from bnjax_examples import checkpointing
from bnjax_examples import config_check
from bnjax_examples import fine_tune
from bnjax_examples import input_pipeline
from bnjax_examples import loop
from bnjax_examples import metrics
from bnjax_examples import nnx_steps
from bnjax_examples import parallel
from bnjax_examples import reporting
from bnjax_examples import steps

CHECKPOINT_DIR = "checkpoints"  # Under the work directory.
PRECISE_STATS_FILE = "precise_stats.json"  # Under the work directory, with precise statistics.
NORM_LABELS = {"bnjax": "bnjax.BatchNorm", "flax": "flax.linen.BatchNorm",
               "whitening": "bnjax.linen.WhiteningBatchNorm",
               "layer": "bnjax layer norm", "group": "bnjax group norm",
               "instance": "bnjax instance norm", "rms": "bnjax RMS norm",
               "none": "no normalisation"}
NNX_NORM_LABELS = {"bnjax": "bnjax.nnx.BatchNorm", "flax": "flax.nnx.BatchNorm",
                   "none": "no normalisation (NNX)"}


def run_label(config: ml_collections.ConfigDict, norm: str | None = None) -> str:
  """What a run is called in logs and plots: its norm layer, the API, fine-tuning."""
  norm = config.norm if norm is None else norm
  label = (NNX_NORM_LABELS.get(norm, NORM_LABELS[norm]) if config.get("api", "linen") == "nnx"
           else NORM_LABELS[norm])
  return label + (", fine-tuned, batch norm frozen" if config.get("init_from") else "")


def parallel_train_step(mesh: Mesh, *, fast_compile: bool = False, renorm_steps: int = 0,
                        log_drift: bool = False, grad_accum_steps: int = 1,
                        batch_norm_momentum: float | None = None
                        ) -> Callable[[steps.TrainState, dict], tuple[steps.TrainState, dict]]:
  """`steps.train_step` over the mesh: state replicated and donated, batch split along the axis.

  Args:
    mesh: from `parallel.create_mesh`; the model must combine its statistics over
      `parallel.AXIS` (``steps.create_model(..., axis_name=parallel.AXIS)``).
    fast_compile: on CPU, compile without LLVM optimisation (see `parallel.data_parallel`).
    renorm_steps: > 0: Batch Renormalization scheduled over a run of this many steps.
    log_drift: add the norm layers' drift to the step metrics (`steps.drift_metrics`).
    grad_accum_steps: micro-batches per optimizer step (each device splits its share).
    batch_norm_momentum: the norm layers' momentum, for the pooled update of accumulation.
  """
  return parallel.data_parallel(
      functools.partial(steps.train_step, axis_name=parallel.AXIS, renorm_steps=renorm_steps,
                        log_drift=log_drift, grad_accum_steps=grad_accum_steps,
                        batch_norm_momentum=batch_norm_momentum),
      mesh, donate_state=True, fast_compile=fast_compile)


def parallel_eval_step(mesh: Mesh, *, fast_compile: bool = False
                       ) -> Callable[[steps.TrainState, dict], dict]:
  """`steps.eval_step` over the mesh: state replicated, batch split along the axis."""
  return parallel.data_parallel(functools.partial(steps.eval_step, axis_name=parallel.AXIS), mesh,
                                fast_compile=fast_compile)


def build_run(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset, mesh: Mesh,
              learning_rate_fn: Callable[[Any], jax.Array], num_steps: int = 0
              ) -> tuple[Any, Callable, Callable]:
  """The initial state (replicated), the train step and the eval step of the config's path.

  ``config.api='linen'`` trains `steps`' linen model; with ``config.init_from`` it fine-tunes the
  checkpoint of that run with frozen batch norm (`fine_tune`). ``config.api='nnx'`` trains the
  NNX model of `nnx_steps`. Every path runs on the same mesh, data and loop.
  """
  key = jax.random.key(config.seed)
  if config.get("api", "linen") == "nnx":
    state = parallel.replicate(functools.partial(
        nnx_steps.create_train_state, key, config, dataset.num_classes, dataset.image_shape,
        learning_rate_fn, axis_name=parallel.AXIS), mesh)
    return state, *(parallel.data_parallel(
        functools.partial(step, axis_name=parallel.AXIS), mesh, donate_state=donate,
        fast_compile=config.fast_compile) for step, donate in
        ((nnx_steps.functional_train_step, True), (nnx_steps.functional_eval_step, False)))
  model = steps.create_model(config, dataset.num_classes, axis_name=parallel.AXIS)
  if config.get("init_from"):
    state = parallel.replicate(fine_tune.initial_state(config, model, dataset.image_shape,
                                                       learning_rate_fn), mesh)
    train_fn = parallel.data_parallel(
        functools.partial(fine_tune.train_step, axis_name=parallel.AXIS), mesh,
        donate_state=True, fast_compile=config.fast_compile)
  else:
    state = parallel.replicate(functools.partial(
        steps.create_train_state, key, config, model, dataset.image_shape, learning_rate_fn),
        mesh)
    train_fn = parallel_train_step(
        mesh, fast_compile=config.fast_compile,
        renorm_steps=num_steps if config.get("batch_renorm", False) else 0,
        log_drift=config_check.logs_drift(config),
        grad_accum_steps=config.get("grad_accum_steps", 1),
        batch_norm_momentum=config.batch_norm_momentum)
  return state, train_fn, parallel_eval_step(mesh, fast_compile=config.fast_compile)


def evaluate(eval_fn: Callable, state: steps.TrainState, dataset: input_pipeline.Dataset,
             mesh: Mesh, global_batch_size: int) -> dict[str, float]:
  """Test loss and accuracy over the whole test set, with the running statistics."""
  rows = parallel.process_rows(mesh, global_batch_size)
  return metrics.eval_summary(
      eval_fn(state, parallel.shard_batch(batch, mesh, global_batch_size)) for batch in
      input_pipeline.eval_batches(dataset, global_batch_size=global_batch_size, rows=rows))


def run_description(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, Any]:
  """What a checkpoint records of its run: data stream and steps (must match to resume), model.

  ``training`` holds the fields that change what a step computes without changing the variables'
  names or shapes (those are compared by the checkpointer). ``log_drift`` is not among them: it
  adds metrics and leaves the state unchanged.
  """
  model_fields = {"model": config.model, "norm": config.norm, "api": config.get("api", "linen")}
  model_fields.update(config.cnn.to_dict() if config.model == "CNN" else config.resnet.to_dict())
  return {"data": {"dataset": config.dataset, "seed": config.seed,
                   "batch_size": config.batch_size, "steps_per_epoch": steps_per_epoch,
                   "augment": config.augment},
          "training": {"dropout_rate": config.get("dropout_rate", 0.0),
                       "batch_renorm": config.get("batch_renorm", False),
                       "grad_accum_steps": config.get("grad_accum_steps", 1)},
          "model": model_fields}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
  """Trains ``config.model`` on ``config.dataset``, evaluating after every epoch.

  Resumes from the newest checkpoint in ``workdir/checkpoints`` when there is one. Writes
  ``workdir/metrics.jsonl`` (one line per epoch), ``workdir/metrics.png`` and, when the run logs
  the norm layers' drift (`config_check.logs_drift`), ``workdir/drift.png``.

  Args:
    config: the run's config (see ``configs/default.py``); validated before anything starts.
    workdir: the directory for checkpoints, metrics and the plot.

  Returns:
    The final train state (replicated over all devices).

  Raises:
    config_check.ConfigError: on an invalid config value.
    input_pipeline.DatasetError: if the dataset's files are missing or malformed.
    checkpointing.CheckpointMismatchError: if the work directory holds a checkpoint of another
      model or data stream.
  """
  config_check.validate_config(config)
  dataset = input_pipeline.load_dataset(config.dataset, config.data_dir, seed=config.seed,
                                        test_fraction=config.test_fraction)
  num_train = len(dataset.train_labels)
  config_check.validate_config(config, num_train_examples=num_train)
  full_epoch_steps = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  steps_per_epoch = (full_epoch_steps if config.steps_per_epoch == -1
                     else min(config.steps_per_epoch, full_epoch_steps))
  num_steps = config.num_epochs * steps_per_epoch
  schedule = loop.Schedule(
      steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs,
      stop_step=min(num_steps, config.stop_at_step) if config.stop_at_step else num_steps,
      log_every_steps=config.log_every_steps,
      checkpoint_every_epochs=config.checkpoint_every_epochs)

  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, reporting.METRICS_FILE)
  mesh = parallel.create_mesh()
  logging.info("Training %s with %s on %s: %d train / %d test examples, %d steps per epoch, "
               "on %s.", config.model, run_label(config), config.dataset, num_train,
               len(dataset.test_labels), steps_per_epoch, parallel.describe_devices(mesh))

  learning_rate_fn = steps.create_learning_rate_fn(config, steps_per_epoch)
  state, train_fn, eval_fn = build_run(config, dataset, mesh, learning_rate_fn, num_steps)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                            run_description(config, steps_per_epoch))
  totals = metrics.EpochTotals()
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, progress = restored
    totals = metrics.EpochTotals.from_progress(progress)
    logging.info("Resumed from %s (epoch %d, batch %d of %d).",
                 checkpointer.path(progress["step"]), progress["epoch"] + 1,
                 progress["batch_in_epoch"], steps_per_epoch)
  start_step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    reporting.truncate_metrics(metrics_path, start_step)
  if start_step >= num_steps:
    logging.info("The checkpoint at step %d already finished the %d steps of this config; delete "
                 "%s to train again.", start_step, num_steps, workdir)

  batches = (parallel.shard_batch(batch, mesh, config.batch_size)
             for batch in input_pipeline.train_batches(
                 dataset, global_batch_size=config.batch_size, seed=config.seed,
                 start_step=start_step, batches_per_epoch=steps_per_epoch,
                 rows=parallel.process_rows(mesh, config.batch_size), augment=config.augment))
  state = loop.run(
      state, start_step=start_step, schedule=schedule,
      train_fn=train_fn, batches=batches,
      evaluate_fn=lambda state: evaluate(eval_fn, state, dataset, mesh, config.eval_batch_size),
      epoch_fields=lambda step: {"learning_rate": float(learning_rate_fn(step - 1)),
                                 "norm": config.norm},
      checkpointer=checkpointer, totals=totals, metrics_path=metrics_path,
      progress_bar=config.progress_bar)
  if config.get("precise_stats_batches", 0) > 0 and int(jax.device_get(state.step)) >= num_steps:
    state = recompute_precise_stats(config, dataset, mesh, state, eval_fn, workdir,
                                    steps_per_epoch)
  if jax.process_index() == 0:
    records = reporting.read_metrics(metrics_path)
    if records:
      reporting.plot_learning_curves(
          {run_label(config): records}, os.path.join(workdir, reporting.PLOT_FILE),
          title=f"{config.model} on {config.dataset}")
      reporting.plot_drift(records, os.path.join(workdir, reporting.DRIFT_PLOT_FILE),
                           title=f"{run_label(config)}: batch statistics against running ones")
  return state


def recompute_precise_stats(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset,
                            mesh: Mesh, state: steps.TrainState, eval_fn: Callable, workdir: str,
                            steps_per_epoch: int) -> steps.TrainState:
  """The trained state with every norm layer's population statistics, and the accuracy change.

  Runs ``config.precise_stats_batches`` training batches (a fresh order: seed + 1) through the
  model in training mode with dropout off (`bnjax.tools.precise_batch_stats`), on this process's
  host copy of the variables, then evaluates again. Writes the test loss and accuracy before and
  after to ``workdir/precise_stats.json`` and logs them; the checkpoints keep the running averages.
  """
  before = evaluate(eval_fn, state, dataset, mesh, config.eval_batch_size)
  local_model = steps.create_model(config, dataset.num_classes)  # statistics of whole batches.
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  batches = input_pipeline.train_batches(dataset, global_batch_size=config.batch_size,
                                         seed=config.seed + 1, batches_per_epoch=steps_per_epoch)
  images = (batch["image"] for batch in
            itertools.islice(batches, config.precise_stats_batches))
  precise = tools.precise_batch_stats(local_model.apply, variables, images, train=True,
                                      deterministic=True)
  state = parallel.replicate(lambda: state.replace(batch_stats=precise["batch_stats"]), mesh)
  after = evaluate(eval_fn, state, dataset, mesh, config.eval_batch_size)
  record = {"batches": config.precise_stats_batches, "before": before, "after": after}
  logging.info("Precise batch statistics from %d batches: test accuracy %.4f -> %.4f.",
               config.precise_stats_batches, before["test_accuracy"], after["test_accuracy"])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, PRECISE_STATS_FILE), "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2)
  return state


def compare_norms(config: ml_collections.ConfigDict,
                  workdir: str) -> dict[str, steps.TrainState]:
  """Trains the same model once per entry of ``config.compare_norms`` and plots them together.

  Each run has its own work directory, ``workdir/<norm>``, and resumes on its own; the comparison
  plot is ``workdir/comparison.png``.

  Returns:
    ``{norm: final train state}``.
  """
  config_check.validate_config(config)
  if not config.compare_norms:
    raise config_check.ConfigError(
        "config.compare_norms = (): list the normalisations to compare, e.g. "
        "--config.compare_norms=\"('bnjax', 'none')\".")
  states = {}
  for norm in config.compare_norms:
    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
      run_config.norm = norm
      run_config.compare_norms = ()
    states[norm] = train_and_evaluate(run_config, os.path.join(workdir, norm))
  if jax.process_index() == 0:
    runs = {run_label(config, norm): reporting.read_metrics(
        os.path.join(workdir, norm, reporting.METRICS_FILE)) for norm in config.compare_norms}
    reporting.plot_learning_curves(
        runs, os.path.join(workdir, reporting.COMPARISON_PLOT_FILE),
        title=f"{config.model} on {config.dataset}: what batch norm does")
  return states


def latest_checkpoint(workdir: str) -> str | None:
  """The directory of the newest checkpoint of the run in `workdir`, or None."""
  return checkpointing.latest_checkpoint(os.path.join(workdir, CHECKPOINT_DIR))

"""Fine-tuning from a previous run's checkpoint with frozen batch norm (``config.init_from``).

A frozen batch-norm layer is a fixed affine map: it normalises with its running statistics, which
stay as loaded, and its ``scale``/``bias`` are not trained (torchvision's ``FrozenBatchNorm2d``).
Here the two halves are:

* statistics: the train step calls the model in evaluation mode (``train=False``,
  ``use_running_average=True`` in every norm layer; ``steps.train_step(..., freeze_norms=True)``),
  so ``batch_stats`` are read and never written;
* affine parameters: the optimizer is ``optax.multi_transform`` over
  `bnjax.tools.norm_params_labels`, with ``optax.set_to_zero()`` for the norm layers' ``scale``
  and ``bias`` (no update, no weight decay, no optimizer state) and the run's optimizer
  (`steps.create_optimizer`) for everything else.

The norm layers are found by type (`bnjax.tools.norm_layer_paths` over the model's classes of
norm layer), so a model without norms fine-tunes every parameter.

Only the ``params`` and ``batch_stats`` of the loaded checkpoint are used; the optimizer starts
afresh and the step count at 0. The fine-tuning run writes its own checkpoints in its own work
directory and resumes from them like any run (``init_from`` is read only when there is none).
"""

from collections.abc import Callable
import functools
import os
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

from bnjax import tools
import bnjax.linen
from bnjax_examples import checkpointing
from bnjax_examples import config_check
from bnjax_examples import steps

# The norm-layer classes of `models.norm_factory`: frozen whichever the config chooses.
NORM_LAYER_TYPES = (bnjax.linen.BatchNorm, nn.BatchNorm, bnjax.linen.WhiteningBatchNorm)
FROZEN, TRAINABLE = "frozen", "trainable"


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{'params/Conv_0/kernel': (3, 3, 1, 32), ...}`` for the leaves of a tree of nested dicts."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


def load_variables(checkpoint_dir: str, model_variables: dict[str, Any]) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` of the newest checkpoint in `checkpoint_dir`, as host arrays.

  Args:
    checkpoint_dir: a run's checkpoint directory (``<workdir>/checkpoints``).
    model_variables: the fine-tuned model's ``{'params', 'batch_stats'}`` (arrays or shapes): the
      stored variables must have the same names and shapes.

  Raises:
    config_check.ConfigError: if there is no checkpoint in `checkpoint_dir`.
    checkpointing.CheckpointMismatchError: if the checkpoint's variables differ from the model's.
  """
  where = checkpointing.latest_checkpoint(checkpoint_dir)
  if where is None:
    raise config_check.ConfigError(
        f"config.init_from: no checkpoint in {checkpoint_dir}; point it at the --workdir of a "
        "finished training run.")
  manager = ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(
      create=False, save_root_metadata=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "progress": ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step()
    stored = manager.item_metadata(step)["state"]
    stored = getattr(stored, "tree", stored)
    differences = checkpointing.describe_mismatch(
        _shapes_by_name({k: stored.get(k, {}) for k in ("params", "batch_stats")}),
        _shapes_by_name(model_variables))
    if differences:
      raise checkpointing.CheckpointMismatchError(
          f"config.init_from: the checkpoint {where} was written by a different model than the "
          "one this config fine-tunes (its model fields, e.g. config.model, config.norm, "
          "config.cnn, must be the training run's).\n  " + "\n  ".join(differences))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.local_devices()[0])),
        model_variables)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"]
  finally:
    manager.close()
  return jax.device_get({k: restored[k] for k in model_variables})


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: Callable[[Any], jax.Array],
                     labels: dict[str, Any]) -> optax.GradientTransformation:
  """The run's optimizer on the ``'trainable'`` parameters; nothing at all on the ``'frozen'``."""
  return optax.multi_transform(
      {TRAINABLE: steps.create_optimizer(config, learning_rate_fn), FROZEN: optax.set_to_zero()},
      labels)


def norm_labels(model: nn.Module, image_shape: tuple[int, int, int],
                params: dict[str, Any]) -> dict[str, Any]:
  """`bnjax.tools.norm_params_labels` of `params`, the norm layers found by type in `model`."""
  paths = tools.norm_layer_paths(model, jnp.zeros((2, *image_shape), jnp.float32),
                                 types=NORM_LAYER_TYPES, train=False)
  return tools.norm_params_labels(params, paths, norm_label=FROZEN, other_label=TRAINABLE)


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       image_shape: tuple[int, int, int],
                       learning_rate_fn: Callable[[Any], jax.Array],
                       variables: dict[str, Any]) -> steps.TrainState:
  """A `steps.TrainState` at step 0 holding the loaded `variables`, with the freezing optimizer."""
  labels = norm_labels(model, image_shape, variables["params"])
  return steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                 tx=create_optimizer(config, learning_rate_fn, labels),
                                 batch_stats=variables.get("batch_stats", {}))


def initial_state(config: ml_collections.ConfigDict, model: nn.Module,
                  image_shape: tuple[int, int, int],
                  learning_rate_fn: Callable[[Any], jax.Array]) -> Callable[[], steps.TrainState]:
  """What `parallel.replicate` calls to build the fine-tuning state from ``config.init_from``."""
  abstract = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jnp.zeros((2, *image_shape), jnp.float32))
  expected = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
  variables = load_variables(os.path.join(config.init_from, "checkpoints"), expected)
  return functools.partial(create_train_state, config, model, image_shape, learning_rate_fn,
                           variables)


def train_step(state: steps.TrainState, batch: dict[str, jax.Array],
               axis_name: str | None = None) -> tuple[steps.TrainState, dict[str, jax.Array]]:
  """`steps.train_step` with the norm layers in evaluation mode: their statistics never change."""
  return steps.train_step(state, batch, axis_name=axis_name, freeze_norms=True)

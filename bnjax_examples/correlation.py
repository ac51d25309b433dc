r"""Channel correlations of a trained layer's normalised output: batch norm against whitening.

  python -m bnjax_examples.main --config=configs/whitening.py --workdir=workdir/whitening
  python -m bnjax_examples.correlation --config=configs/whitening.py --workdir=workdir/whitening

The first command trains the CNN once per entry of ``config.compare_norms`` (here batch norm and
whitening), each in ``workdir/<norm>``; the second restores each run's last checkpoint, runs the
test images through it in evaluation mode, takes the output of one normalisation layer (by default
the second, after the second convolution: what the next layer receives) and draws the correlation
matrix of its channels for every run side by side, ``workdir/correlation.png``. Batch norm leaves
the channels correlated; whitening decorrelates them within each group (the diagonal blocks of
size ``config.whitening.group_size``), through its running estimates.
"""

from collections.abc import Mapping, Sequence
import functools
import os
from typing import Any

from flax import linen as nn
import jax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import ml_collections
import numpy as np

import bnjax
import bnjax.linen
from bnjax_examples import checkpointing
from bnjax_examples import config_check
from bnjax_examples import input_pipeline
from bnjax_examples import parallel
from bnjax_examples import steps
from bnjax_examples import train

PLOT_FILE = "correlation.png"
NORM_LAYERS = (bnjax.BatchNorm, bnjax.linen.WhiteningBatchNorm, nn.BatchNorm)


def _norm_outputs(tree: Mapping[str, Any]) -> list[Any]:
  """The captured outputs of the normalisation layers, in the order the model called them."""
  found = []
  for name, value in tree.items():
    if name == "__call__":
      found.append(value[0])
    elif isinstance(value, Mapping):
      found.extend(_norm_outputs(value))
  return found


@functools.partial(jax.jit, static_argnums=0)
def _normalised_outputs(model: nn.Module, variables: Any, images_NHWC: Any) -> list[Any]:
  """Every normalisation layer's output, evaluation mode (compiled once per model and shape)."""
  _, captured = model.apply(
      variables, images_NHWC, train=False, mutable=["intermediates"],
      capture_intermediates=lambda module, method: (method == "__call__"
                                                    and isinstance(module, NORM_LAYERS)))
  return _norm_outputs(captured["intermediates"])


def restore_run(config: ml_collections.ConfigDict, workdir: str,
                dataset: input_pipeline.Dataset) -> tuple[nn.Module, Any]:
  """The model of `config` and the train state of the last checkpoint in `workdir`.

  Raises:
    FileNotFoundError: if `workdir` holds no checkpoint (train it first).
  """
  num_train = len(dataset.train_labels)
  full_epoch_steps = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  steps_per_epoch = (full_epoch_steps if config.steps_per_epoch == -1
                     else min(config.steps_per_epoch, full_epoch_steps))
  mesh = parallel.create_mesh()
  model = steps.create_model(config, dataset.num_classes)
  state = parallel.replicate(functools.partial(
      steps.create_train_state, jax.random.key(config.seed), config, model, dataset.image_shape,
      steps.create_learning_rate_fn(config, steps_per_epoch)), mesh)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            train.run_description(config, steps_per_epoch))
  restored = checkpointer.restore_latest(state)
  checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {os.path.join(workdir, 'checkpoints')}: train first, "
                            "e.g. python -m bnjax_examples.main --config=configs/whitening.py "
                            f"--workdir={os.path.dirname(os.path.abspath(workdir))}")
  return model, restored[0]


def layer_correlation(model: nn.Module, state: Any, images_NHWC: np.ndarray,
                      layer: int) -> np.ndarray:
  """The [C, C] correlation matrix of the channels of normalisation layer `layer`'s output.

  The model runs in evaluation mode (running statistics); the correlations are over every
  position of every image (float64).
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  found = _normalised_outputs(model, variables, images_NHWC)
  if not -len(found) <= layer < len(found):
    raise ValueError(f"`layer` = {layer}, but the model has {len(found)} normalisation layers; "
                     f"use 0 to {len(found) - 1}.")
  y = np.asarray(found[layer], np.float64)
  rows = y.reshape(-1, y.shape[-1])
  return np.nan_to_num(np.corrcoef(rows, rowvar=False))


def mean_abs_correlation(correlation: np.ndarray, group_size: int | None = None) -> float:
  """The mean |correlation| between distinct channels (within groups of `group_size` if given)."""
  channels = len(correlation)
  same = np.ones((channels, channels), bool)
  if group_size:
    group = np.arange(channels) // group_size
    same = group[:, None] == group[None, :]
  off = same & ~np.eye(channels, dtype=bool)
  return float(np.abs(correlation[off]).mean())


def plot_correlations(correlations: Mapping[str, np.ndarray], path: str, group_size: int,
                      title: str = "") -> None:
  """Draws the correlation matrices side by side, with their mean |off-diagonal| values."""
  figure = Figure(figsize=(5 * len(correlations) + 1, 4.8), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, len(correlations), squeeze=False)[0]
  image = None
  for ax, (label, correlation) in zip(axes, correlations.items()):
    image = ax.imshow(correlation, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
    ax.set_title(f"{label}\nmean |corr|: {mean_abs_correlation(correlation):.3f} overall, "
                 f"{mean_abs_correlation(correlation, group_size):.3f} within groups of "
                 f"{group_size}", fontsize=9)
    ax.set_xlabel("channel")
    ax.set_ylabel("channel")
  figure.colorbar(image, ax=list(axes), shrink=0.8, label="correlation")
  if title:
    figure.suptitle(title)
  figure.savefig(path, dpi=100)


def compare_correlations(config: ml_collections.ConfigDict, workdir: str, *, layer: int = 1,
                         max_images: int = 512) -> dict[str, np.ndarray]:
  """Restores every run of ``config.compare_norms`` (or ``config.norm``) under `workdir`, and
  draws the correlations of normalisation layer `layer` on the test images to
  ``workdir/correlation.png``.

  Returns:
    ``{norm: [C, C] correlation matrix}``.
  """
  config_check.validate_config(config)
  norms: Sequence[str] = tuple(config.compare_norms) or (config.norm,)
  dataset = input_pipeline.load_dataset(config.dataset, config.data_dir, seed=config.seed,
                                        test_fraction=config.test_fraction)
  images = dataset.test_images[:max_images]
  correlations = {}
  for norm in norms:
    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
      run_config.norm = norm
      run_config.compare_norms = ()
    run_dir = os.path.join(workdir, norm) if config.compare_norms else workdir
    model, state = restore_run(run_config, run_dir, dataset)
    correlations[norm] = layer_correlation(model, state, images, layer)
  group_size = int(config_check.whitening_options(config).get("group_size", 64))
  plot_correlations({train.NORM_LABELS[n]: c for n, c in correlations.items()},
                    os.path.join(workdir, PLOT_FILE), group_size,
                    title=f"{config.model} on {config.dataset}: channels of normalisation layer "
                          f"{layer}, test images, evaluation mode")
  return correlations


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  options = flags.FLAGS
  try:
    correlations = compare_correlations(options.config, options.workdir, layer=options.layer)
  except (FileNotFoundError, ValueError, checkpointing.CheckpointMismatchError) as e:
    raise SystemExit(f"error: {e}") from e
  group_size = int(config_check.whitening_options(options.config).get("group_size", 64))
  for norm, correlation in correlations.items():
    print(f"{train.NORM_LABELS[norm]}: mean |correlation| between channels "
          f"{mean_abs_correlation(correlation):.3f}, within groups of {group_size} "
          f"{mean_abs_correlation(correlation, group_size):.3f}")
  print(f"Plot: {os.path.abspath(os.path.join(options.workdir, PLOT_FILE))}", flush=True)


if __name__ == "__main__":
  from absl import app as _app
  from absl import flags as _flags
  from ml_collections import config_flags

  _flags.DEFINE_string("workdir", None, "The work directory the runs were trained in.")
  config_flags.DEFINE_config_file("config", None, "The config the runs were trained with.",
                                  lock_config=True)
  _flags.DEFINE_integer("layer", 1, "Which normalisation layer, in the order the model calls "
                        "them (0: after the first convolution).")
  _flags.mark_flags_as_required(["config", "workdir"])
  _app.run(main)

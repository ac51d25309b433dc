"""What a run reports: metrics as JSON lines in the work directory, and a PNG of its curves.

Each line of ``metrics.jsonl`` is one finished epoch::

  {"epoch": 3, "step": 66, "train_loss": 0.21, "train_accuracy": 0.95, "test_loss": 0.12,
   "test_accuracy": 0.97, "learning_rate": 0.09, "norm": "bnjax", "elapsed_s": 4.1}

and, where the run logs drift (``config.log_drift``), ``"drift": {"BatchNorm_0": {"mean_abs_smd":
0.05, "mean_abs_log_var_ratio": 0.2, "skipped_steps": 0}, ...}``: per norm layer, the epoch's mean
over its steps of the batch statistics' drift from the running statistics, and the number of steps
where some channel kept its running statistics (`plot_drift` draws it).

Plots are drawn with matplotlib's object-oriented API on a `Figure` (the Agg canvas), never through
`pyplot`, so no global backend is switched and no window opens.
"""

from collections.abc import Mapping, Sequence
import json
import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
COMPARISON_PLOT_FILE = "comparison.png"
DRIFT_PLOT_FILE = "drift.png"


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file, or an empty list if it does not exist."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_metrics(path: str, record: Mapping[str, Any]) -> None:
  """Appends one record as a line of JSON."""
  with open(path, "a") as f:
    f.write(json.dumps(dict(record)) + "\n")


def truncate_metrics(path: str, last_step: int) -> None:
  """Drops records written after `last_step`: a resumed run writes them again from there."""
  records = read_metrics(path)
  kept = [r for r in records if r["step"] <= last_step]
  if len(kept) != len(records):
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)


def plot_learning_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
                         title: str = "") -> None:
  """Draws train loss and test accuracy per epoch, one line per run, and saves a PNG.

  Args:
    runs: ``{label: records}``, each record a line of ``metrics.jsonl``.
    path: the PNG to write.
    title: the figure's title.
  """
  figure = Figure(figsize=(10, 4), layout="constrained")
  FigureCanvasAgg(figure)
  loss_axes, accuracy_axes = figure.subplots(1, 2)
  for label, records in runs.items():
    epochs = [r["epoch"] for r in records]
    loss_axes.plot(epochs, [r["train_loss"] for r in records], marker=".", label=label)
    accuracy_axes.plot(epochs, [100 * r["test_accuracy"] for r in records], marker=".",
                       label=label)
  loss_axes.set(xlabel="epoch", ylabel="train loss (cross-entropy)", yscale="log",
                title="Training loss")
  accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
  for axes in (loss_axes, accuracy_axes):
    axes.grid(True, alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
  if title:
    figure.suptitle(title)
  figure.savefig(path, dpi=100)


def plot_drift(records: Sequence[Mapping[str, Any]], path: str, title: str = "") -> bool:
  """Draws each norm layer's drift per epoch against the step, and saves a PNG.

  Two panels, one line per layer: the mean ``|standardised mean difference|`` and the mean ``|log
  variance ratio|`` of the batch statistics against the running statistics (the epoch's means of
  `bnjax_examples.steps.drift_metrics`); an epoch in which some channel of a layer kept its
  running statistics (a non-finite batch) is marked with a cross.

  Args:
    records: lines of ``metrics.jsonl``; those without ``drift`` are left out.
    path: the PNG to write.
    title: the figure's title.

  Returns:
    Whether a plot was written (False when no record has drift).
  """
  records = [r for r in records if r.get("drift")]
  if not records:
    return False
  layers = sorted({layer for r in records for layer in r["drift"]})
  figure = Figure(figsize=(10, 4), layout="constrained")
  FigureCanvasAgg(figure)
  panels = figure.subplots(1, 2)
  fields = (("mean_abs_smd", "mean |standardised mean difference|"),
            ("mean_abs_log_var_ratio", "mean |log variance ratio|"))
  for axes, (field, label) in zip(panels, fields, strict=True):
    for layer in layers:
      points = [(r["step"], r["drift"][layer][field], r["drift"][layer].get("skipped_steps", 0))
                for r in records if layer in r["drift"]]
      line, = axes.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=layer)
      skipped = [p for p in points if p[2] > 0]
      if skipped:
        axes.plot([p[0] for p in skipped], [p[1] for p in skipped], "x", markersize=9,
                  color=line.get_color())
    axes.set(xlabel="step", ylabel=label, title=f"{label} (epoch mean)")
    axes.grid(True, alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
  panels[0].legend(title="norm layer (x: a channel skipped)")
  if title:
    figure.suptitle(title)
  figure.savefig(path, dpi=100)
  return True

"""Classification metrics as sums: per batch inside a step, then over an epoch or the test set.

A step returns sums (``loss_sum``, ``correct``, ``count``) rather than means, so sums over devices,
batches and interrupted-then-resumed epochs stay exact; a mean is taken only at the end:

  >>> logits_NK = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
  >>> labels_N = jnp.array([0, 1, 1])
  >>> sums = batch_sums(logits_NK, labels_N, loss_N=jnp.array([0.1, 0.3, 3.0]))
  >>> {name: round(float(value), 4) for name, value in sums.items()}
  {'loss_sum': 3.4, 'correct': 2.0, 'count': 3.0}
  >>> totals = EpochTotals()
  >>> totals.add([sums, sums])
  >>> {name: round(value, 4) for name, value in totals.summary().items()}
  {'train_loss': 1.1333, 'train_accuracy': 0.6667}
"""

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def batch_sums(logits_NK: jax.Array, labels_N: jax.Array, loss_N: jax.Array,
               weight_N: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums of one batch's loss and correct predictions, and its example count (float32 scalars).

  Args:
    logits_NK: float32 [N, K] logits.
    labels_N: int32 [N] class ids.
    loss_N: float32 [N] per-example losses.
    weight_N: float32 [N] example weights, 0 for padding; None counts every example once.

  Returns:
    ``{'loss_sum': Σ w·loss, 'correct': Σ w·[argmax logits = label], 'count': Σ w}``.
  """
  correct_N = (jnp.argmax(logits_NK, axis=-1) == labels_N).astype(jnp.float32)
  if weight_N is None:
    return {"loss_sum": jnp.sum(loss_N), "correct": jnp.sum(correct_N),
            "count": jnp.asarray(loss_N.shape[0], jnp.float32)}
  return {"loss_sum": jnp.sum(loss_N * weight_N), "correct": jnp.sum(correct_N * weight_N),
          "count": jnp.sum(weight_N)}


def eval_summary(batch_metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """Test loss and accuracy from the `batch_sums` of every test batch."""
  totals = jax.tree.map(lambda *values: float(np.sum(values)), *jax.device_get(list(batch_metrics)))
  return {"test_loss": totals["loss_sum"] / totals["count"],
          "test_accuracy": totals["correct"] / totals["count"]}


# Step metrics named ``drift/<layer>/<name>`` (`steps.drift_metrics`) are per-step values, averaged
# over the epoch's steps rather than summed over examples.
DRIFT_PREFIX = "drift/"


class EpochTotals:
  """Running sums of one epoch's training metrics; part of a checkpoint's progress.

  Args:
    loss_sum: Σ loss so far.
    correct: Σ correct predictions so far.
    count: examples so far.
    drift_sums: Σ over the steps so far of each ``drift/<layer>/<name>`` step metric.
    drift_steps: the steps whose drift is in `drift_sums`.
  """

  def __init__(self, loss_sum: float = 0.0, correct: float = 0.0, count: float = 0.0,
               drift_sums: Mapping[str, float] | None = None, drift_steps: int = 0):
    self.loss_sum, self.correct, self.count = loss_sum, correct, count
    self.drift_sums = dict(drift_sums or {})
    self.drift_steps = drift_steps

  @classmethod
  def from_progress(cls, progress: Mapping[str, Any]) -> "EpochTotals":
    """The totals a checkpoint's progress recorded (see `as_progress`)."""
    return cls(progress["epoch_loss_sum"], progress["epoch_correct"], progress["epoch_count"],
               progress.get("epoch_drift_sums"), progress.get("epoch_drift_steps", 0))

  def add(self, step_metrics: Iterable[Mapping[str, Any]]) -> None:
    """Adds the `batch_sums` (and drift) of some steps (fetched from the devices here)."""
    for metrics in jax.device_get(list(step_metrics)):
      self.loss_sum += float(metrics["loss_sum"])
      self.correct += float(metrics["correct"])
      self.count += float(metrics["count"])
      drift = {name: float(value) for name, value in metrics.items()
               if name.startswith(DRIFT_PREFIX)}
      if drift:
        self.drift_steps += 1
        for name, value in drift.items():
          self.drift_sums[name] = self.drift_sums.get(name, 0.0) + value

  def summary(self) -> dict[str, Any]:
    """Mean training loss and accuracy so far (0 before any step), and the drift if logged.

    ``drift`` (only when steps logged it) is ``{layer: {'mean_abs_smd', 'mean_abs_log_var_ratio':
    means over the steps, 'skipped_steps': steps where some channel kept its running statistics}}``.
    """
    count = max(self.count, 1.0)
    summary: dict[str, Any] = {"train_loss": self.loss_sum / count,
                               "train_accuracy": self.correct / count}
    if self.drift_steps:
      drift: dict[str, dict[str, Any]] = {}
      for name, total in sorted(self.drift_sums.items()):
        layer, _, field = name[len(DRIFT_PREFIX):].rpartition("/")
        if field == "skipped":
          drift.setdefault(layer, {})["skipped_steps"] = round(total)
        else:
          drift.setdefault(layer, {})[field] = total / self.drift_steps
      summary["drift"] = drift
    return summary

  def as_progress(self) -> dict[str, Any]:
    """The totals as a checkpoint's progress stores them."""
    return {"epoch_loss_sum": self.loss_sum, "epoch_correct": self.correct,
            "epoch_count": self.count, "epoch_drift_sums": dict(self.drift_sums),
            "epoch_drift_steps": self.drift_steps}

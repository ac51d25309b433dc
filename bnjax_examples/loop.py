"""The training loop: steps, progress bar, an evaluation and a metrics line per epoch, checkpoints.

`run` knows no model, dataset or mesh: it calls the step and the evaluation it is given, so every
way of building them (`bnjax_examples.train` for the linen models) shares the loop's bookkeeping:
where an epoch ends, when metrics are fetched from the devices, what a checkpoint's progress holds
(so a resumed run continues bit for bit), and the checkpoint written on Ctrl-C.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import time
from typing import Any

from absl import logging
import jax
import tqdm

from bnjax_examples import checkpointing
from bnjax_examples import metrics
from bnjax_examples import reporting


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How a run's steps divide into epochs, and how often it reports and checkpoints.

  Attributes:
    steps_per_epoch: steps between evaluations.
    num_epochs: epochs of the whole run.
    stop_step: the loop stops here (checkpointing first); `num_steps` unless the run is cut short.
    log_every_steps: how often the step metrics are fetched for the progress bar.
    checkpoint_every_epochs: a checkpoint after every this many epochs; 0: only at the end.
  """

  steps_per_epoch: int
  num_epochs: int
  stop_step: int
  log_every_steps: int
  checkpoint_every_epochs: int

  @property
  def num_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch


def run(state: Any, *, start_step: int, schedule: Schedule,
        train_fn: Callable[[Any, Any], tuple[Any, Mapping[str, jax.Array]]],
        batches: Iterator[Any], evaluate_fn: Callable[[Any], Mapping[str, float]],
        epoch_fields: Callable[[int], Mapping[str, Any]],
        checkpointer: checkpointing.Checkpointer, totals: metrics.EpochTotals,
        metrics_path: str, progress_bar: bool) -> Any:
  """Trains from `start_step` to ``schedule.stop_step``, evaluating after every epoch.

  After each finished epoch process 0 appends ``{'epoch', 'step', 'train_loss', 'train_accuracy',
  **evaluate_fn(state), **epoch_fields(step), 'elapsed_s'}`` to `metrics_path`. Checkpoints are
  saved every ``schedule.checkpoint_every_epochs`` epochs, at the last step, and where the loop
  stops; `checkpointer` is closed when the loop returns. On Ctrl-C a single process saves a
  checkpoint at the last finished step before re-raising (with several processes it does not:
  saving is collective and the other processes may not be there to join). Resuming from it gives
  the metrics lines and the state of a run never stopped, wherever the Ctrl-C came (during a step,
  between steps, or while the evaluation that ends an epoch ran).

  Args:
    state: the train state at `start_step` (the state passed to `train_fn` may be donated).
    start_step: the step the state has made (0, or the restored checkpoint's).
    schedule: epochs and reporting.
    train_fn: ``(state, batch) -> (state, metrics.batch_sums)``.
    batches: the training batches from `start_step` on, as `train_fn` takes them.
    evaluate_fn: ``state -> {'test_loss', 'test_accuracy'}``.
    epoch_fields: further fields of the record of the epoch that ends at a given step.
    checkpointer: saves the state and the progress (data position and `totals`).
    totals: the sums of the current epoch so far (restored with a checkpoint taken mid-epoch).
    metrics_path: the JSON-lines file of `reporting`.
    progress_bar: show a tqdm bar per epoch (on process 0).

  Returns:
    The state at the step where the loop stopped.
  """
  steps_per_epoch = schedule.steps_per_epoch
  is_chief = jax.process_index() == 0

  def progress_at(step: int) -> dict[str, Any]:
    return {"step": step, "epoch": step // steps_per_epoch,
            "batch_in_epoch": step % steps_per_epoch, **totals.as_progress()}

  def epoch_record(state: Any, step: int) -> dict[str, Any]:
    """The metrics line of the epoch that ends at `step` (evaluates `state`)."""
    return {"epoch": step // steps_per_epoch, "step": step, **totals.summary(),
            **evaluate_fn(state), **epoch_fields(step),
            "elapsed_s": round(time.time() - started, 3)}

  started = time.time()
  step = start_step
  pending = []  # Metrics of steps not yet added to the epoch's totals.
  try:
    if step % steps_per_epoch == 0 and totals.count:
      # Ctrl-C came after an epoch's last step, before its line was written (while evaluating):
      # the checkpoint holds that epoch's totals. Write the line now, unless a resumed run already
      # did before being stopped again (the evaluation runs either way: all processes take part).
      record = epoch_record(state, step)
      if is_chief and all(r["step"] != step for r in reporting.read_metrics(metrics_path)):
        reporting.append_metrics(metrics_path, record)
      totals = metrics.EpochTotals()
    while step < schedule.stop_step:
      epoch = step // steps_per_epoch
      epoch_end = min((epoch + 1) * steps_per_epoch, schedule.stop_step)
      with tqdm.tqdm(total=steps_per_epoch, initial=step % steps_per_epoch, unit="step",
                     desc=f"epoch {epoch + 1}/{schedule.num_epochs}",
                     disable=not (progress_bar and is_chief)) as bar:
        while step < epoch_end:
          batch = next(batches)
          # train_fn may donate `state`: a Ctrl-C between the call and the bookkeeping would lose
          # the state that a checkpoint needs, or the step's metrics.
          with checkpointing.hold_back_ctrl_c():
            state, step_metrics = train_fn(state, batch)
            pending.append(step_metrics)
          step += 1
          if len(pending) == schedule.log_every_steps or step == epoch_end:
            with checkpointing.hold_back_ctrl_c():  # Each step's metrics in exactly one place.
              totals.add(pending)
              num_fetched, pending = len(pending), []
            bar.update(num_fetched)
            summary = totals.summary()
            bar.set_postfix(loss=f"{summary['train_loss']:.4f}",
                            acc=f"{summary['train_accuracy']:.2%}")
        if step % steps_per_epoch:
          break  # Stopped inside an epoch (schedule.stop_step); checkpointed below.
        record = epoch_record(state, step)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", acc=f"{record['train_accuracy']:.2%}",
                        test_acc=f"{record['test_accuracy']:.2%}")
      if is_chief:
        reporting.append_metrics(metrics_path, record)
      totals = metrics.EpochTotals()
      every = schedule.checkpoint_every_epochs
      if step == schedule.num_steps or (every and (epoch + 1) % every == 0):
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
  return state

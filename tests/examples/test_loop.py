"""Tests for bnjax_examples/loop.py with a stand-in step (no model to compile): metrics lines,
checkpoints, and the checkpoint Ctrl-C leaves, from which a rerun continues as if never stopped."""

import itertools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax_examples import checkpointing
from bnjax_examples import loop
from bnjax_examples import metrics
from bnjax_examples import reporting
from bnjax_examples import steps

SCHEDULE = loop.Schedule(steps_per_epoch=4, num_epochs=3, stop_step=12, log_every_steps=3,
                         checkpoint_every_epochs=1)
RUN = {"data": {"seed": 0}, "model": {"name": "stand-in"}}


def initial_state() -> steps.TrainState:
  """A state with one parameter vector; every leaf an array, as `parallel.replicate` makes it."""
  return jax.device_put(steps.TrainState.create(
      apply_fn=None, params={"w": jnp.zeros((2,), jnp.float32)}, tx=optax.sgd(0.5, momentum=0.9),
      batch_stats={}))


def stand_in_update(state, batch):
  """Moves ``w`` by the batch; the metrics differ from step to step, as real ones do."""
  new_state = state.apply_gradients(grads={"w": batch["x"]})
  step_metrics = {"loss_sum": jnp.sum(batch["x"]), "correct": batch["x"][0],
                  "count": jnp.asarray(2.0, jnp.float32)}
  return new_state, step_metrics


stand_in_step = jax.jit(stand_in_update)
donating_step = jax.jit(stand_in_update, donate_argnums=0)  # As the example's step does.


def donating_step_pressing_ctrl_c_at(step: int):
  """A step that donates the state, and sends this process Ctrl-C inside the call of `step`."""

  def train_fn(state, batch):
    new_state, step_metrics = donating_step(state, batch)
    if int(new_state.step) == step:
      os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt right here.
    return new_state, step_metrics

  return train_fn


def batches_from(start_step: int, interrupt_at: int | None = None):
  """The batch of step s is x = [s, 2s] / 10; asking for step `interrupt_at` raises Ctrl-C."""
  for step in itertools.count(start_step):
    if step == interrupt_at:
      raise KeyboardInterrupt
    yield {"x": np.asarray([step, 2 * step], np.float32) / 10}


def evaluate(state, interrupt_at: int | None = None) -> dict[str, float]:
  """Stand-in test metrics; Ctrl-C if the state has made `interrupt_at` steps."""
  if int(state.step) == interrupt_at:
    raise KeyboardInterrupt
  return {"test_loss": float(jnp.sum(state.params["w"])), "test_accuracy": 0.5}


def run_loop(workdir, *, interrupt_at: int | None = None,
             interrupt_evaluation_at: int | None = None,
             train_fn=stand_in_step) -> steps.TrainState:
  """Restores the newest checkpoint in `workdir` if any, then runs the loop to the end."""
  state, totals = initial_state(), metrics.EpochTotals()
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), RUN)
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, progress = restored
    totals = metrics.EpochTotals.from_progress(progress)
  start_step = int(state.step)
  return loop.run(
      state, start_step=start_step, schedule=SCHEDULE, train_fn=train_fn,
      batches=batches_from(start_step, interrupt_at),
      evaluate_fn=lambda state: evaluate(state, interrupt_evaluation_at),
      epoch_fields=lambda step: {"learning_rate": 0.1 * step}, checkpointer=checkpointer,
      totals=totals, metrics_path=str(workdir / reporting.METRICS_FILE), progress_bar=False)


def records_without_timing(workdir) -> list[dict]:
  return [{k: v for k, v in record.items() if k != "elapsed_s"}
          for record in reporting.read_metrics(str(workdir / reporting.METRICS_FILE))]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, run_loop(workdir)


def test_one_metrics_line_per_epoch_with_the_epoch_means(straight_run):
  workdir, state = straight_run
  records = records_without_timing(workdir)
  assert [(r["epoch"], r["step"]) for r in records] == [(1, 4), (2, 8), (3, 12)]
  steps_of_epoch_2 = np.arange(4, 8, dtype=np.float64) / 10
  assert records[1]["train_loss"] == pytest.approx(np.sum(3 * steps_of_epoch_2) / 8, rel=1e-6)
  assert records[1]["train_accuracy"] == pytest.approx(np.sum(steps_of_epoch_2) / 8, rel=1e-6)
  assert records[2]["learning_rate"] == pytest.approx(1.2)
  assert int(state.step) == 12


def test_checkpoints_after_epochs_and_at_the_end(straight_run):
  workdir, _ = straight_run
  assert checkpointing.latest_checkpoint(str(workdir / "checkpoints")) == str(
      workdir / "checkpoints" / "12")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      "12", "8"]  # Checkpointer keeps the newest 2.


def test_no_checkpoint_is_none_and_the_lookup_creates_nothing(tmp_path):
  assert checkpointing.latest_checkpoint(str(tmp_path / "checkpoints")) is None
  assert not (tmp_path / "checkpoints").exists()


def test_ctrl_c_saves_a_checkpoint_from_which_the_run_continues_exactly(straight_run, tmp_path):
  straight_workdir, straight_state = straight_run
  with pytest.raises(KeyboardInterrupt):
    run_loop(tmp_path, interrupt_at=6)  # Steps 0-5 done: inside epoch 2, 2 steps not yet fetched.
  assert checkpointing.latest_checkpoint(str(tmp_path / "checkpoints")) == str(
      tmp_path / "checkpoints" / "6")

  resumed = run_loop(tmp_path)
  assert records_without_timing(tmp_path) == records_without_timing(straight_workdir)
  np.testing.assert_array_equal(resumed.params["w"], straight_state.params["w"])
  np.testing.assert_array_equal(jax.tree.leaves(resumed.opt_state),
                                jax.tree.leaves(straight_state.opt_state))


def test_ctrl_c_during_the_evaluation_that_ends_an_epoch_loses_no_metrics_line(straight_run,
                                                                               tmp_path):
  straight_workdir, _ = straight_run
  with pytest.raises(KeyboardInterrupt):  # Epoch 2's steps are done, its line is not written.
    run_loop(tmp_path, interrupt_evaluation_at=8)
  assert checkpointing.latest_checkpoint(str(tmp_path / "checkpoints")) == str(
      tmp_path / "checkpoints" / "8")
  assert [r["epoch"] for r in records_without_timing(tmp_path)] == [1]
  with pytest.raises(KeyboardInterrupt):  # Resumed, then stopped again before any step.
    run_loop(tmp_path, interrupt_at=8)
  run_loop(tmp_path)
  assert records_without_timing(tmp_path) == records_without_timing(straight_workdir)


@pytest.fixture
def ctrl_c_raises_keyboard_interrupt():
  """Python's own SIGINT handler, whatever the test runner installed."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_step_that_donates_the_state_still_saves_it(
    straight_run, tmp_path, ctrl_c_raises_keyboard_interrupt):
  straight_workdir, _ = straight_run
  with pytest.raises(KeyboardInterrupt):
    run_loop(tmp_path, train_fn=donating_step_pressing_ctrl_c_at(7))
  assert checkpointing.latest_checkpoint(str(tmp_path / "checkpoints")) == str(
      tmp_path / "checkpoints" / "7")
  run_loop(tmp_path)
  assert records_without_timing(tmp_path) == records_without_timing(straight_workdir)


def test_ctrl_c_while_fetching_step_metrics_loses_none(straight_run, tmp_path, monkeypatch,
                                                        ctrl_c_raises_keyboard_interrupt):
  straight_workdir, _ = straight_run
  add = metrics.EpochTotals.add
  calls = []

  def add_pressing_ctrl_c(totals, step_metrics):
    calls.append(len(step_metrics))
    if len(calls) == 3:  # Steps 5-7 (log_every_steps=3), waiting for their metrics.
      os.kill(os.getpid(), signal.SIGINT)
    add(totals, step_metrics)

  monkeypatch.setattr(metrics.EpochTotals, "add", add_pressing_ctrl_c)
  with pytest.raises(KeyboardInterrupt):
    run_loop(tmp_path)
  monkeypatch.undo()
  assert calls[:3] == [3, 1, 3]
  assert checkpointing.latest_checkpoint(str(tmp_path / "checkpoints")) == str(
      tmp_path / "checkpoints" / "7")
  run_loop(tmp_path)
  assert records_without_timing(tmp_path) == records_without_timing(straight_workdir)

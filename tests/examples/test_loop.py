"""Tests for bnjax_examples/loop.py with a stand-in step (no model to compile): metrics lines,
checkpoints, and the checkpoint Ctrl-C leaves, from which a rerun continues as if never stopped."""

import itertools

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


@jax.jit
def stand_in_step(state, batch):
  """Moves ``w`` by the batch; the metrics differ from step to step, as real ones do."""
  new_state = state.apply_gradients(grads={"w": batch["x"]})
  step_metrics = {"loss_sum": jnp.sum(batch["x"]), "correct": batch["x"][0],
                  "count": jnp.asarray(2.0, jnp.float32)}
  return new_state, step_metrics


def batches_from(start_step: int, interrupt_at: int | None = None):
  """The batch of step s is x = [s, 2s] / 10; asking for step `interrupt_at` raises Ctrl-C."""
  for step in itertools.count(start_step):
    if step == interrupt_at:
      raise KeyboardInterrupt
    yield {"x": np.asarray([step, 2 * step], np.float32) / 10}


def run_loop(workdir, *, interrupt_at: int | None = None) -> steps.TrainState:
  """Restores the newest checkpoint in `workdir` if any, then runs the loop to the end."""
  state, totals = initial_state(), metrics.EpochTotals()
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), RUN)
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, progress = restored
    totals = metrics.EpochTotals.from_progress(progress)
  start_step = int(state.step)
  return loop.run(
      state, start_step=start_step, schedule=SCHEDULE, train_fn=stand_in_step,
      batches=batches_from(start_step, interrupt_at),
      evaluate_fn=lambda state: {"test_loss": float(jnp.sum(state.params["w"])),
                                 "test_accuracy": 0.5},
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

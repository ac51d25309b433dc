"""Tests for bnjax_examples/checkpointing.py beyond the training runs of test_train.py: a Ctrl-C
that lands inside a save waits for the save to finish."""

import os
import signal

import jax
import jax.numpy as jnp
import optax
import pytest

from bnjax_examples import checkpointing
from bnjax_examples import steps


@pytest.fixture
def ctrl_c_raises_keyboard_interrupt():
  """Python's own SIGINT handler, whatever the test runner installed."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_save_raises_after_the_save(tmp_path, ctrl_c_raises_keyboard_interrupt):
  state = jax.device_put(steps.TrainState.create(
      apply_fn=None, params={"w": jnp.ones((3,), jnp.float32)}, tx=optax.sgd(0.1),
      batch_stats={}))
  checkpointer = checkpointing.Checkpointer(str(tmp_path), {"data": {}, "model": {}})
  save = checkpointer._manager.save

  def save_pressing_ctrl_c(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt here, unless held back.
    return save(*args, **kwargs)

  checkpointer._manager.save = save_pressing_ctrl_c
  with pytest.raises(KeyboardInterrupt):
    checkpointer.save(state, {"step": 0})
  checkpointer.close()
  assert checkpointing.latest_checkpoint(str(tmp_path)) == str(tmp_path / "0")
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

"""Checkpoints with orbax-checkpoint: the train state, plus the run's progress as JSON.

A checkpoint holds two items:

* ``state``: ``params``, ``batch_stats``, ``opt_state`` and ``step``, as arrays;
* ``progress``: JSON with the data position (``epoch``, ``batch_in_epoch``), the running sums of the
  current epoch's training metrics, and what the data stream, the steps and the model depend on
  (dataset, seed, batch size; dropout, Batch Renormalization, gradient accumulation; model fields),
  so a resumed run continues exactly where it stopped.

Restoring first compares the stored variables with the model's by name and shape, and refuses with
a `CheckpointMismatchError` that lists the differences: a checkpoint is never partly loaded.
`latest_checkpoint` finds the newest checkpoint of a directory with the same orbax lookup.
"""

from collections.abc import Iterator
import contextlib
import json
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint in the work directory was written by a different model or data stream."""


def _state_tree(state: Any) -> dict[str, Any]:
  """The arrays of a `TrainState` that a checkpoint stores."""
  return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
          "step": state.step}


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{'params/Conv_0/kernel': (3, 3, 1, 32), ...}`` for the leaves of a tree of nested dicts."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


def _step_path(directory: str, step: int) -> str:
  """Where orbax's default step naming puts the checkpoint of `step`."""
  return os.path.join(directory, str(step))


def describe_mismatch(stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                      limit: int = 8) -> list[str]:
  """One line per variable whose presence or shape differs between a checkpoint and the model."""
  lines = []
  for name in sorted(set(stored) | set(expected)):
    if name not in stored:
      lines.append(f"{name}: in the model {expected[name]}, not in the checkpoint")
    elif name not in expected:
      lines.append(f"{name}: in the checkpoint {stored[name]}, not in the model")
    elif stored[name] != expected[name]:
      lines.append(f"{name}: checkpoint {stored[name]}, model {expected[name]}")
  if len(lines) > limit:
    lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
  return lines


@contextlib.contextmanager
def hold_back_ctrl_c() -> Iterator[None]:
  """Delays Ctrl-C (SIGINT) until the block has run, then raises `KeyboardInterrupt`.

  For what must not be cut in half if a checkpoint is to be saved on Ctrl-C: orbax's save and close
  (interrupted, its background writers are left half set up and the process hangs or fails), and a
  step that donates the train state (interrupted after the call and before the assignment, the
  state is gone). Only the main thread receives signals, and only Python's default handler raises
  `KeyboardInterrupt`; otherwise the block runs as it is.
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    raise KeyboardInterrupt


class Checkpointer:
  """Saves and restores the train state and progress in ``directory``, keeping the newest few.

  Args:
    directory: where the checkpoints go, one subdirectory per step.
    run: ``{'data': {...}, 'model': {...}}`` and optionally ``'training': {...}``, stored with
      every checkpoint. ``data`` is what the data stream depends on (dataset, seed, batch size,
      steps per epoch) and ``training`` what the steps depend on beyond the variables (e.g.
      dropout, Batch Renormalization, gradient accumulation): resuming with other values would
      not continue the run, so both must match. ``model`` describes the model in error messages;
      the variables themselves are compared by name and shape.
    max_to_keep: older checkpoints are deleted.
  """

  def __init__(self, directory: str, run: dict[str, Any], max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.run = json.loads(json.dumps(run))  # As JSON will give it back: tuples become lists.
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The step of the newest checkpoint, or None if there is none."""
    return self._manager.latest_step()

  def path(self, step: int) -> str:
    """The directory of the checkpoint of `step`."""
    return _step_path(self.directory, step)

  def save(self, state: Any, progress: dict[str, Any]) -> None:
    """Starts saving `state` and `progress` at ``state.step`` (asynchronously; see `close`).

    Every process must call it: in a multi-process run each writes its part of the arrays. A
    Ctrl-C during the call takes effect when it returns, so a save is never cut in half.
    """
    with hold_back_ctrl_c():
      self._manager.wait_until_finished()  # A save of this step may still be in flight.
      step = int(jax.device_get(state.step))
      if step in self._manager.all_steps():
        return
      progress = dict(progress, run=self.run)
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_state_tree(state)), progress=ocp.args.JsonSave(progress)))

  def restore_latest(self, state: Any) -> tuple[Any, dict] | None:
    """Restores the newest checkpoint into the structure, shapes and shardings of `state`.

    Args:
      state: a freshly created `TrainState`; its arrays give the expected names, shapes, dtypes and
        shardings, and its static fields (model, optimizer) are kept.

    Returns:
      ``(state, progress)`` of the newest checkpoint, or None if there is none.

    Raises:
      CheckpointMismatchError: if the checkpoint's variables differ from the model's in name or
        shape, or its ``run['data']`` or ``run['training']`` differs from this run's. Nothing is
        loaded then.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    where = self.path(step)
    progress = self._manager.restore(
        step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))["progress"]
    stored_run = progress.get("run", {})
    stored_variables = self._manager.item_metadata(step)["state"]
    stored_variables = getattr(stored_variables, "tree", stored_variables)
    expected = _state_tree(state)
    differences = describe_mismatch(
        _shapes_by_name({k: stored_variables.get(k, {}) for k in ("params", "batch_stats")}),
        _shapes_by_name({k: expected[k] for k in ("params", "batch_stats")}))
    fix = (f"Nothing was loaded. Train in a new --workdir, delete {self.directory} to start over, "
           "or go back to the config the checkpoint was written with.")
    if differences:
      raise CheckpointMismatchError(
          f"The checkpoint {where} was written by a different model and cannot be restored into "
          f"this one.\n  Checkpoint's model: {stored_run.get('model')}\n  This model: "
          f"{self.run['model']}\n  "
          + "\n  ".join(differences) + f"\n{fix}")
    # Every section but `model` must match; a section the checkpoint did not record (written
    # before the section existed) is not compared.
    changed = {}
    for section, fields in self.run.items():
      if section == "model" or (section != "data" and section not in stored_run):
        continue
      stored = stored_run.get(section, {})
      changed.update({k: (stored.get(k), v) for k, v in fields.items() if stored.get(k) != v})
    if changed:
      raise CheckpointMismatchError(
          f"The checkpoint {where} was written for a different run, so resuming would not continue "
          "it: " + "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
          + f".\n{fix}")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), expected)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"The checkpoint {where} has the model's variables but a different optimizer state "
          f"(did the optimizer settings change?): {e}\n{fix}") from e
    state = state.replace(params=restored["params"], batch_stats=restored["batch_stats"],
                          opt_state=restored["opt_state"], step=restored["step"])
    return state, progress

  def close(self) -> None:
    """Waits for pending saves to finish and releases the manager (Ctrl-C held back meanwhile)."""
    with hold_back_ctrl_c():
      self._manager.wait_until_finished()
      self._manager.close()


def latest_checkpoint(directory: str) -> str | None:
  """The directory of the newest checkpoint in `directory`, or None if there is none.

  The step comes from orbax's `CheckpointManager.latest_step`, the lookup `Checkpointer` restores
  with. The manager is opened without creating or deleting anything, and for this process alone:
  any one process of a multi-process run may call this (process 0 does to report), so it must not
  wait at orbax's barriers for the others.
  """
  directory = os.path.abspath(directory)
  this_process = jax.process_index()
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, save_root_metadata=False,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=this_process, active_processes={this_process})))
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  return None if step is None else _step_path(directory, step)

"""Tests for the training library: a smoke run of the default config on the bundled digits, exact
resumption, checkpoints of another model, data parallelism and the comparison mode.

Every run here uses all 8 simulated devices of the suite (set in the root conftest.py), so the
batch-norm statistics and the gradients are combined across devices throughout.
"""

import functools
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from bnjax_examples import checkpointing
from bnjax_examples import input_pipeline
from bnjax_examples import models
from bnjax_examples import parallel
from bnjax_examples import reporting
from bnjax_examples import steps
from bnjax_examples import train
from configs import cifar10 as cifar10_config
from configs import compare as compare_config
from configs import default as default_config


def smoke_config():
  config = default_config.get_config("smoke")
  config.progress_bar = False
  return config


def variables_of(state) -> dict[str, np.ndarray]:
  """``{'params/Conv_0/kernel': array, 'batch_stats/...': array}`` on the host."""
  tree = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in leaves}


def records_without_timing(workdir: pathlib.Path) -> list[dict]:
  return [{k: v for k, v in r.items() if k != "elapsed_s"}
          for r in reporting.read_metrics(str(workdir / reporting.METRICS_FILE))]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One uninterrupted smoke run of the default config: 3 epochs of 4 steps on 8 devices."""
  workdir = tmp_path_factory.mktemp("smoke")
  state = train.train_and_evaluate(smoke_config(), str(workdir))
  return workdir, state


def test_smoke_run_reduces_the_training_loss(smoke_run):
  workdir, _ = smoke_run
  records = reporting.read_metrics(str(workdir / reporting.METRICS_FILE))
  assert [r["epoch"] for r in records] == [1, 2, 3]
  assert records[-1]["train_loss"] < 0.75 * records[0]["train_loss"]


def test_smoke_run_beats_chance_on_the_test_set(smoke_run):
  workdir, _ = smoke_run
  records = reporting.read_metrics(str(workdir / reporting.METRICS_FILE))
  assert records[-1]["test_accuracy"] > 0.3  # Ten classes: chance is 0.1.


def test_smoke_run_writes_plot_and_final_checkpoint(smoke_run):
  workdir, state = smoke_run
  assert (workdir / reporting.PLOT_FILE).read_bytes().startswith(b"\x89PNG")
  assert (workdir / reporting.DRIFT_PLOT_FILE).read_bytes().startswith(b"\x89PNG")
  assert int(jax.device_get(state.step)) == 12
  assert train.latest_checkpoint(str(workdir)) == str(workdir / "checkpoints" / "12")


def test_running_statistics_are_replicated_across_devices(smoke_run):
  _, state = smoke_run
  running_mean = state.batch_stats["BatchNorm_0"]["mean"]
  assert len(running_mean.sharding.device_set) == jax.device_count() == 8
  copies = [np.asarray(shard.data) for shard in running_mean.addressable_shards]
  for copy in copies[1:]:
    np.testing.assert_array_equal(copy, copies[0])


def test_resume_continues_exactly_where_it_stopped(smoke_run, tmp_path):
  straight_workdir, straight_state = smoke_run
  config = smoke_config()
  config.stop_at_step = 6  # Half-way, inside the second epoch.
  stopped = train.train_and_evaluate(config, str(tmp_path))
  assert int(jax.device_get(stopped.step)) == 6
  assert train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "6")
  resumed = train.train_and_evaluate(smoke_config(), str(tmp_path))
  expected, actual = variables_of(straight_state), variables_of(resumed)
  assert expected.keys() == actual.keys()
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
  assert records_without_timing(tmp_path) == records_without_timing(straight_workdir)


def test_checkpoint_of_another_model_shape_is_refused(smoke_run, tmp_path):
  workdir, _ = smoke_run
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  config = smoke_config()
  config.cnn.features = (4, 16)
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert "params/Conv_0/kernel: checkpoint (3, 3, 1, 8), model (3, 3, 1, 4)" in message
  assert "Nothing was loaded" in message and str(tmp_path / "checkpoints") in message
  assert not (tmp_path / reporting.METRICS_FILE).exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seed", 1, "seed was 0, now 1"),
    # What the steps compute, beyond the variables' shapes.
    ("dropout_rate", 0.5, "dropout_rate was 0.0, now 0.5"),
    ("batch_renorm", True, "batch_renorm was False, now True"),
    ("grad_accum_steps", 2, "grad_accum_steps was 1, now 2"),
])
def test_checkpoint_of_another_data_stream_is_refused(smoke_run, tmp_path, field, value, message):
  workdir, _ = smoke_run
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  config = smoke_config()
  config[field] = value
  with pytest.raises(checkpointing.CheckpointMismatchError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


def test_one_device_and_four_devices_give_the_same_training_steps():
  config = smoke_config()
  dataset = input_pipeline.load_dataset("digits")
  model = steps.create_model(config, dataset.num_classes, axis_name=parallel.AXIS)
  learning_rate_fn = steps.create_learning_rate_fn(config, steps_per_epoch=4)
  create_state = functools.partial(steps.create_train_state, jax.random.key(0), config, model,
                                   dataset.image_shape, learning_rate_fn)
  initial, final = {}, {}
  for num_devices in (1, 4):
    mesh = parallel.create_mesh(jax.devices()[:num_devices])
    state = parallel.replicate(create_state, mesh)
    initial[num_devices] = variables_of(state)
    step_fn = train.parallel_train_step(mesh, fast_compile=config.fast_compile)
    batches = input_pipeline.train_batches(dataset, global_batch_size=config.batch_size, seed=0)
    for _ in range(3):
      state, _ = step_fn(state, parallel.shard_batch(next(batches), mesh, config.batch_size))
    final[num_devices] = variables_of(state)
  for name, expected in final[1].items():
    np.testing.assert_array_equal(initial[4][name], initial[1][name], err_msg=name)
    assert not np.allclose(expected, initial[1][name]), f"{name} did not change in training"
    np.testing.assert_allclose(final[4][name], expected, rtol=2e-5, atol=2e-6, err_msg=name)


def test_comparison_mode_trains_each_norm_and_plots_them_together(tmp_path):
  config = compare_config.get_config("smoke")
  config.progress_bar = False
  config.num_epochs = 1
  config.steps_per_epoch = 2
  config.compare_norms = ("bnjax", "group", "none")
  states = train.compare_norms(config, str(tmp_path))
  assert set(states) == {"bnjax", "group", "none"}
  assert states["none"].batch_stats == {}
  assert states["group"].batch_stats == {}  # group norm keeps no running statistics.
  for norm in ("bnjax", "group", "none"):
    (record,) = reporting.read_metrics(str(tmp_path / norm / reporting.METRICS_FILE))
    assert record["norm"] == norm and record["step"] == 2
  assert (tmp_path / reporting.COMPARISON_PLOT_FILE).read_bytes().startswith(b"\x89PNG")


def test_cifar10_resnet_config_trains_on_binary_files(tmp_path):
  rng = np.random.default_rng(0)
  for name in input_pipeline.CIFAR10_TRAIN_FILES + (input_pipeline.CIFAR10_TEST_FILE,):
    records = rng.integers(0, 256, (16, 1 + 3 * 32 * 32), dtype=np.uint8)
    records[:, 0] %= 10  # The label byte.
    (tmp_path / name).write_bytes(records.tobytes())
  config = cifar10_config.get_config("smoke")
  config.data_dir = str(tmp_path)
  config.progress_bar = False
  config.num_epochs = 1
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(jax.device_get(state.step)) == 2  # 80 training images in batches of 32.
  assert "ResidualBlock_0" in state.batch_stats
  (record,) = reporting.read_metrics(str(tmp_path / "run" / reporting.METRICS_FILE))
  assert np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])


def test_metrics_lines_are_json_with_loss_and_accuracy(smoke_run):
  workdir, _ = smoke_run
  lines = (workdir / reporting.METRICS_FILE).read_text().splitlines()
  record = json.loads(lines[-1])
  assert {"epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
          "learning_rate", "norm"} <= set(record)
  # Drift is logged by default: per norm layer, the epoch's means and its skipped steps.
  assert sorted(record["drift"]) == ["BatchNorm_0", "BatchNorm_1", "BatchNorm_2"]
  assert set(record["drift"]["BatchNorm_0"]) == {"mean_abs_smd", "mean_abs_log_var_ratio",
                                                 "skipped_steps"}


def test_norm_factory_of_the_config_reaches_the_model():
  config = smoke_config()
  config.norm = "flax"
  model = steps.create_model(config, num_classes=10, axis_name=parallel.AXIS)
  assert model.norm.func is models.nn.BatchNorm
  assert model.norm.keywords["axis_name"] == parallel.AXIS
  config.norm = "layer"  # per-example statistics: no collective, whatever the axis.
  model = steps.create_model(config, num_classes=10, axis_name=parallel.AXIS)
  assert model.norm.func is models.PerExampleNorm
  assert model.norm.keywords == {"kind": "layer", "epsilon": config.batch_norm_epsilon}

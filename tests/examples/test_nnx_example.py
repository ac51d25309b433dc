"""The example's NNX path (``config.api='nnx'``).

The NNX CNN with `bnjax.nnx.BatchNorm` takes the same steps as the linen CNN from the same weights,
trains through the shared loop on 8 devices, checkpoints and resumes exactly, and its config limits
fail before anything runs.
"""

import doctest
import functools

from flax import nnx
import jax
import numpy as np
import pytest

from bnjax_examples import config_check
from bnjax_examples import nnx_models
from bnjax_examples import nnx_steps
from bnjax_examples import parallel
from bnjax_examples import reporting
from bnjax_examples import steps
from bnjax_examples import train
from configs import default as default_config

IMAGE_SHAPE = (8, 8, 1)
NUM_STEPS = 3


def nnx_smoke_config():
  config = default_config.get_config("smoke")
  config.api = "nnx"
  config.progress_bar = False
  config.num_epochs = 2
  config.steps_per_epoch = 2
  return config


def random_batches(count: int, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  return [{"image": rng.normal(size=(batch_size, *IMAGE_SHAPE)).astype(np.float32),
           "label": rng.integers(0, 10, size=batch_size).astype(np.int32)} for _ in range(count)]


def host_tree(tree) -> dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def linen_and_nnx_states(config):
  """The linen train state, and the NNX one holding the same initial weights."""
  learning_rate_fn = steps.create_learning_rate_fn(config, steps_per_epoch=4)
  model = steps.create_model(config, num_classes=10)
  linen_state = steps.create_train_state(jax.random.key(0), config, model, IMAGE_SHAPE,
                                         learning_rate_fn)
  nnx_state = nnx_steps.create_train_state(jax.random.key(1), config, 10, IMAGE_SHAPE,
                                           learning_rate_fn)
  nnx_model, optimizer = nnx_state.objects()
  nnx_models.load_linen_variables(
      nnx_model, {"params": linen_state.params, "batch_stats": linen_state.batch_stats})
  return linen_state, nnx_steps.TrainState.from_objects(nnx_model, optimizer, nnx_state.step)


def test_nnx_steps_equal_linen_steps_from_the_same_weights():
  config = default_config.get_config("smoke")
  linen_state, nnx_state = linen_and_nnx_states(config)
  linen_step, nnx_step = jax.jit(steps.train_step), jax.jit(nnx_steps.functional_train_step)
  for batch in random_batches(NUM_STEPS):
    linen_state, linen_metrics = linen_step(linen_state, batch)
    nnx_state, nnx_metrics = nnx_step(nnx_state, batch)
    np.testing.assert_allclose(float(nnx_metrics["loss_sum"]), float(linen_metrics["loss_sum"]),
                               rtol=1e-5)
    assert float(nnx_metrics["correct"]) == float(linen_metrics["correct"])
  test_batch = dict(random_batches(1, batch_size=16)[0], weight=np.ones(16, np.float32))
  linen_eval = jax.jit(steps.eval_step)(linen_state, test_batch)
  nnx_eval = jax.jit(nnx_steps.functional_eval_step)(nnx_state, test_batch)
  np.testing.assert_allclose(float(nnx_eval["loss_sum"]), float(linen_eval["loss_sum"]),
                             rtol=1e-5)
  expected = host_tree({"params": linen_state.params, "batch_stats": linen_state.batch_stats})
  actual = host_tree({"params": nnx_state.params, "batch_stats": nnx_state.batch_stats})
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # The weights moved: the comparison is not of two untouched initialisations.
  _, initial = linen_and_nnx_states(config)
  assert any(not np.array_equal(actual[name], value)
             for name, value in host_tree({"params": initial.params}).items())


def test_nnx_jit_stateful_step_equals_the_functional_step():
  config = default_config.get_config("smoke")
  _, state = linen_and_nnx_states(config)
  model, optimizer = state.objects()
  functional_step = jax.jit(nnx_steps.functional_train_step)
  for batch in random_batches(2):
    stateful_metrics = nnx_steps.jit_train_step(model, optimizer, batch)
    state, functional_metrics = functional_step(state, batch)
    np.testing.assert_allclose(float(stateful_metrics["loss_sum"]),
                               float(functional_metrics["loss_sum"]), rtol=1e-6)
  expected = host_tree(state.params)
  actual = host_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_nnx_steps_on_8_devices_equal_the_steps_on_one():
  """Statistics combined over the mesh and gradients averaged: the global batch's step."""
  assert jax.device_count() == 8
  config = default_config.get_config("smoke")
  learning_rate_fn = steps.create_learning_rate_fn(config, steps_per_epoch=4)

  def create(axis_name):
    return nnx_steps.create_train_state(jax.random.key(0), config, 10, IMAGE_SHAPE,
                                        learning_rate_fn, axis_name=axis_name)

  mesh = parallel.create_mesh()
  sharded_step = parallel.data_parallel(
      functools.partial(nnx_steps.functional_train_step, axis_name=parallel.AXIS), mesh)
  single_step = jax.jit(nnx_steps.functional_train_step)
  sharded_state, single_state = create(parallel.AXIS), create(None)
  for batch in random_batches(2):
    sharded_state, sharded_metrics = sharded_step(sharded_state,
                                                  parallel.shard_batch(batch, mesh, 32))
    single_state, single_metrics = single_step(single_state, batch)
    np.testing.assert_allclose(float(sharded_metrics["loss_sum"]),
                               float(single_metrics["loss_sum"]), rtol=1e-5)
  expected = host_tree({"params": single_state.params, "batch_stats": single_state.batch_stats})
  actual = host_tree({"params": sharded_state.params, "batch_stats": sharded_state.batch_stats})
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_nnx_models_docstring_example_runs():
  result = doctest.testmod(nnx_models)
  assert result.attempted > 0
  assert result.failed == 0


def test_linen_variables_of_another_model_are_refused():
  config = default_config.get_config("smoke")
  linen_state, nnx_state = linen_and_nnx_states(config)
  model, _ = nnx_state.objects()
  params = dict(linen_state.params)
  del params["Dense_1"]
  with pytest.raises(ValueError, match="the linen params do not match the NNX model's"):
    nnx_models.load_linen_variables(model, {"params": params,
                                            "batch_stats": linen_state.batch_stats})


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
  """One uninterrupted NNX smoke run through `train.train_and_evaluate`, on 8 devices."""
  workdir = tmp_path_factory.mktemp("nnx")
  return workdir, train.train_and_evaluate(nnx_smoke_config(), str(workdir))


def test_nnx_run_trains_evaluates_plots_and_checkpoints(nnx_run):
  workdir, state = nnx_run
  assert jax.device_count() == 8
  records = reporting.read_metrics(str(workdir / reporting.METRICS_FILE))
  assert [r["epoch"] for r in records] == [1, 2]
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  assert records[-1]["test_accuracy"] > 0.2  # Ten classes: chance is 0.1.
  assert (workdir / reporting.PLOT_FILE).read_bytes().startswith(b"\x89PNG")
  assert train.latest_checkpoint(str(workdir)) == str(workdir / "checkpoints" / "4")
  running_mean = state.batch_stats["BatchNorm_0"]["mean"]
  assert len(running_mean.sharding.device_set) == 8


def test_nnx_run_resumes_exactly_from_its_checkpoint(nnx_run, tmp_path):
  straight_workdir, straight_state = nnx_run
  config = nnx_smoke_config()
  config.stop_at_step = 3  # Inside the second epoch.
  stopped = train.train_and_evaluate(config, str(tmp_path))
  assert int(jax.device_get(stopped.step)) == 3
  resumed = train.train_and_evaluate(nnx_smoke_config(), str(tmp_path))
  def trees(state):
    return host_tree({"params": state.params, "batch_stats": state.batch_stats,
                      "opt_state": state.opt_state})

  expected, actual = trees(straight_state), trees(resumed)
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
  def records(workdir):
    return [{k: v for k, v in r.items() if k != "elapsed_s"}
            for r in reporting.read_metrics(str(workdir / reporting.METRICS_FILE))]

  assert records(tmp_path) == records(straight_workdir)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("api", "haiku", "config.api = 'haiku': unknown Flax API; use one of linen, nnx"),
    ("model", "ResNet", "config.model = 'ResNet': the NNX path (config.api='nnx') builds the CNN"),
    ("norm", "whitening", "config.norm = 'whitening': the NNX path (config.api='nnx') builds"),
])
def test_what_the_nnx_path_does_not_build_fails_before_training(field, value, message):
  config = nnx_smoke_config()
  config[field] = value
  with pytest.raises(config_check.ConfigError) as error:
    config_check.validate_config(config, num_devices=8)
  assert message in str(error.value)


def test_nnx_fine_tuning_is_refused_with_the_fix(tmp_path):
  config = nnx_smoke_config()
  config.init_from = str(tmp_path)
  with pytest.raises(config_check.ConfigError,
                     match=r"config.init_from = .*built for the linen path only"):
    config_check.validate_config(config, num_devices=8)

"""Tests for bnjax_examples/steps.py: the pure steps run under `lax.scan` on one device and give the
training of the example's data-parallel steps on 8 devices."""

import functools

import jax
from jax import lax
import numpy as np
import pytest

from bnjax_examples import input_pipeline
from bnjax_examples import parallel
from bnjax_examples import steps
from bnjax_examples import train
from configs import default as default_config

NUM_STEPS = 3
UNOPTIMISED = {"xla_backend_optimization_level": 0}  # Compiles in a second; same values.


def flat(tree) -> dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope="module")
def setup():
  config = default_config.get_config("smoke")
  dataset = input_pipeline.load_dataset("digits")
  learning_rate_fn = steps.create_learning_rate_fn(config, steps_per_epoch=4)
  batches = input_pipeline.train_batches(dataset, global_batch_size=config.batch_size, seed=0)
  return config, dataset, learning_rate_fn, [next(batches) for _ in range(NUM_STEPS)]


def test_train_step_under_scan_matches_the_data_parallel_steps(setup):
  config, dataset, learning_rate_fn, batches = setup
  assert jax.device_count() == 8

  # An experiment's way: one device, no collectives, NUM_STEPS steps in one lax.scan.
  local_model = steps.create_model(config, dataset.num_classes)
  local_state = jax.jit(functools.partial(
      steps.create_train_state, config=config, model=local_model, image_shape=dataset.image_shape,
      learning_rate_fn=learning_rate_fn), compiler_options=UNOPTIMISED)(jax.random.key(0))
  stacked = jax.tree.map(lambda *rows: np.stack(rows), *batches)
  scan_steps = jax.jit(lambda state, batches: lax.scan(steps.train_step, state, batches),
                       compiler_options=UNOPTIMISED)
  scanned_state, scanned_metrics = scan_steps(local_state, stacked)

  # The example's way: the same batches split over 8 devices, one jitted step at a time.
  mesh = parallel.create_mesh()
  mesh_model = steps.create_model(config, dataset.num_classes, axis_name=parallel.AXIS)
  mesh_state = parallel.replicate(functools.partial(
      steps.create_train_state, jax.random.key(0), config, mesh_model, dataset.image_shape,
      learning_rate_fn), mesh)
  step_fn = train.parallel_train_step(mesh, fast_compile=True)
  mesh_metrics = []
  for batch in batches:
    mesh_state, step_metrics = step_fn(mesh_state, parallel.shard_batch(batch, mesh,
                                                                        config.batch_size))
    mesh_metrics.append(step_metrics)

  assert int(scanned_state.step) == int(mesh_state.step) == NUM_STEPS
  expected = flat({"params": mesh_state.params, "batch_stats": mesh_state.batch_stats})
  actual = flat({"params": scanned_state.params, "batch_stats": scanned_state.batch_stats})
  assert expected.keys() == actual.keys()
  for name, value in expected.items():
    np.testing.assert_allclose(actual[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
  mesh_metrics = flat(jax.tree.map(lambda *values: np.stack(values), *mesh_metrics))
  scanned_metrics = flat(scanned_metrics)
  np.testing.assert_array_equal(scanned_metrics["count"], [config.batch_size] * NUM_STEPS)
  np.testing.assert_array_equal(scanned_metrics["count"], mesh_metrics["count"])
  np.testing.assert_array_equal(scanned_metrics["correct"], mesh_metrics["correct"])
  np.testing.assert_allclose(scanned_metrics["loss_sum"], mesh_metrics["loss_sum"], rtol=1e-5)


def test_eval_step_counts_only_weighted_examples(setup):
  config, dataset, learning_rate_fn, _ = setup
  model = steps.create_model(config, dataset.num_classes)
  state = jax.jit(functools.partial(
      steps.create_train_state, config=config, model=model, image_shape=dataset.image_shape,
      learning_rate_fn=learning_rate_fn), compiler_options=UNOPTIMISED)(jax.random.key(0))
  (batch,) = input_pipeline.eval_batches(
      dataset._replace(test_images=dataset.test_images[:5], test_labels=dataset.test_labels[:5]),
      global_batch_size=8)
  eval_fn = jax.jit(steps.eval_step, compiler_options=UNOPTIMISED)
  padded = jax.device_get(eval_fn(state, batch))
  real = jax.device_get(eval_fn(state, {name: rows[:5] for name, rows in batch.items()}))
  assert float(padded["count"]) == float(real["count"]) == 5.0
  assert float(padded["correct"]) == float(real["correct"])
  np.testing.assert_allclose(padded["loss_sum"], real["loss_sum"], rtol=1e-6)

"""configs/renorm_small_batch.py: Batch Renormalization, its schedule scaled to the run."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from bnjax_examples import config_check
from bnjax_examples import input_pipeline
from bnjax_examples import steps
from bnjax_examples import train
from configs import renorm_small_batch

UNOPTIMISED = {"xla_backend_optimization_level": 0}


def test_renorm_config_opens_with_its_command_and_passes_validation_on_one_device():
  module = importlib.import_module("configs.renorm_small_batch")
  assert module.__doc__.startswith("python -m bnjax_examples.main "
                                   "--config=configs/renorm_small_batch.py --workdir=")
  config = renorm_small_batch.get_config()
  assert config.batch_size == 4
  assert config.batch_renorm
  config_check.validate_config(config, num_devices=1)
  smoke = renorm_small_batch.get_config("smoke")
  assert smoke.num_epochs * smoke.steps_per_epoch <= 12
  config_check.validate_config(smoke, num_devices=8)


def test_renorm_bounds_follow_the_scaled_schedule():
  # A run of 16 steps: batch norm for 1 step, d_max reaches 5 at step 5, r_max reaches 3 at 8.
  got = [tuple(float(v) for v in steps.renorm_bounds(jnp.asarray(t), 16)) for t in (0, 1, 3, 8, 16)]
  want = [(1.0, 0.0), (1.0, 0.0), (1.0 + 2.0 * 2 / 7, 5.0 * 2 / 4), (3.0, 5.0), (3.0, 5.0)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _one_step(state, batch, renorm_steps):
  return jax.jit(functools.partial(steps.train_step, renorm_steps=renorm_steps),
                 compiler_options=UNOPTIMISED)(state, batch)


def test_train_step_renormalizes_with_the_running_statistics_after_the_warm_up():
  config = renorm_small_batch.get_config("smoke")
  dataset = input_pipeline.load_dataset("digits")
  model = steps.create_model(config, dataset.num_classes)
  state = jax.jit(functools.partial(
      steps.create_train_state, config=config, model=model, image_shape=dataset.image_shape,
      learning_rate_fn=lambda _: jnp.asarray(0.1, jnp.float32)),
      compiler_options=UNOPTIMISED)(jax.random.key(0))
  batch = next(input_pipeline.train_batches(dataset, global_batch_size=8, seed=0))
  # Running statistics (0 and 1 from init) far from the batch's: renormalization shows.
  plain, _ = _one_step(state, batch, renorm_steps=0)
  in_warm_up, _ = _one_step(state, batch, renorm_steps=1_000)  # step 0 of 1000: batch norm.
  relaxed, _ = _one_step(state.replace(step=jnp.asarray(999, state.step.dtype)), batch,
                         renorm_steps=1_000)

  def leaves(state):
    return jax.tree.leaves(jax.device_get(state.params))

  for a, b in zip(leaves(plain), leaves(in_warm_up), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert any(not np.allclose(a, b, rtol=1e-3, atol=1e-5)
             for a, b in zip(leaves(plain), leaves(relaxed), strict=True))


def test_renorm_small_batch_smoke_run_trains(tmp_path):
  config = renorm_small_batch.get_config("smoke")
  config.progress_bar = False
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(jax.device_get(state.step)) == config.num_epochs * config.steps_per_epoch
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(
      jax.device_get(state.params)))

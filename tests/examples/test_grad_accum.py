"""Tests for gradient accumulation in the example's train step (``config.grad_accum_steps``).

One optimizer step with ``k`` micro-batches must (a) apply the mean of the micro-batches'
gradients and (b) update the running statistics once, with the pooled statistics of the whole
batch: for the first norm layer, whose input does not depend on any normalisation, that is one
update with the big batch, computed here in float64 NumPy from the images and the kernel.
"""

import functools
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax_examples import config_check
from bnjax_examples import input_pipeline
from bnjax_examples import steps
from configs import default as default_config
from tests.examples import float64_reference

K = 4  # Micro-batches of 8 from the smoke config's batch of 32.
UNOPTIMISED = {"xla_backend_optimization_level": 0}  # Compiles in a second; same values.


def gradient_recorder() -> optax.GradientTransformation:
  """An optimizer that leaves the parameters alone and keeps the last gradient as its state."""

  def update(updates, state, params=None):
    del state, params  # Replaced by the new gradient; the parameters stay.
    return jax.tree.map(jnp.zeros_like, updates), updates

  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params), update=update)


@pytest.fixture(scope="module")
def one_step():
  """The state before, the batch, and the state after one accumulated step (one device)."""
  config = default_config.get_config("smoke")
  dataset = input_pipeline.load_dataset("digits")
  model = steps.create_model(config, dataset.num_classes)
  init = jax.jit(functools.partial(model.init, train=False), compiler_options=UNOPTIMISED)
  variables = init(jax.random.key(0), jnp.zeros((2, *dataset.image_shape)))
  state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                  tx=gradient_recorder(), batch_stats=variables["batch_stats"])
  batch = next(input_pipeline.train_batches(dataset, global_batch_size=cast(int, config.batch_size),
                                             seed=0))
  step = jax.jit(functools.partial(steps.train_step, grad_accum_steps=K, log_drift=True,
                                   batch_norm_momentum=cast(float, config.batch_norm_momentum)),
                 compiler_options=UNOPTIMISED)
  new_state, step_metrics = step(state, batch)
  return config, model, state, batch, new_state, step_metrics


def test_first_norm_layer_takes_one_update_with_the_whole_batch(one_step):
  config, _, state, batch, new_state, _ = one_step
  batch_mean, batch_var = float64_reference.first_layer_moments(  # Biased, as the layer stores.
      batch["image"], state.params["Conv_0"]["kernel"])
  momentum = config.batch_norm_momentum
  old = jax.device_get(state.batch_stats["BatchNorm_0"])
  new = jax.device_get(new_state.batch_stats["BatchNorm_0"])
  np.testing.assert_allclose(new["mean"], momentum * old["mean"] + (1 - momentum) * batch_mean,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], momentum * old["var"] + (1 - momentum) * batch_var,
                             rtol=1e-5, atol=1e-6)


def test_gradient_is_the_mean_of_the_micro_batch_gradients(one_step):
  _, model, state, batch, new_state, step_metrics = one_step

  def micro_batch_loss(params, images, labels):
    logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                            train=True, mutable=["batch_stats"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  grad_fn = jax.jit(jax.grad(micro_batch_loss), compiler_options=UNOPTIMISED)
  size = batch["label"].shape[0] // K
  per_micro_batch = [jax.device_get(grad_fn(state.params, batch["image"][i * size:(i + 1) * size],
                                            batch["label"][i * size:(i + 1) * size]))
                     for i in range(K)]
  expected = jax.tree.map(lambda *g: np.mean(np.asarray(g, np.float64), axis=0), *per_micro_batch)
  actual = jax.device_get(new_state.opt_state)  # The recorder's state: the applied gradient.
  flat_expected, _ = jax.tree_util.tree_flatten_with_path(expected)
  flat_actual = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
  for path, value in flat_expected:
    scale = np.max(np.abs(value))
    np.testing.assert_allclose(flat_actual[path], value, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert float(step_metrics["count"]) == batch["label"].shape[0]


def test_drift_under_accumulation_is_that_of_the_whole_batch(one_step):
  config, _, state, batch, _, step_metrics = one_step
  running = jax.device_get(state.batch_stats["BatchNorm_0"])
  smd, log_ratio = float64_reference.drift_means(
      *float64_reference.first_layer_moments(batch["image"], state.params["Conv_0"]["kernel"]),
      running["mean"], running["var"], config.batch_norm_epsilon)
  np.testing.assert_allclose(step_metrics["drift/BatchNorm_0/mean_abs_smd"], smd, rtol=1e-4)
  np.testing.assert_allclose(step_metrics["drift/BatchNorm_0/mean_abs_log_var_ratio"], log_ratio,
                             rtol=1e-4)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("grad_accum_steps", 0, "config.grad_accum_steps = 0: must be an int >= 1"),
    ("grad_accum_steps", -2, "config.grad_accum_steps = -2: must be an int >= 1"),
    ("grad_accum_steps", 3, ("config.grad_accum_steps = 3: each of the 8 devices splits its "
                             "share of config.batch_size = 32 into 3 equal micro-batches, so "
                             "config.batch_size must be a multiple of 24")),
    ("norm", "flax", "config.grad_accum_steps = 2: gradient accumulation is built into the linen"),
])
def test_invalid_accumulation_fails_before_training(field, value, message):
  config = default_config.get_config("smoke")
  config.grad_accum_steps = 2
  config[field] = value
  with pytest.raises(config_check.ConfigError) as error:
    config_check.validate_config(config, num_devices=8)
  assert message in str(error.value)


def test_accumulation_that_splits_the_batch_passes_the_check():
  config = default_config.get_config("smoke")
  config.grad_accum_steps = 4  # 32 examples over 8 devices: 4 each, 1 per micro-batch.
  config_check.validate_config(config, num_devices=8)

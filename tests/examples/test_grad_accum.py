"""Tests for gradient accumulation in the example's train step (``config.grad_accum_steps``).

One optimizer step with ``k`` micro-batches must (a) apply the mean of the micro-batches'
gradients and (b) update the running statistics once, with the pooled statistics of the whole
batch: for the first norm layer, whose input does not depend on any normalisation, that is one
update with the big batch, computed here in float64 NumPy from the images and the kernel. The
step is the shared `accumulated_step` (conftest.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax_examples import config_check
from configs import default as default_config
from tests.examples import float64_reference
from tests.examples.conftest import GRAD_ACCUM_STEPS
from tests.examples.conftest import UNOPTIMISED


def test_first_norm_layer_takes_one_update_with_the_whole_batch(accumulated_step):
  config, _, state, batch, _, new_state, _ = accumulated_step
  batch_mean, batch_var = float64_reference.first_layer_moments(  # Biased, as the layer stores.
      batch["image"], state.params["Conv_0"]["kernel"])
  momentum = config.batch_norm_momentum
  old = jax.device_get(state.batch_stats["BatchNorm_0"])
  new = jax.device_get(new_state.batch_stats["BatchNorm_0"])
  np.testing.assert_allclose(new["mean"], momentum * old["mean"] + (1 - momentum) * batch_mean,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], momentum * old["var"] + (1 - momentum) * batch_var,
                             rtol=1e-5, atol=1e-6)


def test_gradient_is_the_mean_of_the_micro_batch_gradients(accumulated_step):
  _, model, state, batch, _, new_state, step_metrics = accumulated_step

  def micro_batch_loss(params, images, labels):
    logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                            train=True, mutable=["batch_stats"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  grad_fn = jax.jit(jax.grad(micro_batch_loss), compiler_options=UNOPTIMISED)
  k = GRAD_ACCUM_STEPS
  size = batch["label"].shape[0] // k
  per_micro_batch = [jax.device_get(grad_fn(state.params, batch["image"][i * size:(i + 1) * size],
                                            batch["label"][i * size:(i + 1) * size]))
                     for i in range(k)]
  expected = jax.tree.map(lambda *g: np.mean(np.asarray(g, np.float64), axis=0), *per_micro_batch)
  actual = jax.device_get(new_state.opt_state)  # The recorder's state: the applied gradient.
  flat_expected, _ = jax.tree_util.tree_flatten_with_path(expected)
  flat_actual = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
  for path, value in flat_expected:
    scale = np.max(np.abs(value))
    np.testing.assert_allclose(flat_actual[path], value, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert float(step_metrics["count"]) == batch["label"].shape[0]


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

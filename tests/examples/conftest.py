"""A compiled train step shared by the example's step-level tests (one compilation for them all)."""

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
import pytest

from bnjax_examples import input_pipeline
from bnjax_examples import steps
from configs import default as default_config

GRAD_ACCUM_STEPS = 4  # Micro-batches of 8 from the smoke config's batch of 32.
UNOPTIMISED = {"xla_backend_optimization_level": 0}  # Compiles in a second; same values.


def gradient_recorder() -> optax.GradientTransformation:
  """An optimizer that leaves the parameters alone and keeps the last gradient as its state."""

  def update(updates, state, params=None):
    del state, params  # Replaced by the new gradient; the parameters stay.
    return jax.tree.map(jnp.zeros_like, updates), updates

  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params), update=update)


class AccumulatedStep(NamedTuple):
  """One optimizer step of the smoke CNN on one device, with drift logged."""

  config: Any  # The smoke config.
  model: Any  # Its linen CNN (norm 'bnjax').
  state: steps.TrainState  # Before the step; its optimizer records the gradient it is given.
  batch: dict[str, Any]  # The first training batch of 32.
  step: Any  # The compiled `steps.train_step` with GRAD_ACCUM_STEPS micro-batches and drift.
  new_state: steps.TrainState  # After the step.
  metrics: dict[str, Any]  # The step's metrics.


@pytest.fixture(scope="session")
def accumulated_step() -> AccumulatedStep:
  config = default_config.get_config("smoke")
  dataset = input_pipeline.load_dataset("digits")
  model = steps.create_model(config, dataset.num_classes)
  init = jax.jit(functools.partial(model.init, train=False), compiler_options=UNOPTIMISED)
  variables = init(jax.random.key(0), jnp.zeros((2, *dataset.image_shape)))
  state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                  tx=gradient_recorder(), batch_stats=variables["batch_stats"])
  batch = next(input_pipeline.train_batches(dataset, global_batch_size=cast(int, config.batch_size),
                                             seed=0))
  step = jax.jit(functools.partial(
      steps.train_step, grad_accum_steps=GRAD_ACCUM_STEPS, log_drift=True,
      batch_norm_momentum=cast(float, config.batch_norm_momentum)), compiler_options=UNOPTIMISED)
  new_state, step_metrics = step(state, batch)
  return AccumulatedStep(config, model, state, batch, step, new_state, step_metrics)

"""Claim 7's precise statistics against a float64 NumPy reference."""

import jax
import numpy as np

import bnjax
from bnjax_examples.experiments import harness
from bnjax_examples.experiments import precise_statistics


def _numpy_population(params, x, batch_size):
  """Per layer, the mean and biased variance of its input over all rows, in training mode."""
  w0 = np.asarray(params["dense"][0]["w"], np.float64)
  w1 = np.asarray(params["dense"][1]["w"], np.float64)
  h0 = x @ w0
  h1 = []
  for start in range(0, len(x), batch_size):  # Layer 1 sees layer 0 normalised per batch.
    part = h0[start:start + batch_size]
    x_hat = (part - part.mean(0)) / np.sqrt(part.var(0) + 1e-5)
    h1.append(np.maximum(x_hat, 0) @ w1)
  h1 = np.concatenate(h1)
  return [(h0.mean(0), h0.var(0)), (h1.mean(0), h1.var(0))]


def test_population_statistics_match_numpy_over_unequal_batches():
  model = harness.MLP(hidden=(5, 4), activation="relu", placement="before")
  params, _ = model.init(jax.random.key(0), 6)
  states = [bnjax.init(5)[1], bnjax.init(4)[1]]
  x = np.random.default_rng(1).normal(2.0, 3.0, (23, 6)).astype(np.float32)  # Batches 8, 8, 7.
  measure = jax.jit(lambda p, s, x: precise_statistics.population_statistics(model, p, s, x, 8))
  got = measure(params, states, x)
  expected = _numpy_population(params, x.astype(np.float64), 8)
  for state, (mean, var) in zip(got, expected, strict=True):
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.var, var, rtol=1e-5, atol=1e-5)

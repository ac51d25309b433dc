"""Claim 2's noise, noisy batch norm and landscape measurement against closed forms and NumPy.

The smoke run itself happens once, in `test_experiments.py`, which hands its result to
`check_result`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax_examples.experiments import covariate_shift


def check_result(result: dict[str, Any]) -> None:
  """What the smoke run of claim 2 must have measured (called from `test_experiments.py`)."""
  data, config = result["data"], result["config"]
  layers, etas = len(config["hidden"]), config["etas"]
  assert data["etas"] == etas
  assert set(data["summary"]) == set(covariate_shift.ARMS)
  for arm, row in data["summary"].items():
    assert 0 <= row["final_test_accuracy"]["mean"] <= 1, arm
    for key in ("drift_mean", "drift_std", "drift_mean_absolute", "std_level"):
      assert len(row[key]["mean"]) == layers, (arm, key)
    assert len(row["grad_change"]["mean"]) == len(etas), arm
    assert len(row["probe_loss"]["mean"]) == config["epochs"], arm
    assert row["loss_range"]["min"] >= 0, arm
  assert set(data["parts"]) == {"not_internal_covariate_shift", "smoother_landscape"}
  # Noise of amplitude 1 redrawn every step moves the layer inputs far more than a few SGD steps.
  summary = data["summary"]
  assert (min(summary["noisy batch norm"]["drift_mean"]["mean"])
          > 5 * max(summary["batch norm"]["drift_mean"]["mean"]))


def test_noise_is_uniform_with_unit_mean_scale_and_zero_mean_shift():
  width = 40_000
  states = [{"scale": jnp.ones((width,)), "shift": jnp.zeros((width,))}] * 2
  clean = covariate_shift.draw_noise(states, jax.random.key(0), jnp.zeros((2,)))
  np.testing.assert_array_equal(clean[0]["scale"], 1.0)
  np.testing.assert_array_equal(clean[0]["shift"], 0.0)
  a, b = 2.0, 0.5
  noisy = covariate_shift.draw_noise(states, jax.random.key(0), jnp.asarray([a, b]))
  for layer in noisy:
    scale, shift = np.asarray(layer["scale"], np.float64), np.asarray(layer["shift"], np.float64)
    assert scale.min() >= 1 - b
    assert scale.max() <= 1 + b
    assert shift.min() >= -a
    assert shift.max() <= a
    # U(1 − b, 1 + b): mean 1, variance b²/3; U(−a, a): mean 0, variance a²/3 (5 sigma).
    np.testing.assert_allclose(scale.mean(), 1.0, atol=5 * b / np.sqrt(3 * width))
    np.testing.assert_allclose(shift.mean(), 0.0, atol=5 * a / np.sqrt(3 * width))
    np.testing.assert_allclose(scale.var(), b * b / 3, rtol=0.05)
    np.testing.assert_allclose(shift.var(), a * a / 3, rtol=0.05)
  assert not np.array_equal(noisy[0]["scale"], noisy[1]["scale"])  # Each layer its own draw.


def test_noisy_norm_adds_noise_in_training_only():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (16, 4)).astype(np.float32)
  params, _ = bnjax.init(4)
  running = bnjax.BatchNormState(mean=jnp.full((4,), 1.0), var=jnp.full((4,), 4.0))
  scale, shift = np.array([0.5, 1.0, 1.5, 1.2]), np.array([-1.0, 0.0, 0.5, 0.2])
  state = {"bn": running, "scale": jnp.asarray(scale, jnp.float32),
           "shift": jnp.asarray(shift, jnp.float32)}
  norm = covariate_shift.noisy_norm(momentum=0.9)
  xd = x.astype(np.float64)
  standardised = (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-5)
  y, new = norm(params, state, jnp.asarray(x), True)
  np.testing.assert_allclose(y, standardised * scale + shift, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["bn"].mean, 0.9 * 1.0 + 0.1 * xd.mean(0), rtol=1e-5)
  y, _ = norm(params, state, jnp.asarray(x), False)  # Running statistics, no noise.
  np.testing.assert_allclose(y, (xd - 1.0) / np.sqrt(4.0 + 1e-5), rtol=1e-5, atol=1e-5)


def test_along_gradient_matches_a_quadratic_in_closed_form():
  # L(w) = ½ wᵀAw: g = Aw, L(w − ηg) and g(w − ηg) = A(w − ηAw) in closed form.
  a = np.array([[3.0, 1.0], [1.0, 2.0]])
  w = np.array([1.0, -2.0])
  etas = np.array([0.05, 0.1, 0.2, 0.4])
  params = {"w": jnp.asarray(w, jnp.float32)}
  a32 = jnp.asarray(a, jnp.float32)
  got = covariate_shift.along_gradient(lambda p: 0.5 * p["w"] @ a32 @ p["w"], params,
                                       jnp.asarray(etas, jnp.float32))
  g = a @ w
  losses = [0.5 * (w - e * g) @ a @ (w - e * g) for e in (0.0, *etas)]
  np.testing.assert_allclose(got["probe_loss"], losses[0], rtol=1e-5)
  np.testing.assert_allclose(got["loss_range"], max(losses) - min(losses), rtol=1e-4)
  changes = [np.linalg.norm(e * a @ g) / np.linalg.norm(g) for e in etas]
  np.testing.assert_allclose(got["grad_change"], changes, rtol=1e-4)

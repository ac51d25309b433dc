"""Claim 11's measurements against float64 NumPy, and the fields its smoke run must write.

The smoke run itself happens once, in `test_experiments.py`, which hands its result to
`check_result`.
"""

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax_examples.experiments import whitening
from configs.experiments import whitening as whitening_config


def check_result(result: dict[str, Any]) -> None:
  """What the smoke run of claim 11 must have measured (called from `test_experiments.py`)."""
  data, config = result["data"], result["config"]
  layers = len(config["features"])
  assert set(data["summary"]) == set(whitening.ARMS)
  for arm, row in data["summary"].items():
    assert 0 <= row["final_test_accuracy"]["mean"] <= 1, arm
    for key in ("off_diagonal", "off_diagonal_next", "zca_change", "pca_change"):
      assert len(row[key]["mean"]) == layers, (arm, key)
    assert all(0 <= v <= 1 for v in row["off_diagonal"]["mean"]), arm
  for arm, values in data["last_layer_correlation_seed0"].items():
    matrix = np.asarray(values)
    assert matrix.shape == (config["features"][-1],) * 2, arm
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-5, err_msg=arm)
    assert np.all(np.abs(matrix) <= 1 + 1e-5), arm
  assert set(data["parts"]) == {"decorrelates", "pca_hurts", "improves_accuracy"}
  timing = data["timing"]
  assert all(v > 0 for v in timing["median_ms"].values())
  assert math.isclose(timing["ratio_to_batch_norm"]["batch norm"], 1.0)


def test_channel_correlation_matches_numpy_and_zeroes_constant_channels():
  x = np.random.default_rng(0).normal(size=(3, 4, 5, 4))
  x[..., 1] = 0.7 * x[..., 0] + 0.3 * x[..., 1]  # Correlated with channel 0.
  x[..., 3] = 2.0  # Constant: no correlation with anything, not NaN.
  got = np.asarray(whitening.channel_correlation(jnp.asarray(x, jnp.float32)))
  rows = x.reshape(-1, 4)
  expected = np.zeros((4, 4))
  expected[:3, :3] = np.corrcoef(rows[:, :3].T)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Mean |off-diagonal| over the C·(C − 1) = 12 ordered pairs.
  off = np.abs(expected) * (1 - np.eye(4))
  np.testing.assert_allclose(whitening.mean_abs_off_diagonal(jnp.asarray(got)), off.sum() / 12,
                             rtol=1e-5)


def test_arms_whiten_or_standardise_a_correlated_batch():
  rng = np.random.default_rng(1)
  mixing = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.3, 0.4, 0.9]])
  x = (rng.normal(size=(512, 3)) @ mixing.T + 2.0).astype(np.float32)
  xc = x.astype(np.float64) - x.mean(0)
  sigma = xc.T @ xc / len(x) + 1e-5 * np.eye(3)
  eigenvalues, vectors = np.linalg.eigh(sigma)
  zca = vectors @ np.diag(eigenvalues ** -0.5) @ vectors.T  # Σ^(-1/2).
  config = whitening_config.get_config()
  outputs = {}
  for arm in whitening.ARMS:
    norm, norm_state = whitening.arm_norm(arm, config)
    params, _ = bnjax.init(3)
    state = bnjax.init(3)[1] if norm_state is None else norm_state(3)
    outputs[arm] = np.asarray(norm(params, state, jnp.asarray(x), True)[0], np.float64)
  np.testing.assert_allclose(outputs["zca"], xc @ zca.T, atol=2e-4)
  for arm in ("zca", "iternorm", "pca"):  # IterNorm with T = 5 only approximately.
    covariance = outputs[arm].T @ outputs[arm] / len(x)
    np.testing.assert_allclose(covariance, np.eye(3), atol=0.05 if arm == "iternorm" else 1e-3,
                               err_msg=arm)
  # Batch norm standardises each channel and keeps the correlations.
  np.testing.assert_allclose(np.corrcoef(outputs["batch norm"].T), np.corrcoef(x.T), atol=1e-5)
  np.testing.assert_allclose(outputs["batch norm"].std(0), 1.0, atol=1e-4)
  with pytest.raises(ValueError, match="arm"):
    whitening.arm_norm("cholesky", config)


def _batch(variances: tuple[float, float]) -> np.ndarray:
  """Four rows whose mean is 0 and whose biased covariance is ``diag(variances)``."""
  a, b = (math.sqrt(2 * v) for v in variances)
  return np.array([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]])


def test_whitening_change_sees_pca_swap_axes_and_zca_not():
  # Two batches whose variances trade places: PCA's components (by decreasing variance) swap.
  batches = np.stack([_batch((1.0, 1.1)), _batch((1.1, 1.0))]).astype(np.float32)
  config = whitening_config.get_config()
  change = whitening._whitening_change([jnp.asarray(batches)], config)  # noqa: SLF001
  w1 = np.diag(1 / np.sqrt(np.array([1.0, 1.1]) + 1e-5))
  w2 = np.diag(1 / np.sqrt(np.array([1.1, 1.0]) + 1e-5))
  np.testing.assert_allclose(change["zca"], [np.linalg.norm(w2 - w1) / np.linalg.norm(w1)],
                             rtol=1e-4)
  # PCA's two matrices have disjoint supports whatever the signs: the change is exactly √2.
  np.testing.assert_allclose(change["pca"], [math.sqrt(2)], rtol=1e-4)

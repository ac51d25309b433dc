"""A float64 NumPy whitening batch norm: the independent oracle of the whitening tests.

Written from the formulas (per group of d channels: covariance, then ZCA by eigendecomposition,
PCA, Cholesky, or IterNorm's Newton–Schulz iteration), with NumPy/SciPy linear algebra in float64;
it shares no code with `bnjax.whitening`.
"""

import numpy as np
import scipy.linalg


def groups(channels, group_size):
  """The channel slices of each group: size min(group_size, channels), the last one smaller."""
  size = min(group_size, channels)
  return [slice(start, min(start + size, channels)) for start in range(0, channels, size)]


def batch_moments(x_MxC, mask_M=None):
  """Mean [C] and biased covariance [C, C] of the valid rows, float64."""
  x = np.asarray(x_MxC, np.float64)
  if mask_M is not None:
    x = x[np.asarray(mask_M, bool)]
  mean = x.mean(axis=0)
  centred = x - mean
  return mean, centred.T @ centred / x.shape[0]


def zca(s):
  eigenvalues, vectors = np.linalg.eigh(s)
  return vectors @ np.diag(eigenvalues ** -0.5) @ vectors.T


def pca(s):
  eigenvalues, vectors = np.linalg.eigh(s)
  order = np.argsort(eigenvalues)[::-1]
  return np.diag(eigenvalues[order] ** -0.5) @ vectors[:, order].T


def cholesky(s):
  return scipy.linalg.solve_triangular(np.linalg.cholesky(s), np.eye(len(s)), lower=True)


def newton_schulz(s, iterations):
  trace = np.trace(s)
  normalised = s / trace
  p = np.eye(len(s))
  for _ in range(iterations):
    p = 1.5 * p - 0.5 * p @ p @ p @ normalised
  return p / np.sqrt(trace)


def matrix(covariance, method, epsilon=1e-5, iterations=5):
  """The whitening matrix of `covariance + epsilon I` by `method`, float64."""
  s = np.asarray(covariance, np.float64) + epsilon * np.eye(len(covariance))
  if method == "zca":
    return zca(s)
  if method == "pca":
    return pca(s)
  if method == "cholesky":
    return cholesky(s)
  return newton_schulz(s, iterations)


def whiten(x_MxC, mean, covariances, group_size, method, epsilon=1e-5, iterations=5,
           scale=None, bias=None):
  """y = scale * W (x - mean) + bias group by group; `covariances` is the full [C, C] matrix.

  Returns (y, [W of each group]).
  """
  x = np.asarray(x_MxC, np.float64)
  centred = x - np.asarray(mean, np.float64)
  y = np.empty_like(centred)
  matrices = []
  for g in groups(x.shape[1], group_size):
    w = matrix(np.asarray(covariances, np.float64)[g, g], method, epsilon, iterations)
    y[:, g] = centred[:, g] @ w.T
    matrices.append(w)
  if scale is not None:
    y = y * np.asarray(scale, np.float64)
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y, matrices


def train_step(x_MxC, group_size, method, epsilon=1e-5, iterations=5, mask_M=None,
               scale=None, bias=None):
  """One training step on the valid rows: (y, batch mean, batch covariance [C, C], matrices)."""
  mean, covariance = batch_moments(x_MxC, mask_M)
  y, matrices = whiten(x_MxC, mean, covariance, group_size, method, epsilon, iterations, scale,
                       bias)
  return y, mean, covariance, matrices


def block(covariance, channels, group_size, index):
  """The [d, d] block of group `index`, padded with the identity to the group size."""
  g = groups(channels, group_size)[index]
  size = min(group_size, channels)
  out = np.eye(size)
  n = g.stop - g.start
  out[:n, :n] = np.asarray(covariance, np.float64)[g, g]
  return out

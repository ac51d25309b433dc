"""A float64 NumPy batch norm: the independent oracle the suite compares bnjax against."""

import numpy as np


def feature_axes(ndim, axis):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def moments(x, axis=-1, mask=None):
  """Mean, biased variance and count over every axis but `axis`, of the valid values, in float64."""
  x = np.asarray(x, np.float64)
  feat = feature_axes(x.ndim, axis)
  red = tuple(a for a in range(x.ndim) if a not in feat)
  valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
  xv = np.where(valid, x, 0.0)
  count = valid.sum(axis=red)
  mean = xv.sum(axis=red) / np.maximum(count, 1)
  centred = np.where(valid, x - np.expand_dims(mean, red), 0.0)
  var = (centred ** 2).sum(axis=red) / np.maximum(count, 1)
  return mean, var, count


def normalize(x, mean, var, scale=None, bias=None, axis=-1, epsilon=1e-5):
  """y = scale * (x - mean) / sqrt(var + epsilon) + bias, with per-feature arrays of `axis`."""
  x = np.asarray(x, np.float64)
  feat = feature_axes(x.ndim, axis)
  shape = [x.shape[a] if a in feat else 1 for a in range(x.ndim)]
  r = lambda v: np.asarray(v, np.float64).reshape(shape)
  y = (x - r(mean)) / np.sqrt(r(var) + epsilon)
  if scale is not None:
    y = y * r(scale)
  if bias is not None:
    y = y + r(bias)
  return y


def train_step(x, running_mean, running_var, scale=None, bias=None, axis=-1, momentum=0.99,
               epsilon=1e-5, mask=None, unbiased=False):
  """One training step: (y, new_mean, new_var), all float64."""
  mean, var, count = moments(x, axis, mask)
  y = normalize(x, mean, var, scale, bias, axis, epsilon)
  stored_var = var * count / np.maximum(count - 1, 1) if unbiased else var
  new_mean = momentum * np.asarray(running_mean, np.float64) + (1 - momentum) * mean
  new_var = momentum * np.asarray(running_var, np.float64) + (1 - momentum) * stored_var
  return y, new_mean, new_var


# Tolerances for comparing against the float64 reference, by input dtype (absolute, relative).
TOLERANCES = {
    "float16": dict(atol=2e-2, rtol=2e-2),
    "bfloat16": dict(atol=6e-2, rtol=6e-2),
    "float32": dict(atol=2e-5, rtol=1e-5),
    "float64": dict(atol=1e-12, rtol=1e-12),
}

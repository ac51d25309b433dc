"""Float64 NumPy layer, group, instance and RMS norms: the oracle the norm tests compare against.

Written from the definitions (Ba et al. 2016; Wu & He 2018; Ulyanov et al. 2016; Zhang & Sennrich
2019), independently of bnjax: a mean and a two-pass variance over an explicit set of axes, in
float64, of the valid values.
"""

import numpy as np


def _axes(ndim, axes):
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))


def standardize(x, reduce_axes, feature_axes, scale=None, bias=None, epsilon=1e-6, mask=None,
                centred=True):
  """``scale * (x - mean) / sqrt(var + epsilon) + bias`` over `reduce_axes`.

  Mean 0 and the mean square for ``centred=False``; `scale` and `bias` have `x`'s shape along
  `feature_axes`. A set of statistics with no valid value outputs `bias` (0 without one), and so
  does a non-finite value at a masked position.
  """
  x = np.asarray(x, np.float64)
  red = _axes(x.ndim, reduce_axes)
  feat = _axes(x.ndim, feature_axes)
  valid = (np.ones(x.shape, bool) if mask is None
           else np.broadcast_to(np.asarray(mask, bool), x.shape))
  safe = np.where(valid, x, 0.0)
  count = valid.sum(axis=red, keepdims=True)
  if centred:
    mean = safe.sum(axis=red, keepdims=True) / np.maximum(count, 1)
  else:
    mean = np.zeros(count.shape)
  centred_x = np.where(valid, x - mean, 0.0)
  var = (centred_x ** 2).sum(axis=red, keepdims=True) / np.maximum(count, 1)
  # A non-finite value at a masked position is taken as the mean (it is normalised to 0).
  finite = np.where(np.isfinite(x), x, mean)
  x_hat = np.where(count > 0, (finite - mean) / np.sqrt(var + epsilon), 0.0)
  shape = [x.shape[a] if a in feat else 1 for a in range(x.ndim)]
  y = x_hat
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(shape)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(shape)
  return y


def layer_norm(x, scale=None, bias=None, reduction_axes=-1, feature_axes=-1, epsilon=1e-6,
               mask=None):
  return standardize(x, reduction_axes, feature_axes, scale, bias, epsilon, mask)


def rms_norm(x, scale=None, reduction_axes=-1, feature_axes=-1, epsilon=1e-6, mask=None):
  return standardize(x, reduction_axes, feature_axes, scale, None, epsilon, mask, centred=False)


def instance_norm(x, scale=None, bias=None, feature_axes=-1, epsilon=1e-6, mask=None):
  feat = _axes(np.ndim(x), feature_axes)
  reduce_axes = tuple(a for a in range(1, np.ndim(x)) if a not in feat)
  return standardize(x, reduce_axes, feat, scale, bias, epsilon, mask)


def group_norm(x, num_groups, scale=None, bias=None, reduction_axes=None, epsilon=1e-6,
               mask=None):
  """Group norm, channels last: ``[..., C]`` viewed as ``[..., G, C/G]``.

  Statistics over the group's channels and the other reduction axes (default: every axis but the
  first).
  """
  x = np.asarray(x, np.float64)
  ndim, channels = x.ndim, x.shape[-1]
  red = tuple(range(1, ndim)) if reduction_axes is None else _axes(ndim, reduction_axes)
  grouped = x.reshape((*x.shape[:-1], num_groups, channels // num_groups))
  grouped_red = (*(a for a in red if a != ndim - 1), ndim)
  grouped_mask = None
  if mask is not None:
    full = np.broadcast_to(np.asarray(mask, bool), x.shape)
    grouped_mask = full.reshape(grouped.shape)
  y = standardize(grouped, grouped_red, (ndim - 1, ndim), None, None, epsilon, grouped_mask)
  y = y.reshape(x.shape)
  if scale is not None:
    y = y * np.asarray(scale, np.float64)
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y

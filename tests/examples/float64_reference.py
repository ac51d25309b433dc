"""Float64 NumPy references for the example's first norm layer.

Its input is a convolution of the images (no normalisation before it), so its batch statistics and
their drift follow from the images and the kernel alone.
"""

import numpy as np


def conv_same_float64(images_NHWC: np.ndarray, kernel_HWIO: np.ndarray) -> np.ndarray:
  """A stride-1 'SAME' cross-correlation (what `flax.linen.Conv` computes), in float64."""
  x = np.asarray(images_NHWC, np.float64)
  w = np.asarray(kernel_HWIO, np.float64)
  kh, kw = w.shape[:2]
  padded = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  height, width = x.shape[1:3]
  out = np.zeros((*x.shape[:3], w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("nhwc,cd->nhwd", padded[:, i:i + height, j:j + width, :], w[i, j])
  return out


def first_layer_moments(images_NHWC: np.ndarray, kernel_HWIO: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
  """The per-channel mean and biased variance of the first convolution's output over N, H, W."""
  features = conv_same_float64(images_NHWC, kernel_HWIO)
  return features.mean(axis=(0, 1, 2)), features.var(axis=(0, 1, 2))


def drift_means(batch_mean: np.ndarray, batch_var: np.ndarray, running_mean: np.ndarray,
                running_var: np.ndarray, epsilon: float) -> tuple[float, float]:
  """``(mean_c |smd_c|, mean_c |log var ratio_c|)`` of batch statistics against running ones.

  ``smd = (mu_B - mu) / sqrt(var + eps)``, ``log var ratio = log(var_B + eps) - log(var + eps)``.
  """
  running_mean = np.asarray(running_mean, np.float64)
  running_var = np.asarray(running_var, np.float64)
  smd = (batch_mean - running_mean) / np.sqrt(running_var + epsilon)
  log_ratio = np.log(batch_var + epsilon) - np.log(running_var + epsilon)
  return float(np.mean(np.abs(smd))), float(np.mean(np.abs(log_ratio)))

"""NNX precise statistics against a float64 NumPy forward pass of the same model."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import tools
import bnjax.nnx
from tests import reference

F32 = reference.TOLERANCES["float32"]


class _TwoLayers(nnx.Module):
  """Linear -> BatchNorm -> relu -> Dropout -> Linear -> BatchNorm (unbiased, cumulative)."""

  def __init__(self, rngs: nnx.Rngs):
    self.dense1 = nnx.Linear(2, 4, rngs=rngs)
    self.bn1 = bnjax.nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.dense2 = nnx.Linear(4, 3, rngs=rngs)
    self.bn2 = bnjax.nnx.BatchNorm(3, momentum=None, unbiased_running_var=True, rngs=rngs)

  def __call__(self, x):
    x = self.dropout(nnx.relu(self.bn1(self.dense1(x))))
    return self.bn2(self.dense2(x))


def _batches():
  rng = np.random.default_rng(0)
  # Means far from 0 and a smaller last batch: equal weights per batch or a mean of batch variances
  # would differ from the population's.
  return [jnp.asarray(rng.normal(5.0 + i, 1.0 + i, (n, 2)), jnp.float32)
          for i, n in enumerate((8, 8, 3))]


def _population_reference(model, batches):
  """Each layer's float64 population statistics, the first normalising by batch, no dropout."""
  def f64(variable):
    return np.asarray(variable[...], np.float64)

  inputs1, inputs2 = [], []
  for x in batches:
    h1 = np.asarray(x, np.float64) @ f64(model.dense1.kernel) + f64(model.dense1.bias)
    mean, var, _ = reference.moments(h1)
    a = np.maximum(reference.normalize(h1, mean, var, f64(model.bn1.scale), f64(model.bn1.bias)),
                   0)
    inputs1.append(h1)
    inputs2.append(a @ f64(model.dense2.kernel) + f64(model.dense2.bias))
  h1, h2 = np.concatenate(inputs1), np.concatenate(inputs2)
  n = len(h2)
  return (h1.mean(0), h1.var(0)), (h2.mean(0), h2.var(0) * n / (n - 1))


def test_nnx_precise_batch_stats_equal_float64_population_statistics_in_place():
  model = _TwoLayers(nnx.Rngs(0))
  model.eval()  # dropout off; the norm layers still normalise by batch during the pass
  batches = _batches()
  params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  rng_before = jax.tree.map(np.asarray, nnx.state(model, nnx.RngCount))
  done = []
  returned = tools.nnx_precise_batch_stats(model, batches,
                                           progress=lambda *args: done.append(args))
  (mean1, var1), (mean2, var2) = _population_reference(model, batches)
  assert returned is model
  np.testing.assert_allclose(model.bn1.mean[...], mean1, **F32)
  np.testing.assert_allclose(model.bn1.var[...], var1, **F32)
  np.testing.assert_allclose(model.bn2.mean[...], mean2, **F32)
  np.testing.assert_allclose(model.bn2.var[...], var2, **F32)
  # The cumulative layer counts one update per batch, as three training steps would.
  np.testing.assert_array_equal(model.bn2.count[...], [3, 3, 3])
  assert done == [(1, 3), (2, 3), (3, 3)]
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params_before)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.RngCount), rng_before)
  assert model.bn1.use_running_average  # its modes are kept
  assert model.dropout.deterministic


def test_nnx_precise_batch_stats_runs_dropout_as_the_model_is_set():
  model = _TwoLayers(nnx.Rngs(1))
  model.train()  # dropout on: only the layer after it sees different inputs
  batches = _batches()[:2]  # one shape: one compilation
  tools.nnx_precise_batch_stats(model, batches)
  (mean1, var1), (mean2, _) = _population_reference(model, batches)
  np.testing.assert_allclose(model.bn1.mean[...], mean1, **F32)
  np.testing.assert_allclose(model.bn1.var[...], var1, **F32)
  assert not np.allclose(model.bn2.mean[...], mean2, rtol=1e-2)


def test_nnx_precise_batch_stats_needs_a_norm_layer_in_training_mode_and_a_batch():
  class _AlwaysEval(nnx.Module):
    def __init__(self):
      self.bn = bnjax.nnx.BatchNorm(1, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.bn(x, use_running_average=True)

  with pytest.raises(ValueError, match=r"no bnjax\.nnx\.BatchNorm layer ran in training mode"):
    tools.nnx_precise_batch_stats(_AlwaysEval(), [jnp.ones((2, 1))])
  with pytest.raises(ValueError, match=r"`batches` is empty"):
    tools.nnx_precise_batch_stats(_AlwaysEval(), [])
  with pytest.raises(TypeError, match=r"`model` must be an nnx\.Module; got dict"):
    tools.nnx_precise_batch_stats({}, [jnp.ones((2, 1))])

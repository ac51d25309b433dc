"""Precise population statistics against a float64 NumPy forward pass of the same model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import tools
from tests import reference

F32 = reference.TOLERANCES["float32"]


class _TwoLayers(nn.Module):
  """Dense -> BatchNorm -> relu -> Dropout -> Dense -> BatchNorm (unbiased running variance)."""

  @nn.compact
  def __call__(self, x, train, deterministic):
    x = nn.Dense(4, name="dense1")(x)
    x = bnjax.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
    x = nn.Dropout(0.5, deterministic=deterministic)(nn.relu(x))
    x = nn.Dense(3, name="dense2")(x)
    return bnjax.BatchNorm(use_running_average=not train, unbiased_running_var=True,
                           name="bn2")(x)


def _model_and_batches():
  model = _TwoLayers()
  rng = np.random.default_rng(0)
  # Means far from 0 and a smaller last batch: equal weights per batch or a mean of batch variances
  # would differ from the population's.
  batches = [jnp.asarray(rng.normal(5.0 + i, 1.0 + i, (n, 2)), jnp.float32)
             for i, n in enumerate((8, 8, 3))]
  variables = model.init(jax.random.key(0), batches[0], train=False, deterministic=True)
  return model, variables, batches


def _population_reference(variables, batches):
  """Each layer's float64 population statistics, upstream layers normalising by batch."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  inputs1, inputs2 = [], []
  for x in batches:
    h1 = np.asarray(x, np.float64) @ p["dense1"]["kernel"] + p["dense1"]["bias"]
    mean, var, _ = reference.moments(h1)
    a = np.maximum(reference.normalize(h1, mean, var, p["bn1"]["scale"], p["bn1"]["bias"]), 0)
    inputs1.append(h1)
    inputs2.append(a @ p["dense2"]["kernel"] + p["dense2"]["bias"])
  h1, h2 = np.concatenate(inputs1), np.concatenate(inputs2)
  n = len(h2)
  return (h1.mean(0), h1.var(0)), (h2.mean(0), h2.var(0) * n / (n - 1))


def test_precise_batch_stats_equal_float64_population_statistics_of_each_layer():
  model, variables, batches = _model_and_batches()
  done = []
  new = tools.precise_batch_stats(model.apply, variables, iter(batches), train=True,
                                  deterministic=True, progress=lambda *args: done.append(args))
  (mean1, var1), (mean2, var2) = _population_reference(variables, batches)
  np.testing.assert_allclose(new["batch_stats"]["bn1"]["mean"], mean1, **F32)
  np.testing.assert_allclose(new["batch_stats"]["bn1"]["var"], var1, **F32)
  np.testing.assert_allclose(new["batch_stats"]["bn2"]["mean"], mean2, **F32)
  np.testing.assert_allclose(new["batch_stats"]["bn2"]["var"], var2, **F32)
  assert done == [(1, None), (2, None), (3, None)]  # an iterator has no length
  assert new["params"] is variables["params"]
  assert jax.tree.structure(new) == jax.tree.structure(variables)
  # The inputs' untouched running statistics differ: the test sees the replacement.
  assert not np.allclose(variables["batch_stats"]["bn1"]["mean"], mean1)


def test_building_blocks_give_population_statistics_of_batches_of_unequal_size():
  params, state = bnjax.init(2)
  rng = np.random.default_rng(1)
  xs = [rng.normal(1e3, 1.0, (n, 2)).astype(np.float32) for n in (5, 2, 9)]
  step = jax.jit(lambda x: bnjax.batch_norm(params, state, x, True, return_stats=True)[2])
  total = None
  for x in xs:
    total = tools.merge_population(total, tools.population_moments(step(jnp.asarray(x))))
  pooled = np.concatenate(xs).astype(np.float64)
  for unbiased in (False, True):
    got = tools.population_state(total, unbiased=unbiased)
    np.testing.assert_allclose(got.mean, pooled.mean(0), **F32)
    np.testing.assert_allclose(got.var, pooled.var(0, ddof=int(unbiased)), rtol=1e-4)


def test_precise_batch_stats_without_training_mode_is_an_error():
  model, variables, batches = _model_and_batches()
  with pytest.raises(ValueError, match="no bnjax.BatchNorm layer ran in training mode"):
    tools.precise_batch_stats(model.apply, variables, batches, train=False, deterministic=True)
  with pytest.raises(ValueError, match="empty"):
    tools.precise_batch_stats(model.apply, variables, [], train=True, deterministic=True)

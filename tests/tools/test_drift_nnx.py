"""NNX drift diagnostics against float64 NumPy and against `linen_drift` on the same weights."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax import tools
import bnjax.nnx
from tests import reference

F32 = reference.TOLERANCES["float32"]


class _NnxTwoLayers(nnx.Module):
  """Linear -> BatchNorm (ε 1e-3) -> relu -> Linear -> BatchNorm (unbiased running variance)."""

  def __init__(self, rngs: nnx.Rngs):
    self.dense1 = nnx.Linear(2, 4, rngs=rngs)
    self.bn1 = bnjax.nnx.BatchNorm(4, epsilon=1e-3, rngs=rngs)
    self.dense2 = nnx.Linear(4, 3, rngs=rngs)
    self.bn2 = bnjax.nnx.BatchNorm(3, unbiased_running_var=True, rngs=rngs)

  def __call__(self, x):
    return self.bn2(self.dense2(nnx.relu(self.bn1(self.dense1(x)))))


class _LinenTwoLayers(nn.Module):
  """The same model in linen."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="dense1")(x)
    x = nn.relu(bnjax.BatchNorm(use_running_average=False, epsilon=1e-3, name="bn1")(x))
    x = nn.Dense(3, name="dense2")(x)
    return bnjax.BatchNorm(use_running_average=False, unbiased_running_var=True, name="bn2")(x)


def _model(seed):
  """The NNX model, its running statistics moved away from 0 and 1 (a swapped one would show)."""
  model = _NnxTwoLayers(nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for layer in (model.bn1, model.bn2):
    layer.mean[...] = jnp.asarray(rng.normal(0.0, 1.0, layer.mean.shape), jnp.float32)
    layer.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, layer.var.shape), jnp.float32)
  model.eval()  # nnx_drift puts the norm layers in training mode itself
  return model


def _linen_variables(model):
  """The NNX model's weights and running statistics as the linen model's variables."""
  def layer(module, *names):
    return {name: getattr(module, name)[...] for name in names}

  return {"params": {"dense1": layer(model.dense1, "kernel", "bias"),
                     "bn1": layer(model.bn1, "scale", "bias"),
                     "dense2": layer(model.dense2, "kernel", "bias"),
                     "bn2": layer(model.bn2, "scale", "bias")},
          "batch_stats": {"bn1": layer(model.bn1, "mean", "var"),
                          "bn2": layer(model.bn2, "mean", "var")}}


def _drift_reference(batch_mean, batch_var, running_mean, running_var, epsilon):
  """float64 standardised mean difference and log variance ratio."""
  running_mean, running_var = (np.asarray(v[...], np.float64) for v in (running_mean, running_var))
  smd = (batch_mean - running_mean) / np.sqrt(running_var + epsilon)
  return smd, np.log((batch_var + epsilon) / (running_var + epsilon))


def _two_layer_reference(model, x):
  """Each layer's float64 drift, the first layer normalising with its batch statistics."""
  def f64(variable):
    return np.asarray(variable[...], np.float64)

  h1 = np.asarray(x, np.float64) @ f64(model.dense1.kernel) + f64(model.dense1.bias)
  mean1, var1, _ = reference.moments(h1)
  a = np.maximum(reference.normalize(h1, mean1, var1, f64(model.bn1.scale), f64(model.bn1.bias),
                                     epsilon=1e-3), 0)
  h2 = a @ f64(model.dense2.kernel) + f64(model.dense2.bias)
  mean2, var2, _ = reference.moments(h2)
  return {"bn1": _drift_reference(mean1, var1, model.bn1.mean, model.bn1.var, 1e-3),
          "bn2": _drift_reference(mean2, var2, model.bn2.mean, model.bn2.var, 1e-5)}


def test_nnx_drift_equals_float64_and_linen_drift_on_the_same_weights():
  model = _model(seed=1)
  x = jnp.asarray(np.random.default_rng(2).normal(3.0, 2.0, (16, 2)), jnp.float32)
  state_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  report = tools.nnx_drift(model, x)
  want = _two_layer_reference(model, x)
  assert list(report) == ["bn1", "bn2"]
  for name in ("bn1", "bn2"):
    smd, log_ratio = want[name]
    np.testing.assert_allclose(report[name].smd, smd, **F32)
    np.testing.assert_allclose(report[name].log_var_ratio, log_ratio, **F32)
    np.testing.assert_allclose(report[name].max_abs_smd, np.max(np.abs(smd)), **F32)
    np.testing.assert_allclose(report[name].mean_abs_log_var_ratio, np.mean(np.abs(log_ratio)),
                               **F32)
    assert int(report[name].skipped_channels) == 0
  variables = _linen_variables(model)

  @jax.jit
  def linen_step(variables, x):
    _, updates = _LinenTwoLayers().apply(variables, x, mutable=tools.DRIFT_COLLECTIONS)
    return tools.linen_drift(variables, updates)

  linen_report = linen_step(variables, x)
  for name in ("bn1", "bn2"):
    for field in report[name]._fields:
      np.testing.assert_allclose(getattr(report[name], field), getattr(linen_report[name], field),
                                 **F32)
  # The model is not changed: its running statistics are those it had.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), state_before)


def test_nnx_drift_counts_channels_that_skipped_a_non_finite_batch_and_pools_calls():
  class _Shared(nnx.Module):
    def __init__(self):
      self.norm = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))

    def __call__(self, xs):
      return [self.norm(x) for x in xs]

  a = jnp.array([[1.0, 2.0, 0.0], [3.0, jnp.inf, 1.0], [4.0, 0.0, 2.0]])
  b = jnp.array([[-1.0, 0.0, 7.0], [5.0, 1.0, 9.0]])
  layer = tools.nnx_drift(_Shared(), [a, b])["norm"]
  assert int(layer.skipped_channels) == 1
  assert np.isfinite(np.asarray(layer.smd)).tolist() == [True, False, True]
  pooled = np.concatenate([a, b])[:, [0, 2]].astype(np.float64)  # the finite channels
  smd, log_ratio = _drift_reference(pooled.mean(0), pooled.var(0), jnp.zeros(2), jnp.ones(2),
                                    1e-5)
  np.testing.assert_allclose(np.asarray(layer.smd)[[0, 2]], smd, **F32)
  np.testing.assert_allclose(np.asarray(layer.log_var_ratio)[[0, 2]], log_ratio, **F32)

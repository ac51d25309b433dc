"""Drift diagnostics against float64 NumPy: the pure function and every layer of a linen model."""

import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import bnjax
from bnjax import tools
from tests import reference

F32 = reference.TOLERANCES["float32"]
AXIS = "batch"


def _drift_reference(batch_mean, batch_var, running_mean, running_var, epsilon):
  """float64 standardised mean difference and log variance ratio, and the layer summary."""
  def f64(v):
    return np.asarray(v, np.float64)

  smd = (f64(batch_mean) - f64(running_mean)) / np.sqrt(f64(running_var) + epsilon)
  log_ratio = np.log((f64(batch_var) + epsilon) / (f64(running_var) + epsilon))
  return smd, log_ratio, np.max(np.abs(smd)), np.mean(np.abs(log_ratio))


def _assert_drift(got, want):
  smd, log_ratio, max_abs_smd, mean_abs_log_ratio = want
  np.testing.assert_allclose(got.smd, smd, **F32)
  np.testing.assert_allclose(got.log_var_ratio, log_ratio, **F32)
  np.testing.assert_allclose(got.max_abs_smd, max_abs_smd, **F32)
  np.testing.assert_allclose(got.mean_abs_log_var_ratio, mean_abs_log_ratio, **F32)


def test_drift_equals_float64_per_channel_and_summary():
  rng = np.random.default_rng(0)
  stats = [rng.normal(0.0, 2.0, (2, 3)), rng.uniform(0.1, 5.0, (2, 3)),
           rng.normal(0.0, 2.0, (2, 3)), rng.uniform(0.1, 5.0, (2, 3))]
  got = jax.jit(tools.drift, static_argnums=4)(
      *(jnp.asarray(s, jnp.float32) for s in stats), 1e-3)
  _assert_drift(got, _drift_reference(*stats, 1e-3))
  assert got.smd.dtype == jnp.float32 and got.skipped_channels is None


def test_drift_rejects_statistics_of_different_shapes():
  with pytest.raises(ValueError, match=r"running_var.*one shape.*\(3,\)"):
    tools.drift(jnp.zeros(2), jnp.ones(2), jnp.zeros(2), jnp.ones(3))


class _TwoLayers(nn.Module):
  """Dense -> BatchNorm (ε 1e-3) -> relu -> Dense -> BatchNorm (unbiased running variance)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="dense1")(x)
    x = nn.relu(bnjax.BatchNorm(use_running_average=False, epsilon=1e-3, name="bn1")(x))
    x = nn.Dense(3, name="dense2")(x)
    return bnjax.BatchNorm(use_running_average=False, unbiased_running_var=True, name="bn2")(x)


def _with_running_stats(variables, seed):
  """Running statistics away from 0 and 1, so that a swapped mean or variance shows."""
  rng = np.random.default_rng(seed)
  batch_stats = jax.tree.map(
      lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32), variables["batch_stats"])
  return {**variables, "batch_stats": batch_stats}


def _two_layer_reference(variables, x):
  """Each layer's float64 batch moments, the first layer normalising with its batch statistics."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  h1 = np.asarray(x, np.float64) @ p["dense1"]["kernel"] + p["dense1"]["bias"]
  mean1, var1, _ = reference.moments(h1)
  a = np.maximum(reference.normalize(h1, mean1, var1, p["bn1"]["scale"], p["bn1"]["bias"],
                                     epsilon=1e-3), 0)
  h2 = a @ p["dense2"]["kernel"] + p["dense2"]["bias"]
  mean2, var2, _ = reference.moments(h2)
  running = variables["batch_stats"]
  return {"bn1": _drift_reference(mean1, var1, running["bn1"]["mean"], running["bn1"]["var"],
                                  1e-3),
          "bn2": _drift_reference(mean2, var2, running["bn2"]["mean"], running["bn2"]["var"],
                                  1e-5)}


def test_linen_drift_of_every_layer_equals_float64_under_jit():
  model = _TwoLayers()
  x = jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, (16, 2)), jnp.float32)
  variables = _with_running_stats(model.init(jax.random.key(0), x), seed=2)

  @jax.jit
  def step(variables, x):
    _, updates = model.apply(variables, x, mutable=tools.DRIFT_COLLECTIONS)
    return tools.linen_drift(variables, updates)

  report = step(variables, x)
  want = _two_layer_reference(variables, x)
  assert list(report) == ["bn1", "bn2"]
  for name in ("bn1", "bn2"):
    _assert_drift(report[name], want[name])
    assert int(report[name].skipped_channels) == 0


def test_linen_drift_counts_channels_that_skipped_a_non_finite_batch():
  model = bnjax.BatchNorm(use_running_average=False)
  x = jnp.array([[1.0, 2.0, 0.0], [3.0, jnp.inf, 1.0]])
  variables = model.init(jax.random.key(0), x)
  _, updates = model.apply(variables, x, mutable=tools.DRIFT_COLLECTIONS)
  layer = tools.linen_drift(variables, updates)[""]
  assert int(layer.skipped_channels) == 1
  assert np.isfinite(np.asarray(layer.smd)).tolist() == [True, False, True]
  # Without the diagnostics collection there is nothing to count.
  _, updates = model.apply(variables, x, mutable=["batch_stats", bnjax.linen.BATCH_MOMENTS])
  assert tools.linen_drift(variables, updates)[""].skipped_channels is None


class _Shared(nn.Module):
  """One BatchNorm called on two inputs of unequal size."""

  @nn.compact
  def __call__(self, a, b):
    norm = bnjax.BatchNorm(use_running_average=False, name="shared")
    return norm(a), norm(b)


def test_linen_drift_of_a_layer_called_twice_uses_the_pooled_moments():
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.normal(5.0, 1.0, (6, 2)), jnp.float32)
  b = jnp.asarray(rng.normal(-1.0, 3.0, (2, 2)), jnp.float32)
  model = _Shared()
  variables = _with_running_stats(model.init(jax.random.key(0), a, b), seed=4)
  _, updates = model.apply(variables, a, b, mutable=tools.DRIFT_COLLECTIONS)
  mean, var, _ = reference.moments(np.concatenate([a, b]))
  running = variables["batch_stats"]["shared"]
  got = tools.linen_drift(variables, updates)["shared"]
  _assert_drift(got, _drift_reference(mean, var, running["mean"], running["var"], 1e-5))
  assert int(got.skipped_channels) == 0


def test_linen_drift_across_devices_equals_float64_on_the_global_batch():
  assert jax.device_count() >= 8
  model = bnjax.BatchNorm(use_running_average=False, axis_name=AXIS)
  rng = np.random.default_rng(5)
  # A different distribution on every device: a per-device drift would differ from the global one.
  x = np.concatenate([rng.normal(d, 1.0 + d, (2, 3)) for d in range(8)]).astype(np.float32)
  variables = _with_running_stats(model.init(jax.random.key(0), jnp.asarray(x[:2])), seed=6)

  def step(variables, x):
    _, updates = model.apply(variables, x, mutable=tools.DRIFT_COLLECTIONS)
    return tools.linen_drift(variables, updates)

  mesh = Mesh(np.array(jax.devices()[:8]), (AXIS,))
  report = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))(
      variables, jnp.asarray(x))
  mean, var, _ = reference.moments(x)
  running = variables["batch_stats"]
  _assert_drift(report[""], _drift_reference(mean, var, running["mean"], running["var"], 1e-5))


def test_linen_drift_says_how_to_collect_the_moments():
  model = bnjax.BatchNorm(use_running_average=False)
  x = jnp.array([[1.0], [2.0]])
  variables = model.init(jax.random.key(0), x)
  _, updates = model.apply(variables, x, mutable=["batch_stats"])
  with pytest.raises(ValueError, match="batch_moments"):
    tools.linen_drift(variables, updates)


def test_drift_summary_flattens_each_layers_summary():
  model = _TwoLayers()
  x = jnp.asarray(np.random.default_rng(7).normal(0.0, 1.0, (8, 2)), jnp.float32)
  variables = _with_running_stats(model.init(jax.random.key(0), x), seed=8)
  _, updates = model.apply(variables, x, mutable=tools.DRIFT_COLLECTIONS)
  report = tools.linen_drift(variables, updates)
  summary = tools.drift_summary(report)
  assert sorted(summary) == sorted(f"{layer}/{field}" for layer in ("bn1", "bn2") for field in (
      "max_abs_smd", "mean_abs_log_var_ratio", "skipped_channels"))
  want = _two_layer_reference(variables, x)
  for layer in ("bn1", "bn2"):
    np.testing.assert_allclose(summary[f"{layer}/max_abs_smd"], want[layer][2], **F32)
    np.testing.assert_allclose(summary[f"{layer}/mean_abs_log_var_ratio"], want[layer][3], **F32)


def test_importing_the_drift_tools_imports_no_flax():
  # `linen_drift` imports `bnjax.linen` when called; importing the module must not.
  code = ("import sys, bnjax.tools.drift; "
          "print(sorted(m for m in ('flax', 'jax') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
  assert result.stdout.split() == ["['jax']"]

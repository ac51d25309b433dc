"""Lowering for accelerators, checked from CPU with `jax.export`.

A training step of `bnjax.batch_norm`, of `bnjax.BatchNorm` inside a small CNN trained with optax,
and of both under `shard_map` over 8 devices, are exported for CPU, CUDA and TPU. The CUDA lowering
must contain no data-dependent conditional (a GPU conditional reads its predicate back to the host
once per layer): every `stablehlo.case` left in it is the platform choice, indexed by a constant.
Symbolic batch sizes export where "more than one value per channel" is decidable.
"""

import re

import flax.linen as nn
import jax
from jax import export
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from tests import reference

PLATFORMS = ("cpu", "cuda", "tpu")
AXIS = "data"


def _batch(shape=(16, 4, 4, 8), seed=0, loc=3.0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 2.0 + loc


def _function_step(params, state, x):
  def loss(params):
    y, new_state = bnjax.batch_norm(params, state, x, True)
    return jnp.sum(jnp.tanh(y)), new_state

  (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, grads, new_state


class _CNN(nn.Module):
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: bnjax.BatchNorm(use_running_average=not train, axis_name=self.axis_name)
    x = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
    x = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
    return nn.Dense(4)(x.mean(axis=(1, 2)))


def _module_step(axis_name=None):
  model, tx = _CNN(axis_name), optax.sgd(0.1, momentum=0.9)
  variables = model.init(jax.random.key(0), _batch()[:2], train=False)
  opt_state = tx.init(variables["params"])

  def step(params, batch_stats, opt_state, x, labels):
    def loss(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
    if axis_name is not None:  # the mean over the global batch: the gradients are summed.
      value = jax.lax.psum(value, axis_name) / jax.lax.axis_size(axis_name)
      grads = jax.tree.map(lambda g: g / jax.lax.axis_size(axis_name), grads)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, param_updates), updates["batch_stats"], opt_state, value)

  labels = jnp.arange(16) % 4
  return step, (variables["params"], variables["batch_stats"], opt_state, _batch(), labels)


def _data_conditionals(mlir_text):
  """The `stablehlo.case` ops whose index is not a constant (nor a case indexed by one)."""
  found = []
  for body in mlir_text.split("func.func")[1:]:
    defined = dict(re.findall(r"(%[\w#.]+)(?::\d+)? = (\"?stablehlo\.\w+)", body))
    for name, index in re.findall(r"(%[\w#.]+)(?::\d+)? = \"stablehlo\.case\"\((%[\w#.]+)\)", body):
      source = defined.get(index, "")
      if source == "stablehlo.constant":
        continue
      if source == '"stablehlo.case':
        inner = re.search(re.escape(index) + r"(?::\d+)? = \"stablehlo\.case\"\((%[\w#.]+)\)", body)
        if inner and defined.get(inner.group(1)) == "stablehlo.constant":
          continue
      found.append(name)
  return found


def test_conditional_finder_sees_a_data_dependent_cond():
  f = jax.jit(lambda x: jax.lax.cond(x.sum() > 0, lambda: x + 1, lambda: x - 1))
  text = export.export(f, platforms=("cuda",))(jnp.ones(3)).mlir_module()
  assert len(_data_conditionals(text)) == 1


def test_function_training_step_exports_for_every_platform_and_runs_on_cpu():
  params, state = bnjax.init(8)
  x = _batch()
  exported = export.export(jax.jit(_function_step), platforms=PLATFORMS)(params, state, x)
  value, grads, new_state = exported.call(params, state, x)
  expected = jax.jit(_function_step)(params, state, x)
  for a, b in zip(jax.tree.leaves((value, grads, new_state)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cuda_lowering_of_the_training_step_has_no_data_dependent_conditional():
  params, state = bnjax.init(8)
  text = export.export(jax.jit(_function_step), platforms=("cuda",))(
      params, state, _batch()).mlir_module()
  assert _data_conditionals(text) == []
  # On CPU the adaptive route's conditionals are there: the finder is not blind.
  cpu = export.export(jax.jit(_function_step), platforms=("cpu",))(
      params, state, _batch()).mlir_module()
  assert _data_conditionals(cpu)


def test_module_in_a_cnn_with_optax_exports_for_every_platform():
  step, args = _module_step()
  exported = export.export(jax.jit(step), platforms=PLATFORMS)(*args)
  assert exported.platforms == PLATFORMS
  assert _data_conditionals(export.export(jax.jit(step), platforms=("cuda",))(*args)
                            .mlir_module()) == []
  got = exported.call(*args)
  expected = jax.jit(step)(*args)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _sharded(fn, in_specs, out_specs):
  assert jax.device_count() >= 8
  mesh = jax.make_mesh((8,), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))
  return mesh, jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def test_function_under_shard_map_exports_and_matches_the_global_batch():
  params, state = bnjax.init(8)
  x = _batch((64, 8), seed=1)

  def step(params, state, x):
    def loss(params):
      y, new_state = bnjax.batch_norm(params, state, x, True, axis_name=AXIS)
      return jnp.sum(jnp.tanh(y)), new_state
    (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return jax.lax.psum(value, AXIS), grads, new_state

  mesh, sharded = _sharded(step, (P(), P(), P(AXIS)), (P(), P(), P()))
  x = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
  for platforms in (PLATFORMS, ("cuda",)):
    exported = export.export(sharded, platforms=platforms)(params, state, x)
    if platforms == ("cuda",):
      assert _data_conditionals(exported.mlir_module()) == []
  value, grads, new_state = export.export(sharded, platforms=PLATFORMS)(
      params, state, x).call(params, state, x)
  expected_value, expected_grads, expected_state = jax.jit(_function_step)(params, state, x)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  np.testing.assert_allclose(new_state.var, expected_state.var, rtol=1e-5)
  np.testing.assert_allclose(grads.scale, expected_grads.scale, rtol=1e-4, atol=1e-5)


def test_module_under_shard_map_exports_and_matches_the_global_batch():
  step, args = _module_step(AXIS)
  params, batch_stats, opt_state, x, labels = args
  mesh, sharded = _sharded(step, (P(), P(), P(), P(AXIS), P(AXIS)), (P(), P(), P(), P()))
  put = lambda v: jax.device_put(v, NamedSharding(mesh, P(AXIS)))
  sharded_args = (params, batch_stats, opt_state, put(x), put(labels))
  exported = export.export(sharded, platforms=PLATFORMS)(*sharded_args)
  assert exported.nr_devices == 8
  assert _data_conditionals(export.export(sharded, platforms=("cuda",))(*sharded_args)
                            .mlir_module()) == []
  got = exported.call(*sharded_args)
  single_step, _ = _module_step()
  expected = jax.jit(single_step)(*args)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- symbolic shapes


def test_symbolic_batch_with_a_decidable_constraint_exports_and_runs():
  b, = export.symbolic_shape("b", constraints=["b >= 2"])
  params, state = bnjax.init(8)
  spec = jax.ShapeDtypeStruct((b, 4, 4, 8), jnp.float32)
  exported = export.export(jax.jit(_function_step), platforms=PLATFORMS)(params, state, spec)
  for rows in (2, 5):
    x = _batch((rows, 4, 4, 8), seed=rows)
    got = exported.call(params, state, x)
    expected = jax.jit(_function_step)(params, state, x)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def test_symbolic_batch_output_matches_reference():
  b, = export.symbolic_shape("b", constraints=["b >= 2"])
  params, state = bnjax.init(3)
  f = jax.jit(lambda x: bnjax.batch_norm(params, state, x, True))
  exported = export.export(f)(jax.ShapeDtypeStruct((b, 3), jnp.float32))
  x = _batch((7, 3), seed=3)
  y, new_state = exported.call(x)
  y_ref, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, params.scale,
                                                  params.bias)
  np.testing.assert_allclose(y, y_ref, **reference.TOLERANCES["float32"])
  np.testing.assert_allclose(new_state.var, var_ref, **reference.TOLERANCES["float32"])


def test_unconstrained_symbolic_batch_gets_a_clear_error():
  b, = export.symbolic_shape("b")
  params, state = bnjax.init(3)
  f = jax.jit(lambda x: bnjax.batch_norm(params, state, x, True))
  with pytest.raises(ValueError, match=r"more than 1 value per channel.*b >= 2"):
    export.export(f)(jax.ShapeDtypeStruct((b, 3), jnp.float32))

"""bnjax under the transformations Flax's own guides use: per-member parameters under `vmap`,
`pmap` and `shard_map`, per-example `vmap`, nested `vmap`, `nn.vmap` ensembles, gradients through
`vmap` with groups, `lax.scan` training loops.

Gradients are compared with an independent float64 reference: batch norm written out in plain
`jax.numpy` (mean, two-pass variance) over the concatenated global batch, differentiated by JAX's
autodiff in float64; and with bnjax's own autodiff path (``custom_vjp=False``).
"""

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import reference

F32 = reference.TOLERANCES["float32"]
MEMBERS = 4  # ensemble members / devices
ROWS = 5  # rows per member
C = 3
MOMENTUM = 0.9
LEARNING_RATE = 0.5


def _data(seed=0, loc=2.0):
  """[MEMBERS, ROWS, C] float32, a different offset per member so no two agree."""
  noise = jax.random.normal(jax.random.key(seed), (MEMBERS, ROWS, C), jnp.float32)
  return noise * 1.5 + loc + jnp.arange(MEMBERS, dtype=jnp.float32)[:, None, None]


def _member_params():
  """Per-member scale and bias, [MEMBERS, C], all different."""
  scale = 1.0 + 0.25 * jnp.arange(MEMBERS * C, dtype=jnp.float32).reshape(MEMBERS, C)
  bias = 0.1 * jnp.arange(MEMBERS * C, dtype=jnp.float32).reshape(MEMBERS, C) - 0.3
  return bnjax.BatchNormParams(scale, bias)


def _weights(seed=3):
  """The loss's per-position weights, [MEMBERS, ROWS, C]."""
  return jax.random.normal(jax.random.key(seed), (MEMBERS, ROWS, C), jnp.float32)


def _reference_loss(scale_MC, bias_MC, x_MRC, w_MRC):
  """sum(w * tanh(y)), with y batch norm over all members' rows and each member's own affine."""
  x_NC = x_MRC.reshape(-1, C)
  mean_C = x_NC.mean(0)
  var_C = ((x_NC - mean_C[None]) ** 2).mean(0)
  x_hat = (x_MRC - mean_C[None, None]) / jnp.sqrt(var_C[None, None] + 1e-5)
  y = x_hat * scale_MC[:, None, :] + bias_MC[:, None, :]
  return jnp.sum(w_MRC * jnp.tanh(y))


def _reference_steps(params, x, w, steps):
  """float64 SGD on the reference loss: the parameters and x-gradient after each step."""
  with jax.enable_x64(True):
    scale, bias = (np.asarray(v, np.float64) for v in params)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    history = []
    for _ in range(steps):
      g_scale, g_bias, g_x = jax.grad(_reference_loss, argnums=(0, 1, 2))(scale, bias, x64, w64)
      history.append((np.asarray(g_x), np.asarray(g_scale), np.asarray(g_bias)))
      scale, bias = scale - LEARNING_RATE * g_scale, bias - LEARNING_RATE * g_bias
  return history


def _train_steps(grad_fn, params, x, w, steps):
  """The same SGD with bnjax's gradients: (dx, dscale, dbias) before each update."""
  history = []
  for _ in range(steps):
    g_x, g_params = grad_fn(params, x, w)
    history.append((np.asarray(g_x), np.asarray(g_params.scale), np.asarray(g_params.bias)))
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, g_params)
  return history


def _assert_histories_close(ours, expected, atol=1e-4, rtol=1e-4):
  for step, (got, want) in enumerate(zip(ours, expected)):
    for name, a, b in zip(("dx", "dscale", "dbias"), got, want):
      np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=f"{name} at step {step}")


def _member_loss(params, x_RC, w_RC, axis_name, custom_vjp):
  state = bnjax.BatchNormState(jnp.zeros(C), jnp.ones(C))
  y, _ = bnjax.batch_norm(params, state, x_RC, True, axis_name=axis_name, custom_vjp=custom_vjp)
  return jnp.sum(w_RC * jnp.tanh(y))


# ----------------------------------------------------------------------------- per-member params


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_vmap_ensemble_with_per_member_parameters_trains_like_float64(custom_vjp):
  # Each member has its own scale and bias; statistics are shared over the vmapped axis.
  def member_grads(params, x, w):
    return jax.grad(_member_loss, argnums=(1, 0))(params, x, w, "ens", custom_vjp)[::-1]

  @jax.jit
  def grads(params, x, w):
    g_params, g_x = jax.vmap(member_grads, axis_name="ens")(params, x, w)
    return g_x, g_params

  x, w, params = _data(), _weights(), _member_params()
  ours = _train_steps(grads, params, x, w, steps=2)
  _assert_histories_close(ours, _reference_steps(params, x, w, steps=2))


def test_pmap_with_per_device_parameters_matches_float64():
  def device_grads(params, x, w):
    g_params, g_x = jax.grad(_member_loss, argnums=(0, 1))(params, x, w, "dev", True)
    return g_x, g_params

  grads = jax.pmap(device_grads, axis_name="dev", devices=jax.devices()[:MEMBERS])
  x, w, params = _data(1), _weights(4), _member_params()
  ours = _train_steps(grads, params, x, w, steps=2)
  _assert_histories_close(ours, _reference_steps(params, x, w, steps=2))


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_shard_map_with_parameters_varying_over_the_axis_matches_float64(custom_vjp):
  assert jax.device_count() >= MEMBERS
  mesh = jax.make_mesh((MEMBERS,), ("dev",), devices=jax.devices()[:MEMBERS])

  def device_grads(params, x, w):
    params = jax.tree.map(lambda v: v[0], params)
    g_params, g_x = jax.grad(_member_loss, argnums=(0, 1))(params, x[0], w[0], "dev", custom_vjp)
    return g_x[None], jax.tree.map(lambda v: v[None], g_params)

  grads = jax.jit(jax.shard_map(device_grads, mesh=mesh, in_specs=P("dev"), out_specs=P("dev")))
  x, w, params = _data(2), _weights(5), _member_params()
  put = lambda t: jax.device_put(t, NamedSharding(mesh, P("dev")))
  ours = _train_steps(lambda p, x, w: grads(put(p), put(x), put(w)), params, x, w, steps=2)
  _assert_histories_close(ours, _reference_steps(params, x, w, steps=2))


# ----------------------------------------------------------------------------- vmap shapes


def _per_example_call(custom_vjp):
  params = bnjax.BatchNormParams(jnp.array([1.5, 0.5, 2.0]), jnp.array([0.1, -0.2, 0.3]))
  state = bnjax.BatchNormState(jnp.array([0.5, -1.0, 2.0]), jnp.array([2.0, 0.5, 1.5]))

  def one_example(x_C):
    return bnjax.batch_norm(params, state, x_C, True, axis_name="batch", momentum=MOMENTUM,
                            custom_vjp=custom_vjp)

  return params, state, jax.vmap(one_example, axis_name="batch")


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_per_example_vmap_with_rank_one_input_matches_reference(custom_vjp):
  # Flax's per-example pattern: each vmapped example is features only; statistics come entirely
  # from across the named axis.
  x = _data(6).reshape(-1, C)
  params, state, batched = _per_example_call(custom_vjp)
  y, new_state = jax.jit(batched)(x)
  y_ref, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, params.scale,
                                                  params.bias, momentum=MOMENTUM)
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(new_state.mean, np.broadcast_to(mean_ref, new_state.mean.shape), **F32)
  np.testing.assert_allclose(new_state.var, np.broadcast_to(var_ref, new_state.var.shape), **F32)


def test_per_example_vmap_gradient_equals_batched_call():
  x = _data(7).reshape(-1, C)
  w = _weights(8).reshape(-1, C)
  params, state, batched = _per_example_call(True)
  per_example = jax.jit(jax.grad(lambda x: jnp.sum(w * jnp.tanh(batched(x)[0]))))(x)
  whole_batch = jax.jit(jax.grad(lambda x: jnp.sum(
      w * jnp.tanh(bnjax.batch_norm(params, state, x, True)[0]))))(x)
  np.testing.assert_allclose(per_example, whole_batch, **F32)


def test_per_example_vmap_module_matches_flax():
  x = _data(9).reshape(-1, C)
  outputs = {}
  for name, module in (("bnjax", bnjax.BatchNorm), ("flax", nn.BatchNorm)):
    model = module(use_running_average=False, axis_name="batch", momentum=MOMENTUM)
    variables = model.init(jax.random.key(0), x[0])

    def apply(x_C, model=model, variables=variables):
      return model.apply(variables, x_C, mutable=["batch_stats"])

    with jax.numpy_dtype_promotion("standard"):  # Flax mixes dtypes in its statistics.
      outputs[name] = jax.jit(jax.vmap(apply, axis_name="batch"))(x)
  (y, updates), (y_flax, updates_flax) = outputs["bnjax"], outputs["flax"]
  np.testing.assert_allclose(y, y_flax, **F32)
  np.testing.assert_allclose(updates["batch_stats"]["var"], updates_flax["batch_stats"]["var"],
                             **F32)


def test_nested_vmap_with_a_tuple_axis_name_matches_reference():
  x = _data(10)  # [MEMBERS, ROWS, C]: vmap over members ('a') and rows ('b').
  params = bnjax.BatchNormParams(jnp.array([1.5, 0.5, 2.0]), jnp.array([0.1, -0.2, 0.3]))
  state = bnjax.BatchNormState(jnp.zeros(C), jnp.ones(C))

  def one_value(x_C):
    return bnjax.batch_norm(params, state, x_C, True, axis_name=("a", "b"), momentum=MOMENTUM)

  y, new_state = jax.jit(jax.vmap(jax.vmap(one_value, axis_name="b"), axis_name="a"))(x)
  y_ref, mean_ref, var_ref = reference.train_step(x.reshape(-1, C), state.mean, state.var,
                                                  params.scale, params.bias, momentum=MOMENTUM)
  np.testing.assert_allclose(y.reshape(-1, C), y_ref, **F32)
  np.testing.assert_allclose(new_state.mean[0, 0], mean_ref, **F32)
  np.testing.assert_allclose(new_state.var[3, 4], var_ref, **F32)


def test_vmap_without_axis_name_normalises_each_member_alone():
  x = _data(11)
  params, state = bnjax.init(C)
  y, new_state = jax.vmap(lambda x: bnjax.batch_norm(params, state, x, True))(x)
  for m in range(MEMBERS):
    y_ref, mean_ref, _ = reference.train_step(x[m], state.mean, state.var, momentum=0.99)
    np.testing.assert_allclose(y[m], y_ref, **F32)
    np.testing.assert_allclose(new_state.mean[m], mean_ref, **F32)


# ----------------------------------------------------------------------------- groups, nn.vmap


def test_grad_through_vmap_with_axis_index_groups_equals_autodiff():
  x, w = _data(12), _weights(13)
  params = _member_params()
  groups = [[0, 3], [1, 2]]

  def loss(params, x, custom_vjp):
    def member(p, x):
      state = bnjax.BatchNormState(jnp.zeros(C), jnp.ones(C))
      return bnjax.batch_norm(p, state, x, True, axis_name="ens", axis_index_groups=groups,
                              custom_vjp=custom_vjp)[0]
    return jnp.sum(w * jnp.tanh(jax.vmap(member, axis_name="ens")(params, x)))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  ours, autodiff = grads(params, x, True), grads(params, x, False)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(autodiff)):
    np.testing.assert_allclose(a, b, **F32)
  # And the groups really are separate: group [0, 3]'s statistics ignore members 1 and 2.
  sub = np.asarray(x, np.float64)[[0, 3]].reshape(-1, C)
  y = jax.jit(jax.vmap(lambda p, x: bnjax.batch_norm(
      p, bnjax.BatchNormState(jnp.zeros(C), jnp.ones(C)), x, True, axis_name="ens",
      axis_index_groups=groups)[0], axis_name="ens"))(params, x)
  x_hat = (sub - sub.mean(0)) / np.sqrt(sub.var(0) + 1e-5)
  expected = x_hat[:ROWS] * np.asarray(params.scale[0]) + np.asarray(params.bias[0])
  np.testing.assert_allclose(y[0], expected, **F32)


def _ensemble(module):
  """Flax's lifting pattern: one norm layer per member, statistics shared over the members."""
  return nn.vmap(module, variable_axes={"params": 0, "batch_stats": 0},
                 split_rngs={"params": True}, in_axes=0, axis_name="ens")(
                     use_running_average=False, momentum=MOMENTUM, axis_name="ens",
                     scale_init=nn.initializers.uniform(2.0), bias_init=nn.initializers.normal(1.0))


def test_nn_vmap_ensemble_gradients_match_flax():
  x, w = _data(14), _weights(15)
  results = {}
  for name, module in (("bnjax", bnjax.BatchNorm), ("flax", nn.BatchNorm)):
    model = _ensemble(module)
    variables = model.init(jax.random.key(1), x)

    def loss(params, model=model, variables=variables):
      y, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               mutable=["batch_stats"])
      return jnp.sum(w * jnp.tanh(y)), updates

    with jax.numpy_dtype_promotion("standard"):
      results[name] = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  (grads, updates), (grads_flax, updates_flax) = results["bnjax"], results["flax"]
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_flax)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], updates_flax["batch_stats"]["mean"],
                             **F32)


# ----------------------------------------------------------------------------- loops


def test_scan_training_loop_with_mutable_true_keeps_its_carry():
  # With mutable=True every collection comes back; the tree must stay Flax's from step to step.
  model = bnjax.BatchNorm(use_running_average=False, momentum=MOMENTUM)
  xs = _data(16)  # one [ROWS, C] batch per step.
  variables = model.init(jax.random.key(0), xs[0])

  def step(variables, x):
    y, updates = model.apply(variables, x, mutable=True)
    return {**variables, **updates}, y.mean()

  final, _ = jax.lax.scan(step, variables, xs)
  assert jax.tree.structure(final) == jax.tree.structure(variables)
  mean = np.zeros(C)
  for x in np.asarray(xs, np.float64):
    mean = MOMENTUM * mean + (1 - MOMENTUM) * x.mean(0)
  np.testing.assert_allclose(final["batch_stats"]["mean"], mean, **F32)


def test_mutable_true_returns_exactly_flaxs_collections():
  x = _data(17)[0]
  trees = {}
  for name, module in (("bnjax", bnjax.BatchNorm), ("flax", nn.BatchNorm)):
    model = module(use_running_average=False)
    variables = model.init(jax.random.key(0), x)
    with jax.numpy_dtype_promotion("standard"):
      _, updates = model.apply(variables, x, mutable=True)
      _, captured = model.apply(variables, x, mutable=["batch_stats"], capture_intermediates=True)
    trees[name] = (jax.tree.structure(updates), jax.tree.structure(captured))
  assert trees["bnjax"] == trees["flax"]


def test_checkpointed_vmap_gradients_equal_plain():
  x, w = _data(18), _weights(19)
  params = _member_params()

  def loss(params, x, remat):
    member = lambda p, x: jnp.sum(jnp.tanh(bnjax.batch_norm(
        p, bnjax.BatchNormState(jnp.zeros(C), jnp.ones(C)), x, True, axis_name="ens")[0]))
    member = jax.checkpoint(member) if remat else member
    return jnp.sum(jax.vmap(member, axis_name="ens")(params, x * w))

  grad = jax.jit(jax.grad(loss), static_argnums=2)
  plain, remat = grad(params, x, False), grad(params, x, True)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, **F32)

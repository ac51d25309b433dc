"""`bnjax.nnx.BatchNorm` against a float64 reference and as a drop-in for `flax.nnx.BatchNorm`."""

import inspect

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import bnjax
import bnjax.nnx
from tests import reference

F32 = reference.TOLERANCES["float32"]


class FlaxBatchNorm(nnx.BatchNorm):
  """Flax's layer, run under standard promotion (it mixes dtypes itself)."""

  def __call__(self, *args, **kwargs):
    with jax.numpy_dtype_promotion("standard"):
      return super().__call__(*args, **kwargs)


def _x(seed=0, shape=(16, 5), loc=1.5, scale=2.0, dtype=jnp.float32):
  # NumPy draws: eager `jax.random` would compile once per shape.
  x = loc + scale * np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(x.astype(np.float32)).astype(dtype)


@nnx.jit(static_argnames="use_running_average")
def _jit_call(layer, x, use_running_average=None, mask=None):
  """Calls a layer under `nnx.jit`: state updates flow back to `layer` as in an eager call."""
  return layer(x, use_running_average, mask=mask)


def _pure(module, *filters):
  return nnx.to_pure_dict(nnx.state(module, *filters))


def _assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tol), a, b)


# --- The constructor, call and variables of Flax's layer ------------------------------------------

def test_constructor_signature_matches_flax():
  ours = inspect.signature(bnjax.nnx.BatchNorm.__init__).parameters
  theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
  assert list(ours)[:len(theirs)] == list(theirs)
  assert set(ours) - set(theirs) == {"unbiased_running_var", "custom_vjp"}
  for name, p in theirs.items():
    assert ours[name].kind == p.kind, name
    if name in ("bias_init", "scale_init"):  # Initializers: compare what they create.
      key = jax.random.key(0)
      np.testing.assert_array_equal(ours[name].default(key, (3,), jnp.float32),
                                    p.default(key, (3,), jnp.float32))
    elif name == "promote_dtype":
      assert ours[name].default is p.default
    else:
      assert ours[name].default == p.default, name


def test_call_signature_matches_flax():
  ours = inspect.signature(bnjax.nnx.BatchNorm.__call__).parameters
  theirs = inspect.signature(nnx.BatchNorm.__call__).parameters
  assert [(n, p.kind, p.default) for n, p in ours.items()] == [
      (n, p.kind, p.default) for n, p in theirs.items()]


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(use_bias=False),
    dict(use_scale=False, use_bias=False),
    dict(scale_init=nnx.initializers.normal(0.5), bias_init=nnx.initializers.uniform()),
    dict(param_dtype=jnp.bfloat16),
    dict(scale_metadata={"tag": "gamma"}, bias_metadata={"tag": "beta"}),
], ids=["default", "no-bias", "no-affine", "random-init", "bf16-params", "metadata"])
def test_variables_types_and_initial_values_match_flax(kwargs):
  ours = bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(42), **kwargs)
  theirs = nnx.BatchNorm(5, rngs=nnx.Rngs(42), **kwargs)
  ours_state, theirs_state = nnx.state(ours), nnx.state(theirs)
  assert sorted(ours_state) == sorted(theirs_state)
  for name in theirs_state:
    a, b = ours_state[name], theirs_state[name]
    assert type(a) is type(b), name  # nnx.Param for scale/bias, nnx.BatchStat for mean/var.
    assert a[...].dtype == b[...].dtype, name
    np.testing.assert_array_equal(a[...], b[...])
    assert a.get_metadata() == b.get_metadata(), name
  for name in ("scale", "bias"):
    assert (getattr(ours, name) is None) == (getattr(theirs, name) is None)


def test_state_filters_select_params_and_batch_stats():
  layer = bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
  assert sorted(nnx.state(layer, nnx.Param)) == ["bias", "scale"]
  assert sorted(nnx.state(layer, nnx.BatchStat)) == ["mean", "var"]
  graphdef, params, batch_stats = nnx.split(layer, nnx.Param, nnx.BatchStat)
  assert sorted(params) == ["bias", "scale"] and sorted(batch_stats) == ["mean", "var"]


# --- Numbers: a float64 reference and Flax --------------------------------------------------------

@pytest.mark.parametrize("shape, axis, num_features", [
    ((16, 5), -1, 5), ((4, 3, 6, 6), 1, 3), ((4, 6, 6, 3), (2, 3), (6, 3))])
def test_training_and_eval_match_float64_reference(shape, axis, num_features):
  layer = bnjax.nnx.BatchNorm(num_features, axis=axis, momentum=0.8, rngs=nnx.Rngs(0),
                              scale_init=nnx.initializers.normal(1.0),
                              bias_init=nnx.initializers.normal(1.0))
  scale, bias = np.asarray(layer.scale[...]), np.asarray(layer.bias[...])
  mean, var = np.zeros(layer.mean.shape), np.ones(layer.var.shape)
  for step in range(3):
    x = _x(step, shape)
    y = _jit_call(layer, x)
    y_ref, mean, var = reference.train_step(x, mean, var, scale, bias, axis=axis, momentum=0.8)
    np.testing.assert_allclose(y, y_ref, **F32)
    np.testing.assert_allclose(layer.mean[...], mean, **F32)
    np.testing.assert_allclose(layer.var[...], var, **F32)
  x = _x(9, shape)
  np.testing.assert_allclose(_jit_call(layer, x, use_running_average=True),
                             reference.normalize(x, mean, var, scale, bias, axis=axis), **F32)


def test_unbiased_running_var_matches_reference():
  layer = bnjax.nnx.BatchNorm(5, momentum=0.7, unbiased_running_var=True, rngs=nnx.Rngs(0))
  x = _x(1)
  layer(x)
  _, mean, var = reference.train_step(x, np.zeros(5), np.ones(5), momentum=0.7, unbiased=True)
  np.testing.assert_allclose(layer.mean[...], mean, **F32)
  np.testing.assert_allclose(layer.var[...], var, **F32)


@pytest.mark.parametrize("use_fast_variance", [True, False], ids=["flax-default", "flax-exact"])
@pytest.mark.parametrize("shape, axis", [((16, 5), -1), ((4, 5, 6, 6), 1)])
def test_training_and_eval_match_flax_over_steps(shape, axis, use_fast_variance):
  kwargs = dict(axis=axis, momentum=0.9, use_fast_variance=use_fast_variance)
  ours = bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(0), **kwargs)
  theirs = FlaxBatchNorm(5, rngs=nnx.Rngs(0), **kwargs)
  for step in range(3):
    x = _x(step + 1, shape)  # Moderate offset: Flax's fast variance is accurate here.
    np.testing.assert_allclose(_jit_call(ours, x), _jit_call(theirs, x), **F32)
    _assert_trees_close(_pure(ours), _pure(theirs), **F32)
  ours.eval()
  theirs.eval()
  x = _x(9, shape)
  np.testing.assert_allclose(_jit_call(ours, x), _jit_call(theirs, x), **F32)


def test_mask_matches_flax_on_finite_data():
  x = _x(10, (8, 4, 3))
  mask = jnp.asarray(np.random.default_rng(11).random((8, 4, 1)) < 0.5).at[0, 0, 0].set(True)
  ours = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  theirs = FlaxBatchNorm(3, use_fast_variance=False, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(_jit_call(ours, x, mask=mask), _jit_call(theirs, x, mask=mask), **F32)
  _assert_trees_close(_pure(ours), _pure(theirs), **F32)


def test_large_offset_is_exact_where_flax_default_is_not():
  x = _x(12, (256, 4), loc=1e4, scale=1.0)
  y = bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0))(x)
  np.testing.assert_allclose(np.std(np.asarray(y, np.float64), axis=0), np.ones(4), rtol=1e-4)
  y_flax = FlaxBatchNorm(4, rngs=nnx.Rngs(0))(x)
  assert np.max(np.std(np.asarray(y_flax, np.float64), axis=0)) > 2.0


@pytest.mark.parametrize("x_dtype, module_dtype", [
    (jnp.bfloat16, None), (jnp.float16, None), (jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16), (jnp.int32, None), (jnp.uint8, None)])
def test_output_dtype_and_integer_promotion_match_flax(x_dtype, module_dtype):
  x = jnp.round(_x(9, loc=10.0, scale=4.0)).astype(x_dtype)
  ours = bnjax.nnx.BatchNorm(5, dtype=module_dtype, rngs=nnx.Rngs(0))
  theirs = FlaxBatchNorm(5, dtype=module_dtype, use_fast_variance=False, rngs=nnx.Rngs(0))
  y_ours, y_theirs = ours(x), theirs(x)
  assert y_ours.dtype == y_theirs.dtype
  tol = reference.TOLERANCES[jnp.dtype(y_ours.dtype).name]
  np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32),
                             **tol)
  assert ours.mean[...].dtype == jnp.float32 and ours.var[...].dtype == jnp.float32


def test_integer_input_normalised_as_float32():
  x = jnp.arange(24, dtype=jnp.int32).reshape(6, 4) % 5
  y = bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0))(x)
  assert y.dtype == jnp.float32
  y_ref, _, _ = reference.train_step(np.asarray(x, np.float64), np.zeros(4), np.ones(4))
  np.testing.assert_allclose(y, y_ref, **F32)


# --- Train / eval toggling ------------------------------------------------------------------------

class _Block(nnx.Module):

  def __init__(self, norm, *, rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.norm = norm(4, rngs=rngs)

  def __call__(self, x):
    return self.dropout(self.norm(self.linear(x)))


def test_eval_uses_running_statistics_and_leaves_them_unchanged():
  layer = bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  layer(_x(1))
  before = _pure(layer, nnx.BatchStat)
  layer.eval()
  x = _x(2)
  y = layer(x)
  _assert_trees_close(_pure(layer, nnx.BatchStat), before, atol=0, rtol=0)
  np.testing.assert_allclose(y, reference.normalize(x, before["mean"], before["var"],
                                                    np.ones(5), np.zeros(5)), **F32)


def test_train_and_eval_toggle_nested_layers_like_flax():
  for norm in (bnjax.nnx.BatchNorm, nnx.BatchNorm):
    block = _Block(norm, rngs=nnx.Rngs(0))
    block.eval()
    assert block.norm.use_running_average is True and block.dropout.deterministic is True
    block.train()
    assert block.norm.use_running_average is False and block.dropout.deterministic is False
    block.set_attributes(norm, use_running_average=True)  # Freeze only the norm layers.
    assert block.norm.use_running_average is True and block.dropout.deterministic is False


def test_view_sets_mode_without_touching_the_original():
  block = _Block(bnjax.nnx.BatchNorm, rngs=nnx.Rngs(0))
  evaluated = nnx.view(block, use_running_average=True, deterministic=True)
  assert evaluated.norm.use_running_average is True
  assert block.norm.use_running_average is False
  before = _pure(block, nnx.BatchStat)
  evaluated(_x(3, (8, 3)))
  _assert_trees_close(_pure(block, nnx.BatchStat), before, atol=0, rtol=0)
  block(_x(3, (8, 3)))
  assert not np.array_equal(nnx.state(block, nnx.BatchStat)["norm"]["mean"][...],
                            before["norm"]["mean"])


def test_call_argument_overrides_the_attribute():
  layer = bnjax.nnx.BatchNorm(5, use_running_average=True, rngs=nnx.Rngs(0))
  layer(_x(4), use_running_average=False)
  assert not np.array_equal(layer.mean[...], np.zeros(5))


# --- NNX transforms, optimizers, checkpoints ------------------------------------------------------

def test_split_merge_roundtrip_gives_the_same_layer():
  layer = bnjax.nnx.BatchNorm(5, momentum=0.5, rngs=nnx.Rngs(0))
  layer(_x(5))
  graphdef, state = nnx.split(layer)
  merged = nnx.merge(graphdef, state)
  assert merged.momentum == 0.5 and type(merged) is bnjax.nnx.BatchNorm
  merged.eval()
  layer.eval()
  np.testing.assert_array_equal(merged(_x(6)), layer(_x(6)))


def test_state_tree_matches_flax_so_checkpoints_transfer():
  ours, theirs = bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(0)), nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  assert jax.tree.structure(_pure(ours)) == jax.tree.structure(_pure(theirs))
  theirs_trained = FlaxBatchNorm(5, rngs=nnx.Rngs(1), bias_init=nnx.initializers.normal(1.0))
  theirs_trained(_x(7))
  nnx.update(ours, nnx.state(theirs_trained))  # Flax's trained state loads into bnjax's layer.
  _assert_trees_close(_pure(ours), _pure(theirs_trained), atol=0, rtol=0)


def test_functional_jit_step_with_split_and_merge():
  layer = bnjax.nnx.BatchNorm(5, momentum=0.9, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  @jax.jit
  def step(state, x):
    model = nnx.merge(graphdef, state)
    y = model(x)
    return y, nnx.state(model)

  x = _x(8)
  y, new_state = step(state, x)
  y_ref, mean, var = reference.train_step(x, np.zeros(5), np.ones(5), momentum=0.9)
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(new_state["mean"][...], mean, **F32)
  np.testing.assert_allclose(new_state["var"][...], var, **F32)


class _MLP(nnx.Module):

  def __init__(self, norm, *, rngs):
    self.linear1 = nnx.Linear(6, 8, use_bias=False, rngs=rngs)
    self.norm = norm(8, momentum=0.9, rngs=rngs)
    self.linear2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.linear2(nnx.relu(self.norm(self.linear1(x))))


def _train_mlp(norm, steps=4):
  x = _x(13, (32, 6))
  labels = jnp.arange(32) % 3
  model = _MLP(norm, rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, labels):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, x, labels)) for _ in range(steps)]
  model.eval()
  return np.array(losses), model, nnx.jit(lambda m, x: m(x))(model, x)


def test_jitted_optimizer_steps_match_flax():
  losses, model, logits = _train_mlp(bnjax.nnx.BatchNorm)
  losses_flax, model_flax, logits_flax = _train_mlp(FlaxBatchNorm)
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(losses, losses_flax, atol=1e-5, rtol=1e-5)
  _assert_trees_close(_pure(model), _pure(model_flax), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits, logits_flax, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("custom_vjp", [True, False])
def test_gradients_match_float64_closed_form(custom_vjp):
  x = _x(14, (12, 3))
  layer = bnjax.nnx.BatchNorm(3, custom_vjp=custom_vjp, rngs=nnx.Rngs(0),
                              scale_init=nnx.initializers.normal(1.0))
  weights = _x(15, x.shape, loc=0.0, scale=1.0)
  grads = nnx.grad(lambda m: jnp.sum(m(x) * weights))(layer)
  # d/dscale = sum(w * x_hat), d/dbias = sum(w), with x_hat from the float64 reference.
  x_hat = reference.normalize(x, *reference.moments(x)[:2])
  np.testing.assert_allclose(grads["scale"][...], (np.asarray(weights) * x_hat).sum(0), **F32)
  np.testing.assert_allclose(grads["bias"][...], np.asarray(weights).sum(0), **F32)


def test_forward_mode_needs_custom_vjp_false():
  x = _x(16, (8, 3))
  graphdef, state = nnx.split(bnjax.nnx.BatchNorm(3, custom_vjp=False, rngs=nnx.Rngs(0)))
  y = lambda state, x: nnx.merge(graphdef, state, copy=True)(x)
  jacobian = jax.jacfwd(y, argnums=1)(state, x)
  np.testing.assert_allclose(jacobian, jax.jacrev(y, argnums=1)(state, x), **F32)


def test_vmap_and_scan_over_stacked_layers():
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(key):
    return bnjax.nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(params=key))

  layers = create(jax.random.split(jax.random.key(0), 3))
  assert layers.mean.shape == (3, 4)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def apply(x, layer):
    return layer(x) * 2.0 + 1.0

  x = _x(17, (10, 4))
  y = apply(x, layers)
  expected, means = np.asarray(x, np.float64), []
  for _ in range(3):
    means.append(0.5 * reference.moments(expected)[0])
    expected = reference.normalize(expected, *reference.moments(expected)[:2]) * 2.0 + 1.0
  np.testing.assert_allclose(y, expected, **F32)
  np.testing.assert_allclose(layers.mean[...], np.stack(means), **F32)


def test_orbax_checkpoint_roundtrip(tmp_path):
  layer = bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  layer(_x(18))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", nnx.state(layer))
  checkpointer.wait_until_finished()
  abstract = nnx.eval_shape(lambda: bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "state", abstract_state))
  _assert_trees_close(_pure(restored), _pure(layer), atol=0, rtol=0)


# --- Across devices -------------------------------------------------------------------------------

def _mesh():
  assert jax.device_count() >= 8
  return Mesh(jax.devices()[:8], ("data",))


def test_nnx_shard_map_equals_the_global_batch():
  mesh = _mesh()
  x = _x(19, (64, 3), loc=-3.0)  # 8 rows per device, each device different data.
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  sharded = bnjax.nnx.BatchNorm(3, axis_name="data", momentum=0.9, rngs=nnx.Rngs(0))
  single = bnjax.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))

  @nnx.jit
  @nnx.shard_map(mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
  def forward(model, x):
    return model(x)

  y = forward(sharded, x_sharded)
  y_ref, mean, var = reference.train_step(x, np.zeros(3), np.ones(3), momentum=0.9)
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(sharded.mean[...], mean, **F32)
  np.testing.assert_allclose(sharded.var[...], var, **F32)
  np.testing.assert_allclose(y, single(x), **F32)


def test_shard_map_with_uneven_masks_equals_the_global_masked_batch():
  # Devices hold 1 to 8 valid rows: statistics are weighted by counts, not averaged per device.
  mesh = _mesh()
  x = _x(26, (64, 3), loc=4.0)
  mask = jnp.asarray(np.arange(64) % 8 <= np.arange(64) // 8)[:, None]
  layer = bnjax.nnx.BatchNorm(3, axis_name="data", momentum=0.5, rngs=nnx.Rngs(0))
  sharding = NamedSharding(mesh, P("data"))

  @nnx.jit
  @nnx.shard_map(mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data"))
  def forward(model, x, mask):
    return model(x, mask=mask)

  y = forward(layer, jax.device_put(x, sharding), jax.device_put(mask, sharding))
  y_ref, mean, var = reference.train_step(x, np.zeros(3), np.ones(3), momentum=0.5, mask=mask)
  valid = np.broadcast_to(np.asarray(mask), x.shape)
  np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], **F32)
  np.testing.assert_allclose(layer.mean[...], mean, **F32)
  np.testing.assert_allclose(layer.var[...], var, **F32)


def test_jax_shard_map_data_parallel_train_step_equals_the_global_batch():
  mesh = _mesh()
  x = _x(20, (64, 6))
  labels = jnp.arange(64) % 3
  sharded = nnx.split(_MLP(lambda n, **kw: bnjax.nnx.BatchNorm(n, axis_name="data", **kw),
                           rngs=nnx.Rngs(1)))
  single = nnx.split(_MLP(bnjax.nnx.BatchNorm, rngs=nnx.Rngs(1)))

  def grads_and_state(graphdef, state, x, labels):
    # Under `jax.shard_map` the replicated parameters' gradients come out summed over "data"
    # (autodiff transposes the implicit broadcast), i.e. the gradient of the global-batch loss.
    model = nnx.merge(graphdef, state)
    loss_fn = lambda model: optax.softmax_cross_entropy_with_integer_labels(model(x), labels).sum()
    return nnx.grad(loss_fn)(model), nnx.state(model, nnx.BatchStat)

  step = jax.jit(jax.shard_map(
      lambda s, x, l: grads_and_state(sharded[0], s, x, l), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())))
  grads, batch_stats = step(sharded[1], jax.device_put(x, NamedSharding(mesh, P("data"))),
                            jax.device_put(labels, NamedSharding(mesh, P("data"))))
  grads_ref, batch_stats_ref = jax.jit(lambda s, x, l: grads_and_state(single[0], s, x, l))(
      single[1], x, labels)
  _assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(grads_ref), atol=1e-5, rtol=1e-5)
  _assert_trees_close(nnx.to_pure_dict(batch_stats), nnx.to_pure_dict(batch_stats_ref), **F32)


# --- Bad input ------------------------------------------------------------------------------------

def test_feature_shape_mismatch_names_num_features():
  layer = bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"num_features=4.*num_features=5"):
    layer(_x(21))


def test_use_running_average_none_everywhere_raises():
  layer = bnjax.nnx.BatchNorm(5, use_running_average=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use_running_average"):
    layer(_x(22))


@pytest.mark.parametrize("num_features", [0, -2, 2.5, True, (), (3, 0)])
def test_bad_num_features_raises(num_features):
  with pytest.raises(ValueError, match="num_features"):
    bnjax.nnx.BatchNorm(num_features, rngs=nnx.Rngs(0))


def test_traced_use_running_average_raises_naming_it():
  layer = bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="`use_running_average` must be a Python bool"):
    nnx.jit(lambda layer, flag: layer(_x(25), use_running_average=flag))(layer, jnp.bool_(True))


def test_axis_index_groups_lists_are_stored_hashable():
  layer = bnjax.nnx.BatchNorm(5, axis_name="data", axis_index_groups=[[0, 1], [2, 3]],
                              rngs=nnx.Rngs(0))
  assert layer.axis_index_groups == ((0, 1), (2, 3))
  hash(nnx.graphdef(layer))  # `nnx.jit` keys its cache on the graph definition.


def test_one_value_per_channel_in_training_raises():
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(0))(_x(23, (1, 5)))


def test_bad_hyperparameters_and_mask_raise_with_the_argument_name():
  with pytest.raises(ValueError, match="momentum"):
    bnjax.nnx.BatchNorm(5, momentum=1.5, rngs=nnx.Rngs(0))(_x(24))
  with pytest.raises(ValueError, match="epsilon"):
    bnjax.nnx.BatchNorm(5, epsilon=0.0, rngs=nnx.Rngs(0))(_x(24))
  with pytest.raises(TypeError, match="mask"):
    bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(0))(_x(24), mask=jnp.ones((16, 5), jnp.float32))

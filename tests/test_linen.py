"""`bnjax.BatchNorm` as a drop-in for `flax.linen.BatchNorm` (exact-variance mode as the oracle)."""

import dataclasses

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from tests import reference

F32 = reference.TOLERANCES["float32"]


class BatchNorm(nn.BatchNorm):  # Named like Flax's so auto-names in models match.
  """Flax's BatchNorm with exact variance, run under standard promotion (it mixes dtypes itself)."""

  def __call__(self, *args, **kwargs):
    with jax.numpy_dtype_promotion("standard"):
      return super().__call__(*args, **kwargs)


def _flax(**kwargs):
  return BatchNorm(use_fast_variance=False, **kwargs)


def _x(seed=0, shape=(16, 5), loc=1.5, scale=2.0, dtype=jnp.float32):
  return (loc + scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tol), a, b)


def test_fields_and_defaults_match_flax():
  ours = {f.name: f.default for f in dataclasses.fields(bnjax.BatchNorm) if f.name not in
          ("parent", "name")}
  theirs = {f.name: f.default for f in dataclasses.fields(nn.BatchNorm) if f.name not in
            ("parent", "name")}
  extra = set(ours) - set(theirs)
  assert extra == {"unbiased_running_var", "custom_vjp", "stats_route", "ghost_batch_size",
                   "renorm_r_max", "renorm_d_max"}
  for name, default in theirs.items():
    assert ours[name] == default, name


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(use_bias=False),
    dict(use_scale=False, use_bias=False),
    dict(scale_init=nn.initializers.normal(0.5), bias_init=nn.initializers.uniform()),
    dict(param_dtype=jnp.bfloat16),
    dict(axis=(1, 2)),
], ids=["default", "no-bias", "no-affine", "random-init", "bf16-params", "tuple-axis"])
def test_variable_tree_and_initial_values_match_flax(kwargs):
  x = _x(shape=(4, 3, 5, 2))
  key = jax.random.key(42)
  ours = bnjax.BatchNorm(use_running_average=False, **kwargs).init(key, x)
  theirs = _flax(use_running_average=False, **kwargs).init(key, x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  jax.tree.map(lambda a, b: (np.testing.assert_array_equal(a, b), a.dtype == b.dtype or
                             pytest.fail(f"{a.dtype} != {b.dtype}")), ours, theirs)


@pytest.mark.parametrize("shape, axis", [((16, 5), -1), ((4, 3, 6, 6), 1), ((4, 6, 6, 3), (2, 3))])
def test_training_outputs_and_batch_stats_match_flax_over_steps(shape, axis):
  ours, theirs = bnjax.BatchNorm(momentum=0.9, axis=axis), _flax(momentum=0.9, axis=axis)
  v_ours = ours.init(jax.random.key(0), _x(0, shape), use_running_average=False)
  v_theirs = theirs.init(jax.random.key(0), _x(0, shape), use_running_average=False)
  for step in range(3):
    x = _x(step + 1, shape)
    y_ours, upd_ours = ours.apply(v_ours, x, use_running_average=False, mutable=["batch_stats"])
    y_theirs, upd_theirs = theirs.apply(v_theirs, x, use_running_average=False,
                                        mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_theirs, **F32)
    _assert_trees_close(upd_ours, upd_theirs, **F32)
    v_ours = {**v_ours, **upd_ours}
    v_theirs = {**v_theirs, **upd_theirs}
  y_ours = ours.apply(v_ours, _x(9, shape), use_running_average=True)
  y_theirs = theirs.apply(v_theirs, _x(9, shape), use_running_average=True)
  np.testing.assert_allclose(y_ours, y_theirs, **F32)


def test_module_numbers_equal_pure_function():
  x = _x(3)
  model = bnjax.BatchNorm(use_running_average=False, momentum=0.8)
  variables = model.init(jax.random.key(0), x)
  y, updates = model.apply(variables, x, mutable=["batch_stats"])
  params = bnjax.BatchNormParams(**variables["params"])
  state = bnjax.BatchNormState(**variables["batch_stats"])
  y_fn, state_fn = bnjax.batch_norm(params, state, x, True, momentum=0.8)
  np.testing.assert_array_equal(y, y_fn)
  np.testing.assert_array_equal(updates["batch_stats"]["mean"], state_fn.mean)
  np.testing.assert_array_equal(updates["batch_stats"]["var"], state_fn.var)


def test_init_does_not_update_running_statistics():
  variables = bnjax.BatchNorm(use_running_average=False).init(jax.random.key(0), _x(4))
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(5))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(5))


def test_init_with_a_single_example_works():
  # The usual `model.init(key, jnp.ones((1, ...)))`; training on one value per channel raises.
  model = bnjax.BatchNorm(use_running_average=False)
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
  assert variables["params"]["scale"].shape == (5,)
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    model.apply(variables, jnp.ones((1, 5)), mutable=["batch_stats"])


def test_init_with_axis_name_needs_no_bound_axis():
  model = bnjax.BatchNorm(use_running_average=False, axis_name="batch")
  variables = model.init(jax.random.key(0), _x(5))
  assert set(variables) == {"params", "batch_stats"}


def test_eval_mode_leaves_batch_stats_unchanged():
  model = bnjax.BatchNorm(use_running_average=True)
  variables = model.init(jax.random.key(0), _x(6))
  _, updates = model.apply(variables, _x(7), mutable=["batch_stats"])
  _assert_trees_close(updates, {"batch_stats": variables["batch_stats"]}, atol=0, rtol=0)


def test_use_running_average_must_be_given_once():
  with pytest.raises(ValueError, match="use_running_average"):
    bnjax.BatchNorm().init(jax.random.key(0), _x(8))


def test_call_argument_overrides_nothing_when_field_set():
  with pytest.raises(ValueError, match="use_running_average"):
    bnjax.BatchNorm(use_running_average=True).init(jax.random.key(0), _x(8),
                                                   use_running_average=False)


@pytest.mark.parametrize("x_dtype, module_dtype", [
    (jnp.bfloat16, None), (jnp.float16, None), (jnp.bfloat16, jnp.bfloat16), (jnp.float32,
                                                                             jnp.bfloat16)])
def test_output_dtype_matches_flax(x_dtype, module_dtype):
  x = _x(9, dtype=x_dtype)
  ours = bnjax.BatchNorm(use_running_average=False, dtype=module_dtype)
  theirs = _flax(use_running_average=False, dtype=module_dtype)
  v = theirs.init(jax.random.key(0), x)
  y_ours, _ = ours.apply(v, x, mutable=["batch_stats"])
  y_theirs, _ = theirs.apply(v, x, mutable=["batch_stats"])
  assert y_ours.dtype == y_theirs.dtype
  tol = reference.TOLERANCES[jnp.dtype(y_ours.dtype).name]
  np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32),
                             **tol)


def test_mask_matches_flax_on_finite_data():
  x = _x(10, (8, 4, 3))
  mask = jax.random.bernoulli(jax.random.key(11), 0.5, (8, 4, 1)).at[0, 0, 0].set(True)
  ours, theirs = bnjax.BatchNorm(use_running_average=False), _flax(use_running_average=False)
  v = theirs.init(jax.random.key(0), x)
  y_ours, upd_ours = ours.apply(v, x, mask=mask, mutable=["batch_stats"])
  y_theirs, upd_theirs = theirs.apply(v, x, mask=mask, mutable=["batch_stats"])
  np.testing.assert_allclose(y_ours, y_theirs, **F32)
  _assert_trees_close(upd_ours, upd_theirs, **F32)


def test_large_offset_is_exact_where_flax_default_is_not():
  x = _x(12, (256, 4), loc=1e4, scale=1.0)
  ours = bnjax.BatchNorm(use_running_average=False)
  y, _ = ours.apply(ours.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  np.testing.assert_allclose(np.std(np.asarray(y, np.float64), axis=0), np.ones(4), rtol=1e-4)
  fast = nn.BatchNorm(use_running_average=False)  # Flax default: E[x^2] - E[x]^2.
  y_fast, _ = fast.apply(fast.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert np.max(np.std(np.asarray(y_fast, np.float64), axis=0)) > 2.0


class _MLP(nn.Module):
  norm: type

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8, use_bias=False)(x)
    x = self.norm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    return nn.Dense(3)(x)


def test_jitted_train_step_matches_flax_model():
  x = _x(13, (32, 6))
  labels = jnp.arange(32) % 3
  tx = optax.sgd(0.1)

  def run(norm):
    model = _MLP(norm)
    variables = model.init(jax.random.key(1), x, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state):
      def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    losses = []
    for _ in range(5):
      params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state)
      losses.append(loss)
    eval_logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return np.array(losses), params, batch_stats, eval_logits

  ours, theirs = run(bnjax.BatchNorm), run(_flax)
  np.testing.assert_allclose(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
  assert ours[0][-1] < ours[0][0]
  for a, b in zip(ours[1:], theirs[1:]):
    _assert_trees_close(a, b, atol=1e-4, rtol=1e-4)


def test_serialization_roundtrip_keeps_tree():
  model = bnjax.BatchNorm(use_running_average=False)
  variables = model.init(jax.random.key(0), _x(14))
  restored = flax.serialization.from_bytes(variables, flax.serialization.to_bytes(variables))
  _assert_trees_close(restored, variables, atol=0, rtol=0)


def test_non_finite_batch_keeps_batch_stats_and_is_reported():
  model = bnjax.BatchNorm(use_running_average=False)
  variables = model.init(jax.random.key(0), _x(15))
  x = _x(16).at[3, 2].set(jnp.nan)
  _, updates = model.apply(variables, x, mutable=["batch_stats", bnjax.linen.DIAGNOSTICS])
  np.testing.assert_array_equal(updates["batch_stats"]["var"][2], 1.0)
  np.testing.assert_array_equal(updates["batch_stats"]["mean"][2], 0.0)
  (flags,) = updates[bnjax.linen.DIAGNOSTICS]["batch_stats_updated"]
  np.testing.assert_array_equal(flags, [True, True, False, True, True])


def test_custom_vjp_field_off_allows_forward_mode_through_a_model():
  x, tangent = _x(20), _x(21)
  model = bnjax.BatchNorm(use_running_average=False, custom_vjp=False)
  variables = model.init(jax.random.key(0), x)
  got = jax.jvp(lambda x: model.apply(variables, x, mutable=["batch_stats"])[0], (x,),
                (tangent,))[1]
  flax_model = _flax(use_running_average=False)
  flax_vars = flax_model.init(jax.random.key(0), x)
  with jax.numpy_dtype_promotion("standard"):
    expected = jax.jvp(lambda x: flax_model.apply(flax_vars, x, mutable=["batch_stats"])[0],
                       (x,), (tangent,))[1]
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_custom_vjp_field_on_refuses_forward_mode_with_jaxs_error():
  x = _x(22)
  model = bnjax.BatchNorm(use_running_average=False)
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jvp(lambda x: model.apply(variables, x, mutable=["batch_stats"])[0], (x,), (x,))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8])
def test_integer_input_is_promoted_like_flax(dtype):
  x = (jnp.arange(48).reshape(16, 3) * 7 % 11).astype(dtype)
  outputs = {}
  for name, module in (("bnjax", bnjax.BatchNorm), ("flax", _flax)):
    model = module(use_running_average=False)
    variables = model.init(jax.random.key(0), x)
    with jax.numpy_dtype_promotion("standard"):
      outputs[name] = model.apply(variables, x, mutable=["batch_stats"])
  (y, updates), (y_flax, updates_flax) = outputs["bnjax"], outputs["flax"]
  assert y.dtype == y_flax.dtype == jnp.float32
  np.testing.assert_allclose(y, y_flax, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], updates_flax["batch_stats"]["var"],
                             rtol=1e-5)


def test_diagnostics_appear_only_when_their_collection_is_named():
  model = bnjax.BatchNorm(use_running_average=False)
  x = _x(23)
  variables = model.init(jax.random.key(0), x)
  _, everything = model.apply(variables, x, mutable=True)
  assert set(everything) == {"params", "batch_stats"}
  _, named = model.apply(variables, x, mutable=["batch_stats", bnjax.linen.DIAGNOSTICS])
  assert set(named) == {"batch_stats", bnjax.linen.DIAGNOSTICS}

"""bnjax.linen's LayerNorm, RMSNorm, GroupNorm and InstanceNorm as drop-ins for Flax's."""

import dataclasses

from flax import linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import bnjax
import bnjax.linen
from tests import norms_reference as ref

NAMES = ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
# Flax's fields; bnjax adds its own only after them.
EXTRA_FIELDS = {"custom_vjp", "stats_route"}


def _pair(name, **kwargs):
  return getattr(bnjax.linen, name)(**kwargs), getattr(nn, name)(**kwargs)


def _fields(cls):
  return [(f.name, f.default) for f in dataclasses.fields(cls)
          if f.name not in ("parent", "name")]


@pytest.mark.parametrize("name", NAMES)
def test_fields_and_defaults_are_flax_ones_in_order(name):
  ours, theirs = _fields(getattr(bnjax.linen, name)), _fields(getattr(nn, name))
  assert ours[:len(theirs)] == theirs
  assert {field for field, _ in ours[len(theirs):]} <= EXTRA_FIELDS


# Configurations whose Flax output is correct (data near zero), each (module, kwargs, x shape).
CASES = [
    ("LayerNorm", {}, (3, 5, 16)),
    ("LayerNorm", {"reduction_axes": (1, 2, 3), "feature_axes": -1}, (2, 3, 4, 8)),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": (1, 2), "use_bias": False},
     (2, 3, 4)),
    ("RMSNorm", {}, (3, 5, 16)),
    ("RMSNorm", {"reduction_axes": (1, 2), "epsilon": 1e-3}, (2, 3, 4, 8)),
    ("GroupNorm", {"num_groups": 4}, (2, 3, 4, 16)),
    ("GroupNorm", {"num_groups": None, "group_size": 2, "use_scale": False}, (2, 5, 8)),
    ("InstanceNorm", {}, (2, 3, 4, 8)),
    ("InstanceNorm", {"feature_axes": 1}, (2, 8, 3, 4)),
]
_IDS = [f"{name}-{'-'.join(kwargs) or 'defaults'}" for name, kwargs, _ in CASES]


def _inputs(shape, seed=0, loc=0.5):
  return jnp.asarray(np.random.default_rng(seed).normal(loc, 2.0, shape), jnp.float32)


def _perturbed(variables, seed=1):
  """Flax's initial variables with scale and bias moved away from 1 and 0."""
  leaves, tree = jax.tree.flatten(variables)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [v + jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype)
                                   for v in leaves])


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES, ids=_IDS)
def test_variables_outputs_and_gradients_equal_flax_where_it_is_correct(name, kwargs, shape):
  ours, theirs = _pair(name, **kwargs)
  x = _inputs(shape)
  variables = theirs.init(jax.random.key(0), x)
  ours_init = ours.init(jax.random.key(0), x)
  assert jax.tree.structure(ours_init) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(ours_init), jax.tree.leaves(variables), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  variables = _perturbed(variables)
  dy = _inputs(shape, seed=2)

  def loss(module):
    return lambda v, x: jnp.sum(module.apply(v, x) * dy)

  np.testing.assert_allclose(jax.jit(ours.apply)(variables, x),
                             jax.jit(theirs.apply)(variables, x), atol=2e-5, rtol=2e-5)
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  flax_grads = jax.jit(jax.grad(loss(theirs), argnums=(0, 1)))(variables, x)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(flax_grads), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("x_dtype", "dtype", "param_dtype", "expected"), [
    (jnp.bfloat16, None, jnp.float32, jnp.float32),   # promoted with the float32 params, as Flax
    (jnp.bfloat16, None, jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16, jnp.float32, jnp.bfloat16),
    (jnp.int32, None, jnp.float32, jnp.float32),     # integer input becomes float32, as Flax
])
@pytest.mark.parametrize("name", NAMES)
def test_output_dtype_follows_flax(name, x_dtype, dtype, param_dtype, expected):
  kwargs = {"num_groups": 2} if name == "GroupNorm" else {}
  ours, theirs = _pair(name, dtype=dtype, param_dtype=param_dtype, **kwargs)
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4).astype(x_dtype)
  with jax.numpy_dtype_promotion("standard"):  # Flax's own code mixes dtypes implicitly.
    variables = theirs.init(jax.random.key(0), x)
    y_flax = theirs.apply(variables, x)
  y = ours.apply(variables, x)
  assert y.dtype == y_flax.dtype == expected
  tolerance = 2e-5 if expected == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_flax, np.float32),
                             atol=tolerance, rtol=tolerance)


def _numpy_init(key, shape, dtype):
  """Weights drawn by NumPy: compiling JAX's initializers would cost more than the test."""
  del key
  return jnp.asarray(np.random.default_rng(shape[-1]).normal(0, 0.2, shape), dtype)


class _Model(nn.Module):
  """A small conv net with every norm of the family; `norms` maps a name to its class."""

  norms: dict

  @nn.compact
  def __call__(self, x_NHWC):
    x = nn.Conv(16, (3, 3), use_bias=False, kernel_init=_numpy_init)(x_NHWC)
    x = nn.relu(self.norms["GroupNorm"](num_groups=4)(x))
    x = nn.Conv(8, (3, 3), use_bias=False, kernel_init=_numpy_init)(x)
    x = nn.relu(self.norms["InstanceNorm"]()(x))
    x = x.reshape(x.shape[0], -1)
    x = self.norms["LayerNorm"]()(nn.Dense(32, kernel_init=_numpy_init)(x))
    x = self.norms["RMSNorm"]()(nn.Dense(32, kernel_init=_numpy_init)(nn.gelu(x)))
    return nn.Dense(10, kernel_init=_numpy_init)(x)


def test_swapping_flax_norms_for_bnjax_in_a_model_gives_the_same_outputs_and_gradients():
  images = _inputs((4, 8, 8, 3), seed=3)
  labels = jnp.arange(4) % 10
  flax_model = _Model({name: getattr(nn, name) for name in NAMES})
  our_model = _Model({name: getattr(bnjax.linen, name) for name in NAMES})
  variables = flax_model.init(jax.random.key(0), images)
  assert (jax.tree.structure(jax.eval_shape(our_model.init, jax.random.key(0), images))
          == jax.tree.structure(variables))

  def loss(model):
    def fn(params):
      logits = model.apply({"params": params}, images)
      log_probs = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
    return jax.jit(jax.value_and_grad(fn))

  (value, grads), (flax_value, flax_grads) = (loss(our_model)(variables["params"]),
                                              loss(flax_model)(variables["params"]))
  np.testing.assert_allclose(value, flax_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(flax_grads), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)


def test_layer_norm_module_is_exact_far_from_zero_where_flax_is_not():
  x = _inputs((4, 512), seed=4, loc=0.0) * 0.5 + 1e4
  ours, theirs = _pair("LayerNorm")
  variables = theirs.init(jax.random.key(0), x)
  expected = ref.layer_norm(x)
  np.testing.assert_allclose(ours.apply(variables, x), expected, atol=2e-5, rtol=1e-5)
  assert np.abs(np.asarray(theirs.apply(variables, x)) - expected).max() > 1.0


def test_mask_reaches_the_statistics():
  x = _inputs((3, 8), seed=5)
  mask = np.arange(8) < 5
  layer = bnjax.linen.LayerNorm()
  variables = layer.init(jax.random.key(0), x)
  np.testing.assert_allclose(np.asarray(layer.apply(variables, x, mask=mask))[:, :5],
                             ref.layer_norm(x, mask=mask)[:, :5], atol=2e-5, rtol=1e-5)


def test_axis_name_initialises_outside_shard_map_and_combines_inside():
  mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
  x = _inputs((4, 64), seed=6, loc=3.0)
  layer = bnjax.linen.LayerNorm(axis_name="model")
  variables = layer.init(jax.random.key(0), x)  # no collective while initialising.
  step = jax.shard_map(layer.apply, mesh=mesh,
                       in_specs=({"params": {"scale": P("model"), "bias": P("model")}},
                                 P(None, "model")),
                       out_specs=P(None, "model"))
  np.testing.assert_allclose(jax.jit(step)(variables, x), ref.layer_norm(x), atol=2e-5,
                             rtol=1e-5)


def test_group_norm_errors_name_both_numbers():
  with pytest.raises(ValueError, match=r"`num_groups`=5 does not divide the 16 channels"):
    bnjax.linen.GroupNorm(num_groups=5).init(jax.random.key(0), jnp.ones((2, 3, 16)))
  with pytest.raises(ValueError, match="exactly one of `num_groups` and `group_size`"):
    bnjax.linen.GroupNorm(group_size=4).init(jax.random.key(0), jnp.ones((2, 3, 16)))

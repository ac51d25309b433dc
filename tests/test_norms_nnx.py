"""bnjax.nnx's LayerNorm, RMSNorm, GroupNorm and InstanceNorm as drop-ins for Flax NNX's."""

import inspect

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax.nnx
from tests import norms_reference as ref

NAMES = ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
EXTRA_ARGUMENTS = {"custom_vjp", "stats_route"}


def _inputs(shape, seed=0, loc=0.5):
  return jnp.asarray(np.random.default_rng(seed).normal(loc, 2.0, shape), jnp.float32)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_and_call_take_flax_arguments_with_flax_defaults(name):
  ours = inspect.signature(getattr(bnjax.nnx, name).__init__).parameters
  theirs = inspect.signature(getattr(nnx, name).__init__).parameters
  ours_list = [(p.name, p.kind, p.default) for p in ours.values()]
  theirs_list = [(p.name, p.kind, p.default) for p in theirs.values()]
  for (our_name, our_kind, our_default), (their_name, their_kind, their_default) in zip(
      ours_list, theirs_list, strict=False):
    assert (our_name, our_kind) == (their_name, their_kind)
    if not callable(their_default):  # initializers are equal functions, not the same objects.
      assert our_default == their_default, our_name
  assert {n for n, _, _ in ours_list[len(theirs_list):]} <= EXTRA_ARGUMENTS
  call = inspect.signature(getattr(bnjax.nnx, name).__call__).parameters
  flax_call = inspect.signature(getattr(nnx, name).__call__).parameters
  assert [(p.name, p.kind) for p in call.values()] == [(p.name, p.kind)
                                                       for p in flax_call.values()]


CASES = [
    ("LayerNorm", 16, {}, (3, 5, 16)),
    ("LayerNorm", 8, {"reduction_axes": (1, 2, 3), "use_bias": False}, (2, 3, 4, 8)),
    ("RMSNorm", 16, {}, (3, 5, 16)),
    ("GroupNorm", 16, {"num_groups": 4}, (2, 3, 4, 16)),
    ("GroupNorm", 8, {"num_groups": None, "group_size": 2, "use_scale": False}, (2, 5, 8)),
    ("InstanceNorm", 8, {}, (2, 3, 4, 8)),
    ("InstanceNorm", 8, {"feature_axes": 1}, (2, 8, 3, 4)),
]


@pytest.mark.parametrize(("name", "features", "kwargs", "shape"), CASES,
                         ids=[f"{c[0]}-{'-'.join(c[2]) or 'defaults'}" for c in CASES])
def test_state_outputs_and_gradients_equal_flax_where_it_is_correct(name, features, kwargs, shape):
  ours = getattr(bnjax.nnx, name)(features, rngs=nnx.Rngs(0), **kwargs)
  theirs = getattr(nnx, name)(features, rngs=nnx.Rngs(0), **kwargs)
  our_state, their_state = nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)
  assert jax.tree.structure(our_state) == jax.tree.structure(their_state)
  for a, b in zip(jax.tree.leaves(our_state), jax.tree.leaves(their_state), strict=True):
    np.testing.assert_array_equal(a, b)
  # The same perturbed parameters in both, then outputs and gradients.
  rng = np.random.default_rng(1)
  perturbation = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.3, p.shape), p.dtype),
                              our_state)
  for module in (ours, theirs):
    nnx.update(module, jax.tree.map(jnp.add, nnx.state(module, nnx.Param), perturbation))
  x = _inputs(shape)
  dy = _inputs(shape, seed=2)

  def loss(module, x):
    return jnp.sum(module(x) * dy)

  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(ours, x),
                             nnx.jit(lambda m, x: m(x))(theirs, x), atol=2e-5, rtol=2e-5)
  grads = nnx.jit(nnx.grad(loss))(ours, x)
  flax_grads = nnx.jit(nnx.grad(loss))(theirs, x)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(flax_grads), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _numpy_init(key, shape, dtype):
  """Weights drawn by NumPy: compiling JAX's initializers would cost more than the test."""
  del key
  return jnp.asarray(np.random.default_rng(shape[-1]).normal(0, 0.2, shape), dtype)


class _Model(nnx.Module):
  """A small MLP and conv stack with every norm of the family, from `norms` (a module namespace)."""

  def __init__(self, norms, rngs):
    self.conv = nnx.Conv(3, 16, (3, 3), use_bias=False, kernel_init=_numpy_init, rngs=rngs)
    self.group = norms.GroupNorm(16, num_groups=4, rngs=rngs)
    self.instance = norms.InstanceNorm(16, rngs=rngs)
    self.dense = nnx.Linear(16 * 6 * 6, 32, kernel_init=_numpy_init, rngs=rngs)
    self.layer = norms.LayerNorm(32, rngs=rngs)
    self.rms = norms.RMSNorm(32, rngs=rngs)
    self.head = nnx.Linear(32, 10, kernel_init=_numpy_init, rngs=rngs)

  def __call__(self, x_NHWC):
    x = nnx.relu(self.instance(nnx.relu(self.group(self.conv(x_NHWC)))))
    x = self.layer(self.dense(x.reshape(x.shape[0], -1)))
    return self.head(self.rms(nnx.gelu(x)))


def test_swapping_flax_norms_for_bnjax_in_a_model_gives_the_same_outputs_and_gradients():
  images = _inputs((4, 6, 6, 3), seed=3)
  ours, theirs = _Model(bnjax.nnx, nnx.Rngs(0)), _Model(nnx, nnx.Rngs(0))
  for a, b in zip(jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(theirs)),
                  strict=True):
    np.testing.assert_array_equal(a, b)

  @nnx.jit
  def loss_and_grads(model):
    return nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(images))))(model)

  (value, grads), (flax_value, flax_grads) = loss_and_grads(ours), loss_and_grads(theirs)
  np.testing.assert_allclose(value, flax_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(flax_grads), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)


def test_layer_norm_is_exact_far_from_zero_where_flax_is_not():
  x = _inputs((4, 512), seed=4, loc=0.0) * 0.5 + 1e4
  expected = ref.layer_norm(x)
  np.testing.assert_allclose(bnjax.nnx.LayerNorm(512, rngs=nnx.Rngs(0))(x), expected,
                             atol=2e-5, rtol=1e-5)
  flax_y = nnx.LayerNorm(512, rngs=nnx.Rngs(0))(x)
  assert np.abs(np.asarray(flax_y) - expected).max() > 1.0


def test_rms_norm_takes_the_mask_positionally_as_flax_does():
  x = _inputs((3, 8), seed=5)
  mask = np.arange(8) < 5
  y = bnjax.nnx.RMSNorm(8, rngs=nnx.Rngs(0))(x, mask)
  np.testing.assert_allclose(np.asarray(y)[:, :5], ref.rms_norm(x, mask=mask)[:, :5], atol=2e-5,
                             rtol=1e-5)


def test_group_norm_checks_its_groups_when_built():
  with pytest.raises(ValueError, match=r"`num_groups`=5 does not divide the 16 channels"):
    bnjax.nnx.GroupNorm(16, num_groups=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exactly one of `num_groups` and `group_size`"):
    bnjax.nnx.GroupNorm(16, group_size=4, rngs=nnx.Rngs(0))
  layer = bnjax.nnx.GroupNorm(16, num_groups=None, group_size=4, rngs=nnx.Rngs(0))
  assert (layer.num_groups, layer.group_size) == (4, 4)


def test_input_of_the_wrong_feature_size_is_refused():
  with pytest.raises(ValueError, match=r"built with num_features=8\. Build it with "
                     r"`num_features=6`"):
    bnjax.nnx.LayerNorm(8, rngs=nnx.Rngs(0))(jnp.ones((2, 6)))


def test_switched_off_parameters_are_none_as_in_flax():
  for name in ("LayerNorm", "GroupNorm", "InstanceNorm"):
    kwargs = {"num_groups": 2} if name == "GroupNorm" else {}
    ours = getattr(bnjax.nnx, name)(4, use_scale=False, use_bias=False, rngs=nnx.Rngs(0),
                                    **kwargs)
    assert ours.scale is None
    assert ours.bias is None
    assert not jax.tree.leaves(nnx.state(ours, nnx.Param))

"""Layer, group, instance and RMS norm (`bnjax.norms`) against a float64 NumPy reference."""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import bnjax
from tests import norms_reference as ref
from tests.reference import TOLERANCES

EPS = 1e-6


def _normal(shape, seed, loc=0.0, std=1.0):
  return np.random.default_rng(seed).normal(loc, std, shape).astype(np.float32)


def _params(shape, seed=7, use_bias=True):
  rng = np.random.default_rng(seed)
  scale = jnp.asarray(rng.normal(1.0, 0.3, shape), jnp.float32)
  bias = jnp.asarray(rng.normal(0.0, 0.3, shape), jnp.float32) if use_bias else None
  return bnjax.BatchNormParams(scale, bias)


def _np(v):
  return None if v is None else np.asarray(v, np.float64)


# Every layout Flax supports, each as (name, bnjax call, float64 reference, x shape, param shape).
LAYOUTS = {
    "layer-last-axis": (bnjax.layer_norm,
                        lambda p, x, **k: ref.layer_norm(x, _np(p.scale), _np(p.bias), **k),
                        (4, 6, 16), (16,)),
    "layer-nhwc-chw": (lambda p, x, **k: bnjax.layer_norm(p, x, reduction_axes=(1, 2, 3), **k),
                       lambda p, x, **k: ref.layer_norm(x, _np(p.scale), _np(p.bias),
                                                        reduction_axes=(1, 2, 3), **k),
                       (3, 4, 5, 8), (8,)),
    "layer-features-axis-1": (
        lambda p, x, **k: bnjax.layer_norm(p, x, reduction_axes=(1, 2), feature_axes=1, **k),
        lambda p, x, **k: ref.layer_norm(x, _np(p.scale), _np(p.bias), reduction_axes=(1, 2),
                                         feature_axes=1, **k),
        (3, 8, 5), (8,)),
    "layer-two-feature-axes": (
        lambda p, x, **k: bnjax.layer_norm(p, x, reduction_axes=(-2, -1), feature_axes=(-2, -1),
                                           **k),
        lambda p, x, **k: ref.layer_norm(x, _np(p.scale), _np(p.bias), reduction_axes=(-2, -1),
                                         feature_axes=(-2, -1), **k),
        (3, 4, 6), (4, 6)),
    "rms-last-axis": (bnjax.rms_norm,
                      lambda p, x, **k: ref.rms_norm(x, _np(p.scale), **k), (4, 6, 16), (16,)),
    "rms-nhwc-hw-features-last": (
        lambda p, x, **k: bnjax.rms_norm(p, x, reduction_axes=(1, 2), **k),
        lambda p, x, **k: ref.rms_norm(x, _np(p.scale), reduction_axes=(1, 2), **k),
        (3, 4, 5, 8), (8,)),
    "group-nhwc": (lambda p, x, **k: bnjax.group_norm(p, x, num_groups=4, **k),
                   lambda p, x, **k: ref.group_norm(x, 4, _np(p.scale), _np(p.bias), **k),
                   (3, 4, 5, 16), (16,)),
    "group-size-2-explicit-axes": (
        lambda p, x, **k: bnjax.group_norm(p, x, num_groups=None, group_size=2,
                                           reduction_axes=(-3, -2, -1), **k),
        lambda p, x, **k: ref.group_norm(x, 4, _np(p.scale), _np(p.bias),
                                         reduction_axes=(-3, -2, -1), **k),
        (2, 3, 4, 5, 8), (8,)),
    "instance-nhwc": (bnjax.instance_norm,
                      lambda p, x, **k: ref.instance_norm(x, _np(p.scale), _np(p.bias), **k),
                      (3, 4, 5, 8), (8,)),
    "instance-nchw": (lambda p, x, **k: bnjax.instance_norm(p, x, feature_axes=1, **k),
                      lambda p, x, **k: ref.instance_norm(x, _np(p.scale), _np(p.bias),
                                                          feature_axes=1, **k),
                      (3, 8, 4, 5), (8,)),
}


def _layout(name):
  fn, reference, x_shape, param_shape = LAYOUTS[name]
  params = _params(param_shape, use_bias=not name.startswith("rms"))
  return fn, reference, x_shape, params


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_matches_float64_reference_in_every_layout(name):
  fn, reference, x_shape, params = _layout(name)
  x = _normal(x_shape, 0, loc=2.0, std=3.0)
  y = jax.jit(fn)(params, x)
  assert y.dtype == jnp.float32
  assert y.shape == x.shape
  np.testing.assert_allclose(y, reference(params, x), **TOLERANCES["float32"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["layer-last-axis", "group-nhwc", "instance-nhwc",
                                  "rms-last-axis"])
def test_half_precision_input_has_float32_statistics(name, dtype):
  # Offset 300 std 1: in bfloat16 sums the mean alone would lose the variance; statistics in
  # float32 of the rounded input match a float64 reference of that same input.
  fn, reference, x_shape, params = _layout(name)
  x = jnp.asarray(_normal(x_shape, 1, loc=300.0 if name[0] != "r" else 0.0), dtype)
  y = jax.jit(fn)(params, x)
  assert y.dtype == jnp.dtype(dtype)
  expected = reference(params, np.asarray(x.astype(jnp.float32)))
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("name", ["layer-nhwc-chw", "group-nhwc", "instance-nchw",
                                  "rms-last-axis"])
def test_float64_input_under_x64_is_float64_exact(name):
  fn, reference, x_shape, params = _layout(name)
  with jax.enable_x64(True):
    x = jnp.asarray(_normal(x_shape, 2, loc=5.0), jnp.float64)
    params64 = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    y = jax.jit(fn)(params64, x)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, reference(params64, x), **TOLERANCES["float64"])


def test_output_dtype_argument():
  params = bnjax.init_params(8)
  y = bnjax.layer_norm(params, jnp.ones((2, 8), jnp.bfloat16).at[0, 0].set(3.0),
                       dtype=jnp.float32)
  assert y.dtype == jnp.float32


# ----------------------------------------------------------------------------- large offsets


def _implied_variance_error(y, x, reduce_axes):
  """|var_used - var| / var per row, from the output of a norm without affine part.

  y = (x - mean) / sqrt(var_used + eps), so std(y)^2 = var / (var_used + eps), with var from the
  float64 input.
  """
  x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
  var = x64.var(axis=reduce_axes)
  var_used = var / y64.var(axis=reduce_axes) - EPS
  return np.abs(var_used - var) / var


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5, 1e6])
def test_layer_norm_variance_is_exact_far_from_zero_where_flax_is_not(offset):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel  (the peer)
  x = jnp.asarray(_normal((8, 512), 3) + np.float32(offset))
  params = bnjax.init_params(512)
  ours = _implied_variance_error(jax.jit(bnjax.layer_norm)(params, x), x, -1)
  assert ours.max() <= 1e-5, ours.max()
  flax_layer = nn.LayerNorm()
  flax_y = flax_layer.apply(flax_layer.init(jax.random.key(0), x), x)
  if offset >= 1e4:  # Flax's E[x^2] - E[x]^2 cancels the whole offset.
    assert _implied_variance_error(flax_y, x, -1).max() > 0.5


@pytest.mark.parametrize("offset", [1e3, 1e6])
def test_group_norm_variance_is_exact_far_from_zero_where_flax_is_not(offset):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel  (the peer)
  x = jnp.asarray(_normal((2, 4, 4, 64), 4) + np.float32(offset))
  groups = 8
  y = jax.jit(lambda p, x: bnjax.group_norm(p, x, num_groups=groups))(bnjax.init_params(64), x)
  grouped = lambda v: np.asarray(v).reshape(2, 16, groups, 8)  # noqa: E731
  ours = _implied_variance_error(grouped(y), grouped(x), (1, 3))
  assert ours.max() <= 1e-5, ours.max()
  flax_layer = nn.GroupNorm(num_groups=groups)
  flax_y = flax_layer.apply(flax_layer.init(jax.random.key(0), x), x)
  if offset >= 1e4:
    assert _implied_variance_error(grouped(flax_y), grouped(x), (1, 3)).max() > 0.5


@pytest.mark.parametrize("offset", [1e3, 1e6])
def test_instance_and_rms_norm_are_exact_far_from_zero(offset):
  x = jnp.asarray(_normal((2, 6, 5, 4), 5) + np.float32(offset))
  y = jax.jit(bnjax.instance_norm)(bnjax.init_params(4, use_scale=False, use_bias=False), x)
  assert _implied_variance_error(y, x, (1, 2)).max() <= 1e-5
  # RMS norm of data far from zero: y = x / rms, compared elementwise.
  y = jax.jit(bnjax.rms_norm)(bnjax.BatchNormParams(None, None), x)
  np.testing.assert_allclose(y, ref.rms_norm(x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["layer-last-axis", "layer-nhwc-chw", "group-nhwc",
                                  "instance-nhwc"])
def test_constant_row_or_group_outputs_exactly_bias(name):
  fn, _, x_shape, params = _layout(name)
  x = jnp.full(x_shape, 12345.678, jnp.float32)
  y = jax.jit(fn)(params, x)  # every one of these layouts has its features last.
  np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(params.bias, y.shape))


# ----------------------------------------------------------------------------- identities


def test_group_norm_with_one_group_is_layer_norm_over_hwc():
  x = _normal((3, 4, 5, 8), 6, loc=7.0)
  params = _params((8,))
  np.testing.assert_allclose(bnjax.group_norm(params, x, num_groups=1),
                             bnjax.layer_norm(params, x, reduction_axes=(1, 2, 3)),
                             atol=2e-6, rtol=1e-6)


def test_group_norm_with_group_size_one_is_instance_norm():
  x = _normal((3, 4, 5, 8), 7, loc=-3.0)
  params = _params((8,))
  np.testing.assert_allclose(bnjax.group_norm(params, x, num_groups=None, group_size=1),
                             bnjax.instance_norm(params, x), atol=2e-6, rtol=1e-6)


def test_rms_norm_is_layer_norm_on_zero_mean_rows():
  x = _normal((5, 16), 8, std=2.0)
  x = x - x.mean(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
  params = _params((16,), use_bias=False)
  np.testing.assert_allclose(bnjax.rms_norm(params, x), bnjax.layer_norm(params, x),
                             atol=2e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", ["layer-last-axis", "group-nhwc", "instance-nhwc",
                                  "rms-last-axis"])
def test_mask_restricts_statistics_and_keeps_nan_out_of_outputs_and_gradients(name):
  fn, reference, x_shape, params = _layout(name)
  rng = np.random.default_rng(9)
  x = _normal(x_shape, 10, loc=4.0, std=2.0)
  mask = rng.random(x_shape) < 0.6
  poisoned = np.where(mask, x, np.where(rng.random(x_shape) < 0.5, np.nan, np.inf))
  poisoned = poisoned.astype(np.float32)
  dy = jnp.asarray(_normal(x_shape, 11))

  def loss(params, x):  # over the valid outputs: what is masked must not matter.
    return jnp.sum(jnp.where(mask, fn(params, x, mask=mask), 0.0) * dy)

  y = jax.jit(fn)(params, poisoned, mask=mask)
  np.testing.assert_allclose(np.where(mask, y, 0.0),
                             np.where(mask, reference(params, x, mask=mask), 0.0),
                             **TOLERANCES["float32"])
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, poisoned)
  clean = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)  # finite values where masked.
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(clean), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["layer-last-axis", "group-nhwc", "instance-nhwc"])
@pytest.mark.parametrize("custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_set_without_valid_value_outputs_bias_with_finite_gradients(name, custom_vjp):
  fn, _, x_shape, params = _layout(name)
  x = _normal(x_shape, 12, loc=1.0)
  mask = np.ones(x_shape, bool)
  mask[0] = False  # the first example has no valid value: every row, group or channel of it.
  x[0, ...] = np.nan

  def loss(params, x):
    return jnp.sum(jnp.sin(fn(params, x, mask=mask, custom_vjp=custom_vjp)))

  y = jax.jit(lambda p, x: fn(p, x, mask=mask, custom_vjp=custom_vjp))(params, x)
  bias = np.asarray(params.bias)
  np.testing.assert_array_equal(np.asarray(y[0]), np.broadcast_to(bias, y[0].shape))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(np.asarray(grads[1][0]), 0.0)


# ----------------------------------------------------------------------------- gradients


FLOAT64_CASES = {
    "layer": (lambda p, x, m, c: bnjax.layer_norm(p, x, mask=m, custom_vjp=c), (4, 5), (5,)),
    "layer-nhwc-chw": (lambda p, x, m, c: bnjax.layer_norm(p, x, reduction_axes=(1, 2, 3),
                                                           mask=m, custom_vjp=c),
                       (2, 2, 2, 3), (3,)),
    "rms": (lambda p, x, m, c: bnjax.rms_norm(p, x, mask=m, custom_vjp=c), (4, 5), (5,)),
    "group": (lambda p, x, m, c: bnjax.group_norm(p, x, num_groups=2, mask=m, custom_vjp=c),
              (2, 3, 4), (4,)),
    "instance": (lambda p, x, m, c: bnjax.instance_norm(p, x, mask=m, custom_vjp=c),
                 (2, 3, 2), (2,)),
}


# Every norm through the closed-form backward with a mask (its most general path), two without;
# autodiff (which `test_closed_form_backward_equals_autodiff` ties to it) on a centred and an
# uncentred norm, in forward and reverse mode.
SECOND_ORDER = ([(name, True, True) for name in sorted(FLOAT64_CASES)]
                + [("layer-nhwc-chw", False, True), ("group", False, True),
                   ("layer", False, False), ("rms", True, False)])


@pytest.mark.parametrize(
    ("name", "with_mask", "custom_vjp"), SECOND_ORDER,
    ids=[f"{n}-{'mask' if m else 'no-mask'}-{'custom-vjp' if c else 'autodiff'}"
         for n, m, c in SECOND_ORDER])
def test_gradients_match_finite_differences_to_second_order(name, with_mask, custom_vjp):
  fn, x_shape, param_shape = FLOAT64_CASES[name]
  with jax.enable_x64(True):
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(1.0, 2.0, x_shape))
    scale = jnp.asarray(rng.normal(1.0, 0.2, param_shape))
    bias = jnp.asarray(rng.normal(0.0, 0.2, param_shape))
    mask = (rng.random(x_shape) < 0.7) | (np.arange(x_shape[-1]) < 3) if with_mask else None

    def f(x, scale, bias):
      return jnp.sin(fn(bnjax.BatchNormParams(scale, bias), x, mask, custom_vjp))

    # A custom VJP has no forward mode; reverse-over-reverse checks its backward's derivative.
    modes = ["rev"] if custom_vjp else ["fwd", "rev"]
    jtu.check_grads(jax.jit(f), (x, scale, bias), order=2, modes=modes, atol=1e-6, rtol=1e-6)


# The layouts the second-order checks above leave out: parameters along other axes than the last,
# two feature axes, RMS over spatial axes, explicit group axes, channels first.
@pytest.mark.parametrize("name", ["layer-features-axis-1", "layer-two-feature-axes",
                                  "rms-nhwc-hw-features-last", "group-size-2-explicit-axes",
                                  "instance-nchw"])
def test_closed_form_backward_equals_autodiff(name):
  fn, _, x_shape, params = _layout(name)
  x = _normal(x_shape, 14, loc=3.0, std=2.0)
  dy = _normal(x_shape, 15)

  def grads(custom_vjp):
    loss = lambda p, x: jnp.sum(fn(p, x, custom_vjp=custom_vjp) * dy)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  for ours, autodiff in zip(jax.tree.leaves(grads(True)), jax.tree.leaves(grads(False)),
                              strict=True):
    np.testing.assert_allclose(ours, autodiff, atol=2e-5, rtol=2e-5)


def test_closed_form_input_gradient_of_rms_norm():
  # dx = scale * r * (dy - x_hat * mean(dy * x_hat)), r = 1 / sqrt(mean(x^2) + eps), x_hat = x r.
  with jax.enable_x64(True):
    rng = np.random.default_rng(16)
    x, dy = rng.normal(0.5, 2.0, (6, 7)), rng.normal(size=(6, 7))
    scale = rng.normal(1.0, 0.2, 7)
    _, vjp = jax.vjp(lambda x: bnjax.rms_norm(bnjax.BatchNormParams(jnp.asarray(scale), None), x),
                     jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(dy))
    r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    g = dy * scale
    expected = r * (g - x * r * (g * x * r).mean(-1, keepdims=True))
    np.testing.assert_allclose(dx, expected, atol=1e-10, rtol=1e-10)


def test_forward_mode_needs_autodiff_switch():
  x = jnp.asarray(_normal((3, 8), 17))
  params = bnjax.init_params(8)
  tangent = jnp.ones_like(x)
  _, dy = jax.jvp(lambda x: bnjax.layer_norm(params, x, custom_vjp=False), (x,), (tangent,))
  np.testing.assert_allclose(dy, 0.0, atol=1e-5)  # a constant shift is cancelled by the mean.
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda x: bnjax.layer_norm(params, x), (x,), (tangent,))


# ----------------------------------------------------------------------------- across devices


def _mesh(axis, count=8):
  assert jax.device_count() >= count
  return Mesh(np.array(jax.devices()[:count]), (axis,))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_tensor_parallel_statistics_over_sharded_features_equal_unsharded(norm):
  # A hidden dimension of 64 split over 8 devices on 'model'; the features (and scale, bias) are
  # sharded, the rows replicated. Offset 1e4: the combine must not cancel either.
  mesh = _mesh("model")
  fn = bnjax.layer_norm if norm == "layer" else bnjax.rms_norm
  x = jnp.asarray(_normal((6, 64), 18, loc=1e4 if norm == "layer" else 0.0, std=2.0))
  mask = np.random.default_rng(19).random((6, 64)) < 0.5  # unequal valid counts per device.
  dy = jnp.asarray(_normal((6, 64), 20))
  params = _params((64,), use_bias=norm == "layer")

  def loss(params, x, mask, axis_name):
    return jnp.sum(fn(params, x, mask=mask, axis_name=axis_name) * dy)

  def sharded(params, x, mask):
    local = jax.shard_map(
        lambda p, x, m, dy: (fn(p, x, mask=m, axis_name="model"),
                             jax.grad(lambda p, x: jnp.sum(fn(p, x, mask=m, axis_name="model")
                                                           * dy), argnums=(0, 1))(p, x)),
        mesh=mesh, in_specs=(P("model"), P(None, "model"), P(None, "model"), P(None, "model")),
        out_specs=(P(None, "model"), (P("model"), P(None, "model"))))
    return local(params, x, mask, dy)

  y, grads = jax.jit(sharded)(params, x, mask)
  y_single = jax.jit(lambda p, x, m: fn(p, x, mask=m))(params, x, mask)
  grads_single = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)(params, x, mask, None)
  np.testing.assert_allclose(y, y_single, atol=2e-5, rtol=1e-5)
  reference = (ref.layer_norm(x, _np(params.scale), _np(params.bias), mask=mask) if norm == "layer"
               else ref.rms_norm(x, _np(params.scale), mask=mask))
  np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, reference, 0),
                             **TOLERANCES["float32"])
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_single), strict=True):
    np.testing.assert_allclose(a, b, atol=5e-4, rtol=1e-4)


def test_instance_norm_over_a_spatially_sharded_image_equals_unsharded():
  mesh = _mesh("space", 4)
  x = jnp.asarray(_normal((2, 8, 3, 4), 21, loc=50.0))
  params = _params((4,))
  step = jax.shard_map(lambda p, x: bnjax.instance_norm(p, x, axis_name="space"), mesh=mesh,
                       in_specs=(P(), P(None, "space")), out_specs=P(None, "space"))
  np.testing.assert_allclose(jax.jit(step)(params, x),
                             ref.instance_norm(x, _np(params.scale), _np(params.bias)),
                             **TOLERANCES["float32"])


# ----------------------------------------------------------------------------- errors


def test_group_count_that_does_not_divide_the_channels_names_both():
  with pytest.raises(ValueError, match=r"`num_groups`=3 does not divide the 8 channels"):
    bnjax.group_norm(bnjax.init_params(8), jnp.ones((2, 4, 8)), num_groups=3)
  with pytest.raises(ValueError, match=r"`group_size`=3 does not divide the 8 channels"):
    bnjax.group_norm(bnjax.init_params(8), jnp.ones((2, 4, 8)), num_groups=None, group_size=3)


@pytest.mark.parametrize(("num_groups", "group_size"), [(None, None), (2, 4)])
def test_group_norm_needs_exactly_one_of_num_groups_and_group_size(num_groups, group_size):
  with pytest.raises(ValueError, match="exactly one of `num_groups` and `group_size`"):
    bnjax.group_norm(bnjax.init_params(8), jnp.ones((2, 4, 8)), num_groups=num_groups,
                     group_size=group_size)


def test_group_norm_reduction_axes_must_include_the_channels():
  with pytest.raises(ValueError, match="must include the last axis"):
    bnjax.group_norm(bnjax.init_params(8), jnp.ones((2, 4, 8)), num_groups=2, reduction_axes=1)


@pytest.mark.parametrize("fn", [bnjax.layer_norm, bnjax.rms_norm, bnjax.instance_norm,
                                lambda p, x: bnjax.group_norm(p, x, num_groups=2)])
def test_non_floating_input_is_refused(fn):
  with pytest.raises(TypeError, match="`x` must have a floating dtype; got int32"):
    fn(bnjax.init_params(4), jnp.ones((2, 3, 4), jnp.int32))


def test_parameters_of_the_wrong_shape_are_refused():
  with pytest.raises(ValueError, match=r"`params.scale` has shape \(5,\) but `x` of shape "
                     r"\(2, 4\) needs \(4,\)"):
    bnjax.layer_norm(bnjax.init_params(5), jnp.ones((2, 4)))
  with pytest.raises(TypeError, match="`params` must have the fields"):
    bnjax.layer_norm({"scale": jnp.ones(4)}, jnp.ones((2, 4)))


def test_bad_axes_and_epsilon_are_refused():
  params = bnjax.init_params(4)
  with pytest.raises(ValueError, match="`reduction_axes` 2 is out of range for `x` of rank 2"):
    bnjax.layer_norm(params, jnp.ones((2, 4)), reduction_axes=2)
  with pytest.raises(ValueError, match="`feature_axes` 0 includes axis 0"):
    bnjax.instance_norm(bnjax.init_params(2), jnp.ones((2, 3, 4)), feature_axes=0)
  with pytest.raises(ValueError, match="leaves no axis to take the statistics over"):
    bnjax.instance_norm(params, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="`epsilon` must be a number > 0"):
    bnjax.layer_norm(params, jnp.ones((2, 4)), epsilon=0.0)


def test_a_single_value_per_row_is_refused():
  with pytest.raises(ValueError, match="expected more than 1 value per set of statistics, got 1"):
    bnjax.layer_norm(bnjax.init_params(1), jnp.ones((3, 1)))


def test_init_params_makes_ones_and_zeros_and_refuses_bad_sizes():
  params = bnjax.init_params((2, 3), dtype=jnp.bfloat16, use_bias=False)
  assert params.scale.shape == (2, 3)
  assert params.scale.dtype == jnp.bfloat16
  assert params.bias is None
  with pytest.raises(ValueError, match="`num_features` must be a positive int"):
    bnjax.init_params(0)

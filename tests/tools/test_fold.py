"""Folding evaluation-mode batch norm into the preceding Dense/Conv: the closed form against a
float64 reference, every Flax kernel layout, and whole models (a small CNN and a small ResNet)
whose folded eval outputs equal the unfolded ones."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import tools
from tests import flax_free
from tests import reference

F32 = dict(atol=2e-5, rtol=2e-5)


def _rng(seed):
  return np.random.default_rng(seed)


def _random_norm(seed, channels, affine=True):
  rng = _rng(seed)
  f32 = lambda v: jnp.asarray(v.astype(np.float32))
  params = (bnjax.BatchNormParams(f32(rng.normal(1.0, 0.5, channels)),
                                  f32(rng.normal(0.0, 1.0, channels)))
            if affine else bnjax.BatchNormParams(None, None))
  state = bnjax.BatchNormState(f32(rng.normal(0.0, 2.0, channels)),
                               f32(rng.uniform(0.1, 3.0, channels)))
  return params, state


def test_fold_module_imports_no_flax():
  imported = flax_free.external_imports("bnjax.tools.fold")
  assert "flax" not in imported and {"jax", "numpy"} & imported


# --- One layer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("has_bias, affine", [(True, True), (False, True), (True, False)],
                         ids=["bias", "no-bias", "no-affine"])
def test_dense_fold_matches_float64_reference(has_bias, affine):
  rng = _rng(0)
  x = rng.standard_normal((10, 6))
  kernel = jnp.asarray(rng.standard_normal((6, 4)).astype(np.float32))
  bias = jnp.asarray(rng.standard_normal(4).astype(np.float32)) if has_bias else None
  params, state = _random_norm(1, 4, affine)
  new_kernel, new_bias = jax.jit(functools.partial(tools.fold_batch_norm, epsilon=1e-3))(
      kernel, bias, params, state)
  dense = x @ np.asarray(kernel, np.float64) + (0.0 if bias is None else np.asarray(bias))
  expected = reference.normalize(dense, state.mean, state.var, params.scale, params.bias,
                                 epsilon=1e-3)
  folded = x @ np.asarray(new_kernel, np.float64) + np.asarray(new_bias, np.float64)
  np.testing.assert_allclose(folded, expected, **F32)


def test_linen_variable_dicts_are_accepted():
  params, state = _random_norm(2, 3)
  kernel = jnp.ones((2, 3))
  as_tuples = tools.fold_batch_norm(kernel, None, params, state)
  as_dicts = tools.fold_batch_norm(kernel, None, params._asdict(), state._asdict())
  for a, b in zip(as_tuples, as_dicts):
    np.testing.assert_array_equal(a, b)


class ConvThenNorm(nn.Module):
  """One kernel layout followed by batch norm, or its folded form."""
  layer: str
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    kwargs = dict(features=6, kernel_size=(3, 3), use_bias=self.folded, name="layer")
    if self.layer == "conv_grouped":
      x = nn.Conv(feature_group_count=2, **kwargs)(x)
    elif self.layer == "conv_transpose":
      x = nn.ConvTranspose(strides=(2, 2), **kwargs)(x)
    elif self.layer == "conv_transpose_transposed_kernel":
      x = nn.ConvTranspose(strides=(2, 2), transpose_kernel=True, **kwargs)(x)
    else:
      x = nn.Conv(**kwargs)(x)
    return x if self.folded else bnjax.BatchNorm(use_running_average=True, name="bn")(x)


@pytest.mark.parametrize("layer, out_axis", [
    ("conv", -1), ("conv_grouped", -1), ("conv_transpose", -1),
    ("conv_transpose_transposed_kernel", -2)])
def test_conv_kernel_layouts_fold_exactly(layer, out_axis):
  x = jnp.asarray(_rng(3).standard_normal((2, 5, 5, 4)).astype(np.float32))
  shapes = jax.eval_shape(lambda: ConvThenNorm(layer).init(jax.random.key(0), x))
  kernel = jnp.asarray(_rng(4).normal(0, 0.3, shapes["params"]["layer"]["kernel"].shape)
                       .astype(np.float32))
  params, state = _random_norm(4, 6)
  variables = {"params": {"layer": {"kernel": kernel}, "bn": params._asdict()},
               "batch_stats": {"bn": state._asdict()}}
  folded = tools.fold_batch_norms(variables, [tools.FoldPair("layer", "bn", out_axis=out_axis)])
  y = jax.jit(ConvThenNorm(layer).apply)(variables, x)
  y_folded = jax.jit(ConvThenNorm(layer, folded=True).apply)(folded, x)
  np.testing.assert_allclose(y_folded, y, **F32)


def test_kernel_dtype_is_kept_and_arithmetic_is_float32():
  rng = _rng(5)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 2, 4)).astype(np.float32)).astype(jnp.bfloat16)
  params, state = _random_norm(6, 4)
  new_kernel, new_bias = tools.fold_batch_norm(kernel, None, params, state)
  assert new_kernel.dtype == jnp.bfloat16 and new_bias.dtype == jnp.bfloat16
  s = np.asarray(params.scale, np.float64) / np.sqrt(np.asarray(state.var, np.float64) + 1e-5)
  expected = (np.asarray(kernel.astype(jnp.float32), np.float64) * s).astype(np.float32)
  np.testing.assert_array_equal(new_kernel, jnp.asarray(expected).astype(jnp.bfloat16))
  _, bias32 = tools.fold_batch_norm(kernel, jnp.zeros(4, jnp.float32), params, state)
  assert bias32.dtype == jnp.float32


# --- Whole models ---------------------------------------------------------------------------------

class SmallCNN(nn.Module):
  """Conv-BN-ReLU twice, Dense-BN-ReLU, Dense: the common inference-folding case."""
  folded: bool = False

  def _norm(self, x, train, name):
    return x if self.folded else bnjax.BatchNorm(use_running_average=not train, name=name)(x)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(self._norm(nn.Conv(8, (3, 3), use_bias=self.folded, name="conv1")(x), train, "bn1"))
    x = nn.relu(self._norm(nn.Conv(8, (3, 3), strides=2, name="conv2")(x), train, "bn2"))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(self._norm(nn.Dense(16, use_bias=self.folded, name="fc")(x), train, "bn3"))
    return nn.Dense(3, name="head")(x)


CNN_PAIRS = [("conv1", "bn1"), ("conv2", "bn2"), ("fc", "bn3")]


class ResidualBlock(nn.Module):
  """conv-bn-relu-conv-bn plus a strided 1x1 conv-bn projection, added, then relu."""
  features: int
  folded: bool = False

  def _norm(self, x, train, name):
    return x if self.folded else bnjax.BatchNorm(use_running_average=not train, name=name)(x)

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, self.features, use_bias=self.folded)
    y = nn.relu(self._norm(conv((3, 3), strides=2, name="conv1")(x), train, "bn1"))
    y = self._norm(conv((3, 3), name="conv2")(y), train, "bn2")
    shortcut = self._norm(conv((1, 1), strides=2, name="proj")(x), train, "proj_bn")
    return nn.relu(y + shortcut)


class SmallResNet(nn.Module):
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), use_bias=self.folded, name="stem")(x)
    x = x if self.folded else bnjax.BatchNorm(use_running_average=not train, name="stem_bn")(x)
    x = ResidualBlock(12, self.folded, name="block1")(nn.relu(x), train)
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


RESNET_PAIRS = [("stem", "stem_bn"), ("block1/conv1", "block1/bn1"),
                ("block1/conv2", "block1/bn2"), (("block1", "proj"), ("block1", "proj_bn"))]


X = jnp.asarray(_rng(8).standard_normal((4, 8, 8, 3)).astype(np.float32))


@functools.cache
def _trained_variables(model_class):
  """Variables as after training: every leaf random (kernels ~ N(0, 0.3), scales ~ N(1, 0.5),
  biases and running means ~ N(0, 1), running variances ~ U(0.1, 3)), drawn with NumPy for the
  model's variable shapes (no compilation)."""
  shapes = jax.eval_shape(lambda: model_class().init(jax.random.key(0), X))
  rng = _rng(7)

  def draw(path, leaf):
    name = path[-1].key
    value = {"scale": lambda: rng.normal(1.0, 0.5, leaf.shape),
             "var": lambda: rng.uniform(0.1, 3.0, leaf.shape),
             "kernel": lambda: rng.normal(0.0, 0.3, leaf.shape)}.get(
                 name, lambda: rng.normal(0.0, 1.0, leaf.shape))()
    return jnp.asarray(value.astype(np.float32))
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("model, pairs", [(SmallCNN, CNN_PAIRS), (SmallResNet, RESNET_PAIRS)],
                         ids=["cnn", "resnet"])
def test_folded_model_eval_equals_unfolded_eval(model, pairs):
  variables = _trained_variables(model)
  folded = tools.fold_batch_norms(variables, pairs)
  assert "batch_stats" not in folded
  assert jax.tree.structure(folded) == jax.tree.structure(
      jax.eval_shape(lambda: model(folded=True).init(jax.random.key(0), X)))
  y = jax.jit(lambda v, x: model().apply(v, x, train=False))(variables, X)
  y_folded = jax.jit(lambda v, x: model(folded=True).apply(v, x))(folded, X)
  np.testing.assert_allclose(y_folded, y, **F32)
  assert float(jnp.std(y)) > 0.1  # Not a degenerate model that outputs a constant.


def test_fold_batch_norms_keeps_input_and_other_collections():
  variables = _trained_variables(SmallCNN)
  variables = {**variables, "batch_stats": {**variables["batch_stats"], "other": {
      "mean": jnp.zeros(2), "var": jnp.ones(2)}}, "extra": {"count": jnp.int32(3)}}
  before = jax.tree.map(np.asarray, variables)
  folded = tools.fold_batch_norms(variables, CNN_PAIRS[:1])
  jax.tree.map(np.testing.assert_array_equal, variables, before)  # Input untouched.
  assert set(folded["batch_stats"]) == {"bn2", "bn3", "other"}
  assert "bn1" not in folded["params"] and "bias" in folded["params"]["conv1"]
  assert folded["extra"] == {"count": 3}


# --- Errors ---------------------------------------------------------------------------------------

def test_bad_inputs_raise_with_the_argument_named():
  params, state = _random_norm(9, 4)
  with pytest.raises(ValueError, match=r"`params.scale` has shape \(4,\).*out_axis=2"):
    tools.fold_batch_norm(jnp.ones((3, 4, 3)), None, params, state)
  with pytest.raises(ValueError, match="`out_axis`"):
    tools.fold_batch_norm(jnp.ones((3, 4)), None, params, state, out_axis=2)
  with pytest.raises(ValueError, match="`epsilon`"):
    tools.fold_batch_norm(jnp.ones((3, 4)), None, params, state, epsilon=0.0)
  with pytest.raises(TypeError, match="`kernel` must have a floating dtype"):
    tools.fold_batch_norm(jnp.ones((3, 4), jnp.int32), None, params, state)
  with pytest.raises(ValueError, match="at least 2 dimensions"):
    tools.fold_batch_norm(jnp.ones(4), None, params, state)
  with pytest.raises(ValueError, match="exactly 'mean' and 'var'"):
    tools.fold_batch_norm(jnp.ones((3, 4)), None, params, {"mean": state.mean})


def test_bad_pairs_raise_naming_the_path():
  variables = _trained_variables(SmallCNN)
  with pytest.raises(ValueError, match="layer 'conv9' is not in"):
    tools.fold_batch_norms(variables, [("conv9", "bn1")])
  with pytest.raises(ValueError, match="norm 'bn9' is not in `variables\\['batch_stats'\\]`"):
    tools.fold_batch_norms(variables, [("conv1", "bn9")])
  with pytest.raises(ValueError, match="listed twice"):
    tools.fold_batch_norms(variables, [("conv1", "bn1"), ("conv1", "bn2")])
  with pytest.raises(ValueError, match="has no 'kernel'"):
    tools.fold_batch_norms(variables, [("bn2", "bn1")])

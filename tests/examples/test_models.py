"""Tests for bnjax_examples/models.py: the `norm` factory swaps bnjax, Flax and no normalisation."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax_examples import models


# Each test runs a function once: compiling without LLVM optimisation takes a second, not ten.
quick_jit = functools.partial(jax.jit, static_argnames="train",
                              compiler_options={"xla_backend_optimization_level": 0})


def images(batch: int = 6, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, channels)).astype(np.float32)


def shapes(tree) -> dict:
  return jax.tree.map(jnp.shape, tree)


def declared_variables(model, x_NHWC) -> dict:
  """The variables `model.init` would create, as shapes (nothing is computed)."""
  return shapes(jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               x_NHWC))


def small_cnn(norm: str) -> models.CNN:
  return models.CNN(num_classes=10, features=(4, 8), hidden=16,
                    norm=models.norm_factory(norm, momentum=0.9))


def test_bnjax_and_flax_cnns_declare_the_same_variables():
  x_NHWC = images()
  bnjax_variables = declared_variables(small_cnn("bnjax"), x_NHWC)
  assert bnjax_variables == declared_variables(small_cnn("flax"), x_NHWC)
  assert set(bnjax_variables["batch_stats"]) == {"BatchNorm_0", "BatchNorm_1", "BatchNorm_2"}


def test_cnn_without_norm_has_no_batch_stats_and_biased_layers():
  variables = declared_variables(small_cnn("none"), images())
  assert set(variables) == {"params"}
  assert all("bias" in layer for layer in variables["params"].values())


def test_bnjax_and_flax_cnns_agree_in_a_training_step():
  x_NHWC = images(seed=1)
  variables = quick_jit(small_cnn("bnjax").init)(jax.random.key(0), x_NHWC, train=False)
  outputs = {norm: quick_jit(functools.partial(small_cnn(norm).apply, mutable=["batch_stats"]))(
      variables, x_NHWC, train=True) for norm in ("bnjax", "flax")}
  (bnjax_logits, bnjax_stats), (flax_logits, flax_stats) = outputs["bnjax"], outputs["flax"]
  np.testing.assert_allclose(bnjax_logits, flax_logits, rtol=1e-4, atol=1e-5)
  for bnjax_leaf, flax_leaf in zip(jax.tree.leaves(bnjax_stats), jax.tree.leaves(flax_stats)):
    np.testing.assert_allclose(bnjax_leaf, flax_leaf, rtol=1e-4, atol=1e-6)


def test_training_updates_running_statistics_and_evaluation_does_not():
  model, x_NHWC = small_cnn("bnjax"), images()
  variables = quick_jit(model.init)(jax.random.key(0), x_NHWC, train=False)
  apply = quick_jit(functools.partial(model.apply, mutable=["batch_stats"]))
  _, updates = apply(variables, x_NHWC, train=True)
  _, unchanged = apply(variables, x_NHWC, train=False)
  before = variables["batch_stats"]["BatchNorm_0"]["mean"]
  assert not np.allclose(updates["batch_stats"]["BatchNorm_0"]["mean"], before)
  np.testing.assert_array_equal(unchanged["batch_stats"]["BatchNorm_0"]["mean"], before)


@pytest.mark.parametrize("norm", ["bnjax", "none"])
def test_resnet_maps_images_to_logits(norm):
  model = models.ResNet(num_classes=10, stage_sizes=(1, 1), num_filters=4,
                        norm=models.norm_factory(norm))
  x_NHWC = images(batch=3, size=16, channels=3)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x_NHWC)
  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x_NHWC)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32


def test_resnet_blocks_start_as_identity_on_their_residual_branch():
  model = models.ResNet(stage_sizes=(1, 1), num_filters=4, norm=models.norm_factory("bnjax"))
  variables = quick_jit(model.init)(jax.random.key(0), images(size=16, channels=3), train=False)
  for block in ("ResidualBlock_0", "ResidualBlock_1"):
    np.testing.assert_array_equal(variables["params"][block]["BatchNorm_1"]["scale"], 0.0)


def test_unknown_norm_is_rejected():
  with pytest.raises(ValueError, match="Unknown norm 'batch'"):
    models.norm_factory("batch")


def test_models_docstring_examples_run():
  result = doctest.testmod(models, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def _standardized(x, axes, eps=1e-6):
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)


def test_per_example_norms_take_the_statistics_of_each_example_over_their_sets():
  # (2, 3, 3, 4) activations far from zero; every kind against float64 NumPy over its own set.
  x_NHWC = images(batch=2, size=3, channels=4, seed=2) * 3.0 + 500.0
  expected = {
      "layer": _standardized(x_NHWC, (1, 2, 3)),
      "instance": _standardized(x_NHWC, (1, 2)),
      # num_groups=32 on 4 channels: gcd(32, 4) = 4 groups of one channel, i.e. instance norm.
      "group": _standardized(x_NHWC, (1, 2)),
      "rms": x_NHWC / np.sqrt(np.mean(np.square(x_NHWC.astype(np.float64)), axis=(1, 2, 3),
                                      keepdims=True) + 1e-6),
  }
  two_groups = _standardized(x_NHWC.reshape(2, 3, 3, 2, 2), (1, 2, 4)).reshape(x_NHWC.shape)
  for kind, reference in [*expected.items(), ("group-2", two_groups)]:
    layer = models.PerExampleNorm(kind=kind.split("-")[0],
                                  **({"num_groups": 2} if kind == "group-2" else {}))
    variables = layer.init(jax.random.key(0), x_NHWC)
    assert set(variables["params"]) == ({"scale"} if kind == "rms" else {"scale", "bias"})
    np.testing.assert_allclose(layer.apply(variables, x_NHWC), reference, rtol=1e-5, atol=1e-5,
                               err_msg=kind)


def test_instance_norm_of_a_dense_layer_normalises_its_features():
  x_NC = images(batch=3, size=1, channels=5, seed=3).reshape(3, 5) + 50.0
  layer = models.PerExampleNorm(kind="instance")
  np.testing.assert_allclose(layer.apply(layer.init(jax.random.key(0), x_NC), x_NC),
                             _standardized(x_NC, (1,)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", models.PER_EXAMPLE_NORMS)
def test_cnn_with_a_per_example_norm_keeps_no_batch_stats(norm):
  model = small_cnn(norm)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             images())
  assert set(variables) == {"params"}
  assert set(variables["params"]) >= {"PerExampleNorm_0", "PerExampleNorm_1", "PerExampleNorm_2"}
  logits = jax.eval_shape(functools.partial(model.apply, train=True), variables, images())
  assert logits.shape == (6, 10)


def test_unknown_per_example_kind_is_refused():
  with pytest.raises(ValueError, match="`kind` must be one of"):
    models.PerExampleNorm(kind="batch").init(jax.random.key(0), jnp.ones((2, 4)))

"""Frozen batch norm for fine-tuning: which parameters are selected, and k steps that leave the
norm layers bit-identical while everything else trains (linen and NNX)."""

import functools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
import bnjax.nnx
from bnjax import tools

NORM_PATHS = {("block1", "bn"), ("block2", "bn")}


class Block(nn.Module):
  features: int
  freeze_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.features, use_bias=False, name="dense")(x)
    x = bnjax.BatchNorm(use_running_average=not train or self.freeze_norm, name="bn")(x)
    return nn.relu(x)


class Net(nn.Module):
  """Two Dense-BN blocks around a LayerNorm (scale/bias without statistics: not a batch norm)."""
  freeze_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = Block(8, self.freeze_norm, name="block1")(x, train)
    x = nn.LayerNorm()(x)
    x = Block(8, self.freeze_norm, name="block2")(x, train)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(3)(x)


def _data(seed=0, n=32):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((n, 5)).astype(np.float32)),
          jnp.asarray(rng.integers(0, 3, n)))


@functools.cache
def _pretrained_variables():
  """Variables as after pre-training: random affine parameters and running statistics."""
  x, _ = _data()
  variables = jax.jit(lambda: Net().init(jax.random.key(0), x, train=False))()
  leaves, treedef = jax.tree.flatten(variables)
  rng = np.random.default_rng(1)
  leaves = [jnp.asarray((rng.random(v.shape) + 0.5).astype(np.float32)) for v in leaves]
  return jax.tree.unflatten(treedef, leaves)


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- linen: which parameters ----------------------------------------------------------------------

def test_structural_mask_selects_batch_norm_scale_and_bias_only():
  mask = _flat(tools.norm_params_mask(_pretrained_variables()))
  selected = {k for k, v in mask.items() if v}
  assert selected == {"block1/bn/scale", "block1/bn/bias", "block2/bn/scale", "block2/bn/bias"}
  assert not mask["LayerNorm_0/scale"] and not mask["Dense_0/kernel"]


def test_type_based_paths_find_the_same_layers():
  x, _ = _data()
  paths = tools.norm_layer_paths(Net(), x, train=True)
  assert paths == NORM_PATHS
  variables = _pretrained_variables()
  assert tools.norm_params_mask(variables, paths) == tools.norm_params_mask(variables)
  assert tools.norm_params_mask(variables, ["block1/bn", "block2/bn"]) == tools.norm_params_mask(
      variables)
  # With the paths, the params tree alone will do.
  assert tools.norm_params_mask(variables["params"], paths) == tools.norm_params_mask(variables)


def test_labels_name_norm_parameters_and_the_rest():
  labels = _flat(tools.norm_params_labels(_pretrained_variables(), norm_label="fixed",
                                          other_label="train"))
  assert labels["block2/bn/bias"] == "fixed" and labels["block2/dense/kernel"] == "train"
  assert set(labels.values()) == {"fixed", "train"}


class Mixed(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = bnjax.BatchNorm(use_running_average=True, name="ours")(x)
    return nn.BatchNorm(use_running_average=True, name="theirs")(x)


def test_types_choose_which_classes_count_as_norm_layers():
  x, _ = _data()
  assert tools.norm_layer_paths(Mixed(), x) == {("ours",)}
  assert tools.norm_layer_paths(Mixed(), x, types=(bnjax.BatchNorm, nn.BatchNorm)) == {
      ("ours",), ("theirs",)}
  # The structural rule sees any layer with batch-norm variables, Flax's included.
  mask = tools.norm_params_mask(Mixed().init(jax.random.key(0), x))
  assert mask["theirs"] == {"scale": True, "bias": True}


def test_missing_batch_stats_or_unknown_paths_raise():
  variables = _pretrained_variables()
  with pytest.raises(ValueError, match="no 'batch_stats'"):
    tools.norm_params_mask({"params": variables["params"]})
  with pytest.raises(ValueError, match="'block3/bn' is not in"):
    tools.norm_params_mask(variables, [("block3", "bn")])
  with pytest.raises(ValueError, match="'params' collection"):
    tools.norm_params_mask(variables["params"])
  with pytest.raises(TypeError, match="types"):
    tools.norm_layer_paths(Net(), _data()[0], train=False, types=("BatchNorm",))


# --- linen: fine-tuning ---------------------------------------------------------------------------

@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "control"])
def test_linen_fine_tuning_leaves_frozen_batch_norm_bit_identical(freeze):
  variables = _pretrained_variables()
  model = Net(freeze_norm=freeze)
  labels = (tools.norm_params_labels(variables) if freeze else
            jax.tree.map(lambda _: "trainable", variables["params"]))
  tx = optax.multi_transform({"trainable": optax.sgd(0.1, momentum=0.9),
                              "frozen": optax.set_to_zero()}, labels)

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y, key):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
    (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    steps, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, steps), updates["batch_stats"], opt_state

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  for step in range(3):
    x, y = _data(10 + step)
    params, batch_stats, opt_state = train_step(params, batch_stats, opt_state, x, y,
                                                jax.random.key(step))
  _assert_only_norms_unchanged(_flat(variables["params"]), _flat(params),
                               lambda name: "/bn/" in name, freeze)
  for name, value in _flat(variables["batch_stats"]).items():
    assert np.array_equal(value, _flat(batch_stats)[name]) == freeze, name


def _assert_only_norms_unchanged(before, after, is_norm, freeze):
  """Frozen: norm parameters bit-identical, every other parameter moved. Control (not frozen):
  the norm parameters moved too, so the frozen run's equality is not for want of a gradient."""
  for name in before:
    unchanged = np.array_equal(before[name], after[name])
    if freeze:
      assert unchanged == is_norm(name), name
    elif is_norm(name):
      assert not unchanged, name


# --- NNX ------------------------------------------------------------------------------------------

class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.dense1 = nnx.Linear(5, 8, use_bias=False, rngs=rngs)
    self.bn1 = bnjax.nnx.BatchNorm(8, rngs=rngs, scale_init=nnx.initializers.uniform(2.0))
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(8, 8, use_bias=False, rngs=rngs),
                            bnjax.nnx.BatchNorm(8, rngs=rngs)])
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = self.norm(nnx.relu(self.bn1(self.dense1(x))))
    x = nnx.relu(self.blocks[1](self.blocks[0](x)))
    return self.head(self.dropout(x))


def test_nnx_filter_selects_the_norm_layers_params():
  net = NnxNet(nnx.Rngs(0))
  selected = _flat(nnx.to_pure_dict(nnx.state(net, tools.norm_params_filter(net))))
  assert set(selected) == {"bn1/scale", "bn1/bias", "blocks/1/scale", "blocks/1/bias"}
  rest = _flat(nnx.to_pure_dict(nnx.state(net, tools.params_except_norms(net))))
  assert "norm/scale" in rest and "dense1/kernel" in rest and not set(rest) & set(selected)


def test_nnx_filter_types_can_add_flax_batch_norm():
  class Two(nnx.Module):
    def __init__(self, rngs):
      self.ours = bnjax.nnx.BatchNorm(2, rngs=rngs)
      self.theirs = nnx.BatchNorm(2, rngs=rngs)

  two = Two(nnx.Rngs(0))
  by_default = nnx.to_pure_dict(nnx.state(two, tools.norm_params_filter(two)))
  both = nnx.to_pure_dict(nnx.state(two, tools.norm_params_filter(
      two, types=(bnjax.nnx.BatchNorm, nnx.BatchNorm))))
  assert set(by_default) == {"ours"} and set(both) == {"ours", "theirs"}


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "control"])
def test_nnx_fine_tuning_leaves_frozen_batch_norm_bit_identical(freeze):
  model = NnxNet(nnx.Rngs(0))
  model.train()
  if freeze:
    model.set_attributes(bnjax.nnx.BatchNorm, use_running_average=True)
  trainable = tools.params_except_norms(model) if freeze else nnx.Param
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=trainable)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
    optimizer.update(model, grads)

  before = _flat(nnx.to_pure_dict(nnx.clone(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))))
  for step in range(3):
    train_step(model, optimizer, *_data(20 + step))
  after = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))
  after_params = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  is_norm = lambda name: name.startswith(("bn1/", "blocks/1/"))
  _assert_only_norms_unchanged({k: v for k, v in before.items() if k in after_params},
                               after_params, is_norm, freeze)
  for name in set(before) - set(after_params):  # Running statistics.
    assert np.array_equal(before[name], after[name]) == freeze, name

"""PyTorch interop: state_dict conversion both ways and PyTorch's training rule, checked against
a NumPy implementation of PyTorch's documented batch norm (always) and against torch itself (when
installed: `pip install -e '.[torch]'`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import interop
from bnjax.interop import torch as bnjax_torch
from tests import flax_free

F32 = dict(atol=2e-5, rtol=2e-5)
# Channels-first input shapes of BatchNorm1d (2-D and 3-D input), BatchNorm2d and BatchNorm3d.
SHAPES = {"1d": (8, 4), "1d-seq": (4, 4, 5), "2d": (3, 4, 5, 5), "3d": (2, 4, 3, 3, 3)}


# --- PyTorch's batch norm as documented, in float64 NumPy ------------------------------------------
# torch.nn.BatchNorm{1,2,3}d: y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias over every axis
# but the channel axis 1. Training normalises with the biased batch variance and updates
# running = (1 - momentum) * running + momentum * batch, storing the *unbiased* variance;
# momentum=None uses the cumulative average (factor 1 / num_batches_tracked). Evaluation uses the
# running statistics, unless the layer tracks none (then it always uses the batch's).

def torch_rule(x, sd, training, momentum=0.1, eps=1e-5):
  """One forward call; returns (y, new_state_dict). `sd` holds float64/int NumPy arrays."""
  x = np.asarray(x, np.float64)
  axes = tuple(a for a in range(x.ndim) if a != 1)
  shape = [1] * x.ndim
  shape[1] = x.shape[1]
  sd = dict(sd)
  tracking = "running_mean" in sd
  if training or not tracking:
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    if training and tracking:
      n = x.size // x.shape[1]
      sd["num_batches_tracked"] = sd["num_batches_tracked"] + 1
      factor = 1.0 / sd["num_batches_tracked"] if momentum is None else momentum
      sd["running_mean"] = (1 - factor) * sd["running_mean"] + factor * mean
      sd["running_var"] = (1 - factor) * sd["running_var"] + factor * var * n / (n - 1)
  else:
    mean, var = sd["running_mean"], sd["running_var"]
  y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
  if "weight" in sd:
    y = y * sd["weight"].reshape(shape)
  if "bias" in sd:
    y = y + sd["bias"].reshape(shape)
  return y, sd


def _state_dict(channels=4, seed=0, affine=True, bias=True, track=True, prefix=""):
  rng = np.random.default_rng(seed)
  sd = {}
  if affine:
    sd["weight"] = rng.normal(1.0, 0.5, channels).astype(np.float32)
    if bias:
      sd["bias"] = rng.normal(0.0, 1.0, channels).astype(np.float32)
  if track:
    sd["running_mean"] = rng.normal(0.0, 1.0, channels).astype(np.float32)
    sd["running_var"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    sd["num_batches_tracked"] = np.array(5, np.int64)
  return {prefix + k: v for k, v in sd.items()}


def _batch(shape, seed):
  return np.random.default_rng(seed).normal(2.0, 3.0, shape).astype(np.float32)


# `momentum` is traced: the cumulative average changes it every step without recompiling.
_bn = jax.jit(bnjax.batch_norm, static_argnames=("train", "axis", "unbiased_running_var"))

VARIANTS = {"affine": {}, "no-bias": dict(bias=False), "no-affine": dict(affine=False)}


def test_interop_module_imports_neither_flax_nor_torch():
  imported = flax_free.external_imports("bnjax.interop.torch")
  assert not {"flax", "torch"} & imported and "numpy" in imported


# --- Against PyTorch's documented rule (always runs) ----------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", SHAPES)
def test_eval_after_conversion_matches_torch_rule(layout, variant):
  sd = _state_dict(**VARIANTS[variant])
  params, state = bnjax_torch.from_torch(sd)
  x = _batch(SHAPES[layout], 1)
  y, _ = _bn(params, state, x, train=False, axis=1)
  np.testing.assert_allclose(y, torch_rule(x, sd, training=False)[0], **F32)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["0.1", "0.3", "cumulative"])
def test_training_steps_match_torch_rule_and_convert_back(momentum):
  sd = _state_dict(seed=2)
  params, state = bnjax_torch.from_torch(sd)
  expected = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in sd.items()}
  for step in range(4):
    x = _batch(SHAPES["2d"], 10 + step)
    count = int(expected["num_batches_tracked"]) + 1
    decay = (1 - 1 / count) if momentum is None else bnjax.from_torch_momentum(momentum)
    y, state = _bn(params, state, x, train=True, axis=1, momentum=decay,
                   unbiased_running_var=True)
    y_expected, expected = torch_rule(x, expected, training=True, momentum=momentum)
    np.testing.assert_allclose(y, y_expected, **F32)
  back = bnjax_torch.to_torch(params, state, num_batches_tracked=int(expected["num_batches_tracked"]))
  assert set(back) == set(sd)
  for key in sd:
    assert back[key].dtype == sd[key].dtype, key
    np.testing.assert_allclose(back[key], expected[key], **F32)


def test_untracked_statistics_convert_to_no_state():
  sd = _state_dict(track=False)
  params, state = bnjax_torch.from_torch(sd)
  assert state is None
  x = _batch(SHAPES["2d"], 3)
  # Such a layer normalises with batch statistics in evaluation too: bnjax's train mode.
  y, _ = _bn(params, bnjax.init(4)[1], x, train=True, axis=1)
  np.testing.assert_allclose(y, torch_rule(x, sd, training=False)[0], **F32)
  assert set(bnjax_torch.to_torch(params, None)) == {"weight", "bias"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_exact_with_prefixes(variant):
  sd = _state_dict(prefix="layer1.0.bn1.", **VARIANTS[variant])
  model_sd = {**sd, "layer1.0.conv1.weight": np.zeros((4, 4, 3, 3), np.float32)}
  params, state = bnjax_torch.from_torch(model_sd, "layer1.0.bn1")
  back = bnjax_torch.to_torch(params, state, num_batches_tracked=5, prefix="layer1.0.bn1.")
  assert set(back) == set(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key])


def test_converted_arrays_do_not_alias_the_sources():
  # A torch module's `tensor.numpy()` buffers change in place while it trains; on CPU
  # `jnp.asarray` would share their memory.
  sd = _state_dict()
  params, state = bnjax_torch.from_torch(sd)
  for value in sd.values():
    value[...] = 7
  np.testing.assert_array_equal(state.var, _state_dict()["running_var"])
  np.testing.assert_array_equal(params.scale, _state_dict()["weight"])
  back = bnjax_torch.to_torch(params, state)
  assert all(v.flags.writeable for v in back.values())


def test_linen_variable_dicts_and_dtypes():
  params, state = bnjax.init(3)
  sd = bnjax_torch.to_torch({"scale": params.scale, "bias": params.bias},
                            {"mean": state.mean, "var": state.var}, dtype=np.float64)
  assert sd["weight"].dtype == np.float64 and sd["num_batches_tracked"].dtype == np.int64
  params16, state16 = bnjax_torch.from_torch(
      {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in _state_dict().items()},
      param_dtype=jnp.bfloat16)
  assert params16.scale.dtype == jnp.bfloat16 and state16.var.dtype == jnp.float32


def test_reexported_from_the_subpackage():
  assert interop.from_torch is bnjax_torch.from_torch and interop.to_torch is bnjax_torch.to_torch
  assert interop.batch_norms_from_torch is bnjax_torch.batch_norms_from_torch


@pytest.mark.parametrize("sd, match", [
    ({}, "no batch-norm entry"),
    ({"bias": np.zeros(3, np.float32)}, "bias without"),
    ({"running_mean": np.zeros(3, np.float32)}, "must come together"),
    ({"weight": np.zeros(3, np.float32), "running_mean": np.zeros(3, np.float32),
      "running_var": np.zeros(4, np.float32)}, "same shape"),
    ({"weight": np.zeros((3, 1), np.float32)}, "same shape"),
    ({"num_batches_tracked": np.array(1)}, "without running statistics"),
], ids=["empty", "bias-only", "mean-only", "sizes", "2-d", "count-only"])
def test_from_torch_rejects_inconsistent_entries(sd, match):
  with pytest.raises(ValueError, match=match):
    bnjax_torch.from_torch(sd)


def test_from_torch_rejects_non_numeric_and_integer_values():
  with pytest.raises(TypeError, match="'weight' must be a numeric array"):
    bnjax_torch.from_torch({"weight": np.array(["a", "b"])})
  with pytest.raises(TypeError, match="must be floating"):
    bnjax_torch.from_torch({"weight": np.array([1, 2])})


def test_to_torch_rejects_what_pytorch_cannot_hold():
  params, state = bnjax.init(3)
  with pytest.raises(ValueError, match="bias but no scale"):
    bnjax_torch.to_torch(bnjax.BatchNormParams(None, params.bias), state)
  with pytest.raises(ValueError, match="non-negative int"):
    bnjax_torch.to_torch(params, state, num_batches_tracked=-1)
  with pytest.raises(ValueError, match="needs running statistics"):
    bnjax_torch.to_torch(params, None, num_batches_tracked=2)
  with pytest.raises(ValueError, match="same shape"):
    bnjax_torch.to_torch(params, bnjax.BatchNormState(jnp.zeros(4), jnp.ones(4)))


# --- A whole torchvision-style ResNet state_dict --------------------------------------------------

def _resnet_like_state_dict(seed=0):
  """The keys of a torchvision ResNet's first stage, with random values."""
  sd = {"conv1.weight": np.zeros((4, 3, 7, 7), np.float32), "fc.weight": np.zeros((2, 8)),
        "fc.bias": np.zeros(2)}
  norms = {"bn1": 4, "layer1.0.bn1": 4, "layer1.0.bn2": 4, "layer1.1.bn1": 4,
           "layer2.0.bn1": 8, "layer2.0.downsample.1": 8}
  for i, (module, channels) in enumerate(norms.items()):
    sd.update(_state_dict(channels, seed=seed + i, prefix=module + "."))
  sd["layer2.0.downsample.0.weight"] = np.zeros((8, 4, 1, 1), np.float32)
  return sd, norms


def test_resnet_state_dict_converts_by_the_documented_key_map():
  sd, norms = _resnet_like_state_dict()
  tree = bnjax_torch.batch_norms_from_torch(sd)
  assert set(tree["batch_stats"]) == {"bn1", "layer1_0", "layer1_1", "layer2_0"}
  assert set(tree["batch_stats"]["layer2_0"]) == {"bn1", "downsample_1"}
  for module in norms:
    path = bnjax_torch.linen_path_from_torch(module)
    stats, params = tree["batch_stats"], tree["params"]
    for key in path:
      stats, params = stats[key], params[key]
    np.testing.assert_array_equal(stats["var"], sd[module + ".running_var"])
    np.testing.assert_array_equal(stats["mean"], sd[module + ".running_mean"])
    np.testing.assert_array_equal(params["scale"], sd[module + ".weight"])
    np.testing.assert_array_equal(params["bias"], sd[module + ".bias"])


def test_resnet_key_map_can_be_replaced_and_collisions_raise():
  sd, _ = _resnet_like_state_dict()
  flat = bnjax_torch.batch_norms_from_torch(sd, path_fn=lambda key: (key.replace(".", "/"),))
  assert "layer2.0.downsample.1".replace(".", "/") in flat["batch_stats"]
  with pytest.raises(ValueError, match="both map to the linen path"):
    bnjax_torch.batch_norms_from_torch(sd, path_fn=lambda key: ("same",))
  with pytest.raises(ValueError, match="no batch norm found"):
    bnjax_torch.batch_norms_from_torch({"conv1.weight": np.zeros((2, 2))})

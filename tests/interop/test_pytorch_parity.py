"""The same conversions checked against torch itself: eval outputs after converting either way,
running statistics after k training steps, and a small torchvision-style ResNet.

Needs torch (`pip install -e '.[torch]'`, a CPU build); without it this module is skipped and
`test_torch.py` checks the same against PyTorch's documented rule in NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.interop import torch as bnjax_torch

torch = pytest.importorskip(
    "torch", reason="torch is not installed (optional: pip install -e '.[torch]'); "
    "tests/interop/test_torch.py checks the same against PyTorch's documented rule")
torch.set_num_threads(1)

F32 = dict(atol=2e-5, rtol=2e-5)
MODULES = {"1d": (torch.nn.BatchNorm1d, (8, 4)), "1d-seq": (torch.nn.BatchNorm1d, (4, 4, 5)),
           "2d": (torch.nn.BatchNorm2d, (3, 4, 5, 5)), "3d": (torch.nn.BatchNorm3d, (2, 4, 3, 3, 3))}
VARIANTS = {"affine": {}, "no-bias": dict(bias=False), "no-affine": dict(affine=False),
            "untracked": dict(track_running_stats=False)}

_bn = jax.jit(bnjax.batch_norm, static_argnames=("train", "axis", "unbiased_running_var"))


def _numpy_sd(module):
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _randomised(module_class, variant, seed=0):
  torch.manual_seed(seed)
  module = module_class(4, **VARIANTS[variant])
  with torch.no_grad():
    if module.weight is not None:
      module.weight.normal_(1.0, 0.5)
    if module.bias is not None:
      module.bias.normal_(0.0, 1.0)
    if module.running_mean is not None:
      module.running_mean.normal_(0.0, 1.0)
      module.running_var.uniform_(0.5, 2.0)
      module.num_batches_tracked.fill_(5)
  return module


def _x(shape, seed):
  return np.random.default_rng(seed).normal(2.0, 3.0, shape).astype(np.float32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", MODULES)
def test_torch_eval_equals_bnjax_after_from_torch(kind, variant):
  module_class, shape = MODULES[kind]
  module = _randomised(module_class, variant).eval()
  params, state = bnjax_torch.from_torch(_numpy_sd(module))
  x = _x(shape, 1)
  with torch.no_grad():
    expected = module(torch.from_numpy(x)).numpy()
  if state is None:  # track_running_stats=False: batch statistics in evaluation too.
    y, _ = _bn(params, bnjax.init(4)[1], x, train=True, axis=1)
  else:
    y, _ = _bn(params, state, x, train=False, axis=1)
  np.testing.assert_allclose(y, expected, **F32)


@pytest.mark.parametrize("variant", ["affine", "no-bias", "no-affine"])
def test_torch_eval_equals_bnjax_after_to_torch(variant):
  rng = np.random.default_rng(2)
  channels = 4
  params = bnjax.BatchNormParams(
      None if variant == "no-affine" else jnp.asarray(rng.normal(1, 0.5, channels), jnp.float32),
      None if variant != "affine" else jnp.asarray(rng.normal(0, 1, channels), jnp.float32))
  state = bnjax.BatchNormState(jnp.asarray(rng.normal(0, 1, channels), jnp.float32),
                               jnp.asarray(rng.uniform(0.5, 2, channels), jnp.float32))
  module = torch.nn.BatchNorm2d(channels, **VARIANTS[variant])
  module.load_state_dict({k: torch.from_numpy(v)
                          for k, v in bnjax_torch.to_torch(params, state).items()}, strict=True)
  x = _x(MODULES["2d"][1], 3)
  with torch.no_grad():
    expected = module.eval()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(_bn(params, state, x, train=False, axis=1)[0], expected, **F32)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["0.1", "cumulative"])
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_training_steps_give_torchs_running_statistics(kind, momentum):
  module_class, shape = MODULES[kind]
  module = _randomised(module_class, "affine", seed=4)
  module.momentum = momentum
  params, state = bnjax_torch.from_torch(_numpy_sd(module))
  module.train()
  for step in range(4):
    x = _x(shape, 10 + step)
    with torch.no_grad():
      expected = module(torch.from_numpy(x)).numpy()
    count = 5 + step + 1
    decay = (1 - 1 / count) if momentum is None else bnjax.from_torch_momentum(momentum)
    y, state = _bn(params, state, x, train=True, axis=1, momentum=decay,
                   unbiased_running_var=True)
    np.testing.assert_allclose(y, expected, **F32)
  torch_sd = _numpy_sd(module)
  ours = bnjax_torch.to_torch(params, state, num_batches_tracked=5 + 4)
  assert set(ours) == set(torch_sd)
  for key, value in torch_sd.items():
    assert ours[key].dtype == value.dtype, key
    np.testing.assert_allclose(ours[key], value, **F32)


# --- A small torchvision-style ResNet, converted whole --------------------------------------------

class TorchBlock(torch.nn.Module):
  """torchvision's BasicBlock layout: conv1/bn1, conv2/bn2, optional downsample = (conv, bn)."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(cout)
    self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            torch.nn.BatchNorm2d(cout))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 4, 3, 1, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(4)
    self.layer1 = torch.nn.Sequential(TorchBlock(4, 4, 1), TorchBlock(4, 4, 1))
    self.layer2 = torch.nn.Sequential(TorchBlock(4, 8, 2))
    self.fc = torch.nn.Linear(8, 3)

  def forward(self, x):
    x = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
    return self.fc(x.mean(dim=(2, 3)))


class LinenBlock(nn.Module):
  """The same block in linen, written with `setup` and list attributes, as the key map expects."""
  features: int
  stride: int
  project: bool

  def setup(self):
    pad = ((1, 1), (1, 1))
    self.conv1 = nn.Conv(self.features, (3, 3), self.stride, padding=pad, use_bias=False)
    self.bn1 = bnjax.BatchNorm(use_running_average=True)
    self.conv2 = nn.Conv(self.features, (3, 3), padding=pad, use_bias=False)
    self.bn2 = bnjax.BatchNorm(use_running_average=True)
    if self.project:
      self.downsample = [nn.Conv(self.features, (1, 1), self.stride, use_bias=False),
                         bnjax.BatchNorm(use_running_average=True)]

  def __call__(self, x):
    y = nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = self.downsample[1](self.downsample[0](x)) if self.project else x
    return nn.relu(y + shortcut)


class LinenResNet(nn.Module):

  def setup(self):
    self.conv1 = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    self.bn1 = bnjax.BatchNorm(use_running_average=True)
    self.layer1 = [LinenBlock(4, 1, False), LinenBlock(4, 1, False)]
    self.layer2 = [LinenBlock(8, 2, True)]
    self.fc = nn.Dense(3)

  def __call__(self, x_NHWC):
    x = nn.relu(self.bn1(self.conv1(x_NHWC)))
    for block in self.layer1 + self.layer2:
      x = block(x)
    return self.fc(x.mean(axis=(1, 2)))


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def test_torch_resnet_converts_to_linen_with_equal_eval_outputs():
  torch.manual_seed(0)
  model = TorchResNet()
  with torch.no_grad():  # Non-trivial running statistics and affine parameters.
    for step in range(3):
      model.train()(torch.randn(8, 3, 8, 8) * (1 + step) + step)
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.normal_(1.0, 0.3)
        module.bias.normal_(0.0, 0.5)
  sd = _numpy_sd(model)
  variables = bnjax_torch.batch_norms_from_torch(sd)
  # Convolutions and the linear layer: the user's part (OIHW -> HWIO, (out, in) -> (in, out)).
  for key, value in sd.items():
    module_key, name = key.rsplit(".", 1)
    path = bnjax_torch.linen_path_from_torch(module_key)
    if value.ndim == 4:
      _set(variables["params"], path + ("kernel",), jnp.asarray(value.transpose(2, 3, 1, 0)))
    elif module_key == "fc":
      _set(variables["params"], path + ({"weight": "kernel", "bias": "bias"}[name],),
           jnp.asarray(value.T if name == "weight" else value))
  x = np.random.default_rng(5).normal(size=(2, 3, 8, 8)).astype(np.float32)
  template = jax.eval_shape(lambda: LinenResNet().init(jax.random.key(0), x.transpose(0, 2, 3, 1)))
  assert jax.tree.structure(variables) == jax.tree.structure(template)
  y = jax.jit(LinenResNet().apply)(variables, x.transpose(0, 2, 3, 1))
  with torch.no_grad():
    expected = model.eval()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(y, expected, atol=1e-4, rtol=1e-4)

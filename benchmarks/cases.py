"""What the benchmark measures and how long: shapes, dtypes, rounds and model sizes per run plan.

A new micro-benchmark case is one more shape in `SHAPES` (every implementation of every
comparison in `peers.COMPARISONS` runs on it, in every dtype of `DTYPES`). The report's target
rows refer to the first four shapes by position, so add new shapes at the end.

Three plans: `FULL` (`make bench`), `QUICK` (`--quick`: one small shape, every peer) and `SMOKE`
(`--smoke`: a tiny shape, two rounds, bnjax, Flax linen and the floors only, compiled without
LLVM's expensive optimisations; it checks that every part of the pipeline runs, in well under a
minute).
"""

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from benchmarks import names

# Micro-benchmark shapes, channels last: two conv activations, a dense one and a small conv one.
SHAPES = ((256, 32, 32, 64), (128, 16, 16, 256), (4096, 1024), (64, 8, 8, 32))
DTYPES = ("float32", "bfloat16")
DEVICE_COUNTS = (1, 2, 8)
STACK_LAYERS = 6  # (batch norm, relu) layers of the stack whose temporary memory is measured.
# Cases at least this large (elements) take `Plan.rounds_large` rounds: each call lasts long.
LARGE_ELEMENTS = 4 * 2**20


class ResNetSize(NamedTuple):
  """The ResNet-style training step: batch of `image`×`image`×3 images, residual `blocks`."""

  batch: int
  image: int
  blocks: int
  rounds: int


class DevicesSize(NamedTuple):
  """The simulated-devices programs: layer programs on a global batch `shape`, and a ResNet step
  on `batch` images of `image`×`image` with `blocks` residual blocks (None: layer programs only)."""

  shape: tuple[int, ...]
  batch: int
  image: int
  blocks: int | None
  rounds: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """One way to run the whole benchmark.

  Attributes:
    name: `names.FULL`, `names.QUICK` or `names.SMOKE`.
    shapes: micro-benchmark shapes.
    dtypes: micro-benchmark dtypes.
    rounds: interleaved rounds per micro-benchmark case.
    rounds_large: rounds for cases of at least `LARGE_ELEMENTS` elements.
    stack_shapes: shapes of the stack-memory measurement.
    stack_implementations: implementations in the stack-memory table (None: every JAX one).
    stack_layers: the depth of that stack.
    resnet: the ResNet-style training step.
    devices: the simulated-devices programs.
    device_counts: simulated device counts, one subprocess each.
    scaling_device_counts: device counts of the compile-only scaling table.
    scaling_parts: what the scaling table measures (`benchmarks.scaling.PARTS`).
    left_out: implementations not run in this plan; their optional libraries are never
      imported.
    fast_compile: compile with `hlo.FAST_COMPILE_OPTIONS` (same HLO, slower code): for a smoke
      run, whose times mean nothing.
  """

  name: str
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  rounds: int
  rounds_large: int
  stack_shapes: tuple[tuple[int, ...], ...]
  stack_implementations: tuple[str, ...] | None
  resnet: ResNetSize
  devices: DevicesSize
  stack_layers: int = STACK_LAYERS
  device_counts: tuple[int, ...] = DEVICE_COUNTS
  left_out: tuple[str, ...] = ()
  fast_compile: bool = False
  # Compile-only cross-device cost against the device count (`benchmarks/scaling.py`), one
  # subprocess per count, and which of its parts to measure.
  scaling_device_counts: tuple[int, ...] = (8, 64, 256, 1024)
  scaling_parts: tuple[str, ...] = ("layer", "stack", "plain_jit")

  def rounds_for(self, shape: tuple[int, ...]) -> int:
    return self.rounds_large if math.prod(shape) >= LARGE_ELEMENTS else self.rounds

  def includes(self, implementation: str) -> bool:
    return implementation not in self.left_out


PLANS = {
    names.FULL: Plan(
        name=names.FULL, shapes=SHAPES, dtypes=DTYPES, rounds=41, rounds_large=11,
        stack_shapes=(SHAPES[0], SHAPES[3]), stack_implementations=None,
        resnet=ResNetSize(batch=64, image=32, blocks=2, rounds=8),
        devices=DevicesSize(shape=(128, 16, 16, 256), batch=64, image=32, blocks=2, rounds=7)),
    names.QUICK: Plan(
        name=names.QUICK, shapes=((64, 8, 8, 32),), dtypes=DTYPES, rounds=3, rounds_large=3,
        stack_shapes=((64, 8, 8, 32),), stack_implementations=(names.BNJAX, names.FLAX),
        resnet=ResNetSize(batch=16, image=16, blocks=1, rounds=3),
        devices=DevicesSize(shape=(64, 8, 8, 32), batch=16, image=16, blocks=None, rounds=3),
        scaling_device_counts=(8, 64), scaling_parts=("layer", "plain_jit")),
    names.SMOKE: Plan(
        name=names.SMOKE, shapes=((16, 4, 4, 8),), dtypes=("float32",), rounds=2, rounds_large=2,
        stack_shapes=((16, 4, 4, 8),), stack_implementations=(names.BNJAX, names.FLAX),
        resnet=ResNetSize(batch=8, image=8, blocks=1, rounds=2),
        devices=DevicesSize(shape=(16, 4, 4, 8), batch=8, image=8, blocks=None, rounds=2),
        stack_layers=2, device_counts=(1, 2),
        left_out=(names.FLAX_EXACT, names.NNX, names.HAIKU, names.EQUINOX, names.TORCH_CL,
                  names.TORCH_NCHW),
        fast_compile=True, scaling_device_counts=(2, 4), scaling_parts=("layer",)),
}


def normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
  """N(0, 1) float32 data for a case, drawn by NumPy (JAX's generator would compile first)."""
  return np.random.default_rng(seed).standard_normal(shape, np.float32)

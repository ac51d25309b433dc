"""The implementations bnjax is measured against, and the comparisons that pair them with it.

An `Implementation` is one row of the micro-benchmark tables: a JAX layer (`build`, jitted and
compiled by `programs.py`), or an eager PyTorch call (`eager`). A `Comparison` is a family of rows
timed together on the same cases: bnjax's layer, its peers and the references its ratios divide
by. `COMPARISONS` lists the families the benchmark runs; the report gives each its own tables.

To add a peer to batch norm: write its builder below and add one `Implementation` to
`BATCH_NORM_IMPLEMENTATIONS` (its name goes in `names.py`). To add a comparison (layer norm, group
norm, whitening, ghost batches): write the builders of bnjax's layer and its peers, declare a
`Comparison` with its own `name` and `heading`, and append it to `COMPARISONS`; the micro-benchmark
loop, the JSON and the report's timing and pass tables pick it up. A builder takes the case's
shape and dtype name and returns a `JaxLayer` whose `apply(x, params, state)` is
`(y, new_state)` in training mode; `programs.forward_backward` derives the backward with
`jax.vjp`.

Only JAX, bnjax and Flax are imported here; each optional peer (`Implementation.module`) is
imported inside its builder, so a run that leaves it out never loads it.
"""

from collections.abc import Callable, Mapping
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

import bnjax
import bnjax.whitening
from benchmarks import names
from benchmarks.names import (AUTODIFF_REFERENCE, BNJAX, EPSILON, EQUINOX, FLAX, FLAX_EXACT, FLOOR,
                              FLOOR_STATS, HAIKU, MOMENTUM, NNX, TORCH_CL, TORCH_NCHW)

Shape = tuple[int, ...]


class JaxLayer(NamedTuple):
  """A layer in training mode: `apply(x, params, state) -> (y, new_state)` and its variables."""

  apply: Callable[[Any, Any, Any], tuple[Any, Any]]
  params: Any
  state: Any


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One row of the micro-benchmark tables.

  Attributes:
    name: the row's name (from `names.py`), also its key in the JSON.
    description: what it is, for the report's list of implementations.
    build: JAX: `(shape, dtype name) -> JaxLayer`.
    forward_backward: JAX, optional: `shape -> program(x, params, state, dy)`, a hand-written
      forward+backward used instead of `jax.vjp` of `build`'s layer (the bandwidth floors).
    eager: eager (PyTorch): `(shape, dtype name, mode) -> call`, or None where the shape does not
      apply; the call runs the whole forward or forward+backward once.
    module: the optional library it needs; when that does not import, the row is left out and the
      report says why.
    in_stack: whether it is measured in the stack-memory table (a floor keeps nothing to measure).
  """

  name: str
  description: str
  build: Callable[[Shape, str], JaxLayer] | None = None
  forward_backward: Callable[[Shape], Callable[..., Any]] | None = None
  eager: Callable[[Shape, str, str], Callable[[], Any] | None] | None = None
  module: str | None = None
  in_stack: bool = True


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A family of rows timed together: bnjax's layer and its peers, on every case of a plan.

  Attributes:
    name: its key in the JSON (each micro-benchmark entry's "comparison").
    heading: its title in the report ("layer norm"), written before the mode in its table
      headings and above its lists; "" for batch norm, the benchmark's main subject, whose
      headings are just "forward, float32".
    implementations: its rows, bnjax's first.
    references: {ratio key: implementation name}: each row's time ÷ that implementation's time in
      the same round, as a median over rounds.
    shown: the ratio keys printed in the report's cells, and `shown_label` how the heading names
      them.
    full_shapes: the shapes it runs on in the full plan, instead of `cases.SHAPES` (None: those);
      the quick and smoke plans always use their own small shapes.
    dtypes: the dtypes it runs in (None: the plan's).
    modes: the programs it times (`names.MODES`: forward and forward+backward).
  """

  name: str
  heading: str
  implementations: tuple[Implementation, ...]
  references: Mapping[str, str]
  shown: tuple[str, ...]
  shown_label: str
  full_shapes: tuple[Shape, ...] | None = None
  dtypes: tuple[str, ...] | None = None
  modes: tuple[str, ...] = names.MODES

  def shapes_for(self, plan) -> tuple[Shape, ...]:
    """Its shapes in `plan`: `full_shapes` in the full plan when set, else the plan's."""
    if self.full_shapes is not None and plan.name == names.FULL:
      return self.full_shapes
    return plan.shapes

  def dtypes_for(self, plan) -> tuple[str, ...]:
    """The plan's dtypes, restricted to `dtypes` when set."""
    return tuple(d for d in plan.dtypes if self.dtypes is None or d in self.dtypes)

  @property
  def subject(self) -> str:
    return self.implementations[0].name

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(impl.name for impl in self.implementations)


def _channels_axes(shape: Shape) -> tuple[int, ...]:
  """The axes a batch norm reduces over: all but the last (channels)."""
  return tuple(range(len(shape) - 1))


# ============================================================================ batch norm


def bnjax_batch_norm(shape: Shape, dtype_name: str, axis_name: str | None = None) -> JaxLayer:
  del dtype_name  # bnjax's parameters and statistics are float32 for every input dtype.
  params, state = bnjax.init(shape[-1])

  def apply(x, params, state):
    return bnjax.batch_norm(params, state, x, True, momentum=MOMENTUM, epsilon=EPSILON,
                            axis_name=axis_name)

  return JaxLayer(apply, params, state)


def _flax_linen(shape: Shape, dtype_name: str, *, fast_variance: bool,
                axis_name: str | None) -> JaxLayer:
  module = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON,
                        use_fast_variance=fast_variance, dtype=jnp.dtype(dtype_name),
                        axis_name=axis_name)

  def apply(x, params, state):
    y, updates = module.apply({"params": params, "batch_stats": state}, x,
                              mutable=["batch_stats"])
    return y, updates["batch_stats"]

  # Initialised outside any mesh: `axis_name` is only used when applied in training mode.
  variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((2, shape[-1]), dtype_name))
  return JaxLayer(apply, variables["params"], variables["batch_stats"])


def flax_linen(shape: Shape, dtype_name: str, axis_name: str | None = None) -> JaxLayer:
  return _flax_linen(shape, dtype_name, fast_variance=True, axis_name=axis_name)


def flax_linen_exact(shape: Shape, dtype_name: str, axis_name: str | None = None) -> JaxLayer:
  return _flax_linen(shape, dtype_name, fast_variance=False, axis_name=axis_name)


def flax_nnx(shape: Shape, dtype_name: str) -> JaxLayer:
  from flax import nnx  # pylint: disable=import-outside-toplevel  (only where measured)
  model = nnx.BatchNorm(shape[-1], use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON,
                        dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0))
  graphdef, params, state = nnx.split(model, nnx.Param, nnx.BatchStat)

  def apply(x, params, state):
    module = nnx.merge(graphdef, params, state)
    y = module(x)
    _, _, new_state = nnx.split(module, nnx.Param, nnx.BatchStat)
    return y, new_state

  return JaxLayer(apply, params, state)


def haiku_batch_norm(shape: Shape, dtype_name: str) -> JaxLayer:
  import haiku as hk  # pylint: disable=import-outside-toplevel  (optional peer)
  transformed = hk.transform_with_state(
      lambda x: hk.BatchNorm(True, True, MOMENTUM, eps=EPSILON)(x, is_training=True))
  params, state = transformed.init(None, jnp.zeros((2,) + tuple(shape[1:]), dtype_name))

  def apply(x, params, state):
    return transformed.apply(params, state, None, x)

  return JaxLayer(apply, params, state)


def equinox_batch_norm(shape: Shape, dtype_name: str) -> JaxLayer:
  import equinox as eqx  # pylint: disable=import-outside-toplevel  (optional peer)
  channels = shape[-1]
  model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
      channels, axis_name="rows", momentum=MOMENTUM, eps=EPSILON, mode="batch",
      dtype=jnp.dtype(dtype_name))

  def apply(x, params, state):
    module = eqx.tree_at(lambda m: (m.weight, m.bias), model, params)
    rows = x.reshape(-1, channels)  # free for a contiguous [..., C] array.
    y, new_state = jax.vmap(module, axis_name="rows", in_axes=(0, None),
                            out_axes=(0, None))(rows, state)
    return y.reshape(x.shape), new_state

  return JaxLayer(apply, (model.weight, model.bias), state)


def _torch_batch_norm(shape: Shape, dtype_name: str, mode: str, *, channels_last: bool):
  import torch  # pylint: disable=import-outside-toplevel  (optional peer)
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  if not channels_last and len(shape) != 4:
    return None  # NCHW is a 4-D layout.
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  channels = shape[-1]
  torch_shape = (shape[0], channels) + tuple(shape[1:-1])  # NCHW (or NC) logical order.
  generator = torch.Generator().manual_seed(0)
  x = torch.randn(torch_shape, generator=generator).to(dtype)
  dy = torch.randn(torch_shape, generator=generator).to(dtype)
  if len(shape) == 4:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x, dy = x.to(memory_format=memory_format), dy.to(memory_format=memory_format)
  weight = torch.ones(channels, requires_grad=True)
  bias = torch.zeros(channels, requires_grad=True)
  running_mean, running_var = torch.zeros(channels), torch.ones(channels)
  momentum = 1.0 - MOMENTUM  # PyTorch weighs the new batch.
  if mode == names.FORWARD:
    def run():
      with torch.no_grad():
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, EPSILON)
    return run
  x_grad = x.detach().clone().requires_grad_(True)

  def run_with_backward():
    y = F.batch_norm(x_grad, running_mean, running_var, weight, bias, True, momentum, EPSILON)
    return y, torch.autograd.grad(y, (x_grad, weight, bias), dy)

  return run_with_backward


def torch_channels_last(shape: Shape, dtype_name: str, mode: str):
  return _torch_batch_norm(shape, dtype_name, mode, channels_last=True)


def torch_nchw(shape: Shape, dtype_name: str, mode: str):
  return _torch_batch_norm(shape, dtype_name, mode, channels_last=False)


def _floor_params(shape: Shape, dtype_name: str):
  return (jnp.ones((shape[-1],), dtype_name), jnp.zeros((shape[-1],), dtype_name))


def floor(shape: Shape, dtype_name: str) -> JaxLayer:
  def apply(x, params, state):
    a, b = params
    return x * a + b, state

  return JaxLayer(apply, _floor_params(shape, dtype_name), ())


def floor_with_stats(shape: Shape, dtype_name: str) -> JaxLayer:
  axes = _channels_axes(shape)

  def apply(x, params, state):
    del state
    a, b = params
    return x * a + b, jnp.sum(x, axes, dtype=jnp.float32)

  return JaxLayer(apply, _floor_params(shape, dtype_name), ())


def _floor_forward_backward(shape: Shape, *, with_stats: bool):
  axes = _channels_axes(shape)

  def program(x, params, state, dy):
    del state
    a, b = params
    y = x * a + b
    dx = dy * a + x * b
    if not with_stats:
      return y, dx
    sums = (jnp.sum(x, axes, dtype=jnp.float32), jnp.sum(dy, axes, dtype=jnp.float32),
            jnp.sum(dy * x, axes, dtype=jnp.float32))
    return y, dx, sums

  return program


def autodiff_reference(shape: Shape, dtype_name: str) -> JaxLayer:
  """Plain autodiff of a two-pass `jnp` batch norm: what a layer keeps without a custom VJP."""
  axes = _channels_axes(shape)

  def apply(x, params, state):
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    scale, bias = params
    return (x - mean) * jax.lax.rsqrt(var + EPSILON) * scale + bias, state

  return JaxLayer(apply, _floor_params(shape, dtype_name), ())


BATCH_NORM_IMPLEMENTATIONS = (
    Implementation(BNJAX, "`bnjax.batch_norm` (this repository)", build=bnjax_batch_norm),
    Implementation(FLAX, "`flax.linen.BatchNorm` default (fast variance E[x²]−E[x]²)",
                   build=flax_linen),
    Implementation(FLAX_EXACT,
                   "`flax.linen.BatchNorm(use_fast_variance=False)` (two-pass variance)",
                   build=flax_linen_exact),
    Implementation(NNX, "`flax.nnx.BatchNorm` default", build=flax_nnx),
    Implementation(HAIKU, "`hk.BatchNorm` (statistics in the input dtype)",
                   build=haiku_batch_norm, module="haiku"),
    Implementation(EQUINOX, "`eqx.nn.BatchNorm(mode='batch')` under `vmap` over the N·H·W rows",
                   build=equinox_batch_norm, module="equinox"),
    Implementation(TORCH_CL, "`torch.nn.functional.batch_norm`, CPU, channels_last memory format "
                   "(eager)", eager=torch_channels_last, module="torch"),
    Implementation(TORCH_NCHW, "`torch.nn.functional.batch_norm`, CPU, contiguous NCHW (eager; "
                   "4-D shapes only)", eager=torch_nchw, module="torch"),
    Implementation(FLOOR, "bandwidth floor: forward `y = x·a + b` (1 read, 1 write); "
                   "forward+backward adds `dx = dy·a + x·b` (3 reads, 2 writes). XLA:CPU does not "
                   "fuse a reduction into an elementwise loop, so the per-channel sums are left "
                   "out",
                   build=floor,
                   forward_backward=lambda shape: _floor_forward_backward(shape, with_stats=False),
                   in_stack=False),
    Implementation(FLOOR_STATS, "floor with the per-channel sums XLA:CPU needs as passes of their "
                   "own: forward Σx then y (2 reads, 1 write); forward+backward adds Σdy, Σdy·x "
                   "and dx (7 reads, 2 writes)", build=floor_with_stats,
                   forward_backward=lambda shape: _floor_forward_backward(shape, with_stats=True),
                   in_stack=False),
)

BATCH_NORM = Comparison(
    name="batch norm", heading="", implementations=BATCH_NORM_IMPLEMENTATIONS,
    references={names.VS_FLAX: FLAX, names.VS_FLOOR: FLOOR, names.VS_TORCH_CL: TORCH_CL},
    shown=(names.VS_FLAX, names.VS_FLOOR), shown_label="× Flax default, × floor")



# ============================================================================ whitening


def bnjax_whitening(method: str, group: int) -> Callable[[Shape, str], JaxLayer]:
  """A builder of `bnjax.whitening_batch_norm` with `method` and `group` channels per group."""

  def build(shape: Shape, dtype_name: str) -> JaxLayer:
    del dtype_name  # parameters and statistics are float32.
    params, state = bnjax.whitening.init_whitening(shape[-1], group_size=group)

    def apply(x, params, state):
      return bnjax.whitening.whitening_batch_norm(params, state, x, True, group_size=group,
                                                  method=method, momentum=MOMENTUM,
                                                  epsilon=EPSILON)

    return JaxLayer(apply, params, state)

  return build


def eigh_autodiff_zca(group: int) -> Callable[[Shape, str], JaxLayer]:
  """The straightforward ZCA layer: two-pass statistics in `jnp`, ``jnp.linalg.eigh`` and JAX's
  autodiff through all of it (its eigenvector derivative divides by eigenvalue gaps)."""

  def build(shape: Shape, dtype_name: str) -> JaxLayer:
    channels = shape[-1]
    size = min(group, channels)
    params = _floor_params(shape, dtype_name)

    def apply(x, params, state):
      rows = x.reshape(-1, channels // size, size).astype(jnp.float32)
      centred = rows - jnp.mean(rows, axis=0, keepdims=True)
      covariance = jnp.einsum("mgi,mgj->gij", centred, centred) / rows.shape[0]
      eigenvalues, vectors = jnp.linalg.eigh(covariance + EPSILON * jnp.eye(size)[None])
      w = jnp.einsum("gik,gk,gjk->gij", vectors, jax.lax.rsqrt(eigenvalues), vectors)
      y = jnp.einsum("gij,mgj->mgi", w, centred).reshape(x.shape)
      scale, bias = params
      return (y * scale + bias).astype(x.dtype), state

    return JaxLayer(apply, params, ())

  return build


WHITENING_IMPLEMENTATIONS = tuple(
    Implementation(names.whitening_row(method, group),
                   f"`bnjax.whitening_batch_norm(method={method!r}, group_size={group})`",
                   build=bnjax_whitening(method, group))
    for method in names.WHITENING_METHODS for group in names.WHITENING_GROUPS) + tuple(
    Implementation(names.whitening_row("zca", group, eigh_autodiff=True),
                   f"ZCA with groups of {group} in plain `jnp` (`jnp.linalg.eigh`), "
                   "differentiated by JAX's autodiff", build=eigh_autodiff_zca(group))
    for group in names.WHITENING_GROUPS) + (
    Implementation(names.WHITENING_REFERENCE, "`bnjax.batch_norm`, the reference of the ratios",
                   build=bnjax_batch_norm),)

WHITENING = Comparison(
    name=names.WHITENING, heading="whitening", implementations=WHITENING_IMPLEMENTATIONS,
    references={names.VS_BATCH_NORM: names.WHITENING_REFERENCE}, shown=(names.VS_BATCH_NORM,),
    shown_label="× bnjax batch norm", full_shapes=names.WHITENING_SHAPES, dtypes=("float32",))

# ============================================================================ ghost batches


def ghost_size(shape: Shape) -> int:
  """`names.GHOST_SIZE`, or half the batch when it is smaller than two ghost batches (smoke)."""
  return names.GHOST_SIZE if shape[0] >= 2 * names.GHOST_SIZE else max(1, shape[0] // 2)


def bnjax_ghost_batch_norm(shape: Shape, dtype_name: str) -> JaxLayer:
  """`bnjax.batch_norm` in training mode with ghost batches of `ghost_size(shape)` examples."""
  del dtype_name  # bnjax's parameters and statistics are float32 for every input dtype.
  params, state = bnjax.init(shape[-1])
  ghost = ghost_size(shape)

  def apply(x, params, state):
    return bnjax.batch_norm(params, state, x, True, momentum=MOMENTUM, epsilon=EPSILON,
                            ghost_batch_size=ghost)

  return JaxLayer(apply, params, state)


GHOST_BATCH = Comparison(
    name=names.GHOST_BATCH, heading=f"ghost batches of {names.GHOST_SIZE}",
    implementations=(
        Implementation(names.GHOST_ROW,
                       f"`bnjax.batch_norm(..., ghost_batch_size={names.GHOST_SIZE})` (half the "
                       f"batch when it is under {2 * names.GHOST_SIZE}): each run of examples "
                       "normalised with its own statistics", build=bnjax_ghost_batch_norm,
                       in_stack=False),
        Implementation(names.GHOST_REFERENCE, "`bnjax.batch_norm`, the reference of the ratios",
                       build=bnjax_batch_norm, in_stack=False)),
    references={names.VS_PLAIN: names.GHOST_REFERENCE}, shown=(names.VS_PLAIN,),
    shown_label="× bnjax without ghost batches", full_shapes=names.GHOST_SHAPES,
    dtypes=("float32",), modes=(names.FORWARD_BACKWARD,))

# ============================================================================ normalization family
# Per-example norms: no running statistics, so `state` is () and passes through. Each is compared
# with Flax's linen layer on the same shapes (features last), at its default (the fast variance
# E[x²]−E[x]², inexact far from zero) and, for the centred norms, with `use_fast_variance=False`.


def _groups(shape: Shape) -> int:
  """32 groups (Wu & He's default), or the largest count that divides the channels."""
  return math.gcd(32, shape[-1])


def _bnjax_norm(fn: Callable[..., Any], use_bias: bool = True) -> Callable[[Shape, str], JaxLayer]:
  def build(shape: Shape, dtype_name: str) -> JaxLayer:
    del dtype_name  # bnjax's parameters and statistics are float32 for every input dtype.
    params = bnjax.init_params(shape[-1], use_bias=use_bias)
    return JaxLayer(lambda x, params, state: (fn(params, x, shape), state), params, ())

  return build


def _flax_norm(make: Callable[[Shape, str], nn.Module]) -> Callable[[Shape, str], JaxLayer]:
  def build(shape: Shape, dtype_name: str) -> JaxLayer:
    module = make(shape, dtype_name)
    small = (shape[0], *(2,) * (len(shape) - 2), shape[-1])  # the same parameters, cheaper.
    variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros(small, dtype_name))
    return JaxLayer(lambda x, params, state: (module.apply({"params": params}, x), state),
                    variables["params"], ())

  return build


def _implementations(bnjax_fn: Callable[..., Any], flax_class: Any, description: str,
                     use_bias: bool = True, exact_peer: bool = True,
                     **flax_fields: Callable[[Shape], Any]) -> tuple[Implementation, ...]:
  def make(fast_variance: bool) -> Callable[[Shape, str], nn.Module]:
    def module(shape: Shape, dtype_name: str) -> nn.Module:
      fields = {k: v(shape) for k, v in flax_fields.items()}
      if exact_peer:
        fields["use_fast_variance"] = fast_variance
      return flax_class(epsilon=EPSILON, dtype=jnp.dtype(dtype_name), **fields)

    return module

  rows = [Implementation(BNJAX, f"`{bnjax_fn.__name__}` (this repository)",
                         build=_bnjax_norm(bnjax_fn, use_bias), in_stack=False),
          Implementation(FLAX, f"`{description}` default", build=_flax_norm(make(True)),
                         in_stack=False)]
  if exact_peer:
    rows.append(Implementation(FLAX_EXACT, f"`{description}(use_fast_variance=False)`",
                               build=_flax_norm(make(False)), in_stack=False))
  return tuple(rows)


def bnjax_layer_norm(params: Any, x: Any, shape: Shape) -> Any:
  """`bnjax.layer_norm` over the last axis."""
  del shape
  return bnjax.layer_norm(params, x, epsilon=EPSILON)


def bnjax_group_norm(params: Any, x: Any, shape: Shape) -> Any:
  """`bnjax.group_norm` with `_groups(shape)` groups over every axis but the batch."""
  return bnjax.group_norm(params, x, num_groups=_groups(shape), epsilon=EPSILON)


def bnjax_rms_norm(params: Any, x: Any, shape: Shape) -> Any:
  """`bnjax.rms_norm` over the last axis."""
  del shape
  return bnjax.rms_norm(params, x, epsilon=EPSILON)


_FAMILY_REFERENCES = {names.VS_FLAX: FLAX}
LAYER_NORM = Comparison(
    name="layer norm", heading="layer norm",
    implementations=_implementations(bnjax_layer_norm, nn.LayerNorm, "flax.linen.LayerNorm"),
    references=_FAMILY_REFERENCES, shown=(names.VS_FLAX,), shown_label="× Flax default",
    full_shapes=((4096, 1024), (16, 512, 1024)))
GROUP_NORM = Comparison(
    name="group norm", heading="group norm (32 groups, or gcd(32, C))",
    implementations=_implementations(bnjax_group_norm, nn.GroupNorm, "flax.linen.GroupNorm",
                                     num_groups=_groups),
    references=_FAMILY_REFERENCES, shown=(names.VS_FLAX,), shown_label="× Flax default",
    full_shapes=((128, 16, 16, 256),))
RMS_NORM = Comparison(
    name="rms norm", heading="RMS norm",
    implementations=_implementations(bnjax_rms_norm, nn.RMSNorm, "flax.linen.RMSNorm",
                                     use_bias=False, exact_peer=False),
    references=_FAMILY_REFERENCES, shown=(names.VS_FLAX,), shown_label="× Flax default",
    full_shapes=((4096, 1024),))

# Every comparison the micro-benchmarks run, in report order.
COMPARISONS = (BATCH_NORM, WHITENING, GHOST_BATCH, LAYER_NORM, GROUP_NORM, RMS_NORM)

# The stack-memory table: batch norm's JAX rows that keep something, and plain autodiff.
STACK_IMPLEMENTATIONS = tuple(
    impl for impl in BATCH_NORM_IMPLEMENTATIONS if impl.build and impl.in_stack) + (
        Implementation(AUTODIFF_REFERENCE, "plain `jax.vjp` of a two-pass `jnp` batch norm",
                       build=autodiff_reference),)

# The simulated-devices table's layer programs, each run under `shard_map` with the batch sharded:
# {program name: a builder taking `axis_name`}. A new pair (e.g. a layer norm and its Flax peer)
# is two more lines.
SHARDED_LAYERS = {
    "bnjax layer fwd+bwd": bnjax_batch_norm,
    "flax layer fwd+bwd": flax_linen,
}


def comparison(name: str) -> Comparison:
  """The comparison called `name`."""
  for candidate in COMPARISONS:
    if candidate.name == name:
      return candidate
  raise ValueError(f"`name` must be one of {[c.name for c in COMPARISONS]}; got {name!r}.")

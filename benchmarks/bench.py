"""Benchmark: bnjax against Flax, Haiku, Equinox, PyTorch and a bandwidth floor, on CPU.

  make bench                                        # full run, both allocators (~15 min, 2 cores)
  .venv/bin/python benchmarks/bench.py --quick      # smoke run (< 2 min)
  .venv/bin/python benchmarks/bench.py --allocator glibc --out /tmp/RESULTS.md

Writes ``--out`` (default benchmarks/RESULTS.md; RESULTS-quick.md with --quick), a chart and
the raw measurements next to it (same name, .png and .json); ``--render RESULTS.json`` redraws
the report from saved measurements.

What is measured, all in training mode and jitted:

* forward ``(y, new_state) = bn(x)`` and forward+backward ``(y, dx, dscale, dbias, new_state)``
  for a given dy (one layer's work in a training step) for every implementation, shape and dtype;
* the full-size passes XLA compiled (`benchmarks/hlo.py`) and its memory analysis;
* the temporary memory of a 6-layer stack (what a layer keeps for its backward);
* a small ResNet-style training step with bnjax, Flax or no normalisation;
* 1, 2 and 8 simulated devices (one subprocess each, since the device count is fixed when JAX
  starts), the batch sharded with `shard_map` and statistics combined over the mesh axis.

Method: every implementation of a case is compiled and warmed up first; then rounds run every
implementation once each, in an order rotated every round, so that the machine's slow moments
spread over all of them. Reported: the median time over rounds, and ratios taken within each round
(implementation time / reference time in the same round) and then the median over rounds. Each
sample repeats a call enough times to last a few milliseconds (small shapes), with a short pause
between samples so one library's spinning worker threads do not slow the next.

The whole suite runs once per allocator (glibc, and tcmalloc through LD_PRELOAD when the Debian
package libtcmalloc-minimal4 is installed), each in its own subprocess.
"""

import argparse
import datetime
import functools
import glob
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

SHAPES = ((256, 32, 32, 64), (128, 16, 16, 256), (4096, 1024), (64, 8, 8, 32))
QUICK_SHAPES = ((64, 8, 8, 32),)
DTYPES = ("float32", "bfloat16")
MODES = ("forward", "forward+backward")
DEVICE_COUNTS = (1, 2, 8)
STACK_LAYERS = 6
MOMENTUM = 0.99
EPSILON = 1e-5
SAMPLE_SECONDS = 0.005  # each sample lasts at least this long (repeated calls for small shapes).
PAUSE_SECONDS = 0.002  # between samples.

BNJAX = "bnjax"
FLAX = "flax.linen"
FLAX_EXACT = "flax.linen exact"
NNX = "flax.nnx"
HAIKU = "haiku"
EQUINOX = "equinox"
TORCH_CL = "torch channels_last"
TORCH_NCHW = "torch NCHW"
FLOOR = "floor"
FLOOR_STATS = "floor+stats"
IMPLEMENTATIONS = (BNJAX, FLAX, FLAX_EXACT, NNX, HAIKU, EQUINOX, TORCH_CL, TORCH_NCHW, FLOOR,
                   FLOOR_STATS)
DESCRIPTIONS = {
    BNJAX: "`bnjax.batch_norm` (this repository)",
    FLAX: "`flax.linen.BatchNorm` default (fast variance E[x²]−E[x]²)",
    FLAX_EXACT: "`flax.linen.BatchNorm(use_fast_variance=False)` (two-pass variance)",
    NNX: "`flax.nnx.BatchNorm` default",
    HAIKU: "`hk.BatchNorm` (statistics in the input dtype)",
    EQUINOX: "`eqx.nn.BatchNorm(mode='batch')` under `vmap` over the N·H·W rows",
    TORCH_CL: "`torch.nn.functional.batch_norm`, CPU, channels_last memory format (eager)",
    TORCH_NCHW: "`torch.nn.functional.batch_norm`, CPU, contiguous NCHW (eager; 4-D shapes only)",
    FLOOR: "bandwidth floor: forward `y = x·a + b` (1 read, 1 write); forward+backward adds "
           "`dx = dy·a + x·b` (3 reads, 2 writes). XLA:CPU does not fuse a reduction into an "
           "elementwise loop, so the per-channel sums are left out",
    FLOOR_STATS: "floor with the per-channel sums XLA:CPU needs as passes of their own: forward "
                 "Σx then y (2 reads, 1 write); forward+backward adds Σdy, Σdy·x and dx "
                 "(7 reads, 2 writes)",
}


# ============================================================================ timing


def _sample(run, inner):
  start = time.perf_counter()
  for _ in range(inner):
    run()
  return (time.perf_counter() - start) / inner


def calibrate(run, warmup=2):
  """Warms `run` up; returns how many calls make one sample last SAMPLE_SECONDS."""
  for _ in range(warmup):
    run()
  once = _sample(run, 1)
  return max(1, min(1000, math.ceil(SAMPLE_SECONDS / max(once, 1e-7))))


def round_robin(runs, rounds):
  """Times `runs` ({name: callable}) in `rounds` interleaved rounds; returns {name: [seconds]}."""
  inner = {name: calibrate(run) for name, run in runs.items()}
  names = list(runs)
  times = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      time.sleep(PAUSE_SECONDS)
      times[name].append(_sample(runs[name], inner[name]))
  return times


def summarise(times, references):
  """Medians in ms and, for each reference present, the median of per-round ratios."""
  out = {}
  for name, samples in times.items():
    entry = {"median_ms": 1e3 * statistics.median(samples), "rounds": len(samples)}
    for key, ref in references.items():
      if ref in times and times[ref]:
        ratios = [a / b for a, b in zip(samples, times[ref])]
        entry[key] = statistics.median(ratios)
    out[name] = entry
  return out


# ============================================================================ implementations


def _jax_modules():
  import jax
  import jax.numpy as jnp
  return jax, jnp


def _feature_axes(shape):
  return tuple(range(len(shape) - 1))


def jax_implementations(shape, dtype_name):
  """{name: (f(x, params, state) -> (y, new_state), params, state)} for every JAX library."""
  jax, jnp = _jax_modules()
  import bnjax
  dtype = jnp.dtype(dtype_name)
  channels = shape[-1]
  impls = {}

  params, state = bnjax.init(channels)

  def bnjax_f(x, params, state):
    return bnjax.batch_norm(params, state, x, True, momentum=MOMENTUM, epsilon=EPSILON)

  impls[BNJAX] = (bnjax_f, params, state)

  from flax import linen as nn
  for name, fast in ((FLAX, True), (FLAX_EXACT, False)):
    module = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON,
                          use_fast_variance=fast, dtype=dtype)

    def flax_f(x, params, state, module=module):
      y, updates = module.apply({"params": params, "batch_stats": state}, x,
                                mutable=["batch_stats"])
      return y, updates["batch_stats"]

    variables = module.init(jax.random.key(0), jnp.zeros((2, channels), dtype))
    impls[name] = (flax_f, variables["params"], variables["batch_stats"])

  from flax import nnx
  model = nnx.BatchNorm(channels, use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON,
                        dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, nnx_params, nnx_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def nnx_f(x, params, state):
    module = nnx.merge(graphdef, params, state)
    y = module(x)
    _, _, new_state = nnx.split(module, nnx.Param, nnx.BatchStat)
    return y, new_state

  impls[NNX] = (nnx_f, nnx_params, nnx_stats)

  try:
    import haiku as hk
    transformed = hk.transform_with_state(
        lambda x: hk.BatchNorm(True, True, MOMENTUM, eps=EPSILON)(x, is_training=True))
    hk_params, hk_state = transformed.init(None, jnp.zeros((2,) + shape[1:], dtype))

    def haiku_f(x, params, state):
      return transformed.apply(params, state, None, x)

    impls[HAIKU] = (haiku_f, hk_params, hk_state)
  except ImportError:
    pass

  try:
    import equinox as eqx
    model, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        channels, axis_name="rows", momentum=MOMENTUM, eps=EPSILON, mode="batch", dtype=dtype)

    def equinox_f(x, params, state):
      module = eqx.tree_at(lambda m: (m.weight, m.bias), model, params)
      rows = x.reshape(-1, channels)  # free for a contiguous [..., C] array.
      y, new_state = jax.vmap(module, axis_name="rows", in_axes=(0, None),
                              out_axes=(0, None))(rows, state)
      return y.reshape(x.shape), new_state

    impls[EQUINOX] = (equinox_f, (model.weight, model.bias), eqx_state)
  except ImportError:
    pass

  axes = _feature_axes(shape)
  floor_params = (jnp.ones((channels,), dtype), jnp.zeros((channels,), dtype))

  def floor_f(x, params, state):
    a, b = params
    return x * a + b, state

  def floor_stats_f(x, params, state):
    a, b = params
    total = jnp.sum(x, axes, dtype=jnp.float32)
    return x * a + b, total

  impls[FLOOR] = (floor_f, floor_params, ())
  impls[FLOOR_STATS] = (floor_stats_f, floor_params, ())
  return impls


def _floor_backward(shape, with_stats):
  jax, jnp = _jax_modules()
  axes = _feature_axes(shape)

  def f(x, params, state, dy):
    a, b = params
    y = x * a + b
    dx = dy * a + x * b
    if not with_stats:
      return y, dx
    sums = (jnp.sum(x, axes, dtype=jnp.float32), jnp.sum(dy, axes, dtype=jnp.float32),
            jnp.sum(dy * x, axes, dtype=jnp.float32))
    return y, dx, sums

  return f


def forward_backward(f):
  """(x, params, state, dy) -> (y, (dx, dparams), new_state): one layer's training-step work."""
  jax, _ = _jax_modules()

  def step(x, params, state, dy):
    # `state` is a primal too (its cotangent is dropped, so XLA removes it): closing over it would
    # hand flax.nnx variables from the outer trace, which nnx refuses to update.
    y, vjp, new_state = jax.vjp(f, x, params, state, has_aux=True)
    dx, dparams, _ = vjp(dy)
    return y, (dx, dparams), new_state

  return step


def jax_program(name, f, mode, shape):
  if name in (FLOOR, FLOOR_STATS) and mode != "forward":
    return _floor_backward(shape, name == FLOOR_STATS)
  return f if mode == "forward" else forward_backward(f)


def torch_runs(shape, dtype_name, mode):
  """{name: callable} for torch's CPU batch norm in both memory formats (eager mode)."""
  import torch
  import torch.nn.functional as F
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  channels = shape[-1]
  torch_shape = (shape[0], channels) + tuple(shape[1:-1])  # NCHW (or NC) logical order.
  formats = {TORCH_CL: torch.channels_last} if len(shape) == 4 else {TORCH_CL: None}
  if len(shape) == 4:
    formats[TORCH_NCHW] = torch.contiguous_format
  generator = torch.Generator().manual_seed(0)
  runs = {}
  for name, memory_format in formats.items():
    x = torch.randn(torch_shape, generator=generator).to(dtype)
    dy = torch.randn(torch_shape, generator=generator).to(dtype)
    if memory_format is not None:
      x, dy = x.to(memory_format=memory_format), dy.to(memory_format=memory_format)
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)
    momentum = 1.0 - MOMENTUM  # PyTorch weighs the new batch.
    if mode == "forward":
      def run(x=x, weight=weight, bias=bias, rm=running_mean, rv=running_var):
        with torch.no_grad():
          return F.batch_norm(x, rm, rv, weight, bias, True, momentum, EPSILON)
    else:
      xg = x.detach().clone().requires_grad_(True)

      def run(xg=xg, dy=dy, weight=weight, bias=bias, rm=running_mean, rv=running_var):
        y = F.batch_norm(xg, rm, rv, weight, bias, True, momentum, EPSILON)
        return y, torch.autograd.grad(y, (xg, weight, bias), dy)
    runs[name] = run
  return runs


# ============================================================================ the worker


def _versions():
  versions = {"python": platform.python_version()}
  for module in ("jax", "jaxlib", "flax", "haiku", "equinox", "numpy", "torch", "matplotlib"):
    try:
      versions[module] = __import__(module).__version__
    except Exception as error:  # noqa: BLE001  (any import failure is reported, not raised)
      versions[module] = f"not importable ({type(error).__name__}: {error})".splitlines()[0]
  return versions


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cores():
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _allocator_in_use():
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return "unknown"
  return "tcmalloc" if "tcmalloc" in maps else "glibc"


def _git_revision():
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return head + (" (with uncommitted changes)" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _source_digest():
  """A short hash of bnjax's sources, to tell whether the library changed during a run."""
  import hashlib
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(REPO, "bnjax", "*.py"))):
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()[:12]


def _peers():
  """{peer: None if importable else the reason}."""
  peers = {}
  for module in ("haiku", "equinox", "torch"):
    try:
      __import__(module)
      peers[module] = None
    except Exception as error:  # noqa: BLE001
      peers[module] = f"{type(error).__name__}: {error}".splitlines()[0]
  return peers


def _torch_threads(cores):
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(cores)
  return torch.get_num_threads()


def micro_benchmarks(shapes, dtypes, rounds_for, log):
  """Forward and forward+backward of every implementation; one entry per (shape, dtype, mode)."""
  jax, jnp = _jax_modules()
  from benchmarks import hlo
  have_torch = _peers()["torch"] is None
  results = []
  for shape in shapes:
    for dtype_name in dtypes:
      impls = jax_implementations(shape, dtype_name)
      key = jax.random.key(0)
      x = jax.random.normal(key, shape, jnp.float32).astype(dtype_name)
      dy = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32).astype(dtype_name)
      for mode in MODES:
        runs, analysis = {}, {}
        for name, (f, params, state) in impls.items():
          program = jax_program(name, f, mode, shape)
          args = (x, params, state) if mode == "forward" else (x, params, state, dy)
          try:
            compiled = jax.jit(program).lower(*args).compile()
          except Exception as error:  # noqa: BLE001  (a peer that fails is reported, not fatal)
            analysis[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
            continue
          text = compiled.as_text()
          worst = hlo.count_passes(text, x.size)  # the dearest branch of any lax.cond
          fast = hlo.count_passes(text, x.size, branches="min")  # the cheapest
          analysis[name] = {"passes": fast.passes, "reads": fast.reads, "writes": fast.writes,
                            "worst": [worst.passes, worst.reads, worst.writes],
                            "memory": hlo.memory(compiled)}

          def run(compiled=compiled, args=args):
            jax.block_until_ready(compiled(*args))

          runs[name] = run
        if have_torch:
          runs.update(torch_runs(shape, dtype_name, mode))
        rounds = rounds_for(shape)
        started = time.perf_counter()
        times = round_robin(runs, rounds)
        summary = summarise(times, {"vs_flax": FLAX, "vs_floor": FLOOR, "vs_torch_cl": TORCH_CL})
        for name, entry in analysis.items():
          summary.setdefault(name, {}).update(entry)
        results.append({"shape": list(shape), "dtype": dtype_name, "mode": mode,
                        "rounds": rounds, "impls": summary})
        log(f"  {mode:17s} {str(shape):20s} {dtype_name:9s} {rounds:3d} rounds "
            f"{time.perf_counter() - started:6.1f}s  bnjax "
            f"{summary[BNJAX].get('median_ms', float('nan')):.2f} ms, "
            f"{summary[BNJAX].get('vs_flax', float('nan')):.2f}x flax")
  return results


def stack_memory(shape, only=None):
  """Temporary memory of a 6-layer (batch norm, relu) stack, forward+backward, per library."""
  jax, jnp = _jax_modules()
  from benchmarks import hlo
  impls = jax_implementations(shape, "float32")
  x = jnp.zeros(shape, jnp.float32)

  def reference_f(x, params, state):  # plain autodiff of a jnp batch norm (two-pass variance).
    axes = _feature_axes(shape)
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    scale, bias = params
    return (x - mean) * jax.lax.rsqrt(var + EPSILON) * scale + bias, state

  impls["autodiff reference"] = (reference_f, impls[FLOOR][1], ())
  out = {"shape": list(shape), "layers": STACK_LAYERS, "full_size_bytes": x.size * 4, "impls": {},
         "errors": {}}
  for name, (f, params, state) in impls.items():
    if name in (FLOOR, FLOOR_STATS) or (only and name not in only and name != "autodiff reference"):
      continue

    def stack(x, params, state, f=f):
      new = []
      for p, s in zip(params, state):
        y, s = f(x, p, s)
        x = jax.nn.relu(y)
        new.append(s)
      return x, new

    args = (x, [params] * STACK_LAYERS, [state] * STACK_LAYERS, x)
    try:
      compiled = hlo.compile_for_analysis(jax.jit(forward_backward(stack)).lower(*args))
    except Exception as error:  # noqa: BLE001  (reported in the table, not fatal)
      out["errors"][name] = f"{type(error).__name__}: {error}".splitlines()[0]
      continue
    out["impls"][name] = hlo.memory(compiled)
  return out


def _resnet(norm, axis_name=None, blocks=2):
  """A small ResNet-style network: a conv-norm-relu stem and residual blocks of two of them."""
  import bnjax
  from flax import linen as nn
  jax, jnp = _jax_modules()

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      def normalise(y):
        if norm == "bnjax":
          return bnjax.BatchNorm(use_running_average=not train, axis_name=axis_name)(y)
        if norm == "flax":
          return nn.BatchNorm(use_running_average=not train, axis_name=axis_name)(y)
        return y

      x = jax.nn.relu(normalise(nn.Conv(32, (3, 3), use_bias=norm == "none")(x)))
      for _ in range(blocks):
        y = jax.nn.relu(normalise(nn.Conv(32, (3, 3), use_bias=norm == "none")(x)))
        y = normalise(nn.Conv(32, (3, 3), use_bias=norm == "none")(y))
        x = jax.nn.relu(x + y)
      return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

  return Net()


def _train_step(model, global_batch):
  jax, jnp = _jax_modules()

  def step(params, batch_stats, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)
      return jnp.sum(nll) / global_batch, updates.get("batch_stats", {})

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, new_stats, loss

  return step


def resnet_inputs(batch, image):
  jax, jnp = _jax_modules()
  key = jax.random.key(0)
  images = jax.random.normal(key, (batch, image, image, 3), jnp.float32)
  labels = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, 10)
  return images, labels


def resnet_benchmark(batch, image, blocks, rounds):
  jax, _ = _jax_modules()
  images, labels = resnet_inputs(batch, image)
  runs, info = {}, {}
  for norm in ("bnjax", "flax", "none"):
    model = _resnet(norm, blocks=blocks)
    variables = model.init(jax.random.key(1), images[:2], train=False)
    args = (variables["params"], variables.get("batch_stats", {}), images, labels)
    compiled = _compile_or_report(jax.jit(_train_step(model, batch)), args, info, norm)
    if compiled is not None:
      runs[norm] = functools.partial(_call, compiled, args)
  summary = summarise(round_robin(runs, rounds), {"vs_flax": "flax", "vs_none": "none"})
  for norm, entry in info.items():
    summary.setdefault(norm, {}).update(entry)
  return {"batch": batch, "image": image, "blocks": blocks, "rounds": rounds, "impls": summary}


# ============================================================================ devices worker


def _call(compiled, args):
  jax, _ = _jax_modules()
  jax.block_until_ready(compiled(*args))


def _compile_or_report(program, args, info, name):
  """Compiles a jitted `program`; on failure records the error under `info[name]` instead."""
  from benchmarks import hlo
  try:
    compiled = program.lower(*args).compile()
  except Exception as error:  # noqa: BLE001  (a failing program is reported, not fatal)
    info[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    return None
  info[name] = {"collectives": hlo.count_collectives(compiled.as_text())}
  return compiled


def devices_benchmark(shape, batch, image, blocks, rounds):
  """Runs inside a process with N simulated devices: sharded bnjax and Flax, and a train step."""
  jax, jnp = _jax_modules()
  from jax.sharding import NamedSharding, PartitionSpec as P
  import bnjax
  from flax import linen as nn
  from benchmarks import hlo
  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = NamedSharding(mesh, P("batch"))
  channels = shape[-1]
  key = jax.random.key(0)
  x = jax.device_put(jax.random.normal(key, shape, jnp.float32), sharded)
  dy = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32), sharded)
  params, state = bnjax.init(channels)

  def bnjax_f(x, params, state, axis_name="batch"):
    return bnjax.batch_norm(params, state, x, True, momentum=MOMENTUM, epsilon=EPSILON,
                            axis_name=axis_name)

  flax_module = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON,
                             axis_name="batch")

  def flax_f(x, params, state):
    y, updates = flax_module.apply({"params": {"scale": params.scale, "bias": params.bias},
                                    "batch_stats": {"mean": state.mean, "var": state.var}}, x,
                                   mutable=["batch_stats"])
    return y, bnjax.BatchNormState(**updates["batch_stats"])

  def on_mesh(f):
    def local(x, params, state, dy):
      y, grads, new_state = forward_backward(f)(x, params, state, dy)
      dx, dparams = grads
      return y, dx, jax.tree.map(lambda a: a[None], (dparams, new_state))

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("batch"), P(), P(), P("batch")),
                                 out_specs=P("batch")))

  programs = {"bnjax layer fwd+bwd": on_mesh(bnjax_f), "flax layer fwd+bwd": on_mesh(flax_f)}
  runs, info = {}, {}
  for name, program in programs.items():
    compiled = _compile_or_report(program, (x, params, state, dy), info, name)
    if compiled is not None:
      runs[name] = functools.partial(_call, compiled, (x, params, state, dy))
  if devices == 1:  # the same layer without shard_map, on unsharded arrays.
    name, args = "bnjax layer fwd+bwd, plain jit", (jnp.asarray(x), params, state, jnp.asarray(dy))
    program = jax.jit(forward_backward(lambda x, p, s: bnjax_f(x, p, s, None)))
    compiled = _compile_or_report(program, args, info, name)
    if compiled is not None:
      runs[name] = functools.partial(_call, compiled, args)

  if blocks is None:  # --quick: the layer programs only.
    return _finish_devices(runs, info, rounds, devices, shape, batch)
  images, labels = resnet_inputs(batch, image)
  variables = _resnet("bnjax", blocks=blocks).init(jax.random.key(1), images[:2], train=False)
  images, labels = jax.device_put((images, labels), sharded)
  model = _resnet("bnjax", axis_name="batch", blocks=blocks)
  step = _train_step(model, batch)

  def local_step(params, batch_stats, images, labels):
    params, new_stats, loss = step(params, batch_stats, images, labels)
    return params, jax.tree.map(lambda a: a[None], new_stats), loss[None]

  train = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
                                out_specs=(P(), P("batch"), P("batch"))))
  train_args = (variables["params"], variables["batch_stats"], images, labels)
  name = "bnjax ResNet train step"
  compiled = _compile_or_report(train, train_args, info, name)
  if compiled is not None:
    runs[name] = functools.partial(_call, compiled, train_args)
  return _finish_devices(runs, info, rounds, devices, shape, batch)


def _finish_devices(runs, info, rounds, devices, shape, batch):
  summary = summarise(round_robin(runs, rounds), {})
  for name, entry in info.items():
    summary.setdefault(name, {}).update(entry)
  return {"devices": devices, "shape": list(shape), "batch": batch, "impls": summary}


# ============================================================================ orchestration


def tcmalloc_path():
  for pattern in ("/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4",
                  "/usr/lib/*/libtcmalloc_minimal.so*", "/usr/lib/*/libtcmalloc.so.4"):
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def _run_child(arguments, env, log):
  """Runs this script with `arguments` in a subprocess, echoing its output as it comes."""
  with subprocess.Popen([sys.executable, os.path.abspath(__file__)] + arguments, env=env,
                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as child:
    for line in child.stdout:
      log("  | " + line.rstrip("\n"))
  return child.returncode


def _config(quick):
  """What to run: shapes, dtypes, rounds, and the ResNet and devices sizes."""
  if quick:
    return {"shapes": QUICK_SHAPES, "dtypes": DTYPES, "rounds_for": lambda shape: 3,
            "stack_shapes": QUICK_SHAPES, "stack_impls": (BNJAX, FLAX),
            "resnet": (16, 16, 1, 3), "devices": ((64, 8, 8, 32), 16, 16, None, 3)}

  def rounds_for(shape):
    return 11 if math.prod(shape) >= 4 * 2**20 else 41

  return {"shapes": SHAPES, "dtypes": DTYPES, "rounds_for": rounds_for,
          "stack_shapes": (SHAPES[0], SHAPES[3]), "stack_impls": None,
          "resnet": (64, 32, 2, 8), "devices": ((128, 16, 16, 256), 64, 32, 2, 7)}


def worker_main(args):
  """Runs the whole suite under the allocator this process was started with; writes JSON."""
  def log(message):
    print(message, flush=True)

  config = _config(args.quick)
  cores = _cores()
  result = {
      "allocator": _allocator_in_use(), "expected_allocator": args.allocator,
      "machine": {"cpu": _cpu_model(), "cores": cores, "os": platform.platform(),
                  "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                  "ld_preload": os.environ.get("LD_PRELOAD", "")},
      "versions": _versions(), "peers": _peers(), "torch_threads": _torch_threads(cores),
      "quick": args.quick,
  }
  result["load_before"] = os.getloadavg()
  result["revision"], result["bnjax_digest"] = _git_revision(), _source_digest()
  log(f"allocator in use: {result['allocator']}; torch threads: {result['torch_threads']}; "
      f"load average {result['load_before'][0]:.1f}")
  started = time.perf_counter()
  dtypes = ("float32",) if args.float32_only else config["dtypes"]
  result["micro"] = micro_benchmarks(config["shapes"], dtypes, config["rounds_for"], log)
  log(f"micro-benchmarks: {time.perf_counter() - started:.0f}s")
  if not args.only_micro:
    _whole_model_benchmarks(args, config, result, log, started)
  result["seconds"] = time.perf_counter() - started
  result["load_after"] = os.getloadavg()
  result["bnjax_digest_after"] = _source_digest()
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)


def _whole_model_benchmarks(args, config, result, log, started):
  """The 6-layer stack's memory, the ResNet step and the simulated devices."""
  result["stack_memory"] = [stack_memory(shape, config["stack_impls"])
                            for shape in config["stack_shapes"]]
  log(f"stack memory done: {time.perf_counter() - started:.0f}s")
  result["resnet"] = resnet_benchmark(*config["resnet"])
  log(f"ResNet step done: {time.perf_counter() - started:.0f}s")
  result["devices"] = []
  with tempfile.TemporaryDirectory() as tmp:
    for count in DEVICE_COUNTS:
      path = os.path.join(tmp, f"devices{count}.json")
      env = dict(os.environ)
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={count}").strip()
      arguments = ["--worker", "devices", "--json", path] + (["--quick"] if args.quick else [])
      if _run_child(arguments, env, log) == 0:
        with open(path) as f:
          result["devices"].append(json.load(f))
      else:
        result["devices"].append({"devices": count, "error": "the subprocess failed; see log"})
  log(f"devices done: {time.perf_counter() - started:.0f}s")


def worker_devices(args):
  result = devices_benchmark(*_config(args.quick)["devices"])
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{result['devices']} devices: " + ", ".join(
      f"{k} {v['median_ms']:.1f} ms" if "median_ms" in v else f"{k} {v.get('error')}"
      for k, v in result["impls"].items()), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="two small shapes, few rounds: a smoke run of every part (< 2 min)")
  parser.add_argument("--out", default=None,
                      help="the Markdown report (default benchmarks/RESULTS.md, or "
                           "benchmarks/RESULTS-quick.md with --quick); the chart (.png) and the "
                           "raw measurements (.json) go next to it")
  parser.add_argument("--render", metavar="JSON",
                      help="only rewrite the report and chart from a saved .json")
  parser.add_argument("--allocator", choices=("both", "glibc", "tcmalloc"), default="both")
  parser.add_argument("--worker", choices=("main", "devices"), help=argparse.SUPPRESS)
  parser.add_argument("--json", help=argparse.SUPPRESS)
  parser.add_argument("--only-micro", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--float32-only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker == "main":
    return worker_main(args)
  if args.worker == "devices":
    return worker_devices(args)

  from benchmarks import report
  if args.out is None:
    name = "RESULTS-quick.md" if args.quick else "RESULTS.md"
    args.out = os.path.join(REPO, "benchmarks", name)
  stem = os.path.splitext(args.out)[0]
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    report.write(args.out, stem + ".png", saved["runs"], **saved["meta"])
    print(f"wrote {args.out} and {stem}.png from {args.render}")
    return 0

  def log(message):
    print(message, flush=True)

  started = time.perf_counter()
  allocators = ["glibc", "tcmalloc"] if args.allocator == "both" else [args.allocator]
  library = tcmalloc_path()
  runs, notes = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for allocator in allocators:
      env = dict(os.environ)
      # PyTorch's OpenMP threads spin at barriers by default; on a 2-core machine shared with
      # other processes a descheduled thread then stalls the other for a time slice, which made
      # torch 10-100x slower and erratic. Sleeping waits keep it stable (override by setting it).
      env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
      # Workers share a persistent compilation cache: the second allocator's run loads the first
      # one's executables (the same compiled code) instead of compiling everything again.
      env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax-cache"),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
      if allocator == "tcmalloc":
        if library is None:
          notes.append("tcmalloc was not found, so only glibc was measured: install it with "
                       "`apt-get update && apt-get install -y libtcmalloc-minimal4`.")
          log("tcmalloc not found (apt-get install -y libtcmalloc-minimal4); skipping it")
          continue
        env["LD_PRELOAD"] = (library + " " + env.get("LD_PRELOAD", "")).strip()
      path = os.path.join(tmp, f"{allocator}.json")
      log(f"== {allocator}")
      arguments = ["--worker", "main", "--allocator", allocator, "--json", path]
      if args.quick and runs:  # a smoke run exercises the whole-model parts and bf16 once.
        arguments += ["--only-micro", "--float32-only"]
      if _run_child(arguments + (["--quick"] if args.quick else []), env, log) != 0:
        notes.append(f"the {allocator} run failed; see the console log.")
        continue
      with open(path) as f:
        runs.append(json.load(f))
  if not runs:
    log("no run succeeded")
    return 1
  meta = {"notes": notes, "revision": _git_revision(), "seconds": time.perf_counter() - started,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": " ".join(["benchmarks/bench.py"] + list(sys.argv[1:] if argv is None
                                                             else argv))}
  with open(stem + ".json", "w") as f:
    json.dump({"meta": meta, "runs": runs}, f, indent=1)
  report.write(args.out, stem + ".png", runs, **meta)
  log(f"wrote {args.out}, {stem}.png and {stem}.json in {time.perf_counter() - started:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())

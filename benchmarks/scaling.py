"""Cross-device cost against the device count, from compiled HLO (compile-only, nothing runs).

A pod-scale question answered on one CPU: with D simulated devices (``--xla_force_host_platform_
device_count=D``, fixed when JAX starts, so each D is its own process) and `jax.ShapeDtypeStruct`
inputs, XLA compiles each device's program without running it. For bnjax and Flax's
`nn.BatchNorm` with ``axis_name``, this measures, per batch-norm layer:

* the bytes each device receives from collectives in the forward pass (the cheapest path, and the
  dearest one through bnjax's conditional second round) and the all-reduces of the backward;
* the temporary memory of a training step of a ResNet-50-shaped stack of 53 batch-norm layers
  (the channel counts and spatial sizes of ResNet-50 at 224x224, 2 images per device);
* under plain `jit` on a batch-sharded array (no ``axis_name``; XLA's partitioner inserts the
  reductions), the forward all-reduces and temporary memory of one layer.

``python -m benchmarks.scaling --devices 512`` prints one JSON record; `measure` starts that process.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from typing import Any

AXIS = "batch"
CHANNELS = 2048  # the widest ResNet-50 layer: where the bytes per layer matter most.
LOCAL_BATCH = 2  # images per device.


def resnet50_norm_shapes(batch: int = LOCAL_BATCH) -> list[tuple[int, int, int, int]]:
  """The NHWC input shapes of ResNet-50's 53 batch-norm layers at 224x224 (stem, 16 bottleneck
  blocks of three, one projection per stage)."""
  shapes = [(batch, 112, 112, 64)]
  for stage, (blocks, width, size) in enumerate([(3, 64, 56), (4, 128, 28), (6, 256, 14),
                                                 (3, 512, 7)]):
    for block in range(blocks):
      inner = size if (block > 0 or stage == 0) else size * 2  # the first conv of a block strides.
      shapes += [(batch, inner, inner, width), (batch, size, size, width),
                 (batch, size, size, 4 * width)]
      if block == 0:
        shapes.append((batch, size, size, 4 * width))  # the projection shortcut.
  return shapes


def _implementations():
  import bnjax
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  def bnjax_layer(channels):
    params, state = bnjax.init(channels)

    def apply(params, state, x):
      return bnjax.batch_norm(params, state, x, True, axis_name=AXIS)

    return apply, params, state

  def flax_layer(channels):
    module = nn.BatchNorm(use_running_average=False, axis_name=AXIS)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                                   jnp.zeros((2, channels)), mutable=True))

    def apply(params, state, x):
      with jax.numpy_dtype_promotion("standard"):
        y, updates = module.apply({"params": params, "batch_stats": state}, x,
                                  mutable=["batch_stats"])
      return y, updates["batch_stats"]

    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    return apply, zeros(variables["params"]), zeros(variables["batch_stats"])

  return {"bnjax": bnjax_layer, "flax": flax_layer}


PARTS = ("layer", "stack", "plain_jit")


def measure_here(parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
  """`parts` of the record, in this process (with however many devices it has):
  ``"layer"`` the collectives of one layer, ``"stack"`` the 53-layer temporary memory,
  ``"plain_jit"`` one layer under plain `jit` on a batch-sharded array."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from benchmarks import hlo

  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))
  batch_sharded = NamedSharding(mesh, P(AXIS))
  replicated = NamedSharding(mesh, P())

  def spec(shape, sharding=batch_sharded):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)

  def on_mesh(fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

  def compile_(jitted, *args):
    return hlo.compile_for_analysis(jitted.lower(*args))

  record: dict[str, Any] = {"devices": devices, "channels": CHANNELS}
  layer_shape = (LOCAL_BATCH * devices, 7, 7, CHANNELS)
  for name, build in _implementations().items():
    apply, params, state = build(CHANNELS)
    as_specs = lambda tree: jax.tree.map(lambda a: spec(a.shape, replicated), tree)
    if "stack" in parts:
      record[f"{name}/stack53_temp_bytes"] = _stack_temp_bytes(build, spec, on_mesh, compile_,
                                                               replicated)
    if "plain_jit" in parts:
      record.update(_plain_jit(name, params, state, layer_shape))
    if "layer" not in parts:
      continue
    forward = on_mesh(lambda p, s, x: apply(p, s, x)[0], (P(), P(), P(AXIS)), P(AXIS))
    text = compile_(forward, as_specs(params), as_specs(state), spec(layer_shape)).as_text()
    record[f"{name}/forward_bytes"] = sum(hlo.collective_bytes(text, branches="min").values())
    record[f"{name}/forward_bytes_max"] = sum(hlo.collective_bytes(text, branches="max").values())
    forward_reduces = hlo.count_collectives(text, branches="min").get("all-reduce", 0)

    def train(p, s, x, dy, apply=apply):
      y, vjp, new_state = jax.vjp(lambda p, x: apply(p, s, x), p, x, has_aux=True)
      return vjp(dy), jax.tree.map(lambda a: a[None], new_state)

    step = on_mesh(train, (P(), P(), P(AXIS), P(AXIS)), ((P(), P(AXIS)), P(AXIS)))
    text = compile_(step, as_specs(params), as_specs(state), spec(layer_shape),
                    spec(layer_shape)).as_text()
    # The all-reduces a training step adds to the forward pass (including the sum of the
    # replicated parameters' gradients over the devices).
    record[f"{name}/backward_all_reduces"] = (
        hlo.count_collectives(text, branches="min").get("all-reduce", 0) - forward_reduces)

  return record


def _plain_jit(name, params, state, layer_shape):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from benchmarks import hlo

  mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.ShapeDtypeStruct(layer_shape, jnp.float32, sharding=NamedSharding(mesh, P(AXIS)))
  replicated = lambda tree: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), tree)
  compiled = hlo.compile_for_analysis(jax.jit(
      lambda p, s, x: apply_plain(name, p, s, x)).lower(replicated(params), replicated(state), x))
  return {f"{name}/plain_jit_all_reduces": hlo.count_collectives(
              compiled.as_text(), branches="min").get("all-reduce", 0),
          f"{name}/plain_jit_temp_bytes": hlo.peak_temp_bytes(compiled)}


def apply_plain(name, params, state, x):
  """One training-mode layer without ``axis_name`` (plain `jit`: XLA partitions the reductions)."""
  import jax

  if name == "bnjax":
    import bnjax
    return bnjax.batch_norm(params, state, x, True)
  import flax.linen as nn
  with jax.numpy_dtype_promotion("standard"):
    return nn.BatchNorm(use_running_average=False).apply(
        {"params": params, "batch_stats": state}, x, mutable=["batch_stats"])


def _stack_temp_bytes(build, spec, on_mesh, compile_, replicated):
  """Temporary memory of forward+backward through 53 ResNet-50-shaped layers (each its own
  input), as one layer of a training step sees it."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  from benchmarks import hlo

  shapes = resnet50_norm_shapes()
  layers = [build(shape[-1]) for shape in shapes]
  params = [p for _, p, _ in layers]
  states = [s for _, _, s in layers]

  def step(params, states, xs):
    def loss(params, xs):
      total, new_states = 0.0, []
      for (apply, _, _), p, s, x in zip(layers, params, states, xs, strict=True):
        y, new_state = apply(p, s, x)
        total = total + jnp.sum(jax.nn.relu(y))
        new_states.append(new_state)
      return total, new_states

    grads, new_states = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, xs)
    return grads, jax.tree.map(lambda a: a[None], new_states)

  devices = jax.device_count()
  global_shapes = [(s[0] * devices,) + s[1:] for s in shapes]
  mesh_step = on_mesh(step, (P(), P(), P(AXIS)), ((P(), P(AXIS)), P(AXIS)))
  rep = lambda tree: jax.tree.map(lambda a: spec(a.shape, replicated), tree)
  compiled = compile_(mesh_step, rep(params), rep(states), [spec(s) for s in global_shapes])
  return hlo.peak_temp_bytes(compiled)


def measure(devices: int, parts: tuple[str, ...] = PARTS, timeout: float = 900.0
            ) -> dict[str, Any]:
  """Runs `measure_here` in a fresh process with `devices` simulated CPU devices."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--devices", str(devices),
                           "--parts", ",".join(parts)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=root,
                          check=False)
  if result.returncode != 0:
    raise RuntimeError(f"benchmarks.scaling with {devices} devices failed:\n{result.stderr[-4000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, required=True,
                      help="the device count (must match --xla_force_host_platform_device_count)")
  parser.add_argument("--parts", default=",".join(PARTS))
  args = parser.parse_args(argv)
  record = measure_here(tuple(args.parts.split(",")))
  if record["devices"] != args.devices:
    raise SystemExit(f"expected {args.devices} devices, found {record['devices']}: set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}")
  print(json.dumps(record))  # noqa: T201  (the record for `measure`).
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Model-level programs: training steps of real networks with each normalisation.

Users run training steps, not layers, so the benchmark's headline is batch norm's cost inside a
step. `NETWORKS` are the example's CNN and a CIFAR-style ResNet (`bnjax_examples/models.py`);
each is built with bnjax's linen layer, Flax's, and no normalisation at all, and one jitted SGD
step of each is timed in interleaved rounds (`model_benchmark`). Batch norm's in-model cost is
what it adds to the step without normalisation:

    in-model ratio = (step with bnjax - step without) / (step with Flax - step without)

A new network is one more entry in `NETWORKS`; a new case (size, dtype) one more `ModelCase` in
`cases.py`. `resnet` is the smaller ResNet that the simulated-devices table shards.
"""

from collections.abc import Callable
import dataclasses
import functools
import resource
import time
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from benchmarks import cases, hlo, programs, timing
from benchmarks.cases import ModelCase
from bnjax_examples import models as example_models

CLASSES = 10
WIDTH = 32
LEARNING_RATE = 0.1
NO_NORM = "none"

# {norm name: (use_running_average, axis_name) -> linen layer}, or None: no normalisation (and
# the convolutions get a bias instead). Used by `resnet`, the simulated-devices network.
NORMS: dict[str, Callable[[bool, str | None], nn.Module] | None] = {
    "bnjax": lambda use_running_average, axis_name: bnjax.BatchNorm(
        use_running_average=use_running_average, axis_name=axis_name),
    "flax": lambda use_running_average, axis_name: nn.BatchNorm(
        use_running_average=use_running_average, axis_name=axis_name),
    NO_NORM: None,
}


@dataclasses.dataclass(frozen=True)
class Network:
  """A network of the model-level benchmark.

  Attributes:
    name: its key in `NETWORKS` and in the JSON.
    description: what it is, for the report.
    build: ``norm factory or None -> linen module`` whose ``__call__(images, train)`` returns
      logits (`bnjax_examples.models` networks take the factory of `example_models.norm_factory`).
    image: the default image shape (height, width, channels).
  """

  name: str
  description: str
  build: Callable[[Any], nn.Module]
  image: tuple[int, int, int]


NETWORKS = {
    "cnn": Network(
        "cnn", "the example's CNN (`bnjax_examples.models.CNN`): conv 3×3 (32) – norm – relu – "
        "avg-pool, conv 3×3 (64) – norm – relu – avg-pool, dense 256 – norm – relu, dense 10; "
        "3 norm layers",
        lambda norm: example_models.CNN(num_classes=CLASSES, norm=norm), (28, 28, 1)),
    "resnet": Network(
        "resnet", "a CIFAR-style ResNet (`bnjax_examples.models.ResNet`): a 3×3 conv–norm–relu "
        "stem, three stages of two residual blocks with 32/64/128 channels (projection shortcuts "
        "with their own norm); 15 norm layers",
        lambda norm: example_models.ResNet(num_classes=CLASSES, stage_sizes=(2, 2, 2),
                                           num_filters=32, norm=norm), (32, 32, 3)),
}
MODEL_NORMS = ("bnjax", "flax", NO_NORM)


def resnet(norm: str, axis_name: str | None = None, blocks: int = 2) -> nn.Module:
  """A conv-norm-relu stem, `blocks` residual blocks of two such layers, mean pool, dense."""
  make_norm = NORMS[norm]

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      def normalise(y):
        return y if make_norm is None else make_norm(not train, axis_name)(y)

      def conv(y):
        return nn.Conv(WIDTH, (3, 3), use_bias=make_norm is None)(y)

      x = jax.nn.relu(normalise(conv(x)))
      for _ in range(blocks):
        y = jax.nn.relu(normalise(conv(x)))
        y = normalise(conv(y))
        x = jax.nn.relu(x + y)
      return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))

  return Net()


def train_step(model: nn.Module, global_batch: int):
  """`(params, batch_stats, images, labels) -> (params, new_batch_stats, loss)`: one SGD step on
  the softmax cross-entropy (in float32) summed over the local batch and divided by the global
  batch size."""

  def step(params, batch_stats, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
      log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
      nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=1)
      return jnp.sum(nll) / global_batch, updates.get("batch_stats", {})

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return params, new_stats, loss

  return step


def init_variables(model: nn.Module, images) -> dict:
  """The model's variables for `images`' shape.

  Initialised in one program compiled without LLVM's expensive passes: op by op, every random
  draw would compile on its own, and fully optimised the random-bit generator takes seconds to
  compile for a program that runs once.
  """
  args = (jax.random.key(1), images)
  init = jax.jit(functools.partial(model.init, train=False))
  return programs.compile_program(init, args, fast=True)(*args)


def resnet_inputs(batch: int, image: int):
  """Random images `[batch, image, image, 3]` and integer labels `[batch]`."""
  return model_inputs(batch, (image, image, 3), "float32")


def model_inputs(batch: int, image: tuple[int, int, int], dtype: str):
  """Random N(0, 1) images `[batch, *image]` in `dtype` and integer labels `[batch]`."""
  images = jnp.asarray(cases.normal((batch,) + tuple(image), seed=0), dtype)
  labels = jnp.asarray(np.random.default_rng(1).integers(0, CLASSES, batch, np.int32))
  return images, labels


@dataclasses.dataclass
class Step:
  """One compiled training step and what it runs on.

  Attributes:
    compiled: the compiled step.
    args: ``(params, batch_stats, images, labels)``.
    module: the HLO module's name (``jit_<network>_<norm>_step``), as a profile names it.
    norm_sizes: element counts of the arrays batch norm normalises (the inputs of the network's
      norm layers): its "full-size" arrays.
  """

  compiled: Any
  args: tuple
  module: str
  norm_sizes: tuple[int, ...]


def _norm_input_sizes(model: nn.Module, variables: dict, images) -> tuple[int, ...]:
  """Element counts of the inputs of `model`'s batch-norm layers in training (shapes only)."""
  sizes = []

  def record(next_fun, args, kwargs, context):
    if (context.method_name == "__call__"
        and isinstance(context.module, (bnjax.BatchNorm, nn.BatchNorm)) and args):
      sizes.append(int(np.prod(jnp.shape(args[0]))))
    return next_fun(*args, **kwargs)

  def apply(variables, images):
    with nn.intercept_methods(record):
      return model.apply(variables, images, train=True, mutable=["batch_stats"])

  jax.eval_shape(apply, variables, images)
  return tuple(sorted(set(sizes), reverse=True))


def _cast_floats(tree, dtype: str):
  """Floating leaves of `tree` in `dtype` (a bfloat16 model keeps float32 running statistics)."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      tree)


def build_step(case: ModelCase, norm: str, *, fast: bool = False) -> Step:
  """Compiles one SGD step of `case`'s network with `norm` (``"bnjax"``, ``"flax"``, ``"none"``).

  In bfloat16 the images and parameters are bfloat16 (so the convolutions and the layers compute
  in it) and the running statistics stay float32, as both norm layers create them.
  """
  network = NETWORKS[case.network]
  image = case.image or network.image
  images, labels = model_inputs(case.batch, image, case.dtype)
  model = network.build(example_models.norm_factory(norm))
  variables = init_variables(model, images[:2].astype(jnp.float32))
  params = _cast_floats(variables["params"], case.dtype)
  batch_stats = variables.get("batch_stats", {})
  norm_model = network.build(example_models.norm_factory("bnjax"))
  sizes = _norm_input_sizes(norm_model, init_variables(norm_model, images[:2].astype(jnp.float32)),
                            images)
  step = train_step(model, case.batch)
  name = f"{case.network}_{norm}_step"

  def named_step(*args):
    return step(*args)

  named_step.__name__ = named_step.__qualname__ = name
  args = (params, batch_stats, images, labels)
  compiled = programs.compile_program(jax.jit(named_step), args, fast=fast)
  return Step(compiled, args, f"jit_{name}", sizes)


def step_analysis(step: Step) -> dict[str, Any]:
  """What XLA compiled for a step, on its cheapest path: kernels, conditionals, passes over the
  normalised arrays, bytes moved outside convolutions, and temporary memory."""
  text = step.compiled.as_text()
  path = hlo.traffic(text)
  passes = hlo.count_passes(text, step.norm_sizes, branches="min")
  return {"kernels": path.kernels, "conditionals": path.conditionals,
          "passes": passes.passes, "reads": passes.reads, "writes": passes.writes,
          "other_bytes": path.other_bytes, "matmul_bytes": path.matmul_bytes,
          "memory": hlo.memory(step.compiled)}


def in_model_ratio(times: dict[str, list[float]], subject: str, reference: str,
                   floor: str = NO_NORM, resamples: int = 2000) -> dict[str, float] | None:
  """Batch norm's in-model cost, `subject`'s over `reference`'s, from interleaved rounds.

  Each round gives ``subject - floor`` and ``reference - floor`` (same round, so slow spells of
  the machine cancel); the ratio is the median of the first over the median of the second. The
  spread is a bootstrap over rounds (resampled with replacement, a fixed seed): its 10th and 90th
  percentiles.

  Returns:
    ``{"ratio", "low", "high", "subject_ms", "reference_ms"}`` (the two in-model costs in ms), or
    None when a program was not timed or the reference adds nothing measurable.
  """
  if not all(times.get(name) for name in (subject, reference, floor)):
    return None
  s, r, f = (np.asarray(times[name]) for name in (subject, reference, floor))
  extra_s, extra_r = s - f, r - f
  if np.median(extra_r) <= 0:
    return None
  rng = np.random.default_rng(0)
  picks = rng.integers(0, len(s), (resamples, len(s)))
  top, bottom = np.median(extra_s[picks], axis=1), np.median(extra_r[picks], axis=1)
  # A resample whose reference adds nothing has no ratio; it is left out of the spread.
  ratios = (top / np.where(bottom > 0, bottom, 1.0))[bottom > 0]
  if not ratios.size:
    ratios = np.asarray([np.median(extra_s) / np.median(extra_r)])
  return {"ratio": float(np.median(extra_s) / np.median(extra_r)),
          "low": float(np.percentile(ratios, 10)), "high": float(np.percentile(ratios, 90)),
          "subject_ms": float(1e3 * np.median(extra_s)),
          "reference_ms": float(1e3 * np.median(extra_r))}


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _page_faults() -> int:
  """Minor page faults of this process so far: first touches of memory the allocator mapped."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def step_rounds(runs: dict[str, Callable[[], object]],
                rounds: int, faults: dict[str, list[int]] | None = None,
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Interleaved rounds of whole steps (each call one sample): wall and CPU seconds per step.

  `faults`, when given, receives each step's minor page faults: a step whose temporary buffers
  the allocator returns to the system between calls touches fresh pages every call.

  The process's CPU time counts what its threads ran, so other processes on a loaded machine add
  little to it (caches aside); set beside the wall clock, it tells the step's work from its
  waiting, and a program that keeps fewer threads busy shows a wall ratio above its CPU ratio.
  """
  order = list(runs)
  for run in runs.values():  # warm-up: the first calls allocate and page in.
    run()
    run()
  wall: dict[str, list[float]] = {name: [] for name in order}
  cpu: dict[str, list[float]] = {name: [] for name in order}
  for r in range(rounds if order else 0):
    shift = r % len(order)
    for name in order[shift:] + order[:shift]:
      time.sleep(timing.PAUSE_SECONDS)
      started_faults = _page_faults()
      started_cpu, started = _cpu_seconds(), time.perf_counter()
      runs[name]()
      wall[name].append(time.perf_counter() - started)
      cpu[name].append(_cpu_seconds() - started_cpu)
      if faults is not None:
        faults.setdefault(name, []).append(_page_faults() - started_faults)
  return wall, cpu


def model_case(case: ModelCase, *, fast: bool = False) -> dict:
  """Compiles, analyses and times one case with every norm of `MODEL_NORMS`; one "models" entry.

  Args:
    case: the network, batch, dtype, rounds (and image, where not the network's own).
    fast: compile without LLVM's expensive passes (a smoke run).
  """
  runs, info = {}, {}
  sizes = ()
  for norm in MODEL_NORMS:
    try:
      step = build_step(case, norm, fast=fast)
    except Exception as error:  # noqa: BLE001  (a failing program is reported, not fatal)
      info[norm] = {"error": programs.error_text(error)}
      continue
    sizes = step.norm_sizes
    info[norm] = step_analysis(step)
    runs[norm] = functools.partial(programs.call, step.compiled, step.args)
  faults: dict[str, list[int]] = {}
  times, cpu_times = step_rounds(runs, case.rounds, faults)
  summary = timing.summarise(times, {"vs_flax": "flax", "vs_none": NO_NORM})
  for norm, samples in cpu_times.items():
    summary[norm]["cpu_median_ms"] = 1e3 * float(np.median(samples))
    summary[norm]["page_faults"] = int(np.median(faults[norm]))
  for norm, entry in info.items():
    summary.setdefault(norm, {}).update(entry)
  network = NETWORKS[case.network]
  return {"network": case.network, "description": network.description, "batch": case.batch,
          "dtype": case.dtype,
          "image": list(case.image or network.image), "rounds": case.rounds,
          "norm_sizes": list(sizes), "impls": summary,
          "in_model": in_model_ratio(times, "bnjax", "flax"),
          "in_model_cpu": in_model_ratio(cpu_times, "bnjax", "flax"),
          "times": {name: list(samples) for name, samples in times.items()},
          "cpu_times": {name: list(samples) for name, samples in cpu_times.items()}}


def model_benchmark(plan_cases: tuple[ModelCase, ...], log, *, fast: bool = False) -> list[dict]:
  """Every model case of a plan: the "models" list of a run."""
  results = []
  for case in plan_cases:
    entry = model_case(case, fast=fast)
    results.append(entry)
    impls, ratio = entry["impls"], entry["in_model"]
    log(f"  {case.network:7s} batch {case.batch:4d} {case.dtype:9s} {case.rounds:3d} rounds: "
        + ", ".join(f"{norm} {impls.get(norm, {}).get('median_ms', float('nan')):.1f} ms"
                    for norm in MODEL_NORMS)
        + (f"; in-model {ratio['ratio']:.2f}× Flax" if ratio else "; in-model: not measurable")
        + (f" (CPU time {entry['in_model_cpu']['ratio']:.2f}×)" if entry["in_model_cpu"] else ""))
  return results

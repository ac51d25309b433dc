"""What is compiled and run: layer programs, their micro-benchmarks and the stack's memory.

Every JAX program is jitted, compiled and read back (`hlo.py`: full-size passes, collectives,
memory) before it is timed; a program that fails to compile is recorded with its error instead
of stopping the run, and the report lists it.
"""

from collections.abc import Callable
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import cases, hlo, names, peers, timing
from benchmarks.cases import Plan


def error_text(error: BaseException) -> str:
  return f"{type(error).__name__}: {error}".splitlines()[0]


def compile_program(jitted, args, *, fast: bool = False):
  """`jitted.lower(*args).compile()`; `fast` skips LLVM's expensive passes (same HLO)."""
  lowered = jitted.lower(*args)
  return hlo.compile_for_analysis(lowered) if fast else lowered.compile()


def compile_or_report(jitted, args, info: dict, name: str, *, fast: bool = False):
  """Compiles `jitted` for `args` and records its collectives under `info[name]`.

  Returns:
    The compiled program, or None when compiling failed (then `info[name]` holds the error).
  """
  try:
    compiled = compile_program(jitted, args, fast=fast)
  except Exception as error:  # noqa: BLE001  (a failing program is reported, not fatal)
    info[name] = {"error": error_text(error)}
    return None
  info[name] = {"collectives": hlo.count_collectives(compiled.as_text())}
  return compiled


def call(compiled, args) -> None:
  """Runs a compiled program once and waits for its results."""
  jax.block_until_ready(compiled(*args))


def forward_backward(apply: Callable) -> Callable:
  """(x, params, state, dy) -> (y, (dx, dparams), new_state): one layer's training-step work."""

  def step(x, params, state, dy):
    # `state` is a primal too (its cotangent is dropped, so XLA removes it): closing over it would
    # hand flax.nnx variables from the outer trace, which nnx refuses to update.
    y, vjp, new_state = jax.vjp(apply, x, params, state, has_aux=True)
    dx, dparams, _ = vjp(dy)
    return y, (dx, dparams), new_state

  return step


def layer_program(impl: peers.Implementation, layer: peers.JaxLayer, mode: str,
                  shape: tuple[int, ...]) -> Callable:
  """The program `impl` runs in `mode`: its forward, or forward+backward (hand-written or vjp)."""
  if mode == names.FORWARD:
    return layer.apply
  if impl.forward_backward is not None:
    return impl.forward_backward(shape)
  return forward_backward(layer.apply)


def pass_analysis(compiled, full_size: int) -> dict[str, Any]:
  """Full-size passes of the cheapest and the dearest `lax.cond` branch, and the memory."""
  text = compiled.as_text()
  dearest = hlo.count_passes(text, full_size)
  cheapest = hlo.count_passes(text, full_size, branches="min")
  return {"passes": cheapest.passes, "reads": cheapest.reads, "writes": cheapest.writes,
          "worst": [dearest.passes, dearest.reads, dearest.writes],
          "memory": hlo.memory(compiled)}


def available(impl: peers.Implementation, missing: dict[str, str | None]) -> bool:
  """Whether `impl` needs no optional library, or one that was tried and imported (`missing`:
  `machine.importable()`, which names every library the plan tried)."""
  return impl.module is None or (impl.module in missing and missing[impl.module] is None)


def micro_case(comparison: peers.Comparison, plan: Plan, shape, dtype_name: str,
               missing: dict[str, str | None]) -> list[dict]:
  """Forward and forward+backward of every implementation of `comparison` on one case."""
  impls = [impl for impl in comparison.implementations
           if plan.includes(impl.name) and available(impl, missing)]
  layers = {impl.name: impl.build(shape, dtype_name) for impl in impls if impl.build}
  x = jnp.asarray(cases.normal(shape, seed=0), dtype_name)
  dy = jnp.asarray(cases.normal(shape, seed=1), dtype_name)
  entries = []
  for mode in comparison.modes:
    runs, analysis = {}, {}
    for impl in impls:  # JAX first, then eager: eager rows need no compilation.
      if impl.build is None:
        continue
      layer = layers[impl.name]
      args = (x, layer.params, layer.state) + ((dy,) if mode == names.FORWARD_BACKWARD else ())
      try:
        compiled = compile_program(jax.jit(layer_program(impl, layer, mode, shape)), args,
                                   fast=plan.fast_compile)
      except Exception as error:  # noqa: BLE001  (a peer that fails is reported, not fatal)
        analysis[impl.name] = {"error": error_text(error)}
        continue
      analysis[impl.name] = pass_analysis(compiled, x.size)
      runs[impl.name] = functools.partial(call, compiled, args)
    for impl in impls:
      if impl.eager is not None:
        run = impl.eager(shape, dtype_name, mode)
        if run is not None:
          runs[impl.name] = run
    rounds = plan.rounds_for(shape)
    summary = timing.summarise(timing.round_robin(runs, rounds), comparison.references)
    for name, entry in analysis.items():
      summary.setdefault(name, {}).update(entry)
    entries.append({"comparison": comparison.name, "shape": list(shape), "dtype": dtype_name,
                    "mode": mode, "rounds": rounds, "impls": summary})
  return entries


def micro_benchmarks(plan: Plan, missing: dict[str, str | None], log,
                     comparisons: tuple[peers.Comparison, ...] = peers.COMPARISONS) -> list[dict]:
  """One entry per (comparison, shape, dtype, mode) of `plan`: the "micro" list of a run."""
  results = []
  for comparison in comparisons:
    for shape in comparison.shapes_for(plan):
      for dtype_name in comparison.dtypes_for(plan):
        started = time.perf_counter()
        for entry in micro_case(comparison, plan, shape, dtype_name, missing):
          results.append(entry)
          subject = entry["impls"].get(comparison.subject, {})
          title = f"{comparison.heading}: " if comparison.heading else ""
          key = comparison.shown[0]
          log(f"  {title}{entry['mode']:17s} {str(shape):20s} {dtype_name:9s} "
              f"{entry['rounds']:3d} rounds {time.perf_counter() - started:6.1f}s  "
              f"{comparison.subject} {subject.get('median_ms', float('nan')):.2f} ms, "
              f"{subject.get(key, float('nan')):.2f}x ({key})")
  return results


def stack_memory(shape, layers: int, only: tuple[str, ...] | None,
                 missing: dict[str, str | None]) -> dict:
  """Temporary memory of a stack of `layers` (batch norm, relu) layers, forward+backward.

  Args:
    shape: the activation's shape (float32).
    layers: the depth of the stack.
    only: the implementations to measure (None: all of `peers.STACK_IMPLEMENTATIONS`); the
      autodiff reference is always measured.
    missing: `machine.importable()`, to leave out peers that do not import.
  """
  x = jnp.zeros(shape, jnp.float32)
  out = {"shape": list(shape), "layers": layers, "full_size_bytes": x.size * 4,
         "impls": {}, "errors": {}}
  for impl in peers.STACK_IMPLEMENTATIONS:
    if not available(impl, missing) or (only and impl.name not in only
                                        and impl.name != names.AUTODIFF_REFERENCE):
      continue
    layer = impl.build(shape, "float32")

    def stack(x, params, state, apply=layer.apply):
      new = []
      for p, s in zip(params, state):
        y, s = apply(x, p, s)
        x = jax.nn.relu(y)
        new.append(s)
      return x, new

    args = (x, [layer.params] * layers, [layer.state] * layers, x)
    try:
      # Compiled for analysis in every plan: only the buffer assignment is read.
      compiled = hlo.compile_for_analysis(jax.jit(forward_backward(stack)).lower(*args))
    except Exception as error:  # noqa: BLE001  (reported in the table, not fatal)
      out["errors"][impl.name] = error_text(error)
      continue
    out["impls"][impl.name] = hlo.memory(compiled)
  return out


# ============================================================================ whitening stages


def _whitening_stage_programs(shape, group, mode):
  """{stage: (program, arguments)} for one case and mode: the layer's work, stage by stage.

  * covariance: the rows shifted by the data pivot, transposed with the group axis first, their
    sums and cross products (the same work in both modes: its backward is part of the products);
  * matrix function: ``W`` from the [G, d, d] covariances, and in forward+backward the `jax.vjp`
    the closed-form backward applies to it;
  * product: ``y = scale · W rows + bias`` back in row order, and in forward+backward the
    backward's work over the rows: ``dy`` transposed, ``sum(dy rows^T)``, ``W^T (scale dy)``,
    ``P rows`` and their sum transposed back;
  * the whole layer (IterNorm), for scale.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bnjax import stats, whitening  # pylint: disable=import-outside-toplevel
  highest = jax.lax.Precision.HIGHEST
  channels = shape[-1]
  layout = whitening.group_layout(channels, group)
  rows = int(np.prod(shape[:-1]))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((rows, layout.groups, layout.size), np.float32))
  dy = jnp.asarray(rng.standard_normal((rows, layout.groups, layout.size), np.float32))
  rows_T = jnp.transpose(x, (1, 0, 2))
  a = rng.standard_normal((layout.groups, layout.size, layout.size)).astype(np.float32)
  covariance = jnp.asarray(np.eye(layout.size) + np.einsum("gij,gkj->gik", a, a) / layout.size,
                           jnp.float32)
  w = jnp.asarray(np.linalg.inv(np.linalg.cholesky(np.asarray(covariance))), jnp.float32)
  scale = jnp.ones((layout.groups, layout.size))
  backward = mode == names.FORWARD_BACKWARD

  def covariance_stage(x):
    moments, shifted = stats.local_covariance(x, None)
    return moments.cross, shifted

  def matrix_stage(method):
    def matrix(c, w_bar):
      fn = lambda c: whitening.whitening_matrix(c, method=method, epsilon=names.EPSILON)
      if not backward:
        return fn(c)
      out, vjp = jax.vjp(fn, c)
      return out, vjp(w_bar)
    return matrix

  def product_stage(w, rows_T, scale, dy):
    z = jnp.einsum("gij,gmj->gmi", w, rows_T, precision=highest)
    y = jnp.transpose(z, (1, 0, 2)) * scale[None] + scale[None]
    if not backward:
      return y
    dy_T = jnp.transpose(dy, (1, 0, 2))
    cross = jnp.einsum("gmi,gmj->gij", dy_T, rows_T, precision=highest)
    through_output = jnp.einsum("gij,gmi->gmj", w, dy_T, precision=highest)
    through_covariance = jnp.einsum("gij,gmj->gmi", w, rows_T, precision=highest)
    dx = jnp.transpose(through_output + through_covariance, (1, 0, 2))
    return y, cross, jnp.sum(dy, axis=0), dx

  params, state = whitening.init_whitening(channels, group_size=group)

  def layer(x, params, dy):
    fn = lambda x, params: whitening.whitening_batch_norm(
        params, state, x.reshape(rows, channels), True, group_size=group, method="iterative")[0]
    if not backward:
      return fn(x, params)
    y, vjp = jax.vjp(fn, x, params)
    return y, vjp(dy.reshape(rows, channels))

  return {
      "covariance": (covariance_stage, (x,)),
      "matrix function (iterative)": (matrix_stage("iterative"), (covariance, w)),
      "matrix function (zca)": (matrix_stage("zca"), (covariance, w)),
      "product": (product_stage, (w, rows_T, scale, dy)),
      "whole layer (iterative)": (layer, (x, params, dy)),
  }


def whitening_stages(plan: Plan, log) -> list[dict]:
  """Where the whitening layer's time goes: each stage compiled and timed on its own.

  Forward and forward+backward, interleaved in rounds with the whole layer, for every shape of
  the whitening comparison and every group size (see `_whitening_stage_programs`).
  """
  results = []
  for shape in peers.WHITENING.shapes_for(plan):
    for group in names.WHITENING_GROUPS:
      for mode in names.MODES:
        runs = {}
        for name, (fn, args) in _whitening_stage_programs(shape, group, mode).items():
          compiled = compile_program(jax.jit(fn), args, fast=plan.fast_compile)
          runs[name] = functools.partial(call, compiled, args)
        rounds = plan.rounds_for(shape)
        summary = timing.summarise(timing.round_robin(runs, rounds), {})
        results.append({"shape": list(shape), "group": group, "mode": mode, "rounds": rounds,
                        "stages": summary})
        log(f"  whitening stages {mode:17s} {str(shape):20s} g{group:<3d} " + ", ".join(
            f"{k} {v['median_ms']:.1f} ms" for k, v in summary.items()))
  return results

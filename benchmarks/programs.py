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
  for mode in names.MODES:
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


def micro_benchmarks(plan: Plan, missing: dict[str, str | None], log) -> list[dict]:
  """One entry per (comparison, shape, dtype, mode) of `plan`: the "micro" list of a run."""
  results = []
  for comparison in peers.COMPARISONS:
    for shape in plan.shapes:
      for dtype_name in plan.dtypes:
        started = time.perf_counter()
        for entry in micro_case(comparison, plan, shape, dtype_name, missing):
          results.append(entry)
          subject = entry["impls"].get(comparison.subject, {})
          title = f"{comparison.heading}: " if comparison.heading else ""
          log(f"  {title}{entry['mode']:17s} {str(shape):20s} {dtype_name:9s} "
              f"{entry['rounds']:3d} rounds {time.perf_counter() - started:6.1f}s  "
              f"{comparison.subject} {subject.get('median_ms', float('nan')):.2f} ms, "
              f"{subject.get(names.VS_FLAX, float('nan')):.2f}x flax")
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

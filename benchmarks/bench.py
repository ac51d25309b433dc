"""Benchmark: bnjax against Flax, Haiku, Equinox, PyTorch and a bandwidth floor, on CPU.

  make bench                                        # full run, both allocators (~15 min, 2 cores)
  .venv/bin/python benchmarks/bench.py --quick      # one small shape, every peer (~2 min)
  .venv/bin/python benchmarks/bench.py --smoke      # tiny shape, bnjax and Flax only (< 1 min)
  .venv/bin/python benchmarks/bench.py --allocator glibc --out /tmp/RESULTS.md
  .venv/bin/python benchmarks/bench.py --comparison whitening --out benchmarks/RESULTS-whitening.md

Writes ``--out`` (default benchmarks/RESULTS.md; RESULTS-quick.md with --quick; a new temporary
directory with --smoke), a chart and the raw measurements next to it (same name, .png and .json);
``--render RESULTS.json`` redraws the report from saved measurements.

What is measured, all in training mode and jitted:

* forward ``(y, new_state) = bn(x)`` and forward+backward ``(y, dx, dscale, dbias, new_state)``
  for a given dy (one layer's work in a training step) for every implementation, shape and dtype
  (`peers.py`, `cases.py`, `programs.py`);
* the full-size passes XLA compiled (`hlo.py`) and its memory analysis;
* the temporary memory of a 6-layer stack (what a layer keeps for its backward);
* a small ResNet-style training step with bnjax, Flax or no normalisation (`models.py`);
* 1, 2 and 8 simulated devices (one subprocess each, since the device count is fixed when JAX
  starts), the batch sharded with `shard_map` and statistics combined over the mesh axis
  (`devices.py`).

Timing interleaves every implementation of a case in rotated rounds (`timing.py`). The whole
suite runs once per allocator (glibc, and tcmalloc through LD_PRELOAD when the Debian package
libtcmalloc-minimal4 is installed), each in its own subprocess; `report.py` writes the Markdown
and the chart from their JSON.
"""

import os
import sys

# Run as a script, Python puts benchmarks/ itself first on sys.path, where its modules (cases,
# timing, models...) would shadow any top-level module of the same name. The repository root goes
# first instead, so that `benchmarks`, `bnjax` and `examples` are this checkout's: dm-haiku installs
# a top-level `examples` package into site-packages, which must not win.
_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
sys.path[:] = [REPO] + [p for p in sys.path if os.path.abspath(p or os.curdir) not in (REPO, _HERE)]

# pylint: disable=wrong-import-position  (after the sys.path set-up above)
import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from benchmarks import cases, machine, names  # noqa: E402

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def log(message: str) -> None:
  print(message, flush=True)


def _run_child(arguments: list[str], env: dict[str, str]) -> int:
  """Runs this script with `arguments` in a subprocess, echoing its output as it comes."""
  with subprocess.Popen([sys.executable, os.path.abspath(__file__)] + arguments, env=env,
                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as child:
    for line in child.stdout:
      log("  | " + line.rstrip("\n"))
  return child.returncode


def _xla_flags(flags: str, device_count: int | None) -> str:
  """`flags` with the simulated CPU device count set to `device_count` (None: XLA's default)."""
  kept = [flag for flag in flags.split() if not flag.startswith(DEVICE_COUNT_FLAG)]
  if device_count is not None:
    kept.append(f"{DEVICE_COUNT_FLAG}={device_count}")
  return " ".join(kept)


def _plan_flags(plan: cases.Plan) -> list[str]:
  return {names.FULL: [], names.QUICK: ["--quick"], names.SMOKE: ["--smoke"]}[plan.name]


def _optional_modules(plan: cases.Plan) -> tuple[str, ...]:
  """The optional peer libraries `plan` measures (a smoke run does not import the others)."""
  from benchmarks import peers  # pylint: disable=import-outside-toplevel  (imports JAX)
  return tuple(module for module in names.OPTIONAL_MODULES
               if any(plan.includes(impl.name) and impl.module == module
                      for comparison in peers.COMPARISONS for impl in comparison.implementations))


# ============================================================================ workers


def worker_main(args, plan: cases.Plan) -> None:
  """Runs the whole suite under the allocator this process was started with; writes JSON."""
  from benchmarks import programs, models, peers  # pylint: disable=import-outside-toplevel
  optional = _optional_modules(plan)
  cores = machine.cores()
  missing = machine.importable(optional)
  result = {
      "allocator": machine.allocator_in_use(), "expected_allocator": args.allocator,
      "machine": machine.describe(),
      "versions": machine.versions([m for m in machine.VERSIONED_MODULES
                                    if m not in names.OPTIONAL_MODULES or m in optional]),
      "peers": missing,
      "torch_threads": machine.torch_threads(cores) if "torch" in optional else None,
      "plan": plan.name,
  }
  result["load_before"] = os.getloadavg()
  result["revision"], result["bnjax_digest"] = machine.git_revision(), machine.source_digest()
  log(f"allocator in use: {result['allocator']}; torch threads: {result['torch_threads']}; "
      f"load average {result['load_before'][0]:.1f}")
  started = time.perf_counter()
  if args.float32_only:
    plan = dataclasses.replace(plan, dtypes=("float32",))
  comparisons = (peers.COMPARISONS if args.comparison is None
                 else (peers.comparison(args.comparison),))
  result["micro"] = programs.micro_benchmarks(plan, missing, log, comparisons)
  log(f"micro-benchmarks: {time.perf_counter() - started:.0f}s")
  if peers.WHITENING in comparisons:
    result["whitening_stages"] = programs.whitening_stages(plan, log)
    log(f"whitening stages: {time.perf_counter() - started:.0f}s")
  if not args.only_micro and args.comparison is None:
    result["stack_memory"] = [
        programs.stack_memory(shape, plan.stack_layers, plan.stack_implementations, missing)
        for shape in plan.stack_shapes]
    log(f"stack memory done: {time.perf_counter() - started:.0f}s")
    result["resnet"] = models.resnet_benchmark(plan.resnet, fast=plan.fast_compile)
    log(f"ResNet step done: {time.perf_counter() - started:.0f}s")
    result["devices"] = _devices_runs(plan)
    log(f"devices done: {time.perf_counter() - started:.0f}s")
  result["seconds"] = time.perf_counter() - started
  result["load_after"] = os.getloadavg()
  result["bnjax_digest_after"] = machine.source_digest()
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)


def _devices_runs(plan: cases.Plan) -> list[dict]:
  """One subprocess per simulated device count; their "devices" entries."""
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for count in plan.device_counts:
      path = os.path.join(tmp, f"devices{count}.json")
      env = dict(os.environ, XLA_FLAGS=_xla_flags(os.environ.get("XLA_FLAGS", ""), count))
      if _run_child(["--worker", "devices", "--json", path] + _plan_flags(plan), env) == 0:
        with open(path) as f:
          runs.append(json.load(f))
      else:
        runs.append({"devices": count, "error": "the subprocess failed; see log"})
  return runs


def worker_devices(args, plan: cases.Plan) -> None:
  from benchmarks import devices  # pylint: disable=import-outside-toplevel  (imports JAX)
  result = devices.devices_benchmark(plan.devices, fast=plan.fast_compile)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  log(f"{result['devices']} devices: " + ", ".join(
      f"{k} {v['median_ms']:.1f} ms" if "median_ms" in v else f"{k} {v.get('error')}"
      for k, v in result["impls"].items()))


# ============================================================================ the command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true",
                    help="one small shape, every peer, few rounds (about 2 min)")
  size.add_argument("--smoke", action="store_true",
                    help="a tiny shape, 2 rounds, bnjax, Flax and the floor only, glibc only, "
                         "1 and 2 devices: checks every part of the pipeline (< 1 min); writes to "
                         "a new temporary directory unless --out is given")
  parser.add_argument("--out", default=None,
                      help="the Markdown report (default benchmarks/RESULTS.md, or "
                           "benchmarks/RESULTS-quick.md with --quick); the chart (.png) and the "
                           "raw measurements (.json) go next to it")
  parser.add_argument("--render", metavar="JSON",
                      help="only rewrite the report and chart from a saved .json")
  parser.add_argument("--allocator", choices=("both", "glibc", "tcmalloc"), default=None,
                      help="the allocators to measure (default: both; glibc with --smoke)")
  parser.add_argument("--comparison", metavar="NAME", default=None,
                      help="run only this comparison's micro-benchmarks (e.g. 'whitening', with "
                           "its breakdown by stage), without the stack, ResNet and devices parts")
  parser.add_argument("--worker", choices=("main", "devices"), help=argparse.SUPPRESS)
  parser.add_argument("--json", help=argparse.SUPPRESS)
  parser.add_argument("--only-micro", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--float32-only", action="store_true", help=argparse.SUPPRESS)
  return parser


def _default_out(plan: cases.Plan) -> str:
  if plan.name == names.SMOKE:
    return os.path.join(tempfile.mkdtemp(prefix="bnjax-bench-smoke-"), "RESULTS.md")
  name = "RESULTS-quick.md" if plan.name == names.QUICK else "RESULTS.md"
  return os.path.join(REPO, "benchmarks", name)


def _child_env(tmp: str) -> dict[str, str]:
  """The environment of a main worker: one CPU device, passive OpenMP waits, a shared cache."""
  env = dict(os.environ, XLA_FLAGS=_xla_flags(os.environ.get("XLA_FLAGS", ""), None))
  # PyTorch's OpenMP threads spin at barriers by default; on a 2-core machine shared with other
  # processes a descheduled thread then stalls the other for a time slice, which made torch
  # 10-100x slower and erratic. Sleeping waits keep it stable (override by setting it).
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  # Workers share a persistent compilation cache: the second allocator's run loads the first
  # one's executables (the same compiled code) instead of compiling everything again.
  env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax-cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _scaling(plan: cases.Plan, notes: list[str]) -> list[dict]:
  """The compile-only cross-device records, one subprocess per device count."""
  from benchmarks import scaling  # pylint: disable=import-outside-toplevel

  records = []
  for devices in plan.scaling_device_counts:
    log(f"== scaling: {devices} simulated devices (compile-only)")
    try:
      records.append(scaling.measure(devices, plan.scaling_parts))
    except (RuntimeError, OSError, ValueError) as e:  # reported, not fatal: the rest still counts.
      notes.append(f"the scaling measurement at {devices} devices failed: {str(e)[-300:]}")
  return records


def run_all(args, plan: cases.Plan, argv: list[str]) -> int:
  """Runs one worker per allocator, then writes the report, chart and JSON."""
  started = time.perf_counter()
  allocator = args.allocator or ("glibc" if plan.name == names.SMOKE else "both")
  allocators = ["glibc", "tcmalloc"] if allocator == "both" else [allocator]
  library = machine.tcmalloc_path()
  runs, notes = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for allocator in allocators:
      env = _child_env(tmp)
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
      if plan.name != names.FULL and runs:  # a short run exercises the rest and bf16 once.
        arguments += ["--only-micro", "--float32-only"]
      if args.comparison is not None:
        arguments += ["--comparison", args.comparison]
      if _run_child(arguments + _plan_flags(plan), env) != 0:
        notes.append(f"the {allocator} run failed; see the console log.")
        continue
      with open(path) as f:
        runs.append(json.load(f))
  if not runs:
    log("no run succeeded")
    return 1
  scaling_records = _scaling(plan, notes) if args.comparison is None else []
  meta = {"notes": notes, "revision": machine.git_revision(),
          "seconds": time.perf_counter() - started,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": " ".join(["benchmarks/bench.py"] + argv)}
  stem = os.path.splitext(args.out)[0]
  with open(stem + ".json", "w") as f:
    json.dump({"meta": meta, "runs": runs, "scaling": scaling_records}, f, indent=1)
  from benchmarks import report  # pylint: disable=import-outside-toplevel  (imports JAX)
  report.write(args.out, stem + ".png", runs, scaling=scaling_records, **meta)
  log(f"wrote {args.out}, {stem}.png and {stem}.json in {time.perf_counter() - started:.0f}s")
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  plan = cases.PLANS[names.SMOKE if args.smoke else names.QUICK if args.quick else names.FULL]
  if args.worker == "main":
    worker_main(args, plan)
    return 0
  if args.worker == "devices":
    worker_devices(args, plan)
    return 0
  args.out = os.path.abspath(args.out or _default_out(plan))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  if args.render:
    from benchmarks import report  # pylint: disable=import-outside-toplevel  (imports JAX)
    with open(args.render) as f:
      saved = json.load(f)
    stem = os.path.splitext(args.out)[0]
    report.write(args.out, stem + ".png", saved["runs"], scaling=saved.get("scaling"),
                 **saved["meta"])
    log(f"wrote {args.out} and {stem}.png from {args.render}")
    return 0
  return run_all(args, plan, argv)


if __name__ == "__main__":
  sys.exit(main())

"""Where a training step's time goes: a per-kernel profile of the compiled step, per normalisation.

  PYTHONPATH=. python benchmarks/profile_step.py                         # ResNet, batch 64, float32
  PYTHONPATH=. python benchmarks/profile_step.py --network cnn --batch 128 --dtype bfloat16
  PYTHONPATH=. python benchmarks/profile_step.py --cores all --rounds 20 --out /tmp/profile.md

`benchmarks/PROFILE.md` (the ResNet) and `benchmarks/PROFILE_CNN.md` (``--network cnn``) are
reports of this script, with ``--out``.

The same SGD step as the model-level benchmark (`models.build_step`) is compiled with bnjax's
batch norm, Flax's and none. Each round runs each program once under `jax.profiler` (the order
rotated every round), and the XLA:CPU thunk events of its HLO module give every kernel's start and
end. Every kernel is named in the compiled HLO (`hlo.list_kernels`), whose JAX name stack says
which layer each fused op came from, so each kernel is put in one category:

* convolution: a convolution or dot (XLA:CPU's YNNPACK fusions). They are byte-identical in
  the three programs (checked below), so their time differs only by noise;
* norm statistics: a reduction that belongs to a batch-norm layer (sums of x, x², dy, dy·x);
* norm elementwise: other full-size kernels of a batch-norm layer (normalise, dx), fused with
  whatever XLA put with them (relu, residual adds);
* transposed copy: a layout change, the copy each convolution's weight gradient reads its
  input in; XLA fuses into it whatever computes that input (here the norm's output);
* other: per-channel math, the pooling, the loss, the SGD update.

Two figures per kernel: its *minimum* time over the rounds, robust to a loaded machine (other
processes only ever add time), and the median of its *fair share* of the step (each instant of
the step divided among the kernels running then), which adds up to the step's duration. By
default the process is pinned to one core (``--cores 1``), so no two kernels overlap and each
kernel's time is its own; ``--cores all`` profiles the step as it runs, two kernels at a time.

Batch norm's in-model cost is each program's kernel time minus the program without
normalisation, and the ratio bnjax ÷ Flax of that: by the sum of minima over every kernel, and
over the kernels other than convolutions (identical, so their difference is noise).
"""

import os
import sys

# Run as a script: the repository root first on sys.path (see bench.py), and the core count
# fixed before JAX starts, since XLA:CPU sizes its thread pool from the affinity mask.
_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
sys.path[:] = [REPO] + [p for p in sys.path if os.path.abspath(p or os.curdir) not in (REPO, _HERE)]

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

CONVOLUTION = "convolution"
STATISTICS = "norm statistics"
ELEMENTWISE = "norm elementwise"
TRANSPOSE = "transposed copy"
OTHER = "other"
CATEGORIES = (CONVOLUTION, STATISTICS, ELEMENTWISE, TRANSPOSE, OTHER)
# A JAX name-stack segment naming a normalisation layer: linen's auto-names (BatchNorm_0) and the
# examples' explicit ones (stem_norm, shortcut_norm).
_NORM_SEGMENT = re.compile(r"^(BatchNorm_\d+|\w+_norm)$")
_CONTROL = frozenset({"conditional", "while", "call"})


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--network", default="resnet", help="a key of models.NETWORKS")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--image", default=None,
                      help="H,W,C instead of the network's own image shape")
  parser.add_argument("--rounds", type=int, default=15, help="profiled steps per program")
  parser.add_argument("--plain-rounds", type=int, default=10,
                      help="interleaved rounds without the profiler, timed by wall and CPU clock")
  parser.add_argument("--cores", default="1",
                      help="cores to run on: a number (pinned to the last ones allowed) or 'all'")
  parser.add_argument("--layer", default=None,
                      help="the norm layer whose kernels are listed one by one (default: the one "
                           "where bnjax spends most)")
  parser.add_argument("--out", default=None, help="also write the Markdown report here")
  parser.add_argument("--json", default=None, help="write the per-kernel measurements here")
  return parser


def _pin(cores: str) -> str:
  """Restricts this process to `cores` of the allowed CPUs; returns a description."""
  allowed = sorted(os.sched_getaffinity(0))
  if cores == "all":
    return f"all {len(allowed)} cores"
  count = int(cores)
  if not 0 < count <= len(allowed):
    raise SystemExit(f"--cores must be 'all' or 1..{len(allowed)}; got {cores!r}")
  os.sched_setaffinity(0, allowed[-count:])
  return f"{count} of {len(allowed)} cores (pinned to CPU {', '.join(map(str, allowed[-count:]))})"


# ============================================================================ kernels


@dataclasses.dataclass
class Classified:
  """A kernel of a step with its category, the norm layers it belongs to and its direction."""

  kernel: object  # hlo.Kernel
  category: str
  layers: tuple[str, ...]  # e.g. ("ResidualBlock_0/BatchNorm_1",); () outside norm layers.
  phase: str  # "forward", "backward" or "" (no name stack: copies XLA added).


def _layers(op_name: str) -> str | None:
  """The norm layer in a JAX name stack, as ``Block/BatchNorm_0`` (transforms removed)."""
  segments = op_name.split("/")
  for i, segment in enumerate(segments):
    if _NORM_SEGMENT.match(segment):
      path = [s for s in segments[1:i + 1] if "(" not in s]
      return "/".join(path)
  return None


def classify(kernel, norm_sizes: tuple[int, ...]) -> Classified:
  """The category, layers and direction of one `hlo.Kernel`."""
  layers = tuple(sorted({layer for name in kernel.op_names
                         for layer in [_layers(name)] if layer}))
  phase = ("backward" if any("transpose(" in name for name in kernel.op_names)
           else "forward" if kernel.op_names else "")
  smallest = min(norm_sizes) if norm_sizes else 0
  if kernel.matmul:
    category = CONVOLUTION
  elif "transpose" in kernel.opcodes or kernel.opcode == "copy" or (
      "copy" in kernel.opcodes and not layers):
    category = TRANSPOSE
  elif layers and ("reduce" in kernel.opcodes or "reduce-window" in kernel.opcodes):
    category = STATISTICS
  elif layers and kernel.write_bytes >= 2 * smallest:  # a bfloat16 array counts too.
    category = ELEMENTWISE
  else:
    category = OTHER
  return Classified(kernel, category, layers, phase)


def _signature(kernel) -> str:
  """What a convolution kernel computes, independent of its name."""
  return f"{kernel.opcodes}:{kernel.read_bytes}:{kernel.write_bytes}"


_PARTITIONS_RE = re.compile(r'"outer_dimension_partitions":\["(\d+)"')
THREADING = ("parallel loop", "YNNPACK", "serial")


def threading_classes(hlo_text: str, kernels: dict[str, Classified]) -> dict[str, tuple[int, int]]:
  """Non-convolution kernels on the cheapest path by how XLA:CPU runs them: {class: (kernels,
  bytes moved)}. "parallel loop": a loop fusion split into outer-dimension partitions that run on
  several threads; "YNNPACK": a fusion handed to YNNPACK (XLA:CPU's reductions); "serial": every
  other kernel, run on one thread (per-channel math, small copies)."""
  from benchmarks import hlo  # pylint: disable=import-outside-toplevel
  module = hlo.parse(hlo_text)
  attributes = {inst.name: inst.attributes for computation in module.computations.values()
                for inst in computation.instructions}
  totals = {name: [0, 0] for name in THREADING}
  for kernel in hlo.list_kernels(hlo_text, branches="min"):
    if kernel.name in kernels and kernels[kernel.name].category == CONVOLUTION:
      continue
    text = attributes.get(kernel.name, "")
    found = _PARTITIONS_RE.search(text)
    kind = ("YNNPACK" if "__ynn_fusion" in text
            else "parallel loop" if found and int(found.group(1)) > 1 else "serial")
    totals[kind][0] += 1
    totals[kind][1] += kernel.read_bytes + kernel.write_bytes
  return {name: (count, moved) for name, (count, moved) in totals.items()}


# ============================================================================ profiling


@dataclasses.dataclass
class Round:
  """One profiled execution of a step."""

  wall_ms: float  # time.perf_counter around the call.
  span_ms: float  # first kernel start to last kernel end.
  idle_ms: float  # time within the span when no kernel ran.
  duration_ms: dict[str, float]  # per kernel, summed over its events.
  share_ms: dict[str, float]  # per kernel, its fair share of the span.


def _events(directory: str, module: str) -> list[tuple[str, int, int]]:
  """(kernel, start ns, end ns) of every XLA:CPU thunk event of `module` in a trace."""
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  found = []
  for path in glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True):
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          if stats.get("hlo_module") == module and "hlo_op" in stats:
            found.append((stats["hlo_op"], event.start_ns, event.end_ns))
  return found


def _fair_share(events: list[tuple[str, int, int]]) -> tuple[dict[str, float], float, float]:
  """Each kernel's share of the span (time divided equally among the kernels running), the idle
  time and the span, in ms."""
  if not events:
    return {}, 0.0, 0.0
  bounds = sorted([(start, 1, i) for i, (_, start, _) in enumerate(events)]
                  + [(end, -1, i) for i, (_, _, end) in enumerate(events)])
  share: dict[str, float] = collections.defaultdict(float)
  active: set[int] = set()
  idle, last = 0.0, bounds[0][0]
  for point, kind, index in bounds:
    if point > last:
      if active:
        each = (point - last) / len(active) / 1e6
        for j in active:
          share[events[j][0]] += each
      else:
        idle += (point - last) / 1e6
    last = point
    if kind > 0:
      active.add(index)
    else:
      active.discard(index)
  return dict(share), idle, (bounds[-1][0] - bounds[0][0]) / 1e6


def profile_once(step, leaves: set[str]) -> Round:
  """Runs `step` once under the profiler; its kernels' times (only `leaves`: no control flow,
  whose events contain the kernels of the branch they ran)."""
  import jax  # pylint: disable=import-outside-toplevel
  directory = tempfile.mkdtemp(prefix="bnjax-profile-")
  try:
    with jax.profiler.trace(directory):
      started = time.perf_counter()
      jax.block_until_ready(step.compiled(*step.args))
      wall = time.perf_counter() - started
    events = [e for e in _events(directory, step.module) if e[0] in leaves]
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  duration: dict[str, float] = collections.defaultdict(float)
  for name, start, end in events:
    duration[name] += (end - start) / 1e6
  share, idle, span = _fair_share(events)
  return Round(1e3 * wall, span, idle, dict(duration), share)


def profile(steps: dict, kernels: dict, rounds: int, log) -> dict[str, list[Round]]:
  """`rounds` interleaved rounds, each running every step once under the profiler."""
  import jax  # pylint: disable=import-outside-toplevel
  names = list(steps)
  for name in names:  # warm-up: the first call allocates and pages in.
    jax.block_until_ready(steps[name].compiled(*steps[name].args))
  leaves = {name: {k for k, c in kernels[name].items() if c.kernel.opcode not in _CONTROL}
            for name in names}
  results: dict[str, list[Round]] = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      results[name].append(profile_once(steps[name], leaves[name]))
    log(f"  round {r + 1}/{rounds}: " + ", ".join(
        f"{name} {results[name][-1].wall_ms:.0f} ms" for name in names))
  return results


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def plain_rounds(steps: dict, rounds: int) -> dict[str, list[tuple[float, float, int]]]:
  """`rounds` interleaved rounds without the profiler: (wall s, CPU s, minor page faults) of each
  step.

  The process's CPU time counts only the time its threads ran, so other processes on a loaded
  machine add little to it (caches aside): on one pinned core, it is the step's own work.
  """
  import jax  # pylint: disable=import-outside-toplevel
  names = list(steps)
  results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      cpu, wall = _cpu_seconds(), time.perf_counter()
      jax.block_until_ready(steps[name].compiled(*steps[name].args))
      results[name].append((time.perf_counter() - wall, _cpu_seconds() - cpu,
                            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
  return results


# ============================================================================ summaries


def _min_times(rounds: list[Round]) -> dict[str, float]:
  """Each kernel's minimum time over the rounds (0 for a kernel that never ran: an untaken
  branch)."""
  names = set().union(*(r.duration_ms for r in rounds))
  return {k: min(r.duration_ms.get(k, 0.0) for r in rounds) for k in names}


def _median_shares(rounds: list[Round]) -> dict[str, float]:
  names = set().union(*(r.share_ms for r in rounds))
  return {k: statistics.median(r.share_ms.get(k, 0.0) for r in rounds) for k in names}


def by_category(times: dict[str, float], kernels: dict[str, Classified]) -> dict[str, float]:
  totals = dict.fromkeys(CATEGORIES, 0.0)
  for name, value in times.items():
    if name in kernels:
      totals[kernels[name].category] += value
  return totals


def _ratio(top: float, bottom: float) -> str:
  return f"{top / bottom:.2f}" if bottom > 0 else "n/a"


def report(setup: dict, steps: dict, kernels: dict, results: dict, detail: str | None) -> str:
  """The Markdown report of a profile."""
  from benchmarks import models  # pylint: disable=import-outside-toplevel
  names = list(steps)
  lines = [f"# Where the {setup['network']} training step's time goes", "",
           f"{setup['description']}; batch {setup['batch']} of {setup['image']}, {setup['dtype']}; "
           f"{setup['rounds']} profiled steps per program, interleaved; {setup['cores']}; "
           f"jax {setup['jax']}; load average {setup['load_before']:.1f} → "
           f"{setup['load_after']:.1f} on {setup['cpus']} CPUs.", ""]
  minima = {n: _min_times(results[n]) for n in names}
  shares = {n: _median_shares(results[n]) for n in names}

  lines += ["## The programs", "",
            "| program | step median ms | kernel time (sum of minima) ms | idle ms | kernels | "
            "conditionals | passes over the normalised arrays | bytes outside convolutions MiB "
            "| temp MiB |", "|---|---|---|---|---|---|---|---|---|"]
  for n in names:
    a = models.step_analysis(steps[n])
    lines.append(
        f"| {n} | {statistics.median(r.wall_ms for r in results[n]):.1f} | "
        f"{sum(minima[n].values()):.1f} | {statistics.median(r.idle_ms for r in results[n]):.1f} "
        f"| {a['kernels']} | {a['conditionals']} | {a['passes']} ({a['reads']}R {a['writes']}W) "
        f"| {a['other_bytes'] / 2**20:.0f} | {a['memory']['temp'] / 2**20:.1f} |")
  lines += ["", "Kernels, conditionals, passes and bytes follow the cheapest path of every "
            "`lax.cond` (the one N(0, 1) data takes); a pass is a kernel that reads or writes an "
            "array of a normalised layer's size.", ""]

  lines += ["## How XLA:CPU runs the kernels outside convolutions", "",
            "From the compiled HLO, cheapest path: count and MiB moved. XLA:CPU partitions loops "
            "for the threads of the process that compiles them: pinned to one core, every loop "
            "is serial.", "",
            "| program | " + " | ".join(THREADING) + " |", "|---|" + "---|" * len(THREADING)]
  for n in names:
    classes = threading_classes(steps[n].compiled.as_text(), kernels[n])
    lines.append(f"| {n} | " + " | ".join(f"{classes[t][0]} ({classes[t][1] / 2**20:.0f} MiB)"
                                          for t in THREADING) + " |")
  lines.append("")

  plain = setup.get("plain")
  if plain:
    floor_name = models.NO_NORM if models.NO_NORM in names else None
    lines += ["## Step time without the profiler", "",
              f"{len(plain[names[0]])} interleaved rounds after the profiled ones; wall clock and "
              "the process's CPU time (what its threads ran: robust to other processes' load, "
              "on one pinned core the step's own work). Medians, ms.", "",
              "| program | wall | CPU | minor page faults | in-model cost ÷ Flax's, wall "
              "| in-model cost ÷ Flax's, CPU |", "|---|---|---|---|---|---|"]
    for n in names:
      cells = []
      for index in (0, 1):
        if floor_name and n not in (floor_name, "flax") and "flax" in names:
          own = [a[index] - b[index] for a, b in zip(plain[n], plain[floor_name])]
          ref = [a[index] - b[index] for a, b in zip(plain["flax"], plain[floor_name])]
          cells.append(_ratio(statistics.median(own), statistics.median(ref)))
        else:
          cells.append("")
      lines.append(f"| {n} | {1e3 * statistics.median(r[0] for r in plain[n]):.1f} | "
                   f"{1e3 * statistics.median(r[1] for r in plain[n]):.1f} | "
                   f"{statistics.median(r[2] for r in plain[n]):.0f} | {cells[0]} | {cells[1]} |")
    lines.append("")

  convolutions = {n: sorted(_signature(c.kernel) for c in kernels[n].values()
                            if c.category == CONVOLUTION) for n in names}
  same = all(convolutions[n] == convolutions[names[0]] for n in names)
  lines += [f"Convolution kernels identical in the {len(names)} programs: "
            f"**{'yes' if same else 'no'}** ({len(convolutions[names[0]])} kernels).", ""]

  floor = models.NO_NORM if models.NO_NORM in names else None
  for title, times, explain in (
      ("minimum over the rounds", minima, "each kernel's fastest run, summed"),
      ("median fair share", shares, "each kernel's share of the step, median over rounds")):
    lines += [f"## Time by category, ms ({title})", "", f"{explain}.", "",
              "| category | " + " | ".join(names)
              + ("".join(f" | {n} − {floor}" for n in names if n != floor) if floor else "")
              + " |", "|---|" + "---|" * (len(names) + (len(names) - 1 if floor else 0))]
    totals = {n: by_category(times[n], kernels[n]) for n in names}
    for category in CATEGORIES + ("all", "all but convolutions"):
      def value(n, category=category):
        t = totals[n]
        if category == "all":
          return sum(t.values())
        if category == "all but convolutions":
          return sum(v for k, v in t.items() if k != CONVOLUTION)
        return t[category]
      cells = [f"{value(n):.1f}" for n in names]
      if floor:
        cells += [f"{value(n) - value(floor):+.1f}" for n in names if n != floor]
      lines.append(f"| {category} | " + " | ".join(cells) + " |")
    if floor and "bnjax" in names and "flax" in names:
      all_b, all_f, all_n = (sum(totals[n].values()) for n in ("bnjax", "flax", floor))
      nc = {n: sum(v for k, v in totals[n].items() if k != CONVOLUTION) for n in names}
      lines += ["", f"In-model cost, bnjax ÷ Flax: every kernel "
                f"**{_ratio(all_b - all_n, all_f - all_n)}**, every kernel but convolutions "
                f"**{_ratio(nc['bnjax'] - nc[floor], nc['flax'] - nc[floor])}**."]
    lines.append("")

  if floor and "bnjax" in names and "flax" in names:
    walls = {n: [r.wall_ms for r in results[n]] for n in names}
    extra = {n: statistics.median(a - b for a, b in zip(walls[n], walls[floor])) for n in names}
    lines += ["Step time (wall clock, the profiler running): in-model cost bnjax ÷ Flax "
              f"{_ratio(extra['bnjax'], extra['flax'])} (medians of same-round differences: "
              f"bnjax {extra['bnjax']:+.1f} ms, Flax {extra['flax']:+.1f} ms).", ""]

  layers = sorted({layer for n in names for c in kernels[n].values() for layer in c.layers})
  if layers:
    lines += ["## Per layer, ms (minimum over the rounds)", "",
              "Kernels that belong to one norm layer only; XLA fuses a block's last norm with "
              "the residual add and the next layer's input, and those kernels are in 'shared'.", "",
              "| layer | " + " | ".join(f"{n} forward | {n} backward" for n in names
                                       if n != floor) + " |",
              "|---|" + "---|" * (2 * len([n for n in names if n != floor]))]
    per_layer = {}
    for n in names:
      if n == floor:
        continue
      for name, t in minima[n].items():
        c = kernels[n].get(name)
        if c is None or c.category in (CONVOLUTION, TRANSPOSE) or not c.layers:
          continue
        key = c.layers[0] if len(c.layers) == 1 else "shared"
        per_layer.setdefault(key, collections.defaultdict(float))[(n, c.phase)] += t
    for layer in layers + ["shared"]:
      if layer not in per_layer:
        continue
      row = per_layer[layer]
      lines.append(f"| {layer} | " + " | ".join(
          f"{row[(n, 'forward')]:.2f} | {row[(n, 'backward')]:.2f}" for n in names
          if n != floor) + " |")
    lines.append("")
    if detail is None:  # the layer where bnjax spends most.
      candidates = [(sum(v for (n, _), v in row.items() if n == "bnjax"), layer)
                    for layer, row in per_layer.items() if layer != "shared"]
      detail = max(candidates)[1] if candidates else None
    if detail:
      lines += [f"### The kernels of {detail}", "",
                "R/W: MiB read and written; min and median: ms over the rounds.", "",
                "| program | kernel | category | direction | R/W MiB | min | median | fuses |",
                "|---|---|---|---|---|---|---|---|"]
      for n in names:
        for name, c in kernels[n].items():
          if detail not in c.layers or c.kernel.opcode in _CONTROL:
            continue
          runs = [r.duration_ms.get(name, 0.0) for r in results[n]]
          if not any(runs):
            continue
          ops = [o for o in c.kernel.opcodes if o not in ("parameter", "bitcast", "broadcast",
                                                          "constant")]
          lines.append(f"| {n} | {name} | {c.category} | {c.phase} | "
                       f"{c.kernel.read_bytes / 2**20:.1f}/{c.kernel.write_bytes / 2**20:.1f} | "
                       f"{min(runs):.2f} | {statistics.median(runs):.2f} | "
                       f"{', '.join(dict.fromkeys(ops))[:80]} |")
      lines.append("")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  cores = _pin(args.cores)
  load_before = os.getloadavg()[0]
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import hlo, models  # pylint: disable=import-outside-toplevel
  from benchmarks.cases import ModelCase  # pylint: disable=import-outside-toplevel
  image = tuple(int(v) for v in args.image.split(",")) if args.image else None
  case = ModelCase(args.network, args.batch, args.dtype, args.rounds, image)
  network = models.NETWORKS[args.network]

  def log(message):
    print(message, file=sys.stderr, flush=True)

  steps, kernels = {}, {}
  for norm in models.MODEL_NORMS:
    log(f"compiling the {args.network} step with {norm}")
    steps[norm] = models.build_step(case, norm)
    listed = hlo.list_kernels(steps[norm].compiled.as_text(), branches="all")
    kernels[norm] = {k.name: classify(k, steps[norm].norm_sizes) for k in listed}
  results = profile(steps, kernels, args.rounds, log)
  plain = plain_rounds(steps, args.plain_rounds) if args.plain_rounds else None
  setup = {"network": args.network, "description": network.description, "batch": args.batch,
           "image": "×".join(map(str, image or network.image)), "dtype": args.dtype,
           "rounds": args.rounds, "cores": cores, "jax": jax.__version__,
           "load_before": load_before, "load_after": os.getloadavg()[0],
           "cpus": len(os.sched_getaffinity(0)) if args.cores == "all" else os.cpu_count(),
           "plain": plain}
  text = report(setup, steps, kernels, results, args.layer)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"setup": setup, "rounds": {n: [dataclasses.asdict(r) for r in rs]
                                            for n, rs in results.items()},
                 "kernels": {n: {k: {"category": c.category, "layers": c.layers,
                                     "phase": c.phase, "read_bytes": c.kernel.read_bytes,
                                     "write_bytes": c.kernel.write_bytes}
                                 for k, c in ks.items()} for n, ks in kernels.items()}},
                f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())

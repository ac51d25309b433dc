"""Turns the JSON of `bench.py`'s workers into benchmarks/RESULTS.md and its chart.

Reads only the JSON and the names of `names.py`, `cases.py` and `peers.py` (the row order and the
descriptions), so `bench.py --render RESULTS.json` redraws a saved run. Each comparison of
`peers.COMPARISONS` gets its own timing and pass tables; the targets, the training-step table (the
headline), the allocator table, the stack and devices tables are batch norm's.
"""

import math
import os

from benchmarks import names, peers, timing
from benchmarks.cases import SHAPES, STACK_LAYERS
from benchmarks.names import BNJAX, FLAX, FLOOR, MODES, TORCH_CL

MIB = 2.0**20
BATCH_NORM = peers.BATCH_NORM.name
PLAN_BANNERS = {
    names.QUICK: "**Quick run (`--quick`): few rounds, one small shape. Not for quoting.**",
    names.SMOKE: "**Smoke run (`--smoke`): a tiny shape, 2 rounds, fast compilation; it checks "
                 "that the pipeline runs. Its numbers mean nothing.**",
}


def _shape(shape):
  return "(" + ",".join(str(d) for d in shape) + ")"


def _cell(entry, keys):
  if not entry or "median_ms" not in entry:
    return "—" if not entry or "error" not in entry else "error"
  ratios = ", ".join(f"{entry[k]:.2f}×" for k in keys if k in entry)
  return f"{entry['median_ms']:.2f} ({ratios})" if ratios else f"{entry['median_ms']:.2f}"


def _comparison_of(case):
  """The comparison a micro-benchmark entry belongs to (runs before comparisons: batch norm)."""
  return case.get("comparison", BATCH_NORM)


def _plan_of(run):
  return run.get("plan", names.QUICK if run.get("quick") else names.FULL)


def _cases(run, comparison):
  return [c for c in run["micro"] if _comparison_of(c) == comparison]


def _find(run, shape, dtype, mode, comparison=BATCH_NORM):
  for case in _cases(run, comparison):
    if tuple(case["shape"]) == tuple(shape) and case["dtype"] == dtype and case["mode"] == mode:
      return case
  return None


def _prefix(comparison):
  return f"{comparison.heading}: " if comparison.heading else ""


def _ratio(run, shape, mode, impl, key, dtype="float32"):
  case = _find(run, shape, dtype, mode)
  if case is None:
    return None
  return case["impls"].get(impl, {}).get(key)


def _fmt(values, limit=None, lower_is_better=True):
  present = [v for v in values if v is not None]
  if not present:
    return "not measured", ""
  text = " / ".join(f"{v:.2f}" for v in present)
  if limit is None:
    return text, ""
  worst = max(present) if lower_is_better else min(present)
  return text, ("yes" if round(worst, 2) <= limit else "**no**")


def _targets(runs):
  """Rows of (target, allocator, measured, met): bnjax's batch-norm performance goals."""
  rows = []
  big = [s for s in SHAPES[:3]]
  for run in runs:
    allocator = run["allocator"]
    shapes = [s for s in big if _find(run, s, "float32", MODES[1])]
    label = ", ".join(_shape(s) for s in shapes) or "none measured"

    def add(target, values, limit):
      text, met = _fmt(values, limit)
      rows.append((target, allocator, text, met))

    add(f"fwd+bwd ≤ 0.75× Flax default (float32; {label})",
        [_ratio(run, s, MODES[1], BNJAX, names.VS_FLAX) for s in shapes], 0.75)
    add("fwd+bwd ≤ 1.3× bandwidth floor", [_ratio(run, s, MODES[1], BNJAX, names.VS_FLOOR)
                                          for s in shapes], 1.3)
    add("stretch: fwd+bwd ≤ 1.0× torch channels_last",
        [_ratio(run, s, MODES[1], BNJAX, names.VS_TORCH_CL) for s in shapes], 1.0)
    add("forward ≤ 1.05× Flax default (shapes 1–2)",
        [_ratio(run, s, MODES[0], BNJAX, names.VS_FLAX) for s in shapes[:2]], 1.05)
    add("shape 4 (64,8,8,32) fwd+bwd ≤ 0.7× Flax default",
        [_ratio(run, SHAPES[3], MODES[1], BNJAX, names.VS_FLAX)], 0.7)
    devices = {d["devices"]: d for d in run.get("devices", []) if "impls" in d}
    if 1 in devices and 2 in devices:
      name = "bnjax layer fwd+bwd"
      one = devices[1]["impls"].get(name, {}).get("median_ms")
      two = devices[2]["impls"].get(name, {}).get("median_ms")
      add("sharded over 2 simulated devices ≤ 1.15× one device (bnjax layer fwd+bwd)",
          [two / one if one and two else None], 1.15)
    whitening_case = _find(run, names.WHITENING_SHAPES[0], "float32", MODES[1], names.WHITENING)
    if whitening_case is not None:
      add(f"whitening: {names.whitening_row('iterative', 64)} fwd+bwd ≤ 3× bnjax batch norm "
          f"({_shape(names.WHITENING_SHAPES[0])})",
          [whitening_case["impls"].get(names.whitening_row("iterative", 64), {}).get(
              names.VS_BATCH_NORM)], 3.0)
    ghost_cases = [c for c in _cases(run, names.GHOST_BATCH)
                   if c["mode"] == MODES[1] and c["dtype"] == "float32"]
    for case in ghost_cases:
      add(f"ghost batches of {names.GHOST_SIZE}: fwd+bwd ≤ {names.GHOST_TARGET}× without "
          f"({_shape(case['shape'])})",
          [case["impls"].get(names.GHOST_ROW, {}).get(names.VS_PLAIN)], names.GHOST_TARGET)
  for run in runs:
    for e in run.get("models", []):
      if e["dtype"] != "float32":
        continue
      ratio = e.get("in_model")
      text, met = _fmt([ratio["ratio"] if ratio else None], 0.75)
      rows.append((f"{e['network']} step (batch {e['batch']}): batch norm's in-model cost ≤ "
                   "0.75× Flax's", run["allocator"], text, met))
  memory = runs[0].get("stack_memory", [])
  if memory:
    stack = memory[0]
    bn, flax = stack["impls"].get(BNJAX), stack["impls"].get(FLAX)
    if bn and flax:
      text, met = _fmt([bn["temp"] / flax["temp"]], 0.75)
      rows.append((f"{stack['layers']}-layer stack temp memory ≤ 0.75× Flax "
                   f"({_shape(stack['shape'])})", "—", text, met))
      per_layer = bn["temp"] / stack["full_size_bytes"] / stack["layers"]
      text, met = _fmt([per_layer], 1.0)
      rows.append(("one saved full-size array per layer (stack temp ÷ layers, in arrays)", "—",
                   text, met))
  return rows


def _micro_tables(run, comparison, lines):
  for mode in reversed(MODES):
    for dtype in ("float32", "bfloat16"):
      cases = [c for c in _cases(run, comparison.name)
               if c["mode"] == mode and c["dtype"] == dtype]
      if not cases:
        continue
      lines.append(f"#### {_prefix(comparison)}{mode}, {dtype}: median ms "
                   f"({comparison.shown_label})")
      lines.append("")
      lines.append("| implementation | " + " | ".join(_shape(c["shape"]) for c in cases) + " |")
      lines.append("|---|" + "---|" * len(cases))
      for impl in comparison.names:
        if not any(impl in c["impls"] for c in cases):
          continue
        name = f"**{impl}**" if impl == comparison.subject else impl
        lines.append(f"| {name} | " + " | ".join(
            _cell(c["impls"].get(impl), comparison.shown) for c in cases) + " |")
      rounds = sorted({c["rounds"] for c in cases})
      lines.append("")
      lines.append(f"Rounds per case: {', '.join(map(str, rounds))}.")
      lines.append("")


def _whitening_stages_table(run, lines):
  """Where the whitening layer's time goes: its stages timed on their own (median ms)."""
  entries = run.get("whitening_stages") or []
  if not entries:
    return
  for mode in reversed(MODES):
    cases = [e for e in entries if e["mode"] == mode]
    lines += [f"#### whitening by stage: {mode}, float32: median ms", "",
              "| stage | " + " | ".join(f"{_shape(e['shape'])} g{e['group']}" for e in cases)
              + " |", "|---|" + "---|" * len(cases)]
    for stage in names.WHITENING_STAGES:
      lines.append(f"| {stage} | " + " | ".join(
          f"{e['stages'][stage]['median_ms']:.2f}" if stage in e["stages"] else "—"
          for e in cases) + " |")
    lines += ["", "Each stage compiled and timed on its own, interleaved with the whole layer: the "
              "covariance (rows shifted by the data pivot and transposed with the group axis "
              "first, their sums and cross products; the same in both modes), the matrix "
              "function on the [G, d, d] covariances (and its `vjp`), and the products over the "
              "rows (forward: W·rows back in row order with the affine part; forward+backward "
              "adds the closed-form backward's work: dy transposed, Σ dy·rowsᵀ, Wᵀ(scale·dy), "
              "P·rows and their sum transposed back).", ""]


def _allocator_table(runs, lines):
  """glibc ÷ tcmalloc time for the same program (separate processes, so not interleaved)."""
  by_name = {r["allocator"]: r for r in runs}
  if not {"glibc", "tcmalloc"} <= set(by_name):
    return
  glibc, tcmalloc = by_name["glibc"], by_name["tcmalloc"]
  cases = [c for c in _cases(glibc, BATCH_NORM)
           if c["dtype"] == "float32" and c["mode"] == MODES[1]]
  lines += ["### Allocator effect", "",
            "Forward+backward float32, median ms under glibc ÷ under tcmalloc (the two runs are "
            "separate processes, minutes apart). Above 1: glibc's fresh, page-faulting "
            "allocations of large outputs cost that much.", "",
            "| implementation | " + " | ".join(_shape(c["shape"]) for c in cases) + " |",
            "|---|" + "---|" * len(cases)]
  for impl in (BNJAX, FLAX, TORCH_CL, FLOOR):
    cells = []
    for case in cases:
      other = _find(tcmalloc, case["shape"], "float32", MODES[1])
      a = case["impls"].get(impl, {}).get("median_ms")
      b = (other or {"impls": {}})["impls"].get(impl, {}).get("median_ms")
      cells.append(f"{a / b:.2f}" if a and b else "—")
    lines.append(f"| {impl} | " + " | ".join(cells) + " |")
  lines.append("")


def _passes_table(run, comparison, lines):
  cases = [c for c in _cases(run, comparison.name) if c["dtype"] == "float32"]
  if not cases:
    return
  if comparison.heading:
    lines += [f"**{comparison.heading}**", ""]
  shapes = []
  for c in cases:
    if tuple(c["shape"]) not in shapes:
      shapes.append(tuple(c["shape"]))
  lines.append("| implementation | " + " | ".join(_shape(s) for s in shapes) + " |")
  lines.append("|---|" + "---|" * len(shapes))
  for impl in comparison.names:
    cells = []
    for shape in shapes:
      parts = []
      for mode in MODES:
        entry = (_find(run, shape, "float32", mode, comparison.name)
                 or {"impls": {}})["impls"].get(impl, {})
        if "passes" in entry:
          temp = entry["memory"]["temp"] / MIB
          worst = entry.get("worst")
          fast = [entry["passes"], entry["reads"], entry["writes"]]
          branch = (f"; dearest branch {worst[0]} ({worst[1]}R {worst[2]}W)"
                    if worst and worst != fast else "")
          parts.append(f"{entry['passes']} ({entry['reads']}R {entry['writes']}W{branch}, "
                       f"{temp:.1f} MiB)")
      cells.append(" / ".join(parts) if parts else "—")
    if any(c != "—" for c in cells):
      lines.append(f"| {impl} | " + " | ".join(cells) + " |")
  lines.append("")


def _stack_table(runs, lines):
  for stack in runs[0].get("stack_memory", []):
    full = stack["full_size_bytes"]
    lines.append(f"{stack['layers']}-layer stack of (batch norm, relu), forward+backward, "
                 f"float32 {_shape(stack['shape'])}; one activation is {full / MIB:.1f} MiB.")
    lines.append("")
    lines.append("| implementation | temp MiB | temp ÷ (layers × activation) | × Flax default |")
    lines.append("|---|---|---|---|")
    flax = stack["impls"].get(FLAX, {}).get("temp")
    for name, mem in stack["impls"].items():
      ratio = f"{mem['temp'] / flax:.2f}" if flax else "—"
      lines.append(f"| {name} | {mem['temp'] / MIB:.1f} | "
                   f"{mem['temp'] / full / stack['layers']:.2f} | {ratio} |")
    lines.append("")


def _model_entries(runs):
  """(allocator, entry) of every model-level case, in run order."""
  return [(run["allocator"], entry) for run in runs for entry in run.get("models", [])]


def _models_table(runs, lines):
  """The headline: batch norm's cost inside a training step, bnjax against Flax."""
  entries = _model_entries(runs)
  if not entries:
    lines += ["No training step was measured in this run.", ""]
    return
  lines += [
      "Batch norm's **in-model cost** is what it adds to a training step: the step with the "
      "norm layers minus the same step without normalisation (the convolutions then get a "
      "bias). The ratio is bnjax's in-model cost over Flax's, both from the same interleaved "
      "rounds (median of the per-round differences; in brackets the 10th–90th percentiles of a "
      "bootstrap over rounds). The same ratio by the process's CPU time (what its threads ran, "
      "little affected by other processes' load) tells work from waiting: a wall ratio above "
      "the CPU ratio means a step that keeps fewer threads busy. The step ratio is the median "
      "of per-round ratios of whole steps. "
      "Passes (kernels reading or writing a normalised layer's array), kernels and temporary "
      "memory are read from the compiled step (`benchmarks/hlo.py`), following the cheapest "
      "branch of every `lax.cond`.", "",
      "| network | batch | dtype | allocator | step ms bnjax / Flax / none | step bnjax ÷ Flax "
      "| in-model cost ms bnjax / Flax | **in-model bnjax ÷ Flax** | in-model ÷ Flax, CPU time "
      "| passes bnjax / Flax / none | kernels bnjax / Flax / none | temp MiB bnjax / Flax |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for allocator, e in entries:
    impls = e["impls"]
    if any("median_ms" not in impls.get(n, {}) for n in (BNJAX, "flax", "none")):
      lines.append(f"| {e['network']} | {e['batch']} | {e['dtype']} | {allocator} | "
                   "error (see Errors) | — | — | — | — | — | — | — |")
      continue
    step = " / ".join(f"{impls[n]['median_ms']:.1f}" for n in (BNJAX, "flax", "none"))
    ratio = e.get("in_model")
    if ratio:
      cost = f"{ratio['subject_ms']:.1f} / {ratio['reference_ms']:.1f}"
      in_model = f"**{ratio['ratio']:.2f}** ({ratio['low']:.2f}–{ratio['high']:.2f})"
    else:
      cost, in_model = "—", "not measurable"
    cpu = e.get("in_model_cpu")
    in_model_cpu = (f"{cpu['ratio']:.2f} ({cpu['low']:.2f}–{cpu['high']:.2f})" if cpu
                    else "not measurable")
    passes = " / ".join(str(impls[n].get("passes", "—")) for n in (BNJAX, "flax", "none"))
    kernels = " / ".join(str(impls[n].get("kernels", "—")) for n in (BNJAX, "flax", "none"))
    temp = " / ".join(f"{impls[n]['memory']['temp'] / MIB:.1f}" if "memory" in impls[n] else "—"
                      for n in (BNJAX, "flax"))
    lines.append(f"| {e['network']} | {e['batch']} | {e['dtype']} | {allocator} | {step} | "
                 f"{impls[BNJAX].get('vs_flax', math.nan):.2f} | {cost} | {in_model} | "
                 f"{in_model_cpu} | {passes} "
                 f"| {kernels} | {temp} |")
  lines.append("")
  described = {}
  for _, e in entries:
    described.setdefault(e["network"], (e.get("description", ""), e["image"], e["rounds"]))
  for network, (description, image, rounds) in described.items():
    lines.append(f"- **{network}**: {description}; images {'×'.join(map(str, image))}, softmax "
                 f"cross-entropy, SGD; {rounds} rounds at the smallest batch.")
  lines.append("")


def _devices_table(runs, lines):
  for run in runs:
    entries = [d for d in run.get("devices", []) if "impls" in d]
    if not entries:
      for d in run.get("devices", []):
        lines.append(f"- {run['allocator']}, {d.get('devices')} devices: {d.get('error')}")
      continue
    names = list(entries[0]["impls"])
    for d in entries[1:]:
      names += [n for n in d["impls"] if n not in names]
    base = {n: next((d["impls"][n].get("median_ms") for d in entries if d["devices"] == 1
                     and n in d["impls"]), None) for n in names}
    lines.append(f"**{run['allocator']}**: median ms (× the same program on 1 device); "
                 "collectives in the compiled program")
    lines.append("")
    lines.append("| program | " + " | ".join(f"{d['devices']} device(s)" for d in entries) + " |")
    lines.append("|---|" + "---|" * len(entries))
    for n in names:
      cells = []
      for d in entries:
        e = d["impls"].get(n)
        if not e or "median_ms" not in e:
          cells.append("error (see Errors)" if e else "—")
          continue
        ratio = f" ({e['median_ms'] / base[n]:.2f}×)" if base[n] else ""
        coll = ", ".join(f"{v} {k}" for k, v in sorted(e.get("collectives", {}).items())) or "none"
        cells.append(f"{e['median_ms']:.2f}{ratio}; {coll}")
      lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
  if runs and runs[0].get("devices"):
    d = next((d for d in runs[0]["devices"] if "impls" in d), None)
    if d:
      lines.append(f"Layer programs: global batch {_shape(d['shape'])} float32 sharded over the "
                   "devices, `shard_map` with `axis_name='batch'`, forward+backward with "
                   "parameter gradients summed over devices (the `all-reduce`). The ResNet step is "
                   f"`benchmarks.models.resnet` (a stem and residual blocks of conv–norm–relu) "
                   f"with global batch {d['batch']}. Each device count runs in its "
                   "own process, so these ratios are not interleaved; the simulated devices share "
                   "the machine's cores.")
      lines.append("")


def _errors(runs):
  """Every program that failed to compile or run, with its message."""
  found = []
  for run in runs:
    where = run["allocator"]
    for case in run.get("micro", []):
      for impl, entry in case["impls"].items():
        if "error" in entry:
          what = "" if _comparison_of(case) == BATCH_NORM else f"{_comparison_of(case)} "
          found.append((where, f"{impl}, {what}{case['mode']} {_shape(case['shape'])} "
                        f"{case['dtype']}", entry["error"]))
    for stack in run.get("stack_memory", []):
      for impl, error in stack.get("errors", {}).items():
        found.append((where, f"{impl}, {stack['layers']}-layer stack memory", error))
    for entry in run.get("models", []):
      for impl, info in entry["impls"].items():
        if "error" in info:
          found.append((where, f"{entry['network']} step (batch {entry['batch']}, "
                        f"{entry['dtype']}) with {impl}", info["error"]))
    for d in run.get("devices", []):
      if "error" in d:
        found.append((where, f"{d.get('devices')} devices", d["error"]))
      for impl, entry in d.get("impls", {}).items():
        if "error" in entry:
          found.append((where, f"{impl}, {d['devices']} devices", entry["error"]))
  return found


def chart(path, runs):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  impls = [i for i in peers.BATCH_NORM.names if i != FLAX]
  fig, axes = plt.subplots(len(runs), 2, figsize=(14, 4.2 * len(runs)), squeeze=False)
  for row, run in enumerate(runs):
    for col, mode in enumerate(reversed(MODES)):
      ax = axes[row][col]
      cases = [c for c in _cases(run, BATCH_NORM)
               if c["mode"] == mode and c["dtype"] == "float32"]
      width = 0.8 / len(impls)
      for k, impl in enumerate(impls):
        values = [c["impls"].get(impl, {}).get(names.VS_FLAX, math.nan) for c in cases]
        positions = [i + (k - len(impls) / 2 + 0.5) * width for i in range(len(cases))]
        ax.bar(positions, values, width, label=impl,
               edgecolor="black" if impl == BNJAX else None, linewidth=1.5)
      ax.axhline(1.0, color="black", linewidth=0.8)
      ax.set_xticks(range(len(cases)))
      ax.set_xticklabels([_shape(c["shape"]) for c in cases])
      ax.set_ylabel("time ÷ flax.linen.BatchNorm (same round)")
      ax.set_title(f"{mode}, float32, {run['allocator']} allocator")
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.1f"))
      ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.1f"))
  axes[0][1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _header(runs, notes, date, revision, command, seconds):
  """The title, how the run was made, and the machine it ran on."""
  first = runs[0]
  machine, versions = first["machine"], first["versions"]
  plan = _plan_of(first)
  lines = ["# bnjax benchmark results", ""]
  if plan in PLAN_BANNERS:
    lines += [PLAN_BANNERS[plan], ""]
  revisions = ", ".join(f"{r.get('revision', revision)} (sources {r.get('bnjax_digest', '?')}) "
                        f"for {r['allocator']}" for r in runs)
  make = " (`make bench`)" if plan == names.FULL else ""
  lines += [f"Produced by `{command}`{make} on {date}, in {seconds / 60:.1f} minutes; "
            f"bnjax at revision {revisions}.", "", "## Machine", ""]
  lines.append(f"- CPU: {machine['cpu']}, {machine['cores']} cores available; {machine['os']}")
  lines.append("- allocators measured: " + ", ".join(
      f"{r['expected_allocator']} (in use: {r['allocator']}"
      + (f", LD_PRELOAD={r['machine']['ld_preload']}" if r["machine"]["ld_preload"] else "")
      + ")" for r in runs))
  lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                          if "not importable" not in v))
  if first["torch_threads"]:
    lines.append(f"- PyTorch threads: {first['torch_threads']} (`torch.set_num_threads`, the cores "
                 f"XLA:CPU uses), OMP_WAIT_POLICY={machine.get('omp_wait_policy')}")
  else:
    lines.append("- PyTorch threads: n/a")
  lines.append("- machine load (1-minute load average at the start and end of each allocator's "
               "run; above the core count, other processes were competing for the cores): "
               + ", ".join(f"{r['allocator']} {r['load_before'][0]:.1f} → "
                           f"{r['load_after'][0]:.1f}" for r in runs if "load_after" in r))
  missing = {m: reason for m, reason in first["peers"].items() if reason}
  if missing:
    lines.append("- **peers that could not be imported (left out of every table): "
                 + "; ".join(f"{names.OPTIONAL_MODULES[m]} (`{reason}`)"
                             for m, reason in missing.items()) + "**")
  if set(first["peers"]) != set(names.OPTIONAL_MODULES):  # a plan that leaves peers out.
    measured = dict.fromkeys(i for c in peers.COMPARISONS for i in c.names
                             if any(i in case["impls"] for case in _cases(first, c.name)))
    lines.append("- implementations measured (the others were left out of this run): "
                 + ", ".join(measured))
  elif not missing:
    lines.append("- all peers imported: Flax (linen, nnx), Haiku, Equinox, PyTorch")
  for r in runs:
    if r.get("bnjax_digest") != r.get("bnjax_digest_after"):
      notes = list(notes) + [f"bnjax's sources changed during the {r['allocator']} run: its "
                             "numbers may mix two versions."]
  lines += [f"- **{note}**" for note in notes]
  return lines


def _implementations(runs):
  """Each comparison's implementations with their descriptions, and how they were run."""
  lines = ["## Implementations", ""]
  for comparison in peers.COMPARISONS:
    if comparison.heading:  # batch norm's list comes first, without a heading.
      if not any(_cases(run, comparison.name) for run in runs):
        continue
      lines += ["", f"{comparison.heading}:", ""]
    lines += [f"- **{impl.name}**: {impl.description}" for impl in comparison.implementations]
  lines += [
      "", "Every JAX implementation is jitted and compiled before timing; parameters are float32 "
      "except Haiku's and Equinox's, which follow the input dtype. Forward returns "
      "`(y, new_state)`; forward+backward returns `(y, (dx, dparams), new_state)` for a given dy "
      "(`jax.vjp`; PyTorch: `autograd.grad(y, (x, weight, bias), dy)`).", "",
      "Method: rounds run every implementation once each in a rotated order; a sample repeats a "
      f"call until it lasts {timing.SAMPLE_SECONDS * 1e3:g} ms; medians over rounds; ratios are "
      "the median over rounds of (time ÷ reference time in the same round). The machine is "
      "shared and noisy: compare ratios, not absolute times.", ""]
  return lines


def _bytes(n):
  if n is None:
    return "–"
  for unit, size in (("MB", 1e6), ("KB", 1e3)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} B"


def _scaling_table(records, lines):
  """Collective bytes, all-reduces and temporary memory against the device count."""
  lines += ["## Cross-device cost against the device count (compile-only)", "",
            "Compiled for D simulated devices with `jax.ShapeDtypeStruct` inputs "
            "(`benchmarks/scaling.py`); nothing runs, so D reaches pod sizes on one CPU. One layer "
            f"of {records[0]['channels']} channels under `shard_map`: bytes each device receives "
            "from collectives in the forward pass (bnjax: the cheapest path / through the "
            "re-centred second round), and the all-reduces a training step adds. The stack is "
            "a training step of ResNet-50's 53 batch-norm layers (224x224, 2 images per device). "
            "Plain jit: one layer without `axis_name` on a batch-sharded array.", "",
            "| D | bnjax fwd bytes | Flax fwd bytes | bwd all-reduces bnjax / Flax "
            "| 53-layer temp bnjax / Flax | plain jit all-reduces bnjax / Flax "
            "| plain jit temp bnjax / Flax |", "|---|---|---|---|---|---|---|"]
  for r in records:
    get = r.get
    lines.append(
        f"| {r['devices']} | {_bytes(get('bnjax/forward_bytes'))} / "
        f"{_bytes(get('bnjax/forward_bytes_max'))} | {_bytes(get('flax/forward_bytes'))} "
        f"| {get('bnjax/backward_all_reduces', '–')} / {get('flax/backward_all_reduces', '–')} "
        f"| {_bytes(get('bnjax/stack53_temp_bytes'))} / {_bytes(get('flax/stack53_temp_bytes'))} "
        f"| {get('bnjax/plain_jit_all_reduces', '–')} / {get('flax/plain_jit_all_reduces', '–')} "
        f"| {_bytes(get('bnjax/plain_jit_temp_bytes'))} / "
        f"{_bytes(get('flax/plain_jit_temp_bytes'))} |")
  lines.append("")


def write(out, chart_path, runs, *, notes, date, revision, command, seconds, scaling=None):
  """Writes the Markdown report `out` and the chart `chart_path` for `runs` (one per allocator).

  Args:
    out: the Markdown file to write.
    chart_path: the PNG chart to write (the report links it by its base name).
    runs: one worker's JSON per allocator, as `bench.py` saves them under "runs".
    notes: lines to print in bold under the machine description.
    date, revision, command, seconds: when, at which revision, how and how long the run was made.
    scaling: `benchmarks.scaling` records, one per device count (a table when given).
  """
  lines = _header(runs, notes, date, revision, command, seconds)
  lines += ["", "## Targets", "",
            "The speed and memory goals set for bnjax's batch norm, each with what this run "
            "measured. Ratios are float32 medians of per-round ratios; a list gives one value per "
            "shape.", "",
            "| target | allocator | measured | met |", "|---|---|---|---|"]
  for target, allocator, measured, met in _targets(runs):
    lines.append(f"| {target} | {allocator} | {measured} | {met} |")
  lines += ["", f"![bnjax and peers, time relative to Flax]({os.path.basename(chart_path)})", ""]
  lines += ["## Training steps: batch norm's cost inside a model", ""]
  _models_table(runs, lines)
  lines += _implementations(runs)
  lines += ["## Micro-benchmarks", ""]
  for run in runs:
    lines += [f"### Allocator: {run['allocator']}", ""]
    for comparison in peers.COMPARISONS:
      _micro_tables(run, comparison, lines)
    _whitening_stages_table(run, lines)
  _allocator_table(runs, lines)
  lines += ["## What XLA compiled (float32)", "",
            "Full-size passes: kernels of the compiled program that read or write an array of "
            "the activation's size (R reads, W writes, from `benchmarks/hlo.py`), and the "
            "compiled temporary memory, for forward / forward+backward. Where a program has "
            "a `lax.cond`, the count follows the cheapest branch and the dearest is added.", ""]
  for comparison in peers.COMPARISONS:
    _passes_table(runs[0], comparison, lines)
  stacks = runs[0].get("stack_memory") or [{"layers": STACK_LAYERS}]
  lines += [f"## Memory of a {stacks[0]['layers']}-layer stack", ""]
  _stack_table(runs, lines)
  lines += ["## Simulated devices", ""]
  _devices_table(runs, lines)
  if scaling:
    _scaling_table(scaling, lines)
  errors = _errors(runs)
  if errors:
    lines += ["## Errors", "", "Programs that failed to compile (left out of the tables above):",
              ""]
    for where, what, message in errors:
      lines.append(f"- {where}: {what}: `{message[:400]}`")
    lines.append("")
  with open(out, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")
  chart(chart_path, runs)

"""bnjax's benchmark (`make bench` -> benchmarks/RESULTS.md), split by job.

Modules, each importing only those above it (none imports `bench` or `report`):

  names.py     names and settings shared by the workers and the report (no JAX)
  cases.py     shapes, dtypes, rounds and model sizes: the full, --quick and --smoke plans
  timing.py    interleaved rounds, medians, same-round ratios
  machine.py   CPU, cores, allocator, versions, bnjax's revision
  hlo.py       full-size passes, collectives and memory read from the compiled HLO
  peers.py     implementations (bnjax, Flax, Haiku, Equinox, PyTorch, the floors) and the
               comparisons that pair bnjax's layer with its peers
  programs.py  what is compiled and run: layer programs, micro-benchmarks, stack memory
  models.py    model-level programs: the ResNet-style training step per normalisation
  devices.py   sharded programs on simulated devices, and their collectives
  report.py    the Markdown report and the chart, from the workers' JSON
  bench.py     the command line: one worker process per allocator and per device count

Adding a row:

* a shape: append it to `cases.SHAPES` (every implementation runs on it);
* a peer of batch norm: a builder and one `Implementation(...)` in `peers.py`, its name in
  `names.py`;
* a new comparison (layer norm, group norm, whitening, ghost batches): its builders and a
  `Comparison` appended to `peers.COMPARISONS`; its timing and pass tables follow;
* a sharded layer pair for the devices table: one entry in `peers.SHARDED_LAYERS`;
* a normalisation in the ResNet step: one entry in `models.NORMS`.

`bench.py --smoke` runs every part at a tiny size in well under a minute, into a temporary
directory; `tests/benchmarks/test_bench_smoke.py` runs it and checks the report's tables.
"""

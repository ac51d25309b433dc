"""`benchmarks/bench.py --smoke`: the whole benchmark pipeline at a tiny size, in a subprocess.

One smoke run (workers, the devices subprocesses, the report and the chart) is shared by the tests
below; each checks one part of what it wrote. Its timings mean nothing and are not checked.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "bench.py"
COMMITTED_REPORT = REPO / "benchmarks" / "RESULTS.md"
TIMEOUT_SECONDS = 600
# Sections of the report; the smoke run measures one allocator, so there is no allocator table.
SECTIONS = ("## Machine", "## Targets", "## Implementations", "## Micro-benchmarks",
            "### Allocator: glibc", "#### forward+backward, float32: median ms",
            "#### forward, float32: median ms", "## What XLA compiled (float32)",
            "## Memory of a 2-layer stack", "## ResNet-style training step", "## Simulated devices",
            "## Cross-device cost against the device count (compile-only)")
SMOKE_IMPLEMENTATIONS = ("bnjax", "flax.linen", "floor", "floor+stats")
NUMBER = r"\d+\.\d+"
TEMPORARY_PREFIX = "bnjax-bench-smoke-"  # of the directory --smoke writes into by default.


class SmokeRun(NamedTuple):
  report: pathlib.Path  # the Markdown report; the .png and .json lie next to it.
  committed_digest: str | None  # of benchmarks/RESULTS.md before the run.


def _digest(path):
  return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def smoke():
  """Runs the smoke benchmark once, with its default output, and removes what it wrote."""
  committed = _digest(COMMITTED_REPORT)
  env = dict(os.environ)
  # The suite's 8 simulated devices are not the benchmark's business: it sets its own counts.
  env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                              if not flag.startswith("--xla_force_host_platform_device_count"))
  done = subprocess.run([sys.executable, str(BENCH), "--smoke"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
  console = done.stdout + done.stderr
  assert done.returncode == 0, f"bench.py --smoke failed:\n{console[-4000:]}"
  found = re.search(r"^wrote (\S+\.md), ", done.stdout, re.MULTILINE)
  assert found, f"bench.py --smoke did not say where it wrote its report:\n{console[-2000:]}"
  report = pathlib.Path(found.group(1))
  yield SmokeRun(report, committed)
  if report.parent.name.startswith(TEMPORARY_PREFIX):
    shutil.rmtree(report.parent, ignore_errors=True)


def _rows(text):
  """The cells of every Markdown table row in `text`, bold marks removed."""
  return [[cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]
          for line in text.splitlines() if line.startswith("|")]


def _table_row(text, *first_cells):
  """The first table row in `text` that starts with `first_cells`, or None."""
  return next((row for row in _rows(text) if tuple(row[:len(first_cells)]) == first_cells), None)


def _section(text, heading):
  """The text under `heading` up to the next heading of the same or a higher level."""
  level = heading.split()[0]
  start = text.index(heading)
  following = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], re.MULTILINE)
  return text[start:start + len(heading) + following.start()] if following else text[start:]


def test_smoke_writes_outside_the_repository(smoke):
  assert REPO not in smoke.report.parents, f"the smoke report went into {smoke.report}"
  assert smoke.report.parent.name.startswith(TEMPORARY_PREFIX), smoke.report
  assert _digest(COMMITTED_REPORT) == smoke.committed_digest, "it changed benchmarks/RESULTS.md"
  for suffix in (".md", ".png", ".json"):
    assert smoke.report.with_suffix(suffix).stat().st_size > 0, f"no {suffix} next to the report"


def test_smoke_report_has_every_section(smoke):
  text = smoke.report.read_text()
  missing = [section for section in SECTIONS if section not in text]
  assert not missing, f"sections missing from the smoke report: {missing}"
  assert "## Errors" not in text, _section(text, "## Errors")


def test_smoke_micro_tables_time_every_implementation(smoke):
  text = smoke.report.read_text()
  for heading in ("#### forward+backward, float32", "#### forward, float32"):
    table = _section(text, heading)
    for impl in SMOKE_IMPLEMENTATIONS:
      row = _table_row(table, impl)
      assert row is not None, f"no {impl} row under {heading!r}"
      assert re.fullmatch(rf"{NUMBER} \({NUMBER}×, {NUMBER}×\)", row[1]), (heading, row)


def test_smoke_passes_table_counts_every_implementation(smoke):
  table = _section(smoke.report.read_text(), "## What XLA compiled (float32)")
  for impl in SMOKE_IMPLEMENTATIONS:
    row = _table_row(table, impl)
    assert row is not None, f"no {impl} row in the passes table"
    forward, backward = row[1].split(" / ")
    assert re.match(r"\d+ \(\d+R \d+W", forward) and re.match(r"\d+ \(\d+R \d+W", backward), row


def test_smoke_stack_table_measures_bnjax_flax_and_autodiff(smoke):
  table = _section(smoke.report.read_text(), "## Memory of a 2-layer stack")
  for impl in ("bnjax", "flax.linen", "autodiff reference"):
    row = _table_row(table, impl)
    assert row is not None and re.fullmatch(NUMBER, row[1]), (impl, row)


def test_smoke_resnet_table_times_every_normalisation(smoke):
  table = _section(smoke.report.read_text(), "## ResNet-style training step")
  for norm in ("bnjax", "flax", "none"):
    row = _table_row(table, "glibc", norm)
    assert row is not None and re.fullmatch(NUMBER, row[2]), (norm, row)


def test_smoke_devices_table_has_one_and_two_devices(smoke):
  table = _section(smoke.report.read_text(), "## Simulated devices")
  assert "| program | 1 device(s) | 2 device(s) |" in table, table
  for program in ("bnjax layer fwd+bwd", "flax layer fwd+bwd"):
    row = _table_row(table, program)
    assert row is not None, f"no {program} row in the devices table"
    assert all("all-reduce" in cell for cell in row[1:3]), row


def test_smoke_json_records_the_plan_and_every_case(smoke):
  saved = json.loads(smoke.report.with_suffix(".json").read_text())
  (run,) = saved["runs"]
  assert run["plan"] == "smoke"
  assert run["peers"] == {}, "a smoke run should not import Haiku, Equinox or PyTorch"
  batch_norm = [case for case in run["micro"] if case["comparison"] == "batch norm"]
  assert {(c["mode"], c["dtype"]) for c in batch_norm} == {("forward", "float32"),
                                                          ("forward+backward", "float32")}
  for case in batch_norm:
    assert set(case["impls"]) == set(SMOKE_IMPLEMENTATIONS), case["impls"].keys()
  assert [d["devices"] for d in run["devices"]] == [1, 2]


def test_scaling_table_has_a_row_per_device_count_with_equal_forward_bytes(smoke):
  table = _section(smoke.report.read_text(), "## Cross-device cost against the device count")
  rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
  assert [row.split("|")[1].strip() for row in rows] == ["2", "4"]
  forward = {row.split("|")[2].strip() for row in rows}
  assert len(forward) == 1, forward  # bnjax's forward bytes do not grow with the device count.

"""Interleaved timing: rounds that run every program once each, medians and same-round ratios.

Every program of a case is warmed up first; then each round runs every program once, in an
order rotated every round, so that the machine's slow moments spread over all of them. A sample
repeats a call until it lasts `SAMPLE_SECONDS` (small shapes), with a short pause between samples
so that one library's spinning worker threads do not slow the next. Reported: the median time over
rounds, and ratios taken within each round (time ÷ reference time in the same round), then their
median over rounds.
"""

from collections.abc import Callable, Mapping
import math
import statistics
import time

SAMPLE_SECONDS = 0.005  # each sample lasts at least this long (repeated calls for small shapes).
PAUSE_SECONDS = 0.002  # between samples.
MAX_CALLS_PER_SAMPLE = 1000


def _sample(run: Callable[[], object], calls: int) -> float:
  """Seconds per call of `calls` back-to-back calls."""
  start = time.perf_counter()
  for _ in range(calls):
    run()
  return (time.perf_counter() - start) / calls


def calibrate(run: Callable[[], object], warmup: int = 2) -> int:
  """Warms `run` up; returns how many calls make one sample last `SAMPLE_SECONDS`."""
  for _ in range(warmup):
    run()
  once = _sample(run, 1)
  return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(SAMPLE_SECONDS / max(once, 1e-7))))


def round_robin(runs: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
  """Times `runs` ({name: call}) in `rounds` interleaved rounds; returns {name: [seconds]}."""
  calls = {name: calibrate(run) for name, run in runs.items()}
  order = list(runs)
  times = {name: [] for name in order}
  for r in range(rounds if order else 0):
    shift = r % len(order)
    for name in order[shift:] + order[:shift]:
      time.sleep(PAUSE_SECONDS)
      times[name].append(_sample(runs[name], calls[name]))
  return times


def summarise(times: Mapping[str, list[float]], references: Mapping[str, str]) -> dict[str, dict]:
  """Medians in ms and, for each reference timed, the median of the per-round ratios.

  Args:
    times: {name: seconds per round}, as `round_robin` returns.
    references: {ratio key: name of the program that divides}; a reference that was not timed
      gives no ratio.

  Returns:
    {name: {"median_ms", "rounds", and one entry per ratio key}}.
  """
  out = {}
  for name, samples in times.items():
    entry = {"median_ms": 1e3 * statistics.median(samples), "rounds": len(samples)}
    for key, reference in references.items():
      if times.get(reference):
        entry[key] = statistics.median(a / b for a, b in zip(samples, times[reference]))
    out[name] = entry
  return out

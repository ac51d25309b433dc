"""Tests for bnjax_examples/metrics.py: the docstring's worked example (sums, then means)."""

import doctest

from bnjax_examples import metrics


def test_metrics_docstring_example_runs():
  result = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0

"""Every experiment runs at ``:smoke`` size and writes the result.json and plot FINDINGS needs.

One module-scoped run per experiment (seconds each, compiled without LLVM optimisation); the tests
then read what it wrote.
"""

import importlib
import json
import math
import os

import jax
import numpy as np
import pytest

from bnjax_examples.experiments import EXPERIMENTS
from bnjax_examples.experiments import PLOT_FILE
from bnjax_examples.experiments import RESULT_FIELDS
from bnjax_examples.experiments import RESULT_FILE
from bnjax_examples.experiments import VERDICTS
from bnjax_examples.experiments import runner
from tests.experiments import test_covariate_shift
from tests.experiments import test_whitening

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "experiments")


@pytest.fixture(scope="module", params=sorted(EXPERIMENTS))
def smoke_run(request, tmp_path_factory):
  """``(name, result read back from result.json, workdir)`` of the experiment's smoke run."""
  name = request.param
  config = importlib.import_module(f"configs.experiments.{name}").get_config("smoke")
  workdir = str(tmp_path_factory.mktemp(name))
  runner.run_experiment(config, workdir)
  with open(os.path.join(workdir, RESULT_FILE)) as f:
    return name, json.load(f), workdir


def test_smoke_run_writes_every_field_and_a_plot(smoke_run):
  name, result, workdir = smoke_run
  assert [field for field in RESULT_FIELDS if field not in result] == []
  assert result["name"] == name
  assert result["verdict"] in VERDICTS
  assert result["command"].startswith(
      f"python -m bnjax_examples.experiments --config=configs/experiments/{name}.py:smoke")
  assert "confirmed if" in result["criterion"]  # The criterion, stated before the number.
  assert result["seeds"]
  assert result["measured"]
  with open(os.path.join(workdir, PLOT_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_smoke_run_measures_what_its_claim_needs(smoke_run):
  name, result, _ = smoke_run
  data = result["data"]
  if name == "bias_gradient":
    cases = {(r["mode"], r["case"]) for r in data["rows"]}
    assert {("train", "plain"), ("train", "masked"), ("train", "8 devices"),
            ("eval", "plain")} <= cases
    # Cancellation is exact up to rounding at any size; evaluation mode is not cancelled.
    assert result["verdict"] == "confirmed"
  elif name == "bias_gradient_norms":
    rows = data["rows"]
    assert {(r["norm"], r["bias"]) for r in rows} == {
        ("layer norm over C", "per channel"), ("layer norm over C", "scalar"),
        ("layer norm over H,W,C", "per channel"), ("layer norm over H,W,C", "scalar"),
        ("group norm", "per channel"), ("group norm", "per group"),
        ("instance norm", "per channel")}
    # A bias constant over each normalised set is cancelled to rounding (float32: far below
    # 1e-4); a per-channel bias under layer norm or group norm is not.
    cancelled = {("layer norm over C", "scalar"), ("layer norm over H,W,C", "scalar"),
                 ("group norm", "per group"), ("instance norm", "per channel")}
    for r in rows:
      if (r["norm"], r["bias"]) in cancelled:
        assert r["ratio_max"] < 1e-4, r
      else:
        assert r["ratio_min"] > 1e-2, r
    assert result["verdict"] == "confirmed"
  elif name == "training_speed":
    for arm in data["arms"].values():
      steps = np.asarray(arm["steps_to_target"])
      assert steps.shape == (len(data["learning_rates"]), len(result["seeds"]))
      assert np.all((steps > 0) | np.isinf(steps))
      assert len(arm["final_accuracy"]) == len(data["learning_rates"])
  elif name == "stop_gradient":
    rows = data["table"]["batch norm"].values()
    assert all(row["bias_norm_final"]["mean"] < 1e-4 for row in rows)  # Zero gradient.
    rows = data["table"]["stop_gradient"].values()
    assert all(row["bias_norm_final"]["mean"] > 1e-3 for row in rows)
    assert all("train_loss_change" in row for row in rows)
  elif name == "relu_order":
    assert set(data["summary"]) == {"mlp", "cnn"}
    for summary in data["summary"].values():
      assert {"before", "after", "none", "difference", "standard_error"} == set(summary)
      # After the norm, the next layer's inputs have zero mean and unit std in training mode.
      np.testing.assert_allclose(summary["after"]["initial_mean"]["mean"], 0, atol=1e-4)
      np.testing.assert_allclose(summary["after"]["initial_std"]["mean"], 1, atol=1e-3)
    assert math.isclose(data["gaussian_mean"], 0.3989, abs_tol=1e-4)
    assert math.isclose(data["gaussian_std"], 0.5838, abs_tol=1e-4)
  elif name == "unbiased_variance":
    sizes = data["batch_sizes"]
    assert set(data["summary"]) == {str(m) for m in sizes}
    assert math.isclose(data["theory"]["2"], math.sqrt(2), rel_tol=1e-12)
    for m in sizes:
      assert {"biased_ratio", "unbiased_ratio", "precise_accuracy"} <= set(data["summary"][str(m)])
  elif name == "unbiased_variance_cnn":
    sizes = data["images_per_batch"]
    assert set(data["summary"]) == {str(n) for n in sizes}
    for n in sizes:  # m = N·H·W: 8x8, then 4x4 after pooling.
      assert data["values_per_channel"][str(n)] == [64 * n, 16 * n]
      np.testing.assert_allclose(data["theory"][str(n)],
                                 [math.sqrt(m / (m - 1)) for m in (64 * n, 16 * n)], rtol=1e-12)
      row = data["summary"][str(n)]
      for name_ in ("biased_ratio", "unbiased_ratio", "predicted_ratio", "effective_m"):
        assert len(row[name_]["mean"]) == 2
      # Over the same run the unbiased running variance is the larger: smaller test std.
      assert all(u <= b for u, b in zip(row["unbiased_ratio"]["mean"], row["biased_ratio"]["mean"],
                                        strict=True))
  elif name == "precise_statistics":
    summary = data["summary"]
    assert set(summary) == {str(b) for b in data["batch_sizes"]}
    kinds = {"ema 0.9", "ema 0.99", "ema 0.999", "cumulative",
             *(f"precise {n}" for n in data["sample_sizes"])}
    for row in summary.values():
      assert {f"{k}/accuracy" for k in kinds} <= set(row)
      # The reference is precise statistics from every example: zero distance from itself.
      everything = f"precise {max(data['sample_sizes'])}"
      assert row[f"{everything}/mean_error"]["max"] < 1e-5
      assert row[f"{everything}/log_var_error"]["max"] < 1e-5
      # 64 of the 1,438 examples give different statistics than all of them.
      assert row["precise 64/log_var_error"]["mean"] > 1e-4
  elif name == "batch_renorm":
    sizes = [str(m) for m in data["batch_sizes"]]
    for arm in ("batch norm", "batch renorm"):
      assert set(data["summary"][arm]) == set(sizes)
      for m in sizes:
        assert {"ema", "precise", "test batch"} == set(data["summary"][arm][m])
    for m in sizes:  # Group norm has no batch statistics: one kind.
      assert set(data["summary"]["group norm"][m]) == {"ema"}
      assert 0 <= data["summary"]["group norm"][m]["ema"]["mean"] <= 100
    assert set(data["renorm_minus_batch_norm"]) == set(sizes)
  elif name == "batch_renorm_non_iid":
    for arm in ("batch norm", "batch renorm", "group norm"):
      for what in ("accuracy", "train_loss"):
        assert set(data["summary"][arm][what]) == {"i.i.d.", "non-i.i.d."}
      for sampling in ("i.i.d.", "non-i.i.d."):
        assert 10 < data["summary"][arm]["accuracy"][sampling]["mean"] <= 100  # Above chance.
    assert set(data["iid_minus_non_iid"]) == {"batch norm", "batch renorm", "group norm"}
    for key in ("renorm_minus_batch_norm_non_iid", "renorm_minus_batch_norm_iid"):
      assert set(data[key]) == {"mean", "se"}
  elif name == "dropout_shift":  # More in test_dropout_shift.py.
    for cell in ("before, p=0", "after, p=0.5"):  # No dropout before a norm: no shift.
      np.testing.assert_allclose(data["summary"][cell]["formula_ratio"]["mean"], 1.0, rtol=1e-6)
    assert set(data["precise_minus_ema"]) == set(data["summary"])
  elif name == "small_batch":  # More in test_small_batch.py.
    assert set(data["batch_summary"]) == {str(m) for m in data["batch_sizes"]}
    assert set(data["ghost_summary"]) == {str(b) for b in data["ghost_sizes"]}
  elif name == "whitening":
    test_whitening.check_result(result)
  elif name == "covariate_shift":
    test_covariate_shift.check_result(result)
  else:
    pytest.fail(f"No check for experiment {name!r}.")


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_config_opens_with_its_command(name):
  with open(os.path.join(CONFIG_DIR, f"{name}.py")) as f:
    first_line = f.readline()
  assert first_line.startswith(
      f'r"""python -m bnjax_examples.experiments --config=configs/experiments/{name}.py')
  module = importlib.import_module(f"configs.experiments.{name}")
  assert module.get_config().experiment == name
  assert len(module.get_config().seeds) >= 3
  with pytest.raises(ValueError, match="smoke"):
    module.get_config("huge")


def test_eight_devices_are_simulated():
  assert jax.device_count() >= 8  # The bias-gradient experiment's sharded case needs them.

"""The experiments' shared harness, the broken batch norm of claim 4, and the FINDINGS generator."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax_examples.experiments import RESULT_FIELDS
from bnjax_examples.experiments import findings
from bnjax_examples.experiments import harness
from bnjax_examples.experiments import runner
from bnjax_examples.experiments import stop_gradient


def test_every_epoch_visits_each_example_once_in_a_seeded_order():
  key = jax.random.key(3)
  rows = jnp.concatenate([harness.batch_indices(key, jnp.asarray(s), 10, 3) for s in range(3)])
  assert len(set(rows.tolist())) == 9  # 3 batches of 3 from 10: no repeat, one left out.
  assert set(rows.tolist()) <= set(range(10))
  next_epoch = jnp.concatenate([harness.batch_indices(key, jnp.asarray(s), 10, 3)
                                for s in range(3, 6)])
  assert rows.tolist() != next_epoch.tolist()
  other_seed = harness.batch_indices(jax.random.key(4), jnp.asarray(0), 10, 3)
  assert other_seed.tolist() != rows[:3].tolist()


def test_digits_split_is_fixed_and_standardised():
  data = harness.digits()
  assert data.train_x.shape == (1438, 64)
  assert data.test_x.shape == (359, 64)
  assert data.train_x.dtype == jnp.float32
  assert data.train_y.dtype == jnp.int32
  from sklearn import datasets
  raw = datasets.load_digits()
  order = np.random.default_rng(harness.SPLIT_SEED).permutation(len(raw.target))
  np.testing.assert_array_equal(np.asarray(data.test_y), raw.target[order[:359]])
  assert abs(float(jnp.mean(data.train_x))) < 1e-3  # One channel, standardised on train.


def test_mean_and_spread_against_numpy():
  values = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 7.0]])
  summary = harness.mean_and_spread(values)
  np.testing.assert_allclose(summary["mean"], [3.0, 5.0])
  np.testing.assert_allclose(summary["std"], [2.0, np.sqrt(7.0)])
  assert summary["min"] == [1.0, 2.0]
  assert summary["max"] == [5.0, 7.0]
  assert summary["n"] == 3


@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_placements_order_the_layers(network):
  data = harness.digits()
  x = data.train_x[:32]
  for placement in harness.PLACEMENTS:
    if network == "mlp":
      model = harness.MLP(hidden=(8, 8), placement=placement)
    else:
      model = harness.CNN(features=(4, 8), placement=placement)
    params, states = model.init(jax.random.key(0), 64)
    logits, new_states, taps = model.apply(params, states, x, True, harness.bnjax_norm())
    assert logits.shape == (32, 10)
    assert len(taps) == 4
    assert len(new_states) == (0 if placement == "none" else 2)
    layers = params["dense"] if network == "mlp" else params["conv"]
    assert ("b" in layers[0]) == (placement != "before")
    layer_input = taps[0]  # What the second layer sees.
    per_unit = tuple(range(layer_input.ndim - 1))
    if placement == "after":  # Normalised: zero mean, unit variance per unit (batch statistics).
      np.testing.assert_allclose(jnp.mean(layer_input, axis=per_unit), 0, atol=1e-5)
      variance = np.asarray(jnp.var(layer_input, axis=per_unit))
      dead = variance < 1e-6  # A ReLU unit that is zero on the whole batch stays zero.
      assert dead.sum() < len(variance) / 2
      np.testing.assert_allclose(variance[~dead], 1, atol=1e-3)
    else:  # A ReLU output.
      assert float(jnp.min(layer_input)) >= 0
  with pytest.raises(ValueError, match="placement"):
    harness.MLP(placement="between")


def test_stop_gradient_norm_has_batch_norms_forward_but_not_its_gradient():
  x = jax.random.normal(jax.random.key(0), (16, 4)) * 3 + 1
  params, state = bnjax.init(4)
  broken = stop_gradient.stop_gradient_norm(0.9)
  proper = harness.bnjax_norm(momentum=0.9)
  y_broken, state_broken = broken(params, state, x, True)
  y_proper, state_proper = proper(params, state, x, True)
  np.testing.assert_allclose(y_broken, y_proper, atol=1e-5)
  np.testing.assert_allclose(state_broken.var, state_proper.var, rtol=1e-5)
  weights = jax.random.normal(jax.random.key(1), (16, 4))
  bias = jnp.zeros(4)
  def loss(norm, b):
    return jnp.sum(norm(params, state, x + b[None], True)[0] ** 3 * weights)
  grad_proper = jax.jit(jax.grad(lambda b: loss(proper, b)))(bias)
  grad_broken = jax.jit(jax.grad(lambda b: loss(broken, b)))(bias)
  assert float(jnp.max(jnp.abs(grad_proper))) < 1e-4  # The mean subtraction cancels b.
  assert float(jnp.min(jnp.abs(grad_broken))) > 1e-2  # Treated as a constant, it does not.


def _fake_result(name, number, verdict):
  return {"name": name, "claim_number": number, "claim": f"Claim {number} holds.",
          "source": "A paper, §1", "published": "14x", "criterion": "confirmed if x ≥ 3",
          "measured": f"x = {number}.5 ± 0.1", "verdict": verdict,
          "command": f"python -m bnjax_examples.experiments --config={name}.py --workdir=DIR",
          "plot": "plot.png", "seeds": [0, 1, 2], "elapsed_s": 12.0, "notes": ["A note."],
          "data": {}}


def test_findings_renders_every_result_with_the_criterion_before_the_number(tmp_path, monkeypatch):
  monkeypatch.setattr(findings, "NOT_DONE", {4: "A claim: not built yet.", 9: "Measured below."})
  results_dir = tmp_path / "results"
  for name, number, verdict in (("later", 9, "not confirmed"), ("first", 1, "confirmed")):
    os.makedirs(results_dir / name)
    (results_dir / name / "result.json").write_text(json.dumps(_fake_result(name, number,
                                                                            verdict)))
  output = tmp_path / "FINDINGS.md"
  findings.main(["--results", str(results_dir), "--output", str(output)])
  text = output.read_text()
  assert text.index("## Claim 1:") < text.index("## Claim 9:")  # Claim order, not name order.
  section = text[text.index("## Claim 9:"):]
  assert section.index("confirmed if x ≥ 3") < section.index("x = 9.5 ± 0.1")
  assert "**Verdict:** **not confirmed**" in section
  assert "![later](results/later/plot.png)" in section
  assert "--config=later.py" in section
  assert "A note." in section
  assert "| 1. [Claim 1 holds.](#claim-1) | **confirmed** | 3 | 12 s |" in text
  # A claim without a result is listed as not measured; one with a result is not.
  assert "\n- 4. A claim: not built yet." in text
  assert "| 4. A claim | not run | | |" in text
  assert "Measured below." not in text
  assert "do not edit by hand" in text
  assert "under load" in text


def test_findings_gives_each_experiment_of_one_claim_its_own_anchor():
  results = [{**_fake_result(name, 3, "confirmed"), "_dir": name} for name in ("base", "variant")]
  text = findings.render(results, "results")
  assert text.count('<a id="claim-3"></a>') == 1
  assert text.count('<a id="claim-3-variant"></a>') == 1
  assert "(#claim-3) |" in text
  assert "(#claim-3-variant) |" in text


def test_findings_refuses_a_result_without_a_field(tmp_path):
  result = _fake_result("first", 1, "confirmed")
  del result["criterion"]
  os.makedirs(tmp_path / "first")
  (tmp_path / "first" / "result.json").write_text(json.dumps(result))
  with pytest.raises(ValueError, match=r"first.*result\.json lacks the fields criterion"):
    findings.load_results(str(tmp_path))


def test_runner_refuses_an_unknown_experiment(tmp_path):
  import ml_collections
  config = ml_collections.ConfigDict({"experiment": "no_such_claim"})
  with pytest.raises(ValueError, match="Unknown experiment 'no_such_claim'"):
    runner.run_experiment(config, str(tmp_path))


def test_result_fields_name_what_findings_prints():
  rendered = findings.render([dict(_fake_result("x", 1, "confirmed"), _dir="x")], "results")
  for field in ("claim", "source", "published", "criterion", "measured", "verdict", "command"):
    assert field in RESULT_FIELDS
    assert str(_fake_result("x", 1, "confirmed")[field]) in rendered

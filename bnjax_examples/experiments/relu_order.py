"""Claim 5: batch norm before or after the ReLU.

The original paper normalises the pre-activation (``dense -> BN -> ReLU``; Ioffe & Szegedy 2015,
§3.2); some lecture notes call that "a bad idea" and normalise after the non-linearity. Here: a
ReLU MLP and a small CNN on the digits with batch norm before the ReLU, after it, and without
normalisation, 5 seeds each; the verdict compares the final test accuracy of "after" and
"before" and is given only if the difference exceeds two standard errors. Also measured: the mean
and standard deviation of what the next layer sees after a ReLU of normalised values (per unit,
over the training set, with batch statistics), at initialisation and after training, against the
unit-Gaussian values ``E[relu(z)] = 1/sqrt(2π) = 0.399`` and
``std(relu(z)) = sqrt(1/2 - 1/(2π)) = 0.584``.
"""

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bnjax_examples.experiments import harness

GAUSSIAN_MEAN = float(1 / np.sqrt(2 * np.pi))  # E[relu(z)], z ~ N(0, 1).
GAUSSIAN_STD = float(np.sqrt(0.5 - 1 / (2 * np.pi)))  # std(relu(z)).


MODELS = ("mlp", "cnn")


def _train_placement(config: ml_collections.ConfigDict, model_name: str, placement: str
                     ) -> dict[str, np.ndarray]:
  data = harness.digits()
  if model_name == "mlp":
    model = harness.MLP(hidden=tuple(config.hidden), activation="relu", placement=placement)
    hidden, num_steps = len(config.hidden), config.num_steps
  else:
    model = harness.CNN(features=tuple(config.cnn_features), placement=placement)
    hidden, num_steps = len(config.cnn_features), config.cnn_num_steps
  norm = harness.bnjax_norm(momentum=config.momentum)

  def next_layer_input(params, states):
    """Per layer, the mean over units of each unit's mean and std of what the next layer sees."""
    _, _, taps = model.apply(params, states, data.train_x, True, norm)
    def per_unit(t):  # Every axis but the channels.
      return tuple(range(t.ndim - 1))
    return (jnp.stack([jnp.mean(jnp.mean(t, axis=per_unit(t))) for t in taps[:hidden]]),
            jnp.stack([jnp.mean(jnp.std(t, axis=per_unit(t))) for t in taps[:hidden]]))

  def one_run(key):
    initial = model.init(jax.random.fold_in(key, 0), data.train_x.shape[1])
    mean_0, std_0 = next_layer_input(*initial)
    params, states, history = harness.train(
        model, norm, data, key, config.learning_rate, batch_size=config.batch_size,
        num_steps=num_steps, eval_every=config.eval_every)
    mean_1, std_1 = next_layer_input(params, states)
    return {"test_accuracy": history["test_accuracy"], "train_loss": history["train_loss"],
            "initial_mean": mean_0, "initial_std": std_0, "final_mean": mean_1,
            "final_std": std_1}

  # Seeds one after another for the CNN: `vmap` over seeds batches the kernels, which turns each
  # convolution into a grouped one, slow on CPU.
  over_seeds = jax.vmap(one_run) if model_name == "mlp" else functools.partial(lax.map, one_run)
  results = harness.jit(over_seeds, config.fast_compile)(harness.seed_keys(config.seeds))
  return {name: np.asarray(value) for name, value in results.items()}


def _compare(config: ml_collections.ConfigDict, results: dict[str, dict[str, np.ndarray]]
             ) -> tuple[dict[str, Any], str, str]:
  """``(summary, verdict, measured text)`` of one model's three placements."""
  summary: dict[str, Any] = {}
  for placement, r in results.items():
    summary[placement] = {k: harness.mean_and_spread(r[k])
                          for k in ("initial_mean", "initial_std", "final_mean", "final_std")}
    summary[placement]["final_test_accuracy"] = harness.mean_and_spread(
        r["test_accuracy"][:, -1])
  before = results["before"]["test_accuracy"][:, -1]
  after = results["after"]["test_accuracy"][:, -1]
  n = len(config.seeds)
  ddof = 1 if n > 1 else 0
  difference = float(after.mean() - before.mean())
  standard_error = float(np.sqrt(before.var(ddof=ddof) / n + after.var(ddof=ddof) / n))
  if n > 1 and abs(difference) > 2 * standard_error:
    verdict = "confirmed" if difference > 0 else "not confirmed"
  else:
    verdict = "inconclusive"
  summary["difference"] = difference
  summary["standard_error"] = standard_error
  s = summary["before"]
  measured = (
      f"final test accuracy (mean ± std over {n} seeds): before "
      f"{100 * before.mean():.2f} ± {100 * before.std(ddof=ddof):.2f} %, after "
      f"{100 * after.mean():.2f} ± {100 * after.std(ddof=ddof):.2f} %, none "
      f"{100 * summary['none']['final_test_accuracy']['mean']:.2f} %; after − before = "
      f"{100 * difference:+.2f} points (2 standard errors: {200 * standard_error:.2f}). With BN "
      f"before the ReLU the next layer sees, per unit, mean {s['initial_mean']['mean'][0]:.3f} "
      f"and std {s['initial_std']['mean'][0]:.3f} at initialisation (first layer; unit "
      f"Gaussian: {GAUSSIAN_MEAN:.3f}, {GAUSSIAN_STD:.3f}), {s['final_mean']['mean'][0]:.3f} and "
      f"{s['final_std']['mean'][0]:.3f} after training")
  return summary, verdict, measured


def run(config: ml_collections.ConfigDict, plot_path: str) -> dict[str, Any]:
  """Trains the three placements of each model, computes the verdict and draws the figure."""
  results = {m: {p: _train_placement(config, m, p) for p in ("before", "after", "none")}
             for m in config.models}
  compared = {m: _compare(config, r) for m, r in results.items()}
  verdicts = {verdict for _, verdict, _ in compared.values()}
  if "not confirmed" in verdicts:
    verdict = "not confirmed"
  elif verdicts == {"confirmed"}:
    verdict = "confirmed"
  else:
    verdict = "inconclusive"
  measured = " ".join(f"{m.upper()}: {text} (verdict alone: {v})."
                      for m, (_, v, text) in compared.items())
  _plot(config, results, plot_path)
  return {
      "claim_number": 5,
      "claim": ("Batch norm after the ReLU works better than before it (the original paper's "
                "placement)."),
      "source": "Ioffe & Szegedy 2015, §3.2 (before); lecture notes that call it 'a bad idea'",
      "published": ("no number; the next layer sees mean 0.399, std 0.584 after a ReLU of unit "
                    "Gaussians (analytic)"),
      "criterion": ("per model, confirmed if the final test accuracy with BN after the ReLU "
                    "exceeds that with BN before by more than 2 standard errors of the difference "
                    "(over seeds), not confirmed if it falls short by more than that, "
                    "inconclusive otherwise; overall, not confirmed if either model says so, "
                    "confirmed if both do, inconclusive otherwise"),
      "measured": measured,
      "verdict": verdict,
      "seeds": list(config.seeds),
      "notes": [("The CNN is a small functional one (harness.CNN, channels "
                 f"{tuple(config.cnn_features)}), not the example's flax CNN, which always "
                 "normalises before the ReLU.")],
      "data": {"summary": {m: summary for m, (summary, _, _) in compared.items()},
               "gaussian_mean": GAUSSIAN_MEAN, "gaussian_std": GAUSSIAN_STD},
  }


def _plot(config, all_results, plot_path: str) -> None:
  figure, axes = harness.new_figure(len(all_results), 2, (11, 4 * len(all_results)))
  for row, (model_name, results) in enumerate(all_results.items()):
    _plot_model(config, model_name, results, axes[row])
  figure.savefig(plot_path, dpi=100)


def _plot_model(config, model_name, results, axes) -> None:
  num_evals = results["before"]["test_accuracy"].shape[1]
  steps = config.eval_every * np.arange(1, num_evals + 1)
  ax = axes[0]
  for placement, r in results.items():
    curves = 100 * r["test_accuracy"]
    label = f"BN {placement} the ReLU" if placement != "none" else "no BN"
    line, = ax.plot(steps, curves.mean(axis=0), label=label)
    ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=line.get_color(),
                    alpha=0.2)
  ax.set(xlabel="step", ylabel="test accuracy (%)", ylim=(80, 100),
         title=f"{model_name.upper()}: test accuracy (band: min-max over seeds)")
  ax = axes[1]
  layers = np.arange(1, len(results["before"]["initial_mean"][0]) + 1)
  for placement in ("before", "after"):
    r = results[placement]
    for when, marker in (("initial", "o"), ("final", "s")):
      ax.errorbar(layers, r[f"{when}_mean"].mean(axis=0), yerr=r[f"{when}_std"].mean(axis=0),
                  marker=marker, capsize=3, linestyle="none",
                  label=f"BN {placement}, {when}: mean ± std")
  ax.axhline(GAUSSIAN_MEAN, color="black", linestyle="dashed", label="unit Gaussian: 0.399")
  ax.axhline(GAUSSIAN_MEAN + GAUSSIAN_STD, color="grey", linestyle="dotted",
             label="0.399 + 0.584")
  ax.set(xlabel="hidden layer", ylabel="what the next layer sees (per unit)",
         title=f"{model_name.upper()}: mean ± std of the next layer's inputs")
  ax.set_xticks(layers)
  for ax in axes:
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)

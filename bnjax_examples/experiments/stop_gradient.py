"""Claim 4: normalising outside the gradient step makes the parameters blow up.

Ioffe & Szegedy (2015, §2): if the batch mean is treated as a constant by the gradient, a bias ``b``
before the normalisation is updated without changing the output, so "b will grow indefinitely
while the loss remains fixed", and with the variance too the model blows up. Here: a ReLU MLP whose
hidden dense layers keep their bias, normalised by `bnjax.batch_norm` (the gradient flows through
the batch statistics) or by the same formula with `jax.lax.stop_gradient` on the batch mean and
variance, at two learning rates. Measured over training: ‖b‖ and ‖W‖ of the hidden layers, the
training loss and the test accuracy.
"""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

import bnjax
from bnjax_examples.experiments import harness

ARMS = ("batch norm", "stop_gradient")


def stop_gradient_norm(momentum: float) -> harness.Norm:
  """Batch norm whose batch mean and variance are constants to the gradient (broken on purpose)."""
  def norm(params, state, x, train):
    if not train:
      return bnjax.batch_norm(params, state, x, False)
    mean = lax.stop_gradient(jnp.mean(x, axis=0))
    var = lax.stop_gradient(jnp.var(x, axis=0))
    y = params.scale[None] * (x - mean[None]) * lax.rsqrt(var + 1e-5)[None] + params.bias[None]
    count = jnp.asarray(x.shape[0], jnp.int32)
    new_state, _ = bnjax.update_running_stats(state, mean, var, count, momentum, unbiased=False)
    return y, new_state
  return norm


def _train_arm(config: ml_collections.ConfigDict, arm: str) -> dict[str, np.ndarray]:
  data = harness.digits()
  model = harness.MLP(hidden=tuple(config.hidden), activation="relu", placement="before",
                      dense_bias=True)
  norm = (harness.bnjax_norm(momentum=config.momentum) if arm == "batch norm"
          else stop_gradient_norm(config.momentum))
  hidden = len(config.hidden)

  def evaluate(params, states):
    logits, _, _ = model.apply(params, states, data.test_x, False, norm)
    layers = params["dense"][:hidden]
    return {"test_accuracy": harness.accuracy(logits, data.test_y),
            "bias_norm": jnp.sqrt(sum(jnp.sum(layer["b"] ** 2) for layer in layers)),
            "weight_norm": jnp.sqrt(sum(jnp.sum(layer["w"] ** 2) for layer in layers))}

  def one_run(learning_rate, key):
    return harness.train(model, norm, data, key, learning_rate, batch_size=config.batch_size,
                         num_steps=config.num_steps, eval_every=config.eval_every,
                         evaluate=evaluate)[2]

  rates = jnp.repeat(jnp.asarray(config.learning_rates, jnp.float32), len(config.seeds))
  keys = jnp.tile(harness.seed_keys(config.seeds), len(config.learning_rates))
  history = harness.jit(jax.vmap(one_run), config.fast_compile)(rates, keys)
  shape = (len(config.learning_rates), len(config.seeds))
  return {name: np.asarray(value).reshape(shape + value.shape[1:])
          for name, value in history.items()}


# Norms are compared above this floor: a bias with zero gradient drifts at the rounding level
# (about 1e-7 per step), which is no growth.
NORM_FLOOR = 1e-3


def _growth(curve: np.ndarray) -> float:
  """``(final + floor) / (mid-run + floor)``: how much a norm grew over the second half."""
  middle, final = float(curve[len(curve) // 2 - 1]), float(curve[-1])
  return (final + NORM_FLOOR) / (middle + NORM_FLOOR)


def run(config: ml_collections.ConfigDict, plot_path: str) -> dict[str, Any]:
  """Trains both arms at both learning rates, computes the verdict and draws the figure."""
  histories = {arm: _train_arm(config, arm) for arm in ARMS}
  rates = list(config.learning_rates)
  table: dict[str, Any] = {}
  for arm, history in histories.items():
    table[arm] = {}
    for i, rate in enumerate(rates):
      row = {}
      for name in ("bias_norm", "weight_norm"):
        curves = history[name][i]  # [seeds, evals]
        row[f"{name}_final"] = harness.mean_and_spread(curves[:, -1])
        row[f"{name}_growth"] = harness.mean_and_spread([_growth(c) for c in curves])
      losses = history["train_loss"][i]
      row["train_loss_final"] = harness.mean_and_spread(losses[:, -1])
      # Below 1: the loss still fell over the second half (it is not "fixed").
      row["train_loss_change"] = harness.mean_and_spread(
          losses[:, -1] / losses[:, losses.shape[1] // 2 - 1])
      row["test_accuracy_final"] = harness.mean_and_spread(history["test_accuracy"][i][:, -1])
      table[arm][str(rate)] = row
  growth = config.growth
  blows_up = all(max(table["stop_gradient"][str(r)]["bias_norm_growth"]["mean"],
                     table["stop_gradient"][str(r)]["weight_norm_growth"]["mean"]) >= growth
                 for r in rates)
  proper_steady = all(max(table["batch norm"][str(r)]["bias_norm_growth"]["mean"],
                          table["batch norm"][str(r)]["weight_norm_growth"]["mean"]) < growth
                      for r in rates)
  verdict = "confirmed" if blows_up and proper_steady else "not confirmed"
  pieces = []
  for r in rates:
    for arm in ARMS:
      row = table[arm][str(r)]
      pieces.append(
          f"{arm} at learning rate {r:g}: ‖b‖ {row['bias_norm_final']['mean']:.3g} (x"
          f"{row['bias_norm_growth']['mean']:.2f} over the second half), ‖W‖ "
          f"{row['weight_norm_final']['mean']:.3g} (x{row['weight_norm_growth']['mean']:.2f}), "
          f"training loss x{row['train_loss_change']['mean']:.2f} over the second half, "
          f"test accuracy {100 * row['test_accuracy_final']['mean']:.1f} %")
  _plot(config, histories, plot_path)
  return {
      "claim_number": 4,
      "claim": ("Normalising outside the gradient step (batch mean and variance treated as "
                "constants) makes the parameters blow up while the loss does not improve."),
      "source": "Ioffe & Szegedy 2015, §2",
      "published": "'b will grow indefinitely while the loss remains fixed' (no number)",
      "criterion": (f"confirmed if, at every learning rate, ‖b‖ or ‖W‖ of the hidden layers grows "
                    f"by ≥ {growth}x over the second half of training with stop_gradient (mean "
                    f"over seeds), and by < {growth}x with proper batch norm (norms compared "
                    f"above a floor of {NORM_FLOOR:g}, below which a parameter counts as zero)"),
      "measured": "; ".join(pieces),
      "verdict": verdict,
      "seeds": list(config.seeds),
      "notes": [("The hidden dense layers keep their bias in both arms; with proper batch norm "
                 "it gets a zero gradient and stays at its initial 0.")],
      "data": {"learning_rates": rates, "table": table,
               "curves": {arm: {name: h[name].mean(axis=1).tolist()
                                for name in ("bias_norm", "weight_norm", "train_loss",
                                             "test_accuracy")}
                          for arm, h in histories.items()}},
  }


def _plot(config, histories, plot_path: str) -> None:
  figure, axes = harness.new_figure(2, 2, (11, 8))
  steps = config.eval_every * np.arange(1, config.num_steps // config.eval_every + 1)
  panels = (("bias_norm", "‖b‖ of the hidden layers", "log"),
            ("weight_norm", "‖W‖ of the hidden layers", "log"),
            ("train_loss", "training loss", "log"), ("test_accuracy", "test accuracy", "linear"))
  for ax, (name, label, scale) in zip(axes.flat, panels, strict=True):
    for arm, history in histories.items():
      for i, rate in enumerate(config.learning_rates):
        curves = history[name][i]
        ax.plot(steps, curves.mean(axis=0), linestyle="-" if arm == "batch norm" else "--",
                label=f"{arm}, learning rate {rate:g}")
    ax.set(xlabel="step", ylabel=label, yscale=scale)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  figure.suptitle("Batch norm vs stop_gradient on the batch statistics (mean over seeds)")
  figure.savefig(plot_path, dpi=100)

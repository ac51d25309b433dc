r"""Claim 2: batch norm does not help by reducing internal covariate shift; it smooths the loss.

Santurkar, Tsipras, Ilyas & Madry ("How does batch normalization help optimization?", NeurIPS
2018) train a network whose batch-norm outputs get random noise, drawn afresh at every step, so that
the next layer's input distribution moves more than without batch norm at all, and find it trains
about as well as clean batch norm; they then show that batch norm makes the loss and its gradient
change less along the gradient direction. Here, with a ReLU MLP on the digits (the harness MLP,
5 hidden layers + the output layer), three arms:

* ``none``: no normalisation (dense layers with biases);
* ``batch norm``: dense → `bnjax.batch_norm` → ReLU;
* ``noisy batch norm``: the same, with per-unit noise after the normalisation (after γ, β),
  redrawn every step: :math:`y \leftarrow y \cdot s + t`, :math:`s \sim U(1 - b, 1 + b)`,
  :math:`t \sim U(-a, a)`. The noise has unit-mean scale and zero-mean shift, so evaluation
  without noise is the network's expected layer; it is off in evaluation.

Measured, per arm and seed:

* the test accuracy (evaluation mode) after every epoch;
* the drift of the layer inputs: at every step, on a fixed probe batch in training mode (with
  that step's noise), each hidden layer's output (the next layer's input, after the ReLU) per unit
  mean :math:`\mu_{t,u}` and std :math:`\sigma_{t,u}`; the drift of a layer is
  :math:`\overline{|\mu_{t,u} - \mu_{t-1,u}|} / \overline{\sigma_{t,u}}` (means over units and
  steps; also the same for σ), relative so that arms with activations of different size compare;
* the smoothness along the gradient after every epoch, on the probe batch (training-mode batch
  statistics, no noise): :math:`g = \nabla L(w)`, the loss range
  :math:`\max_\eta L(w - \eta g) - \min_\eta L(w - \eta g)` over :math:`\eta \in \{0\} \cup H`
  and the gradient change :math:`\lVert g(w) - g(w - \eta g) \rVert / \lVert g(w) \rVert` for each
  :math:`\eta \in H = \{0.05, 0.1, 0.2, 0.4\}`.
"""

from collections.abc import Callable
import os
import time
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

import bnjax
from bnjax_examples.experiments import harness

ARMS = ("none", "batch norm", "noisy batch norm")


def noisy_norm(momentum: float) -> harness.Norm:
  """Batch norm followed, in training, by the per-unit noise ``y · scale + shift`` in its state.

  The state is ``{'bn': BatchNormState, 'scale': [C], 'shift': [C]}``; the training loop puts a
  fresh draw in ``scale`` and ``shift`` before every step (ones and zeros: clean batch norm).
  """
  def norm(params, state, x, train):
    y, bn = bnjax.batch_norm(params, state["bn"], x, train, momentum=momentum)
    if train:
      y = y * state["scale"][None] + state["shift"][None]
    return y, {**state, "bn": bn}
  return norm


def _norm_state(width: int) -> dict[str, Any]:
  return {"bn": bnjax.init(width)[1], "scale": jnp.ones((width,)), "shift": jnp.zeros((width,))}


def draw_noise(states: list[dict[str, Any]], key: jax.Array, amplitude: jax.Array
               ) -> list[dict[str, Any]]:
  """`states` with a fresh noise draw per layer: scale ~ U(1 − b, 1 + b), shift ~ U(−a, a).

  Args:
    states: the layers' norm states.
    key: this step's key.
    amplitude: ``[a, b]``; zeros give clean batch norm.
  """
  new = []
  for i, state in enumerate(states):
    k_scale, k_shift = jax.random.split(jax.random.fold_in(key, i))
    width = state["scale"].shape
    u_scale = jax.random.uniform(k_scale, width, minval=-1.0, maxval=1.0)
    u_shift = jax.random.uniform(k_shift, width, minval=-1.0, maxval=1.0)
    new.append({**state, "scale": 1 + amplitude[1] * u_scale, "shift": amplitude[0] * u_shift})
  return new


def along_gradient(loss: Callable[[Any], jax.Array], params: Any, etas: jax.Array
                   ) -> dict[str, jax.Array]:
  r"""The loss and the gradient along the gradient direction, from `params`.

  With :math:`g = \nabla L(w)`: ``loss_range`` is :math:`\max - \min` of
  :math:`L(w - \eta g)` over :math:`\eta \in \{0\} \cup` `etas`, ``grad_change[k]`` is
  :math:`\lVert g(w) - g(w - \eta_k g) \rVert / \lVert g(w) \rVert` (norms over every leaf of
  the parameter tree), ``probe_loss`` is :math:`L(w)`.

  Args:
    loss: a scalar function of the parameters.
    params: the point w, a pytree.
    etas: [E] step sizes.
  """
  value, g = jax.value_and_grad(loss)(params)

  def norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))

  def step(eta):
    moved = jax.tree.map(lambda p, d: p - eta * d, params, g)
    value_eta, g_eta = jax.value_and_grad(loss)(moved)
    return value_eta, norm(jax.tree.map(jnp.subtract, g, g_eta))
  values, changes = lax.map(step, etas)
  every = jnp.concatenate([value[None], values])
  return {"probe_loss": value, "loss_range": jnp.max(every) - jnp.min(every),
          "grad_change": changes / norm(g)}


def _run_arm(config: ml_collections.ConfigDict, arm: str, amplitudes: np.ndarray
             ) -> dict[str, np.ndarray]:
  """Trains one network structure for every (noise amplitude, seed); everything measured.

  `amplitudes` is [A, 2] (one row per arm sharing this structure); the results have leading axes
  [A, seeds].
  """
  data = harness.digits()
  placement = "none" if arm == "none" else "before"
  model = harness.MLP(hidden=tuple(config.hidden), activation="relu", placement=placement)
  norm = noisy_norm(config.momentum)
  layers = len(config.hidden)
  num_train = data.train_x.shape[0]
  steps_per_epoch = num_train // config.batch_size
  etas = jnp.asarray(config.etas, jnp.float32)

  def one_run(key, amplitude):
    params, states = model.init(jax.random.fold_in(key, 0), data.train_x.shape[1], _norm_state)
    batch_key, noise_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 3)
    probe_rows = jax.random.permutation(jax.random.fold_in(key, 2), num_train)[:config.probe]
    probe_x, probe_y = data.train_x[probe_rows], data.train_y[probe_rows]

    def loss_fn(params, states, x, y):
      logits, new_states, _ = model.apply(params, states, x, True, norm)
      return harness.cross_entropy(logits, y), new_states

    def step(carry, t):
      params, states = carry
      states = draw_noise(states, jax.random.fold_in(noise_key, t), amplitude)
      _, _, taps = model.apply(params, states, probe_x, True, norm)
      means = jnp.stack([jnp.mean(tap, axis=0) for tap in taps[:layers]])
      stds = jnp.stack([jnp.std(tap, axis=0) for tap in taps[:layers]])
      rows = harness.batch_indices(batch_key, t, num_train, config.batch_size)
      (loss, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, states, data.train_x[rows], data.train_y[rows])
      params = jax.tree.map(lambda p, g: p - config.learning_rate * g, params, grads)
      return (params, states), (loss, means, stds)

    def landscape(params, states):
      clean = draw_noise(states, noise_key, jnp.zeros((2,)))
      return along_gradient(lambda p: loss_fn(p, clean, probe_x, probe_y)[0], params, etas)

    def epoch(carry, e):
      carry, (losses, means, stds) = lax.scan(
          step, carry, e * steps_per_epoch + jnp.arange(steps_per_epoch))
      params, states = carry
      logits, _, _ = model.apply(params, states, data.test_x, False, norm)
      record = {"test_accuracy": harness.accuracy(logits, data.test_y),
                "train_loss": jnp.mean(losses), **landscape(params, states)}
      # Drift between consecutive steps within the epoch, relative to the layer's mean std.
      level = jnp.mean(stds, axis=(0, 2))
      record["drift_mean"] = jnp.mean(jnp.abs(jnp.diff(means, axis=0)), axis=(0, 2)) / level
      record["drift_std"] = jnp.mean(jnp.abs(jnp.diff(stds, axis=0)), axis=(0, 2)) / level
      record["drift_mean_absolute"] = jnp.mean(jnp.abs(jnp.diff(means, axis=0)), axis=(0, 2))
      record["std_level"] = level
      return carry, record

    _, history = lax.scan(epoch, (params, states), jnp.arange(config.epochs))
    return history

  over_seeds = jax.vmap(one_run, in_axes=(0, None))
  over_arms = jax.vmap(over_seeds, in_axes=(None, 0))
  results = harness.jit(over_arms, config.fast_compile)(harness.seed_keys(config.seeds),
                                                        jnp.asarray(amplitudes, jnp.float32))
  return {name: np.asarray(value) for name, value in results.items()}


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """``(mean(a) − mean(b), standard error of the difference)`` over seeds."""
  n = len(a)
  ddof = 1 if n > 1 else 0
  return (float(a.mean() - b.mean()),
          float(np.sqrt(a.var(ddof=ddof) / n + b.var(ddof=ddof) / n)))


def run(config: ml_collections.ConfigDict, plot_path: str) -> dict[str, Any]:
  """Trains the three arms, computes the verdict and draws the figure."""
  cpu_start = time.process_time()
  noise = [float(config.noise_shift), float(config.noise_scale)]
  plain = _run_arm(config, "none", np.zeros((1, 2)))
  normed = _run_arm(config, "batch norm", np.asarray([[0.0, 0.0], noise]))
  results = {"none": {k: v[0] for k, v in plain.items()},
             "batch norm": {k: v[0] for k, v in normed.items()},
             "noisy batch norm": {k: v[1] for k, v in normed.items()}}
  n = len(config.seeds)

  def per_seed(arm, key):
    """Per seed: the mean over epochs (and layers, η) of a measurement."""
    value = results[arm][key]
    return value.reshape(value.shape[0], -1).mean(axis=1)

  summary = {}
  for arm, r in results.items():
    summary[arm] = {
        "final_test_accuracy": harness.mean_and_spread(r["test_accuracy"][:, -1]),
        "final_train_loss": harness.mean_and_spread(r["train_loss"][:, -1]),
        "drift_mean": harness.mean_and_spread(r["drift_mean"].mean(axis=1)),  # Per layer.
        "drift_std": harness.mean_and_spread(r["drift_std"].mean(axis=1)),
        "drift_mean_absolute": harness.mean_and_spread(r["drift_mean_absolute"].mean(axis=1)),
        "std_level": harness.mean_and_spread(r["std_level"].mean(axis=1)),
        "loss_range": harness.mean_and_spread(per_seed(arm, "loss_range")),
        "grad_change": harness.mean_and_spread(r["grad_change"].mean(axis=1)),  # Per η.
        "probe_loss": harness.mean_and_spread(r["probe_loss"]),  # Per epoch.
    }

  # (1) Not ICS: noisy BN within 1 point of BN, and its layer inputs drift more than without BN.
  final = {arm: r["test_accuracy"][:, -1] for arm, r in results.items()}
  noisy_gap = _difference(final["noisy batch norm"], final["batch norm"])
  drift = {arm: per_seed(arm, "drift_mean") for arm in ARMS}
  drift_ratio = float(drift["noisy batch norm"].mean() / drift["none"].mean())
  drift_gap = _difference(drift["noisy batch norm"], drift["none"])
  trains_as_well = abs(noisy_gap[0]) <= config.accuracy_tolerance
  drifts_more = drift_gap[0] > 2 * drift_gap[1]
  not_ics = "confirmed" if trains_as_well and drifts_more else "not confirmed"
  # (2) Smoother: BN's loss range and gradient change along g ≥ 2× smaller than without BN.
  smooth = {key: float(per_seed("none", key).mean() / per_seed("batch norm", key).mean())
            for key in ("loss_range", "grad_change")}
  smoother = ("confirmed" if min(smooth.values()) >= config.smoothness_factor
              else "not confirmed")
  parts = {"not_internal_covariate_shift": not_ics, "smoother_landscape": smoother}
  matched = _matched_loss_ratios(results)
  first_epoch = float(results["none"]["loss_range"][:, 0].mean()
                      / results["batch norm"]["loss_range"][:, 0].mean())
  verdict = "confirmed" if set(parts.values()) == {"confirmed"} else "not confirmed"

  def acc(arm):
    s = summary[arm]["final_test_accuracy"]
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} %"

  def over_seeds(arm, key, fmt=".3f"):
    v = per_seed(arm, key)
    return f"{v.mean():{fmt}} ± {v.std(ddof=1 if n > 1 else 0):{fmt}}"

  etas = list(config.etas)
  change = {arm: summary[arm]["grad_change"]["mean"] for arm in ARMS}
  measured = (
      f"final test accuracy (mean ± std over {n} seeds): none {acc('none')}, BN "
      f"{acc('batch norm')}, noisy BN {acc('noisy batch norm')}; noisy − BN = "
      f"{100 * noisy_gap[0]:+.2f} points. Drift of the layer inputs' per-unit mean between "
      f"consecutive steps, relative to their std (mean over layers and steps): none "
      f"{over_seeds('none', 'drift_mean')}, BN {over_seeds('batch norm', 'drift_mean')}, noisy BN "
      f"{over_seeds('noisy batch norm', 'drift_mean')} ({drift_ratio:.1f}× none's); of the "
      f"per-unit std: none {over_seeds('none', 'drift_std')}, BN "
      f"{over_seeds('batch norm', 'drift_std')}, noisy BN "
      f"{over_seeds('noisy batch norm', 'drift_std')}: part 1 {not_ics}. Along the gradient "
      f"(mean over epochs), loss range for η ≤ {max(etas)}: none "
      f"{over_seeds('none', 'loss_range')}, BN {over_seeds('batch norm', 'loss_range')} "
      f"({smooth['loss_range']:.1f}× smaller); gradient change ‖g(w) − g(w − ηg)‖/‖g‖ for η = "
      f"{', '.join(str(e) for e in etas)}: none "
      f"{', '.join(f'{v:.3f}' for v in change['none'])}, BN "
      f"{', '.join(f'{v:.3f}' for v in change['batch norm'])} "
      f"({smooth['grad_change']:.1f}× smaller on average): part 2 {smoother}. At matched probe "
      f"loss instead of matched epoch (each epoch of the network without BN against the BN "
      f"epoch of nearest mean probe loss, {len(matched)} epochs in BN's range), the loss range "
      f"is {np.median(matched) if matched else float('nan'):.1f}× smaller with BN (median); after "
      f"the first epoch alone it is {first_epoch:.2f}× (mean over seeds)")
  _plot(config, results, plot_path)
  return {
      "claim_number": 2,
      "claim": ("Batch norm does not work by reducing internal covariate shift: with noise that "
                "makes the layer inputs drift it trains as well; it makes the loss smoother."),
      "source": ("Santurkar, Tsipras, Ilyas, Madry, NeurIPS 2018, 'How does batch normalization "
                 "help optimization?' (§2, noisy BN; §3, landscape)"),
      "published": ("qualitative (VGG on CIFAR-10): noisy BN's test accuracy ≈ BN's ≫ no BN's "
                    "while its layer inputs are less stable than without BN; with BN the loss "
                    "range and the gradient change along the gradient are clearly smaller (plots, "
                    "no single number)"),
      "criterion": (
          "two parts fixed before the run. (1) Not internal covariate shift: confirmed if noisy "
          f"BN's final test accuracy is within {100 * config.accuracy_tolerance:.0f} point of "
          "BN's (mean over seeds) and its layer inputs' relative mean drift exceeds that of the "
          "network without BN by more than 2 standard errors, not confirmed otherwise. "
          "(2) Smoothness: confirmed if, averaged over epochs (and η), both the loss range and "
          f"the gradient change along the gradient are at least {config.smoothness_factor:g}× "
          "smaller with BN than without, not confirmed otherwise. Overall confirmed if both "
          "parts are, not confirmed otherwise"),
      "measured": measured,
      "verdict": verdict,
      "seeds": list(config.seeds),
      "notes": [
          (f"This run used {time.process_time() - cpu_start:.0f} s of CPU time (all threads of "
           f"the process; 1-minute load average {os.getloadavg()[0]:.1f} at its end on the "
           "2 shared cores): on an unloaded machine its wall time is about that or less."),
          (f"A ReLU MLP, hidden widths {tuple(config.hidden)}, plain SGD at learning rate "
           f"{config.learning_rate}, batch {config.batch_size}, {config.epochs} epochs; noise "
           f"scale ~ U({1 - config.noise_scale:g}, {1 + config.noise_scale:g}), shift ~ "
           f"U(−{config.noise_shift:g}, {config.noise_shift:g}) per unit and step, in training "
           "only (the paper's noise has non-unit mean; here the scale has mean 1 so that the "
           "clean evaluation network is the expected one)."),
          (f"The drift and the landscape use a fixed probe batch of {config.probe} training "
           "examples per seed, in training mode (batch statistics of the probe batch; for the "
           "landscape no noise). Part 2 compares the same epochs; the BN network's loss falls "
           "faster, so the measurement also gives the ratio at matched probe loss (not part of "
           "the criterion)."),
          ("The paper's network is a VGG on CIFAR-10; the digits are easy enough that the "
           "network without BN also trains well at this learning rate, so part 1's accuracy "
           "comparison is between two arms that both reach high accuracy."),
      ],
      "data": {"summary": summary, "etas": etas, "parts": parts,
               "noisy_minus_batch_norm": {"difference": noisy_gap[0],
                                          "standard_error": noisy_gap[1]},
               "drift_ratio_noisy_to_none": drift_ratio,
               "smoothness_ratio_none_to_batch_norm": smooth,
               "matched_loss_range_ratios": matched},
  }


def _matched_loss_ratios(results: dict[str, dict[str, np.ndarray]]) -> list[float]:
  """Loss range without BN ÷ with BN, each epoch without BN against BN's nearest-loss epoch.

  Losses and ranges are means over seeds; only epochs whose probe loss lies within the range of
  BN's probe losses are matched.
  """
  none_loss = results["none"]["probe_loss"].mean(axis=0)
  bn_loss = results["batch norm"]["probe_loss"].mean(axis=0)
  none_range = results["none"]["loss_range"].mean(axis=0)
  bn_range = results["batch norm"]["loss_range"].mean(axis=0)
  ratios = []
  for loss, loss_range in zip(none_loss, none_range, strict=True):
    if bn_loss.min() <= loss <= bn_loss.max():
      nearest = int(np.argmin(np.abs(bn_loss - loss)))
      ratios.append(float(loss_range / bn_range[nearest]))
  return ratios


def _plot(config, results, plot_path: str) -> None:
  figure, axes = harness.new_figure(2, 2, (12, 8.5))
  epochs = np.arange(1, config.epochs + 1)

  def band(ax, x, curves, arm):
    line, = ax.plot(x, curves.mean(axis=0), label=arm, marker=".")
    ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=line.get_color(),
                    alpha=0.2)
  ax = axes[0][0]
  for arm, r in results.items():
    band(ax, epochs, 100 * r["test_accuracy"], arm)
  ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (band: min-max)")
  ax = axes[0][1]
  layers = np.arange(1, len(config.hidden) + 1)
  for arm, r in results.items():
    band(ax, layers, r["drift_mean"].mean(axis=1), arm)
  ax.set(xlabel="hidden layer", ylabel="mean |Δ per-unit mean| / mean std", yscale="log",
         title="layer-input drift between consecutive steps", xticks=layers)
  ax = axes[1][0]
  for arm, r in results.items():
    band(ax, epochs, r["loss_range"], arm)
  ax.set(xlabel="epoch", ylabel="max − min of L(w − ηg)", yscale="log",
         title=f"loss range along the gradient, η ≤ {max(config.etas)}")
  ax = axes[1][1]
  etas = np.asarray(config.etas)
  for arm, r in results.items():
    band(ax, etas, r["grad_change"].mean(axis=1), arm)
  ax.set(xlabel="η", ylabel="‖g(w) − g(w − ηg)‖ / ‖g(w)‖", xscale="log", yscale="log",
         title="gradient change along the gradient (mean over epochs)")
  for row in axes:
    for ax in row:
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=8)
  figure.savefig(plot_path, dpi=90)

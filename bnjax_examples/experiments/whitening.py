r"""Claim 11: whitening the channels (ZCA, IterNorm) vs standardising them one by one (batch norm).

Decorrelated batch norm (Huang et al., CVPR 2018) whitens each group of channels with
:math:`W = \Sigma^{-1/2}` (ZCA) and reports that PCA whitening, :math:`W = \Lambda^{-1/2} D^\top`,
suffers "stochastic axis swapping" (eigenvectors are defined only up to order and sign, so a
channel maps to a different output from batch to batch) "to the extent that training never
converges"; IterNorm (Huang et al., CVPR 2019) approximates :math:`\Sigma^{-1/2}` with ``T``
Newton–Schulz steps and reports ≈0.5–1 point over batch norm on ResNets (unverified). Here: the
harness CNN on the digits with batch norm (`bnjax.batch_norm`), ZCA, IterNorm and PCA
(`bnjax.whitening_batch_norm` with ``method`` ``'zca'``, ``'iterative'``, ``'pca'``) in place of
batch norm, the same seeds and steps. Measured, per arm:

* the test accuracy (evaluation mode: the running mean and covariance);
* the mean absolute off-diagonal correlation :math:`\frac{1}{C(C-1)}\sum_{i \ne j} |\rho_{ij}|`
  between the channels of each normalised layer output and of the next layer's input (after the
  ReLU), over the test set's positions in evaluation mode, and the correlation matrices (plot);
* how much the whitening matrix changes between batches (the axis-swapping mechanism): for the
  trained network's layer inputs on consecutive training batches, the relative change
  :math:`\lVert W_{t+1} - W_t \rVert_F / \lVert W_t \rVert_F` of ZCA's and PCA's matrices;
* the time of one training step (forward, backward, SGD update), median of interleaved rounds.
"""

from collections.abc import Callable, Sequence
import functools
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

ARMS = ("batch norm", "zca", "iternorm", "pca")
METHODS = {"zca": "zca", "iternorm": "iterative", "pca": "pca"}  # Arm -> whitening method.


def arm_norm(arm: str, config: ml_collections.ConfigDict
             ) -> tuple[harness.Norm, Callable[[int], Any] | None]:
  """``(norm, norm_state)`` of an arm, as `harness.train` takes them.

  Raises:
    ValueError: if `arm` is not one of `ARMS`.
  """
  if arm == "batch norm":
    return harness.bnjax_norm(momentum=config.momentum, epsilon=config.epsilon), None
  if arm not in METHODS:
    raise ValueError(f"whitening: `arm` must be one of {ARMS}; got {arm!r}.")
  options = {"method": METHODS[arm], "group_size": config.group_size,
             "iterations": config.iterations}

  def norm(params, state, x, train):
    return bnjax.whitening_batch_norm(params, state, x, train, momentum=config.momentum,
                                      epsilon=config.epsilon, **options)

  def norm_state(width: int) -> bnjax.WhiteningState:
    return bnjax.init_whitening(width, group_size=config.group_size)[1]
  return norm, norm_state


def _model(config: ml_collections.ConfigDict) -> "harness.CNN | harness.MLP":
  """The harness CNN, or (``config.model == 'mlp'``, the smoke test's) a ReLU MLP."""
  if config.model == "mlp":
    return harness.MLP(hidden=tuple(config.features), activation="relu", placement="before")
  return harness.CNN(features=tuple(config.features), placement="before")


def mean_abs_off_diagonal(correlation: jax.Array) -> jax.Array:
  r"""``Σ_{i≠j} |corr_ij| / (C (C - 1))`` of a correlation matrix [C, C]."""
  c = correlation.shape[-1]
  off = jnp.abs(correlation) * (1 - jnp.eye(c, dtype=correlation.dtype))
  return jnp.sum(off, axis=(-2, -1)) / (c * (c - 1))


def channel_correlation(x: jax.Array) -> jax.Array:
  """The [C, C] correlation of the channels (last axis) of `x`, every other axis a sample.

  A channel without variance gets zero correlation with the others (not NaN).
  """
  rows = x.reshape(-1, x.shape[-1])
  centred = rows - jnp.mean(rows, axis=0, keepdims=True)
  covariance = jnp.matmul(centred.T, centred, precision=lax.Precision.HIGHEST) / rows.shape[0]
  std = jnp.sqrt(jnp.diagonal(covariance))
  safe = jnp.where(std > 0, std, 1.0)
  correlation = covariance / safe[:, None] / safe[None, :]
  return jnp.where((std[:, None] > 0) & (std[None, :] > 0), correlation, 0.0)


def _whitening_change(inputs: Sequence[jax.Array], config: ml_collections.ConfigDict
                      ) -> dict[str, jax.Array]:
  """Per method, per layer: mean over consecutive batches of ``‖W_{t+1} − W_t‖_F / ‖W_t‖_F``.

  `inputs[i]` is layer i's normalisation input, [batches, N, H, W, C]; the covariance of each
  batch (biased, over N·H·W positions) is split into the groups the layer whitens.
  """
  change = {}
  for method in ("zca", "pca"):
    per_layer = []
    for x in inputs:
      batches, c = x.shape[0], x.shape[-1]
      rows = x.reshape(batches, -1, c)
      centred = rows - jnp.mean(rows, axis=1, keepdims=True)
      covariance = jnp.einsum("bmi,bmj->bij", centred, centred,
                              precision=lax.Precision.HIGHEST) / rows.shape[1]
      d = min(config.group_size, c)
      groups = [covariance[:, g:g + d, g:g + d] for g in range(0, c, d)]
      ratios = []
      for sigma in groups:
        w = bnjax.whitening.whitening_matrix(sigma, method=method, epsilon=config.epsilon)
        ratios.append(jnp.linalg.norm(w[1:] - w[:-1], axis=(-2, -1))
                      / jnp.linalg.norm(w[:-1], axis=(-2, -1)))
      per_layer.append(jnp.mean(jnp.stack(ratios)))
    change[method] = jnp.stack(per_layer)
  return change


def _train_arm(config: ml_collections.ConfigDict, arm: str) -> dict[str, np.ndarray]:
  """Trains one arm for every seed; its accuracy, correlations and whitening-matrix changes."""
  data = harness.digits()
  model = _model(config)
  norm, norm_state = arm_norm(arm, config)
  layers = len(config.features)
  probe = config.probe_batches * config.batch_size

  def measure(params, states, key):
    _, _, taps = model.apply(params, states, data.test_x, False, norm)
    # The last layer's matrices, for the plot.
    correlations = {"normalised": channel_correlation(taps[2 * layers - 1]),
                    "next_input": channel_correlation(taps[layers - 1])}
    off_diagonal = {
        "normalised": jnp.stack([mean_abs_off_diagonal(channel_correlation(t))
                                 for t in taps[layers:]]),
        "next_input": jnp.stack([mean_abs_off_diagonal(channel_correlation(t))
                                 for t in taps[:layers]]),
    }
    # Each layer's normalisation input on consecutive training batches, in training mode.
    rows = jax.random.permutation(key, data.train_x.shape[0])[:probe]
    captured: list[jax.Array] = []

    def capture(p, s, x, train):
      captured.append(x)
      return norm(p, s, x, train)

    def inputs_of(batch):
      del captured[:]
      model.apply(params, states, batch, True, capture)
      return list(captured)
    per_batch = [inputs_of(data.train_x[rows[b * config.batch_size:(b + 1) * config.batch_size]])
                 for b in range(config.probe_batches)]
    inputs = [jnp.stack([batch[i] for batch in per_batch]) for i in range(layers)]
    return correlations, off_diagonal, _whitening_change(inputs, config)

  def one_run(key):
    params, states, history = harness.train(
        model, norm, data, key, config.learning_rate, batch_size=config.batch_size,
        num_steps=config.num_steps, eval_every=config.eval_every, norm_state=norm_state)
    correlations, off_diagonal, change = measure(params, states, jax.random.fold_in(key, 2))
    return {"test_accuracy": history["test_accuracy"], "train_loss": history["train_loss"],
            "last_correlation": correlations["normalised"],
            "last_correlation_next": correlations["next_input"],
            "off_diagonal": off_diagonal["normalised"],
            "off_diagonal_next": off_diagonal["next_input"],
            "zca_change": change["zca"], "pca_change": change["pca"]}

  # Seeds one after another: `vmap` over seeds would turn each convolution into a grouped one,
  # slow on CPU.
  run = harness.jit(functools.partial(lax.map, one_run), config.fast_compile)
  results = run(harness.seed_keys(config.seeds))
  return {name: np.asarray(value) for name, value in results.items()}


def _time_steps(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Per arm, the median seconds of one training step; interleaved rounds, ratios to batch norm."""
  data = harness.digits()
  model = _model(config)
  x, y = data.train_x[:config.batch_size], data.train_y[:config.batch_size]
  steps = {}
  for arm in ARMS:
    norm, norm_state = arm_norm(arm, config)
    params, states = model.init(jax.random.key(0), x.shape[1], norm_state)

    def step(params, states, norm=norm):
      def loss_fn(params):
        logits, new_states, _ = model.apply(params, states, x, True, norm)
        return harness.cross_entropy(logits, y), new_states
      (_, new_states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return jax.tree.map(lambda p, g: p - config.learning_rate * g, params, grads), new_states
    step = harness.jit(step, config.fast_compile)
    params, states = jax.block_until_ready(step(params, states))  # Compiles.
    steps[arm] = (step, params, states)
  load_before = os.getloadavg()[0]
  seconds = {arm: [] for arm in ARMS}
  for _ in range(config.timing_rounds):
    for arm in ARMS:
      step, params, states = steps[arm]
      start = time.perf_counter()
      for _ in range(config.timing_steps):
        params, states = step(params, states)
      jax.block_until_ready((params, states))
      seconds[arm].append((time.perf_counter() - start) / config.timing_steps)
      steps[arm] = (step, params, states)
  reference = np.asarray(seconds["batch norm"])
  return {
      "median_ms": {arm: 1e3 * float(np.median(s)) for arm, s in seconds.items()},
      "ratio_to_batch_norm": {arm: float(np.median(np.asarray(s) / reference))
                              for arm, s in seconds.items()},
      "load_average": [load_before, os.getloadavg()[0]],
      "rounds": config.timing_rounds, "steps_per_round": config.timing_steps,
  }


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """``(mean(a) − mean(b), standard error of the difference)`` over seeds."""
  n = len(a)
  ddof = 1 if n > 1 else 0
  return (float(a.mean() - b.mean()),
          float(np.sqrt(a.var(ddof=ddof) / n + b.var(ddof=ddof) / n)))


def _sub_verdict(difference: float, standard_error: float, n: int) -> str:
  """Confirmed above +2 standard errors, not confirmed below −2, inconclusive between."""
  if n < 2 or abs(difference) <= 2 * standard_error:
    return "inconclusive"
  return "confirmed" if difference > 0 else "not confirmed"


def run(config: ml_collections.ConfigDict, plot_path: str) -> dict[str, Any]:
  """Trains the four arms, times their steps, computes the verdict and draws the figure."""
  cpu_start = time.process_time()
  results = {arm: _train_arm(config, arm) for arm in ARMS}
  timing = _time_steps(config)
  n = len(config.seeds)
  final = {arm: r["test_accuracy"][:, -1] for arm, r in results.items()}
  summary = {arm: {
      "final_test_accuracy": harness.mean_and_spread(final[arm]),
      "final_train_loss": harness.mean_and_spread(r["train_loss"][:, -1]),
      "off_diagonal": harness.mean_and_spread(r["off_diagonal"]),
      "off_diagonal_next": harness.mean_and_spread(r["off_diagonal_next"]),
      "zca_change": harness.mean_and_spread(r["zca_change"]),
      "pca_change": harness.mean_and_spread(r["pca_change"]),
  } for arm, r in results.items()}

  # (1) Whitening decorrelates: ZCA's and IterNorm's outputs at every layer, under half of BN's.
  bn_off = np.asarray(summary["batch norm"]["off_diagonal"]["mean"])
  ratios = {arm: (np.asarray(summary[arm]["off_diagonal"]["mean"]) / bn_off).tolist()
            for arm in ("zca", "iternorm", "pca")}
  decorrelates = ("confirmed" if all(max(ratios[a]) < 0.5 for a in ("zca", "iternorm"))
                  else "not confirmed")
  # (2) PCA's stochastic axis swapping hurts: PCA's accuracy below ZCA's by > 2 standard errors.
  pca_gap = _difference(final["zca"], final["pca"])
  pca_hurts = _sub_verdict(*pca_gap, n)
  # (3) Whitening beats batch norm: the better of ZCA and IterNorm above BN by > 2 standard errors.
  best = max(("zca", "iternorm"), key=lambda a: final[a].mean())
  gain = _difference(final[best], final["batch norm"])
  improves = _sub_verdict(*gain, n)
  parts = {"decorrelates": decorrelates, "pca_hurts": pca_hurts, "improves_accuracy": improves}
  if "not confirmed" in parts.values():
    verdict = "not confirmed"
  elif set(parts.values()) == {"confirmed"}:
    verdict = "confirmed"
  else:
    verdict = "inconclusive"

  def acc(arm):
    s = summary[arm]["final_test_accuracy"]
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} %"

  def off(arm, key="off_diagonal"):
    return "/".join(f"{v:.3f}" for v in summary[arm][key]["mean"])

  def change(arm, method):
    return "/".join(f"{v:.3f}" for v in summary[arm][f"{method}_change"]["mean"])

  ms, ratio = timing["median_ms"], timing["ratio_to_batch_norm"]
  measured = (
      f"final test accuracy (mean ± std over {n} seeds): BN {acc('batch norm')}, ZCA "
      f"{acc('zca')}, IterNorm {acc('iternorm')}, PCA {acc('pca')}; {best} − BN = "
      f"{100 * gain[0]:+.2f} points (2 SE {200 * gain[1]:.2f}): {improves}; ZCA − PCA = "
      f"{100 * pca_gap[0]:+.2f} points (2 SE {200 * pca_gap[1]:.2f}): {pca_hurts}. Mean "
      f"|off-diagonal correlation| of the normalised outputs (layers 1/2, evaluation mode, test "
      f"set): BN {off('batch norm')}, ZCA {off('zca')}, IterNorm {off('iternorm')}, PCA "
      f"{off('pca')} ({decorrelates}); of the next layer's input after the ReLU: BN "
      f"{off('batch norm', 'off_diagonal_next')}, ZCA {off('zca', 'off_diagonal_next')}, "
      f"IterNorm {off('iternorm', 'off_diagonal_next')}, PCA {off('pca', 'off_diagonal_next')}. "
      f"Between consecutive batches of {config.batch_size}, the whitening matrix of the trained "
      f"ZCA network's layer inputs changes by {change('zca', 'zca')} (relative Frobenius, layers "
      f"1/2) when computed by ZCA and by {change('zca', 'pca')} when computed by PCA; in the PCA "
      f"network {change('pca', 'zca')} vs {change('pca', 'pca')}. Time per training step "
      f"(median of {timing['rounds']} interleaved rounds of {timing['steps_per_round']}): BN "
      f"{ms['batch norm']:.2f} ms, ZCA {ms['zca']:.2f} ms ({ratio['zca']:.2f}×), IterNorm "
      f"{ms['iternorm']:.2f} ms ({ratio['iternorm']:.2f}×), PCA {ms['pca']:.2f} ms "
      f"({ratio['pca']:.2f}×)")
  _plot(config, results, timing, plot_path)
  load = timing["load_average"]
  return {
      "claim_number": 11,
      "claim": ("Whitening the channels (ZCA, IterNorm) decorrelates them and trains better than "
                "per-channel standardisation (batch norm); PCA whitening fails by stochastic axis "
                "swapping."),
      "source": ("Huang, Yang, Lang, Deng, CVPR 2018 (Decorrelated BN, §3); Huang, Zhou, Zhu, "
                 "Liu, Shao, CVPR 2019 (IterNorm)"),
      "published": ("no number for the digits; DBN: PCA whitening's axis swapping makes training "
                    "fail ('never converges'), ZCA does not; DBN and IterNorm improve residual "
                    "networks over BN on CIFAR and ImageNet, IterNorm by ≈0.5–1 point top-1 "
                    "(unverified figure); IterNorm's cost: matrix products only, this project's "
                    "benchmark target ≤ 3× batch norm per layer"),
      "criterion": (
          "three parts, each fixed before the run. (1) Decorrelation: confirmed if the mean "
          "|off-diagonal correlation| of ZCA's and IterNorm's normalised outputs (evaluation "
          "mode, test set) is below half of batch norm's at every layer, not confirmed otherwise. "
          "(2) Axis swapping: confirmed if PCA's final test accuracy is below ZCA's by more than "
          "2 standard errors of the difference over seeds, not confirmed if above by more than "
          "that, inconclusive otherwise. (3) Accuracy: confirmed if the better of ZCA and "
          "IterNorm beats batch norm by more than 2 standard errors, not confirmed if it falls "
          "short by more than that, inconclusive otherwise. Overall: not confirmed if any part is "
          "not confirmed, confirmed if all three are, inconclusive otherwise. Speed is measured, "
          "not judged"),
      "measured": measured,
      "verdict": verdict,
      "seeds": list(config.seeds),
      "notes": [
          (f"This run used {time.process_time() - cpu_start:.0f} s of CPU time (all threads of "
           f"the process; 1-minute load average {os.getloadavg()[0]:.1f} at its end on the "
           "2 shared cores): on an unloaded machine its wall time is about that or less."),
          (f"The harness CNN (channels {tuple(config.features)}, conv → norm → ReLU → 2×2 average "
           f"pool), {config.num_steps} SGD steps at batch {config.batch_size}, learning rate "
           f"{config.learning_rate}; whitening groups of {config.group_size} channels (each "
           "layer whitened whole), IterNorm T = "
           f"{config.iterations}, ε = {config.epsilon}, momentum {config.momentum}; evaluation "
           "whitens with the running covariance (bnjax's default, the consistent estimate)."),
          ("bnjax has no PCA variant that avoids axis swapping; PCA here is "
           "`method='pca'` (eigenvectors by decreasing variance, signs as `eigh` returns them), "
           "the cautionary example of DBN's paper. Cholesky whitening exists too but is not in "
           "the claim."),
          ("'Next layer's input' is the ReLU output before the 2×2 average pool, which only "
           "averages positions within each channel."),
          ("The step times were measured on 2 CPU cores shared with other jobs (1-minute load "
           f"average {load[0]:.1f} before the timing, {load[1]:.1f} after); the ratios are "
           "medians of per-round ratios of interleaved runs, a tiny CNN at batch 64, not the "
           "speed of bnjax on large layers (see benchmarks/RESULTS-whitening.md)."),
          ("On the digits every arm but PCA reaches about 98 %, so an accuracy gain of whitening "
           "of the published size (well under a point) is within the seed spread; the accuracy "
           "part can only come out inconclusive here unless the gain is larger."),
      ],
      "data": {"summary": summary, "off_diagonal_ratio_to_batch_norm": ratios,
               "parts": parts, "timing": timing, "best_whitening": best,
               "accuracy_gain": {"difference": gain[0], "standard_error": gain[1]},
               "zca_minus_pca": {"difference": pca_gap[0], "standard_error": pca_gap[1]},
               "last_layer_correlation_seed0": {arm: r["last_correlation"][0].tolist()
                                                for arm, r in results.items()}},
  }


def _plot(config, results, timing, plot_path: str) -> None:
  figure, axes = harness.new_figure(3, 4, (16, 11))
  for column, arm in enumerate(ARMS):
    for row, (key, what) in enumerate((("last_correlation", "normalised output"),
                                       ("last_correlation_next", "next layer's input"))):
      ax = axes[row][column]
      image = ax.imshow(results[arm][key][0], vmin=-1, vmax=1, cmap="RdBu_r")
      off = results[arm]["off_diagonal" if row == 0 else "off_diagonal_next"][0, -1]
      ax.set(title=f"{arm}: last layer's {what}\n(seed 0; mean |off-diag| {off:.3f})",
             xlabel="channel", ylabel="channel")
      if column == len(ARMS) - 1:
        figure.colorbar(image, ax=ax, fraction=0.046)
  ax = axes[2][0]
  steps = config.eval_every * np.arange(1, results["batch norm"]["test_accuracy"].shape[1] + 1)
  for arm, r in results.items():
    curves = 100 * r["test_accuracy"]
    line, = ax.plot(steps, curves.mean(axis=0), label=arm)
    ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=line.get_color(),
                    alpha=0.2)
  ax.set(xlabel="step", ylabel="test accuracy (%)", ylim=(40, 100),
         title="test accuracy (band: min-max over seeds)")
  ax.legend(fontsize=8)
  ax = axes[2][1]
  layers = np.arange(1, len(config.features) + 1)
  width = 0.2
  for k, arm in enumerate(ARMS):
    ax.bar(layers + (k - 1.5) * width, results[arm]["off_diagonal"].mean(axis=0), width,
           color=f"C{k}", label=arm)
  ax.set(xlabel="layer", ylabel="mean |off-diagonal correlation|", xticks=layers,
         title="normalised outputs (evaluation mode, test set)")
  ax.legend(fontsize=8)
  ax = axes[2][2]
  for k, arm in enumerate(ARMS):
    ax.bar(layers + (k - 1.5) * width, results[arm]["off_diagonal_next"].mean(axis=0), width,
           color=f"C{k}", label=arm)
  ax.set(xlabel="layer", ylabel="mean |off-diagonal correlation|", xticks=layers,
         title="next layer's input (after the ReLU)")
  ax.legend(fontsize=8)
  ax = axes[2][3]
  ms = timing["median_ms"]
  ax.bar(range(len(ARMS)), [ms[a] for a in ARMS], color=[f"C{k}" for k in range(len(ARMS))])
  ax.set_xticks(range(len(ARMS)), [f"{a}\n{timing['ratio_to_batch_norm'][a]:.2f}×" for a in ARMS])
  ax.set(ylabel="ms per training step", title="training step time (median, interleaved)")
  for row in axes[2]:
    row.grid(True, alpha=0.3)
  figure.savefig(plot_path, dpi=90)

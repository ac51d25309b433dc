r"""Claim 3: a bias added just before batch norm gets exactly zero gradient in training mode.

Batch norm subtracts the batch mean, so ``BN(xW + b) = BN(xW)`` for every ``b`` and
:math:`\partial L / \partial b = \sum_n \partial L / \partial h_n = 0` (Ioffe & Szegedy 2015, §3.2).
The network ``softmax(relu(BN(xW + b)) V)`` on a batch of digits; we measure
``max|dL/db| / max|dL/dβ|`` (β, BN's own bias, gets the gradient ``b`` would have had without BN)
with bnjax's closed-form backward pass and with JAX's autodiff through it, in float32 and float64,
with a mask over the batch and with the batch sharded over 8 (simulated) devices; and in evaluation
mode, where the running statistics are constants and ``b`` does matter.

Exactly zero is not expected in floating point: ``dL/db`` is a sum of ``m`` per-example terms that
cancel, so it is measured against ``m`` machine epsilons (``m`` the values per channel).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import bnjax
from bnjax_examples.experiments import harness

DEVICES = 8
CASES = ("plain", "masked", f"{DEVICES} devices")


def _network(train: bool, custom_vjp: bool, axis_name: Any = None):
  """``loss(w, b, beta, v, x, labels, weights)`` of ``softmax(relu(BN(xW + b)) V)``."""
  def loss(w, b, beta, v, x, labels, weights):
    h = x @ w + b[None]
    params = bnjax.BatchNormParams(scale=jnp.ones_like(beta), bias=beta)
    # Running statistics of a partly trained layer: evaluation mode normalises with constants.
    state = bnjax.BatchNormState(mean=jnp.full(beta.shape, 0.1, jnp.float32),
                                 var=jnp.full(beta.shape, 2.0, jnp.float32))
    mask = None if train is False else (weights > 0)[:, None]
    if train:
      y, _ = bnjax.batch_norm(params, state, h, True, mask=mask, axis_name=axis_name,
                              custom_vjp=custom_vjp)
    else:
      y, _ = bnjax.batch_norm(params, state, h, False)
    log_p = jax.nn.log_softmax(jax.nn.relu(y) @ v)
    per_example = -jnp.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]
    total = jnp.sum(per_example * weights)
    count = jnp.sum(weights)
    if axis_name is not None:
      total, count = jax.lax.psum(total, axis_name), jax.lax.psum(count, axis_name)
    return total / count
  return loss


def _gradients(case: str, train: bool, custom_vjp: bool, dtype: Any, key: jax.Array,
               batch_size: int, width: int, fast_compile: bool) -> tuple[float, float]:
  """``(max|dL/db|, max|dL/dβ|)`` for one case on one random batch and initialisation."""
  data = harness.digits()
  k_rows, k_w, k_v, k_mask = jax.random.split(key, 4)
  rows = jax.random.choice(k_rows, data.train_x.shape[0], (batch_size,), replace=False)
  x, labels = data.train_x[rows].astype(dtype), data.train_y[rows]
  w = (jax.random.normal(k_w, (x.shape[1], width)) / 8).astype(dtype)
  b = jnp.full((width,), 0.5, dtype)
  beta = jnp.zeros((width,), dtype)
  v = (jax.random.normal(k_v, (width, 10)) / np.sqrt(width)).astype(dtype)
  weights = jnp.ones((batch_size,), dtype)
  if case == "masked":  # A quarter of the rows are padding: outside the statistics and the loss.
    weights = (jax.random.uniform(k_mask, (batch_size,)) > 0.25).astype(dtype)
  gradient_fn = _gradient_fn(case, train, custom_vjp, fast_compile)
  grad_b, grad_beta = gradient_fn(w, b, beta, v, x, labels, weights)
  return float(jnp.max(jnp.abs(grad_b))), float(jnp.max(jnp.abs(grad_beta)))


@functools.cache
def _gradient_fn(case: str, train: bool, custom_vjp: bool, fast_compile: bool):
  """The jitted ``(dL/db, dL/dβ)`` of one case, compiled once for every seed (per dtype)."""
  if case == f"{DEVICES} devices":
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:DEVICES]), ("batch",))
    spec, replicated = jax.P("batch"), jax.P()
    loss = jax.shard_map(_network(train, custom_vjp, axis_name="batch"), mesh=mesh,
                         in_specs=(replicated,) * 4 + (spec,) * 3, out_specs=replicated)
  else:
    loss = _network(train, custom_vjp)
  return harness.jit(jax.grad(loss, argnums=(1, 2)), fast_compile)


def run(config: ml_collections.ConfigDict, plot_path: str) -> dict[str, Any]:
  """Measures the gradient ratio for every case, dtype, backward pass and mode; draws the bars."""
  cases = [c for c in CASES if c != f"{DEVICES} devices" or jax.device_count() >= DEVICES]
  notes = []
  if len(cases) < len(CASES):
    notes.append(f"Only {jax.device_count()} device(s): the {DEVICES}-device case was not run "
                 "(start through `python -m bnjax_examples.experiments`, which simulates 8).")
  notes.append("Which biases layer, group and instance norm cancel is measured by the "
               "bias_gradient_norms experiment.")
  rows = []  # One per (dtype, backward, mode, case): the worst ratio over the seeds.
  for dtype_name in config.dtypes:
    with jax.enable_x64(dtype_name == "float64"):
      dtype = jnp.dtype(dtype_name)
      for backward, custom_vjp in (("closed form", True), ("autodiff", False))[:config.backwards]:
        for mode, train in (("train", True), ("eval", False)):
          for case in cases:
            if not train and (case != "plain" or not custom_vjp):
              continue  # Evaluation mode has one backward pass and no batch statistics.
            ratios = []
            for seed in config.seeds:
              grad_b, grad_beta = _gradients(case, train, custom_vjp, dtype,
                                             jax.random.key(seed), config.batch_size, config.width,
                                             config.fast_compile)
              ratios.append(grad_b / grad_beta)
            rows.append({"dtype": dtype_name, "backward": backward, "mode": mode, "case": case,
                         "ratio_max": max(ratios), "ratio_per_seed": ratios,
                         "bound": config.batch_size * float(jnp.finfo(dtype).eps)})

  train_rows = [r for r in rows if r["mode"] == "train"]
  eval_rows = [r for r in rows if r["mode"] == "eval"]
  cancelled = all(r["ratio_max"] <= r["bound"] for r in train_rows)
  eval_matters = all(min(r["ratio_per_seed"]) >= 1e-2 for r in eval_rows)
  verdict = "confirmed" if cancelled and eval_matters else "not confirmed"
  worst = ", ".join(f"{max(r['ratio_max'] for r in train_rows if r['dtype'] == d):.1e} ({d}, "
                    f"bound {config.batch_size * float(np.finfo(d).eps):.1e})"
                    for d in config.dtypes)
  measured = (f"training mode, worst over {len(config.seeds)} seeds and every case: {worst}; "
              "evaluation mode: "
              f"{min(min(r['ratio_per_seed']) for r in eval_rows):.2f} or more")
  _plot(rows, plot_path)
  return {
      "claim_number": 3,
      "claim": "A bias added just before batch norm gets zero gradient in training mode (it is "
               "cancelled by the mean subtraction), but not in evaluation mode.",
      "source": "Ioffe & Szegedy 2015, §3.2",
      "published": "exactly 0 (analytically)",
      "criterion": ("confirmed if, in training mode, max|dL/db| / max|dL/dβ| ≤ m·ε (m = "
                    f"{config.batch_size} values per channel, ε the dtype's machine epsilon: the "
                    "rounding of a sum of m cancelling terms) for every case, dtype and backward "
                    "pass, and ≥ 0.01 in evaluation mode"),
      "measured": measured,
      "verdict": verdict,
      "seeds": list(config.seeds),
      "notes": notes,
      "data": {"rows": rows},
  }


def _plot(rows: list[dict[str, Any]], plot_path: str) -> None:
  figure, axes = harness.new_figure(1, 1, (9, 4))
  ax = axes[0, 0]
  labels = [f"{r['mode']}, {r['case']}\n{r['backward']}, {r['dtype']}" for r in rows]
  values = [max(r["ratio_max"], 1e-30) for r in rows]
  colours = ["tab:red" if r["mode"] == "eval" else
             ("tab:blue" if r["dtype"] == "float32" else "tab:green") for r in rows]
  ax.bar(range(len(rows)), values, color=colours)
  for i, r in enumerate(rows):
    ax.hlines(r["bound"], i - 0.4, i + 0.4, colors="black", linestyles="dashed")
  ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
  ax.set(yscale="log", ylabel="max|dL/db| / max|dL/dβ|",
         title="Gradient of a bias before batch norm (dashed: m·ε)")
  ax.grid(True, axis="y", alpha=0.3)
  figure.savefig(plot_path, dpi=100)

r"""Claim 3, other norms: which biases layer, group and instance norm cancel, and which they do not.

A norm subtracts a mean taken over a set of values; a bias added before it is cancelled exactly
when it is constant over every such set (then ``norm(h + b) = norm(h)`` and
:math:`\partial L / \partial b = 0`). So, for an ``[N, H, W, C]`` activation:

* layer norm over the channels: a per-channel bias is NOT cancelled (it varies inside the set),
  a bias constant over the channels (a scalar) is;
* layer norm over ``(H, W, C)``: a per-channel bias is NOT cancelled; a scalar bias is;
* group norm: a bias constant within each group of channels is cancelled; a per-channel one is NOT;
* instance norm (over ``(H, W)`` per channel): a per-channel bias is cancelled.

Network: ``dense(mean_pool(relu(norm(conv3x3(x) + b))))`` on a batch of 8x8 digits. We measure
``max|dL/db| / max|dL/dβ|`` (β: the norm's own per-channel bias) with bnjax's closed-form backward
pass and with JAX's autodiff through it, in float32 and float64. A cancelled bias is measured
against ``k·ε``, ``k`` the number of values summed into one component of ``dL/db`` (the rounding
bound of a sum of ``k`` terms that cancel); a bias that is not cancelled must reach 0.01.
"""

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

import bnjax
from bnjax_examples.experiments import harness

# (norm, bias shape, expected cancelled): the expectation is stated before anything is measured.
CASES = (
    ("layer norm over C", "per channel", False),
    ("layer norm over C", "scalar", True),
    ("layer norm over H,W,C", "per channel", False),
    ("layer norm over H,W,C", "scalar", True),
    ("group norm", "per channel", False),
    ("group norm", "per group", True),
    ("instance norm", "per channel", True),
)


def _normalise(norm: str, params: bnjax.BatchNormParams, h: jax.Array, groups: int,
               custom_vjp: bool) -> jax.Array:
  if norm == "layer norm over C":
    return bnjax.layer_norm(params, h, reduction_axes=-1, feature_axes=-1, custom_vjp=custom_vjp)
  if norm == "layer norm over H,W,C":
    return bnjax.layer_norm(params, h, reduction_axes=(1, 2, 3), feature_axes=-1,
                            custom_vjp=custom_vjp)
  if norm == "group norm":
    return bnjax.group_norm(params, h, num_groups=groups, custom_vjp=custom_vjp)
  if norm == "instance norm":
    return bnjax.instance_norm(params, h, custom_vjp=custom_vjp)
  raise ValueError(f"Unknown norm {norm!r}; expected one of {sorted({c[0] for c in CASES})}.")


def _expand_bias(bias_kind: str, b: jax.Array, channels: int) -> jax.Array:
  """The ``[C]`` bias added to every position from the parameter ``b`` of its own shape."""
  if bias_kind == "per channel":
    return b
  if bias_kind == "scalar":
    return jnp.broadcast_to(b, (channels,))
  return jnp.repeat(b, channels // b.shape[0])  # Per group: one value for C/G channels.


def bias_size(bias_kind: str, channels: int, groups: int) -> int:
  """The number of parameters of ``b``."""
  return {"per channel": channels, "scalar": 1, "per group": groups}[bias_kind]


@functools.cache
def _ratios_fn(custom_vjp: bool, dtype: Any, batch_size: int, channels: int, groups: int,
               fast_compile: bool):
  """``(key, train_x, train_y) -> max|dL/db| / max|dL/dβ|`` of every case in `CASES`.

  One jitted program (per dtype and backward pass) draws the batch, the weights and the biases
  from ``key`` and differentiates every case.
  """
  def loss(w, b, beta, v, x, labels, norm, bias_kind):
    h = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = h + _expand_bias(bias_kind, b, h.shape[-1])[None, None, None]
    params = bnjax.BatchNormParams(scale=jnp.ones_like(beta), bias=beta)
    y = jax.nn.relu(_normalise(norm, params, h, groups, custom_vjp))
    log_p = jax.nn.log_softmax(jnp.mean(y, axis=(1, 2)) @ v)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))

  def ratios(key, train_x, train_y):
    k_rows, k_w, k_b, k_v = jax.random.split(key, 4)
    rows = jax.random.choice(k_rows, train_x.shape[0], (batch_size,), replace=False)
    x = train_x[rows].reshape(-1, 8, 8, 1).astype(dtype)
    labels = train_y[rows]
    w = (jax.random.normal(k_w, (3, 3, 1, channels)) / 3).astype(dtype)
    beta = jnp.zeros((channels,), dtype)
    v = (jax.random.normal(k_v, (channels, 10)) / np.sqrt(channels)).astype(dtype)
    out = []
    for k, (norm, bias_kind, _) in zip(jax.random.split(k_b, len(CASES)), CASES, strict=True):
      b = (0.5 + jax.random.normal(k, (bias_size(bias_kind, channels, groups),))).astype(dtype)
      grad_b, grad_beta = jax.grad(loss, argnums=(1, 2))(w, b, beta, v, x, labels, norm,
                                                         bias_kind)
      out.append(jnp.max(jnp.abs(grad_b)) / jnp.max(jnp.abs(grad_beta)))
    return jnp.stack(out)
  return harness.jit(ratios, fast_compile)


def gradient_ratios(custom_vjp: bool, dtype: Any, key: jax.Array,
                    config: ml_collections.ConfigDict) -> list[float]:
  """``max|dL/db| / max|dL/dβ|`` of every case on one random batch and initialisation."""
  data = harness.digits()
  ratios = _ratios_fn(custom_vjp, dtype, config.batch_size, config.channels, config.groups,
                      config.fast_compile)(key, data.train_x, data.train_y)
  return [float(r) for r in ratios]


def summed_values(bias_kind: str, config: ml_collections.ConfigDict) -> int:
  """``k``: how many per-position gradients are summed into one component of ``dL/db``."""
  positions = config.batch_size * 8 * 8
  per_component = {"per channel": 1, "scalar": config.channels,
                   "per group": config.channels // config.groups}[bias_kind]
  return positions * per_component


def run(config: ml_collections.ConfigDict, plot_path: str) -> dict[str, Any]:
  """Measures the ratio for every case, dtype and backward pass; the verdict; the bars."""
  rows = []
  for dtype_name in config.dtypes:
    with jax.enable_x64(dtype_name == "float64"):
      dtype = jnp.dtype(dtype_name)
      for backward, custom_vjp in (("closed form", True), ("autodiff", False))[:config.backwards]:
        per_seed = [gradient_ratios(custom_vjp, dtype, jax.random.key(seed), config)
                    for seed in config.seeds]
        for i, (norm, bias_kind, expected) in enumerate(CASES):
          ratios = [seed_ratios[i] for seed_ratios in per_seed]
          k = summed_values(bias_kind, config)
          rows.append({"norm": norm, "bias": bias_kind, "expected_cancelled": expected,
                       "dtype": dtype_name, "backward": backward, "ratio_max": max(ratios),
                       "ratio_min": min(ratios), "ratio_per_seed": ratios, "summed_values": k,
                       "bound": k * float(jnp.finfo(dtype).eps)})

  def as_expected(r: dict[str, Any]) -> bool:
    if r["expected_cancelled"]:
      return r["ratio_max"] <= r["bound"]
    return r["ratio_min"] >= config.not_cancelled_floor
  for r in rows:
    r["as_expected"] = as_expected(r)
  verdict = "confirmed" if all(r["as_expected"] for r in rows) else "not confirmed"

  pieces = []
  for norm, bias_kind, expected in CASES:
    mine = [r for r in rows if r["norm"] == norm and r["bias"] == bias_kind]
    if expected:
      numbers = ", ".join(f"{d} ≤ {max(r['ratio_max'] for r in mine if r['dtype'] == d):.1e} "
                          f"(bound {next(r['bound'] for r in mine if r['dtype'] == d):.1e})"
                          for d in config.dtypes)
    else:
      numbers = f"≥ {min(r['ratio_min'] for r in mine):.2f}"
    pieces.append(f"{norm}, {bias_kind} bias (expected {'cancelled' if expected else 'not'}): "
                  f"{numbers}")
  passes = "both backward passes" if config.backwards == 2 else "the closed-form backward pass"
  measured = (f"max|dL/db| / max|dL/dβ| over {len(config.seeds)} seed(s), {passes}: "
              + "; ".join(pieces))
  _plot(rows, plot_path)
  return {
      "claim_number": 3,
      "claim": "Layer, group and instance norm cancel a bias before them only when it is "
               "constant over each set of values they take a mean over (a per-channel bias is "
               "not cancelled by layer norm over channels).",
      "source": "Ioffe & Szegedy 2015, §3.2 (the mean subtraction argument), applied to the sets "
                "of Ba et al. 2016 (layer norm), Ulyanov et al. 2016 (instance norm) and Wu & He "
                "2018 (group norm)",
      "published": "exactly 0 when the bias is constant over each normalised set (analytically); "
                   "not zero otherwise",
      "criterion": (
          "confirmed if every case behaves as stated before the run: for a bias expected to be "
          "cancelled, max|dL/db| / max|dL/dβ| ≤ k·ε (k the values summed into one component of "
          "dL/db, ε the dtype's machine epsilon) for every seed, dtype and backward pass; for a "
          f"bias expected not to be cancelled, ≥ {config.not_cancelled_floor} for every seed. "
          "Expected: layer norm over C cancels a scalar bias, not a per-channel one; layer norm "
          "over H,W,C the same; group norm cancels a bias constant within each group, not a "
          "per-channel one; instance norm cancels a per-channel bias"),
      "measured": measured,
      "verdict": verdict,
      "seeds": list(config.seeds),
      "notes": [
          (f"Batch of {config.batch_size} digits as [N, 8, 8, 1], a 3x3 convolution to "
           f"{config.channels} channels, group norm with {config.groups} groups; the bias b is "
           "drawn from N(0.5, 1) per component."),
          ("Batch norm itself (per-channel bias, cancelled) is measured by the bias_gradient "
           "experiment."),
      ],
      "data": {"rows": rows},
  }


def _plot(rows: list[dict[str, Any]], plot_path: str) -> None:
  figure, axes = harness.new_figure(1, 1, (9, 4.5))
  ax = axes[0, 0]
  labels = [f"{r['norm']}, {r['bias']}\n{r['backward']}, {r['dtype']}" for r in rows]
  values = [max(r["ratio_max"], 1e-30) for r in rows]
  colours = ["tab:red" if not r["expected_cancelled"] else
             ("tab:blue" if r["dtype"] == "float32" else "tab:green") for r in rows]
  ax.bar(range(len(rows)), values, color=colours)
  for i, r in enumerate(rows):
    if r["expected_cancelled"]:
      ax.hlines(r["bound"], i - 0.4, i + 0.4, colors="black", linestyles="dashed")
  ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=5)
  ax.set(yscale="log", ylabel="max|dL/db| / max|dL/dβ|",
         title="Bias before layer/group/instance norm (red: expected not cancelled; dashed: k·ε)")
  ax.grid(True, axis="y", alpha=0.3)
  figure.savefig(plot_path, dpi=100)

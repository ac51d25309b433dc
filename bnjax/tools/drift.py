r"""Drift diagnostics: how far a batch's statistics are from the running statistics.

Training normalises with the batch statistics :math:`\mu_B, \sigma_B^2`; evaluation with the
running statistics :math:`\mu, \sigma^2`. Per channel, two numbers say how different the two
normalisations are:

.. math::

   \mathrm{smd} = \frac{\mu_B - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
   \mathrm{log\_var\_ratio} = \log \frac{\sigma_B^2 + \epsilon}{\sigma^2 + \epsilon}

the standardised mean difference (the shift, in running standard deviations, that evaluation's
normalisation leaves in a batch like this one) and the log ratio of the variances the two modes
divide by (0 when they agree; :math:`\pm\log 2` is a factor of two). They are Batch
Renormalization's ``d`` and ``2 log r`` before clipping (Ioffe 2017), with ε inside both. Per layer
the summary is :math:`\max_c |\mathrm{smd}_c|` and :math:`\operatorname{mean}_c
|\mathrm{log\_var\_ratio}_c|`. The batch variance is the biased one that training normalises with,
compared with the running variance as stored (for a layer with ``unbiased_running_var`` the two
differ by ``N / (N - 1)`` even for identical data: evaluation really divides by the larger one).

`drift` is the pure function (for `bnjax.batch_norm`'s ``return_stats=True``); `linen_drift`
collects it from every `bnjax.BatchNorm` of a linen model after one training-mode ``apply`` with
``mutable=DRIFT_COLLECTIONS``, reusing what the layers sow; `nnx_drift` does the same for every
`bnjax.nnx.BatchNorm` of an NNX model in one call on a copy of it; `drift_summary` flattens either
report into scalars for a metrics log. None of them imports flax at import time.
"""

from collections.abc import Mapping, Sequence
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax import stats
from bnjax.tools import _nnx_moments
from bnjax.tools.precise import population_moments

__all__ = ["DRIFT_COLLECTIONS", "Drift", "drift", "drift_summary", "linen_drift", "nnx_drift"]

#: The ``mutable=`` list that makes a training-mode ``apply`` of a linen model return what
#: `linen_drift` reads: the updated running statistics, each `bnjax.BatchNorm`'s batch moments
#: (``bnjax.linen.BATCH_MOMENTS``) and its per-channel update flags (``bnjax.linen.DIAGNOSTICS``).
DRIFT_COLLECTIONS = ("batch_stats", "batch_moments", "diagnostics")


class Drift(NamedTuple):
  """The drift of one layer's batch statistics from its running statistics (see the module doc)."""

  #: ``(batch_mean - running_mean) / sqrt(running_var + eps)``, of the feature shape; float32+.
  smd: jax.Array
  #: ``log((batch_var + eps) / (running_var + eps))``, of the feature shape; same dtype.
  log_var_ratio: jax.Array
  #: ``max |smd|`` over the channels; scalar.
  max_abs_smd: jax.Array
  #: ``mean |log_var_ratio|`` over the channels; scalar.
  mean_abs_log_var_ratio: jax.Array
  #: int32 scalar: channels whose running statistics this batch did not update (non-finite batch
  #: statistics or no valid value), or None where the layer's update flags were not collected.
  skipped_channels: jax.Array | None = None


def drift(batch_mean: jax.Array, batch_var: jax.Array, running_mean: jax.Array,
          running_var: jax.Array, epsilon: float | jax.Array = 1e-5) -> Drift:
  r"""The standardised mean difference and log variance ratio of a batch against running stats.

  .. math::

     \mathrm{smd} = \frac{\mu_B - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
     \mathrm{log\_var\_ratio} = \log \frac{\sigma_B^2 + \epsilon}{\sigma^2 + \epsilon}

  per channel, computed in float32 at least, with the per-layer summary ``max |smd|`` and
  ``mean |log_var_ratio|``. A non-finite batch statistic gives a non-finite drift in its channel.

  Args:
    batch_mean: the batch mean :math:`\mu_B`, of the feature shape.
    batch_var: the biased batch variance :math:`\sigma_B^2` (what training normalises with).
    running_mean: the running mean :math:`\mu` (before this batch's update).
    running_var: the running variance :math:`\sigma^2` (before this batch's update).
    epsilon: the layer's ε.

  Returns:
    A `Drift` (``skipped_channels`` None).

  Raises:
    ValueError: if the four statistics do not have one shape.

  Examples:
    >>> d = bnjax.tools.drift(batch_mean=jnp.array([1.0, 0.0]), batch_var=jnp.array([4.0, 1.0]),
    ...                       running_mean=jnp.zeros(2), running_var=jnp.ones(2), epsilon=0.0)
    >>> d.smd, d.log_var_ratio  # 1 running std off; variance 4x
    (Array([1., 0.], dtype=float32), Array([1.3862944, 0.       ], dtype=float32))
    >>> float(d.max_abs_smd), round(float(d.mean_abs_log_var_ratio), 4)  # log(4) / 2
    (1.0, 0.6931)
  """
  shapes = {name: jnp.shape(value) for name, value in (
      ("batch_mean", batch_mean), ("batch_var", batch_var), ("running_mean", running_mean),
      ("running_var", running_var))}
  if len(set(shapes.values())) != 1:
    raise ValueError("bnjax.tools.drift: `batch_mean`, `batch_var`, `running_mean` and "
                     f"`running_var` must have one shape; got {shapes}.")
  dtype = jnp.promote_types(
      jnp.promote_types(jnp.result_type(batch_mean), jnp.result_type(running_mean)), jnp.float32)
  batch_mean, batch_var, running_mean, running_var = (
      jnp.asarray(v).astype(dtype) for v in (batch_mean, batch_var, running_mean, running_var))
  eps = jnp.asarray(epsilon).astype(dtype)
  smd = (batch_mean - running_mean) * jax.lax.rsqrt(running_var + eps)
  log_var_ratio = jnp.log(batch_var + eps) - jnp.log(running_var + eps)
  return Drift(smd=smd, log_var_ratio=log_var_ratio, max_abs_smd=jnp.max(jnp.abs(smd)),
               mean_abs_log_var_ratio=jnp.mean(jnp.abs(log_var_ratio)))


def linen_drift(variables: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Drift]:
  """The drift of every `bnjax.BatchNorm` layer of a linen model in one training-mode ``apply``.

  Call the model as in training with ``mutable=DRIFT_COLLECTIONS`` (or at least
  ``['batch_stats', bnjax.linen.BATCH_MOMENTS]``), then pass the variables it was called with and
  the updates it returned. Each layer's sown global batch moments (combined over ``axis_name``;
  for ghost batches, those of the whole batch) are compared, by `drift` with the layer's ε, with
  its running statistics in ``variables`` (before the update). A layer called more than once is
  reported for the exact pooled moments of its calls (`bnjax.tools.merge_population`). Where
  ``bnjax.linen.DIAGNOSTICS`` was collected, ``skipped_channels`` counts the channels whose
  running statistics were kept (over all calls). Pure and jittable: use it in the training step.

  Args:
    variables: the variables ``apply`` was called with (``batch_stats`` before the update).
    updates: the second output of ``apply(..., mutable=DRIFT_COLLECTIONS)``.

  Returns:
    ``{layer path: Drift}``, paths joined by ``/`` (e.g. ``'Block_0/BatchNorm_0'``; ``''`` for a
    model that is itself a `bnjax.BatchNorm`), in the order of the sown collection.

  Raises:
    ValueError: if ``updates`` hold no batch moments (the layers did not run in training mode,
      or ``bnjax.linen.BATCH_MOMENTS`` was not in ``mutable``).

  Examples:
    >>> from bnjax.tools import DRIFT_COLLECTIONS, linen_drift
    >>> model = bnjax.BatchNorm(use_running_average=False)
    >>> x = jnp.array([[1.0], [3.0]])
    >>> variables = model.init(jax.random.key(0), x)  # running mean 0, variance 1
    >>> _, updates = model.apply(variables, x, mutable=DRIFT_COLLECTIONS)
    >>> report = linen_drift(variables, updates)
    >>> report[''].smd, report[''].skipped_channels  # (2 - 0) / sqrt(1 + 1e-5)
    (Array([1.99999], dtype=float32), Array(0, dtype=int32))
  """
  from bnjax import linen  # flax is imported only by this function.

  sown = updates.get(linen.BATCH_MOMENTS)
  if not sown:
    raise ValueError(
        "bnjax.tools.linen_drift: `updates` hold no batch moments; call the model in training "
        f"mode with `mutable={list(DRIFT_COLLECTIONS)}`; got collections {sorted(updates)}.")
  if "batch_stats" not in variables:
    raise ValueError("bnjax.tools.linen_drift: `variables` have no 'batch_stats' collection; got "
                     f"collections {sorted(variables)}.")
  flags = updates.get(linen.DIAGNOSTICS, {})
  report = {}
  for path, calls in _leaves(sown, "moments"):
    running = _at(variables["batch_stats"], path)
    updated = _at(flags, path).get("batch_stats_updated") if _has(flags, path) else None
    report["/".join(path)] = _layer_drift(calls, running["mean"], running["var"], updated)
  return report


def nnx_drift(model: Any, x: Any, **call_kwargs: Any) -> dict[str, Drift]:
  """The drift of every `bnjax.nnx.BatchNorm` of an NNX model on one batch.

  The NNX counterpart of `linen_drift`, with the same per-layer result: ``model(x,
  **call_kwargs)`` runs once on a copy of the model (compiled once per input shape and settings),
  every norm layer normalising with its batch statistics as in training and every other module as
  the model is set. Each layer's global batch moments (combined over ``axis_name``; a layer called
  more than once pooled exactly over its calls) are compared by `drift`, with the layer's ε, with
  its running statistics. ``skipped_channels`` counts the channels whose running statistics a
  training step would have kept (over all calls). The model is not changed: its running
  statistics, parameters and random state stay as they were.

  Args:
    model: an ``nnx.Module`` containing `bnjax.nnx.BatchNorm` layers.
    x: the input, passed as the first argument of ``model``.
    **call_kwargs: further keyword arguments of ``model(x, ...)``; hashable values are static,
      arrays are traced.

  Returns:
    ``{layer path: Drift}``, paths joined by ``/`` (e.g. ``'blocks/0/bn'``; ``''`` for a model
    that is itself a `bnjax.nnx.BatchNorm`), in sorted order.

  Raises:
    ValueError: if no `bnjax.nnx.BatchNorm` ran in training mode.
    TypeError: if ``model`` is not an ``nnx.Module``.

  Examples:
    >>> from flax import nnx
    >>> from bnjax.tools import nnx_drift
    >>> model = bnjax.nnx.BatchNorm(1, rngs=nnx.Rngs(0))  # running mean 0, variance 1
    >>> report = nnx_drift(model, jnp.array([[1.0], [3.0]]))
    >>> report[''].smd, report[''].skipped_channels  # (2 - 0) / sqrt(1 + 1e-5)
    (Array([1.99999], dtype=float32), Array(0, dtype=int32))
  """
  from flax import nnx  # flax is imported only by this function.

  where = "nnx_drift"
  layers = _nnx_moments.norm_layers(model, where)
  running = {_path_name(path): (layer.mean[...], layer.var[...]) for path, layer in layers.items()}
  graphdef, rng_state, other_state = nnx.split(model, nnx.RngState, ...)
  static_kwargs, traced_kwargs = _nnx_moments.split_call_kwargs(call_kwargs)
  return _nnx_report(graphdef, static_kwargs, rng_state, other_state, x, traced_kwargs, running)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nnx_report(graphdef: Any, static_kwargs: tuple[tuple[str, Any], ...], rng_state: Any,
                other_state: Any, x: Any, traced_kwargs: Mapping[str, Any],
                running: Mapping[str, tuple[jax.Array, jax.Array]]) -> dict[str, Drift]:
  """`nnx_drift`'s measurement and report, one compiled program per model and input shape."""
  sown, _ = _nnx_moments.measure(graphdef, static_kwargs, rng_state, other_state, x,
                                 traced_kwargs)
  report = {}
  for path, calls in _leaves(sown, "moments"):
    running_mean, running_var = running[_path_name(path)]
    report[_path_name(path)] = _layer_drift(calls, running_mean, running_var,
                                            [moments["updated"] for moments in calls])
  if not report:
    raise ValueError("bnjax.tools.nnx_drift: no bnjax.nnx.BatchNorm layer ran in training mode; "
                     "they are switched to training mode, so the model's `__call__` must not pass "
                     "`use_running_average=True` to them.")
  return report


def _path_name(path: tuple[Any, ...]) -> str:
  return "/".join(str(key) for key in path)


def _layer_drift(calls: Sequence[Mapping[str, Any]], running_mean: jax.Array,
                 running_var: jax.Array, updated: Sequence[jax.Array] | None) -> Drift:
  """One layer's `Drift` for the pooled moments of its calls, with its skipped channels."""
  parts = [population_moments(moments) for moments in calls]
  total = stats.merge_moments(jax.tree.map(lambda *fields: jnp.stack(fields), *parts))
  layer = drift(total.mean, total.var, running_mean, running_var, calls[0]["epsilon"])
  if updated is not None:
    skipped = sum(jnp.sum(jnp.logical_not(u), dtype=jnp.int32) for u in updated)
    layer = layer._replace(skipped_channels=jnp.asarray(skipped, jnp.int32))
  return layer


def drift_summary(report: Mapping[str, Drift]) -> dict[str, jax.Array]:
  """The per-layer summary of a `linen_drift` report as flat scalars, e.g. for a metrics file.

  Args:
    report: ``{layer path: Drift}``, from `linen_drift`.

  Returns:
    ``{'<layer>/max_abs_smd': scalar, '<layer>/mean_abs_log_var_ratio': scalar}`` for every layer,
    and ``'<layer>/skipped_channels'`` where it was collected (``''`` for a model that is itself
    a `bnjax.BatchNorm`: the keys then start with ``/``).

  Examples:
    >>> d = bnjax.tools.drift(jnp.array([2.0]), jnp.array([1.0]), jnp.zeros(1), jnp.ones(1), 0.0)
    >>> bnjax.tools.drift_summary({'bn1': d})
    {'bn1/max_abs_smd': Array(2., dtype=float32), 'bn1/mean_abs_log_var_ratio': Array(0.,
    dtype=float32)}
  """
  summary = {}
  for layer, values in report.items():
    summary[f"{layer}/max_abs_smd"] = values.max_abs_smd
    summary[f"{layer}/mean_abs_log_var_ratio"] = values.mean_abs_log_var_ratio
    if values.skipped_channels is not None:
      summary[f"{layer}/skipped_channels"] = values.skipped_channels
  return summary


def _leaves(tree: Mapping[Any, Any], name: str, path: tuple[Any, ...] = ()
            ) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
  """``(layer path, sown values)`` for every entry called `name` in a sown collection."""
  found = []
  for key, value in tree.items():
    if key == name and isinstance(value, tuple):
      found.append((path, value))
    elif isinstance(value, Mapping):
      found.extend(_leaves(value, name, (*path, key)))
  return found


def _has(tree: Mapping[str, Any], path: tuple[str, ...]) -> bool:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return False
    tree = tree[key]
  return isinstance(tree, Mapping)


def _at(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
  for key in path:
    tree = tree[key]
  return tree

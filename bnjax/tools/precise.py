"""Precise population statistics: replace the running averages by the exact statistics of data.

The running statistics that batch norm uses in evaluation are an exponential average of batch
statistics measured while the weights were still moving. After training, with the weights fixed,
one pass over (a few thousand examples of) training data gives each layer the exact mean and
variance of what its input took, which Wu & Johnson ("Rethinking 'Batch' in BatchNorm", 2021)
find better and more stable than the average; fvcore's ``PreciseBN`` is the PyTorch tool.

Semantics (as fvcore's): the model runs in training mode, so each layer normalises with its batch
statistics and sees the input that training gave it; each layer's new statistics are the mean and
the variance of all values its input took over all batches (counted per channel: batches of
unequal size weigh by their counts, the population variance, not the mean of batch variances).
Each batch's global moments (combined over ``axis_name`` as in training) are merged exactly with
Chan, Golub & LeVeque's formula (`bnjax.stats.merge_moments`), in float32 at least. A layer with
``unbiased_running_var`` stores ``var * N / (N - 1)`` with ``N`` the population count.

Building blocks for `bnjax.batch_norm` users (`population_moments`, `merge_population`,
`population_state`) import no flax; `precise_batch_stats` is for linen models of `bnjax.BatchNorm`.
"""

from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import stats
from bnjax.tools import _nnx_moments
from bnjax.types import BatchNormState
from bnjax.types import BatchStats

__all__ = ["merge_population", "nnx_precise_batch_stats", "population_moments", "population_state",
           "precise_batch_stats"]

#: ``progress(done, total)``: batches done so far, and the number of batches (None when the
#: iterable has no ``len``).
ProgressCallback = Callable[[int, int | None], None]

_COUNT_LIMIT = np.iinfo(np.int32).max


def population_moments(batch_stats: BatchStats | Mapping[str, Any]) -> stats.Moments:
  """One batch's moments, from what ``batch_norm(..., return_stats=True)`` returned.

  ``Moments(count, pivot=mean, delta=0, m2=var * count)``: the batch mean is its own pivot, so
  merging never subtracts large means from each other.

  Args:
    batch_stats: a `BatchStats` (or a mapping with ``mean``, ``var``, ``count``).

  Returns:
    `bnjax.stats.Moments` of the feature shape, in float32 at least.

  Examples:
    >>> params, state = bnjax.init(1)
    >>> _, _, batch = bnjax.batch_norm(params, state, jnp.array([[1.0], [3.0]]), True,
    ...                                return_stats=True)
    >>> population_moments(batch).m2
    Array([2.], dtype=float32)
  """
  if isinstance(batch_stats, Mapping):
    mean, var, count = batch_stats["mean"], batch_stats["var"], batch_stats["count"]
  else:
    mean, var, count = batch_stats.mean, batch_stats.var, batch_stats.count
  dtype = jnp.promote_types(jnp.result_type(mean), jnp.float32)
  mean = jnp.asarray(mean, dtype)
  count = jnp.asarray(count)
  return stats.Moments(count=count, pivot=mean, delta=jnp.zeros_like(mean),
                       m2=jnp.asarray(var, dtype) * count.astype(dtype))


@jax.jit
def _merge_two(total: stats.Moments, part: stats.Moments) -> stats.Moments:
  return stats.merge_moments(jax.tree.map(lambda a, b: jnp.stack([a, b]), total, part))


def merge_population(total: stats.Moments | None, part: stats.Moments) -> stats.Moments:
  """The moments of the union of two disjoint sets of values (Chan et al.'s exact merge).

  Args:
    total: the moments so far, or None for the first part.
    part: the moments of the next batch (see `population_moments`).

  Returns:
    The merged `bnjax.stats.Moments`:
    ``n = n_1 + n_2``, ``mean = (n_1 mean_1 + n_2 mean_2) / n``,
    ``m2 = m2_1 + m2_2 + n_1 n_2 (mean_1 - mean_2)**2 / n``.

  Raises:
    ValueError: if the total count would not fit in int32.

  Examples:
    >>> def part(mean, var, count):
    ...   return population_moments(bnjax.BatchStats(jnp.array([mean]), jnp.array([var]),
    ...                                              jnp.array([count]), None))
    >>> both = merge_population(part(1.0, 0.0, 1), part(4.0, 1.0, 2))  # {1} and {3, 5}
    >>> both.mean, both.var
    (Array([3.], dtype=float32), Array([2.6666667], dtype=float32))
  """
  if total is None:
    return part
  if int(np.max(np.asarray(total.count, np.int64) + np.asarray(part.count, np.int64))) > (
      _COUNT_LIMIT):
    raise ValueError("merge_population: more than 2**31 - 1 values per channel; the counts are "
                     "int32. Use fewer batches (Wu & Johnson find 10^3 to 10^4 examples enough).")
  return _merge_two(total, part)


def population_state(moments: stats.Moments, unbiased: bool = False,
                     like: BatchNormState | None = None) -> BatchNormState:
  """Running statistics equal to a population's mean and variance.

  ``mean = moments.mean``; ``var = m2 / N`` (or ``m2 / (N - 1)`` with ``unbiased``), ``N`` the
  population count. Channels without values keep ``like``'s statistics (or get 0 and 1).

  Args:
    moments: the population's `bnjax.stats.Moments` (see `merge_population`).
    unbiased: store the unbiased variance (for a layer with ``unbiased_running_var=True``).
    like: the layer's current statistics; their dtype is kept.

  Returns:
    A `BatchNormState`.

  Examples:
    >>> params, state = bnjax.init(1)
    >>> total = None
    >>> for x in (jnp.array([[1.0], [2.0], [6.0]]), jnp.array([[7.0], [9.0]])):
    ...   _, _, batch = bnjax.batch_norm(params, state, x, True, return_stats=True)
    ...   total = merge_population(total, population_moments(batch))
    >>> population_state(total, unbiased=True)  # of [1, 2, 6, 7, 9]: 46 / 4
    BatchNormState(mean=Array([5.], dtype=float32), var=Array([11.5], dtype=float32))
  """
  count = jnp.asarray(moments.count)
  m2 = moments.m2
  n = count.astype(m2.dtype)
  var = m2 / jnp.maximum(n - 1 if unbiased else n, 1)
  has_data = count > (1 if unbiased else 0)
  mean = moments.mean
  old_mean = jnp.zeros_like(mean) if like is None else like.mean
  old_var = jnp.ones_like(var) if like is None else like.var
  dtype = jnp.float32 if like is None else jnp.result_type(like.mean)
  return BatchNormState(mean=jnp.where(has_data, mean, old_mean).astype(dtype),
                        var=jnp.where(has_data, var, old_var).astype(dtype))


def precise_batch_stats(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
                        batches: Iterable[Any], *,
                        progress: bool | ProgressCallback | None = None,
                        **apply_kwargs: Any) -> dict[str, Any]:
  """Linen variables whose every `bnjax.BatchNorm` layer holds its population statistics.

  For each batch, ``apply_fn(variables, batch, mutable=[...], **apply_kwargs)`` runs (compiled
  once per batch shape) with the layers in training mode; each `bnjax.BatchNorm` sows its global
  batch moments (``bnjax.linen.BATCH_MOMENTS``), which are merged exactly across batches (and
  across the calls of a layer used twice). Then every layer's ``batch_stats`` ``mean``/``var`` are
  replaced by the population's, ``var`` unbiased for layers with ``unbiased_running_var``. The
  parameters and every other variable are returned unchanged; the running averages the passes
  produce are discarded. A layer with ``momentum=None`` (cumulative average) also gets ``count``,
  per channel the number of calls that would have updated it (so that training on weighs the next
  batch as one more). See the module doc for the semantics.

  Args:
    apply_fn: ``model.apply``, or a function with its signature (e.g. one that runs it across
      devices; then the sown moments must be returned replicated).
    variables: the trained variables, with ``params`` and ``batch_stats``.
    batches: an iterable of inputs, each passed as the second argument of ``apply_fn``; the last
      may be smaller. A finite number of them is read once.
    progress: None (silent), True (a ``tqdm`` progress bar; tqdm must be installed), or a
      callable ``progress(done, total)`` called after each batch with the number of batches done
      and ``len(batches)`` (None when ``batches`` has no length).
    **apply_kwargs: keyword arguments of the call that put the norm layers in training mode with
      the rest of the model in evaluation, e.g. ``train=True, deterministic=True`` (dropout off).
      Static values: they are closed over, not traced.

  Returns:
    A new variables dict: ``batch_stats`` replaced where a layer saw data.

  Raises:
    ValueError: if ``batches`` is empty, or no `bnjax.BatchNorm` layer ran in training mode.
    ImportError: with ``progress=True`` if tqdm is not installed.
    TypeError: if ``progress`` is neither None, a bool nor a callable.

  Examples:
    >>> import flax.linen as nn
    >>> from bnjax.tools import precise_batch_stats
    >>> model = bnjax.BatchNorm()
    >>> data = jnp.array([[1.0], [2.0], [6.0], [7.0], [9.0]])
    >>> variables = model.init(jax.random.key(0), data, use_running_average=True)
    >>> new = precise_batch_stats(model.apply, variables, [data[:3], data[3:]],
    ...                           use_running_average=False)
    >>> new['batch_stats']['mean'], new['batch_stats']['var']
    (Array([5.], dtype=float32), Array([9.2], dtype=float32))
  """
  from bnjax.linen import BATCH_MOMENTS  # flax is imported only by this function.

  if "batch_stats" not in variables:
    raise ValueError("precise_batch_stats: `variables` have no 'batch_stats' collection; got "
                     f"collections {sorted(variables)}.")

  @jax.jit
  def measure(variables: Mapping[str, Any], batch: Any) -> Any:
    _, updates = apply_fn(variables, batch, mutable=["batch_stats", BATCH_MOMENTS],
                          **apply_kwargs)
    return updates.get(BATCH_MOMENTS, {})

  population = _Population("precise_batch_stats", "bnjax.BatchNorm", progress, batches)
  for batch in batches:
    population.add(measure(variables, batch))
  new_stats = dict(variables["batch_stats"])
  for path, state, updates in population.states(
      lambda path: _at(new_stats, path), "pass the keyword arguments that make it (e.g. "
      "`train=True` or `use_running_average=False`)"):
    layer = _at(new_stats, path)
    layer["mean"], layer["var"] = state.mean, state.var
    if "count" in layer:
      layer["count"] = updates.astype(jnp.result_type(layer["count"]))
  return {**variables, "batch_stats": new_stats}


def nnx_precise_batch_stats(model: Any, batches: Iterable[Any], *,
                            progress: bool | ProgressCallback | None = None,
                            **call_kwargs: Any) -> Any:
  """Sets every `bnjax.nnx.BatchNorm` of an NNX model to its population statistics, in place.

  The NNX counterpart of `precise_batch_stats`, with the same semantics: for each batch,
  ``model(batch, **call_kwargs)`` runs on a copy of the model (compiled once per batch shape),
  every norm layer normalising with its batch statistics (each module with a
  ``use_running_average`` attribute has it False in the copy; every other module runs as the model
  is set, so call ``model.eval()`` first for dropout off). Each `bnjax.nnx.BatchNorm` sows its
  global batch moments (`bnjax.nnx.BatchMoments`, combined over ``axis_name`` as in training),
  merged exactly across batches and calls by Chan et al.'s formula (`merge_population`). Then
  each layer's ``mean`` and ``var`` ``nnx.BatchStat`` are set to the population's (``var``
  unbiased, ``m2 / (N - 1)``, for layers with ``unbiased_running_var``), and for
  ``momentum=None`` its ``count`` to the number of calls that would have updated each channel.

  As NNX's own updates (``nnx.Optimizer.update``), the model is changed in place, and returned
  for convenience. Only those ``nnx.BatchStat`` variables change: the parameters, every other
  variable and the random-number state are untouched (the copy's dropout keys advance from batch
  to batch during the pass and are then discarded, so two calls give the same statistics).

  Args:
    model: an ``nnx.Module`` containing `bnjax.nnx.BatchNorm` layers.
    batches: an iterable of inputs, each passed as the first argument of ``model``; the last
      may be smaller. A finite number of them is read once.
    progress: None (silent), True (a ``tqdm`` progress bar; tqdm must be installed), or a
      callable ``progress(done, total)`` called after each batch with the number of batches done
      and ``len(batches)`` (None when ``batches`` has no length).
    **call_kwargs: further keyword arguments of ``model(batch, ...)``; hashable values are static
      (a new value compiles anew), arrays are traced.

  Returns:
    ``model`` itself, updated.

  Raises:
    ValueError: if ``batches`` is empty, or no `bnjax.nnx.BatchNorm` ran in training mode (e.g.
      the model's ``__call__`` passes ``use_running_average=True`` to all of them).
    ImportError: with ``progress=True`` if tqdm is not installed.
    TypeError: if ``progress`` is neither None, a bool nor a callable.

  Examples:
    >>> from flax import nnx
    >>> from bnjax.tools import nnx_precise_batch_stats
    >>> model = bnjax.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    >>> model.eval()
    >>> data = jnp.array([[1.0], [2.0], [6.0], [7.0], [9.0]])
    >>> _ = nnx_precise_batch_stats(model, [data[:3], data[3:]])
    >>> model.mean[...], model.var[...]  # of [1, 2, 6, 7, 9]
    (Array([5.], dtype=float32), Array([9.2], dtype=float32))
  """
  from flax import nnx  # flax is imported only by this function.

  where = "nnx_precise_batch_stats"
  layers = _nnx_moments.norm_layers(model, where)
  graphdef, rng_state, other_state = nnx.split(model, nnx.RngState, ...)
  static_kwargs, traced_kwargs = _nnx_moments.split_call_kwargs(call_kwargs)
  population = _Population(where, "bnjax.nnx.BatchNorm", progress, batches)
  for batch in batches:
    sown, rng_state = _nnx_moments.measure(graphdef, static_kwargs, rng_state, other_state, batch,
                                   traced_kwargs)
    population.add(sown)

  def running(path: tuple[Any, ...]) -> dict[str, Any]:
    return {"mean": layers[path].mean[...], "var": layers[path].var[...]}

  for path, state, updates in population.states(
      running, "they are switched to training mode, so the model's `__call__` must not pass "
      "`use_running_average=True` to them"):
    layer = layers[path]
    layer.mean[...] = state.mean
    layer.var[...] = state.var
    if layer.momentum is None:
      layer.count[...] = updates.astype(layer.count[...].dtype)
  return model


class _Population:
  """The exact population moments of every layer over a pass, with its progress report."""

  def __init__(self, where: str, layer_name: str, progress: Any, batches: Iterable[Any]) -> None:
    self.where = where
    self.layer_name = layer_name
    self.totals: dict[tuple[Any, ...], stats.Moments] = {}
    self.unbiased: dict[tuple[Any, ...], bool] = {}
    self.updates: dict[tuple[Any, ...], jax.Array] = {}
    self.seen = 0
    self.report = _progress_reporter(progress, len(batches) if isinstance(batches, Sized)
                                      else None, where)

  def add(self, sown: Mapping[str, Any]) -> None:
    """Merges one batch's sown moments (``{...: {'moments': (call, ...)}}``) into the totals."""
    layers = _sown_layers(sown)
    for (path, calls), (moments, took) in zip(layers, _batch_moments(sown), strict=True):
      self.totals[path] = merge_population(self.totals.get(path), moments)
      self.unbiased[path] = bool(calls[0]["unbiased"])
      self.updates[path] = self.updates.get(path, 0) + took
    self.seen += 1
    self.report(self.seen)

  def states(self, running: Callable[[tuple[Any, ...]], Mapping[str, Any]], hint: str
             ) -> list[tuple[tuple[Any, ...], BatchNormState, jax.Array]]:
    """``(layer path, population state, updates per channel)`` of every layer that ran."""
    self.report(None)
    if self.seen == 0:
      raise ValueError(f"{self.where}: `batches` is empty; pass at least one batch.")
    if not self.totals:
      raise ValueError(f"{self.where}: no {self.layer_name} layer ran in training mode; {hint}.")
    found = []
    for path, total in self.totals.items():
      layer = running(path)
      state = population_state(total, self.unbiased[path],
                               like=BatchNormState(layer["mean"], layer["var"]))
      found.append((path, state, self.updates[path]))
    return found


@jax.jit
def _batch_moments(sown: Mapping[str, Any]) -> list[tuple[stats.Moments, jax.Array]]:
  """Per layer, in `_sown_layers` order: the merged moments of its calls on one batch.

  With them, per channel, how many of those calls a training step would have updated it with.
  """
  found = []
  for _, calls in _sown_layers(sown):
    parts = [population_moments(moments) for moments in calls]
    merged = stats.merge_moments(jax.tree.map(lambda *fields: jnp.stack(fields), *parts))
    # The rule by which a training step updates a channel (`update_running_stats`).
    took = sum(((jnp.isfinite(m["mean"]) & jnp.isfinite(m["var"])
                 & (m["count"] > m["unbiased"].astype(m["count"].dtype))).astype(jnp.int32)
                for m in calls), jnp.zeros((), jnp.int32))
    found.append((merged, took))
  return found


def _progress_reporter(progress: Any, total: int | None, where: str
                       ) -> Callable[[int | None], None]:
  """``report(done)`` after each batch, ``report(None)`` at the end, for a `progress` argument."""
  if progress is None or progress is False:
    return _silent
  if progress is True:
    try:
      import tqdm  # pylint: disable=import-outside-toplevel
    except ImportError as error:
      raise ImportError(
          f"bnjax.tools.{where}: `progress=True` shows a tqdm progress bar, but tqdm is not "
          "installed. Install it (`pip install tqdm`), or pass a callable "
          "`progress(done, total)`, or None.") from error
    bar = tqdm.tqdm(total=total, desc=where, unit="batch")

    def update_bar(done: int | None) -> None:
      if done is None:
        bar.close()
      else:
        bar.update(1)
    return update_bar
  if callable(progress):
    def call_back(done: int | None) -> None:
      if done is not None:
        progress(done, total)
    return call_back
  raise TypeError(f"bnjax.tools.{where}: `progress` must be None, a bool or a callable "
                  f"`progress(done, total)`; got {type(progress).__name__}.")


def _silent(_: int | None) -> None:
  pass


def _sown_layers(tree: Mapping[str, Any], path: tuple[Any, ...] = ()
                 ) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
  """``(layer path, sown moments of each call)`` for every layer in a sown collection."""
  found = []
  for key, value in tree.items():
    if key == "moments" and isinstance(value, tuple):
      found.append((path, value))
    elif isinstance(value, Mapping):
      found.extend(_sown_layers(value, (*path, key)))
  return found


def _at(tree: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
  """The (copied, so writable) sub-dict at `path`."""
  for key in path:
    tree[key] = dict(tree[key])
    tree = tree[key]
  return tree

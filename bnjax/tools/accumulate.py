"""One running-statistics update per optimizer step when gradients are accumulated.

With gradients accumulated over ``k`` micro-batches, calling batch norm in training mode on each
micro-batch updates the running averages ``k`` times per optimizer step: the momentum is applied
``k`` times and the last micro-batch weighs most. Instead, keep the running statistics fixed while
the micro-batches run (discard each call's ``new_state``), collect each call's `BatchStats`
(``return_stats=True``), and apply `update_from_micro_batches` once: it merges the micro-batches'
moments exactly by counts (`bnjax.stats.merge_moments`) and updates the running statistics once
with the pooled mean and variance.

For a norm layer whose input does not depend on earlier norm layers (the first one) this equals
one update with the whole batch. Deeper layers see inputs normalised by micro-batch statistics
upstream, so their pooled statistics differ from a big batch's by that much (as their outputs do).
"""

from typing import TypeVar, cast

import jax.numpy as jnp

from bnjax import stats
from bnjax.functional import update_running_stats
from bnjax.types import BatchNormState
from bnjax.types import BatchStats
from bnjax.types import CumulativeState

__all__ = ["pool_batch_stats", "update_from_micro_batches"]

_State = TypeVar("_State", BatchNormState, CumulativeState)


def pool_batch_stats(micro_stats: BatchStats) -> BatchStats:
  """The statistics of the union of micro-batches, from their `BatchStats` stacked on axis 0.

  ``n = sum(n_i)``, ``mean = sum(n_i mean_i) / n``,
  ``var = (sum(n_i var_i) + sum(n_i (mean_i - mean)**2)) / n`` (Chan, Golub & LeVeque), computed
  by `bnjax.stats.merge_moments` without cancellation.

  Args:
    micro_stats: `BatchStats` whose fields have a leading axis of micro-batches (e.g. stacked by
      ``lax.scan``).

  Returns:
    `BatchStats` of the pooled batch; ``updated`` is True where its statistics are finite and
    count at least one value.

  Examples:
    >>> from bnjax.tools import pool_batch_stats
    >>> stacked = bnjax.BatchStats(mean=jnp.array([[1.0], [4.0]]), var=jnp.array([[0.0], [1.0]]),
    ...                            count=jnp.array([[1], [2]]), updated=jnp.array([[True], [True]]))
    >>> pooled = pool_batch_stats(stacked)   # of {1} and {3, 5}
    >>> pooled.mean, pooled.var, pooled.count
    (Array([3.], dtype=float32), Array([2.6666667], dtype=float32), Array([3], dtype=int32))
  """
  dtype = jnp.promote_types(jnp.result_type(micro_stats.mean), jnp.float32)
  mean = jnp.asarray(micro_stats.mean, dtype)
  count = jnp.asarray(micro_stats.count)
  parts = stats.Moments(count=count, pivot=mean, delta=jnp.zeros_like(mean),
                        m2=jnp.asarray(micro_stats.var, dtype) * count.astype(dtype))
  pooled = stats.merge_moments(parts, axis=0)
  mean, var = pooled.mean, pooled.var
  return BatchStats(mean=mean, var=var, count=pooled.count,
                    updated=jnp.isfinite(mean) & jnp.isfinite(var) & (pooled.count > 0))


def update_from_micro_batches(state: _State, micro_stats: BatchStats, momentum: float | None = 0.99,
                              unbiased_running_var: bool = False) -> _State:
  """Running statistics updated once, with the pooled statistics of ``k`` micro-batches.

  ``new = momentum * old + (1 - momentum) * pooled`` per channel, ``pooled`` from
  `pool_batch_stats`; a channel keeps its old values where the pooled statistics are not finite
  (a non-finite micro-batch makes them so) or have no value, as in `bnjax.update_running_stats`.

  Args:
    state: the running statistics before the optimizer step (the micro-batches' own updates are
      discarded).
    micro_stats: the micro-batches' `BatchStats` (``return_stats=True``), stacked on axis 0.
    momentum: as in `bnjax.batch_norm` (None: the cumulative average, with a `CumulativeState`).
    unbiased_running_var: as in `bnjax.batch_norm`, with the pooled count.

  Returns:
    The new running statistics, of ``state``'s type.

  Examples:
    >>> from jax import lax
    >>> from bnjax.tools import update_from_micro_batches
    >>> params, state = bnjax.init(1)
    >>> micro_batches = jnp.arange(8.0).reshape(2, 4, 1)   # k = 2 micro-batches of 4
    >>> def micro_step(_, x):
    ...   y, _, batch_stats = bnjax.batch_norm(params, state, x, True, return_stats=True)
    ...   return None, batch_stats
    >>> _, stacked = lax.scan(micro_step, None, micro_batches)
    >>> update_from_micro_batches(state, stacked, momentum=0.9).mean  # 0.1 * mean(0..7)
    Array([0.35], dtype=float32)
  """
  pooled = pool_batch_stats(micro_stats)
  new_state, _ = update_running_stats(state, pooled.mean, pooled.var, pooled.count, momentum,
                                      unbiased_running_var)
  return cast(_State, new_state)

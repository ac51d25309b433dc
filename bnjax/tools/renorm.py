"""The Batch Renormalization schedule of the bounds on ``r`` and ``d`` (Ioffe 2017, section 4)."""

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["renorm_schedule"]


def renorm_schedule(step: Any, *, warmup_steps: int = 5_000, r_max: float = 3.0,
                    r_max_steps: int = 40_000, d_max: float = 5.0,
                    d_max_steps: int = 25_000) -> tuple[jax.Array, jax.Array]:
  """Bounds ``(renorm_r_max, renorm_d_max)`` for training step ``step``.

  Ioffe ("Batch Renormalization", 2017, section 4) trains with ``r_max = 1`` and ``d_max = 0``
  (plain batch norm) for the first 5,000 steps, then relaxes them gradually to ``r_max = 3`` at
  40k steps and ``d_max = 5`` at 25k steps. Here the relaxation is linear:

      r_max(t) = 1 + (r_max - 1) * clip((t - warmup) / (r_max_steps - warmup), 0, 1)
      d_max(t) = d_max * clip((t - warmup) / (d_max_steps - warmup), 0, 1)

  which is what two ``optax.linear_schedule`` s give (example below). ``step`` may be traced, so
  the bounds follow the optimizer's step counter inside a compiled training step.

  Args:
    step: the training step, an int or an integer array (traced or not).
    warmup_steps: steps of plain batch norm before the bounds relax.
    r_max: the final bound on ``r``.
    r_max_steps: the step at which ``r_max`` is reached.
    d_max: the final bound on ``|d|``.
    d_max_steps: the step at which ``d_max`` is reached.

  Returns:
    ``(r_max(step), d_max(step))``, float32 scalars, for ``renorm_r_max`` and ``renorm_d_max``.

  Raises:
    ValueError: if a ramp ends before the warm-up does, or a bound is out of range.

  Examples:
    >>> from bnjax.tools import renorm_schedule
    >>> [tuple(float(v) for v in renorm_schedule(t)) for t in (0, 5_000, 15_000, 40_000)]
    [(1.0, 0.0), (1.0, 0.0), (1.5714285373687744, 2.5), (3.0, 5.0)]

    The same with optax schedules:

    >>> import optax
    >>> r_sched = optax.linear_schedule(1.0, 3.0, 35_000, transition_begin=5_000)
    >>> d_sched = optax.linear_schedule(0.0, 5.0, 20_000, transition_begin=5_000)
    >>> float(r_sched(15_000)), float(d_sched(15_000))
    (1.5714285373687744, 2.5)

    In a training step, with the step counter traced:

    >>> step = jnp.asarray(10_000)
    >>> r, d = renorm_schedule(step)
    >>> y, state = bnjax.batch_norm(*bnjax.init(3), jnp.ones((4, 3)), True,
    ...                             renorm_r_max=r, renorm_d_max=d)
  """
  if r_max < 1 or d_max < 0:
    raise ValueError(f"renorm_schedule: needs r_max >= 1 and d_max >= 0; got r_max={r_max}, "
                     f"d_max={d_max}.")
  if min(r_max_steps, d_max_steps) <= warmup_steps:
    raise ValueError(f"renorm_schedule: the ramps must end after the warm-up of {warmup_steps} "
                     f"steps; got r_max_steps={r_max_steps}, d_max_steps={d_max_steps}.")
  t = jnp.asarray(step).astype(jnp.float32) - jnp.float32(warmup_steps)

  def progress(end: int) -> jax.Array:
    return jnp.clip(t / jnp.float32(end - warmup_steps), 0.0, 1.0)

  return (1.0 + jnp.float32(r_max - 1.0) * progress(r_max_steps),
          jnp.float32(d_max) * progress(d_max_steps))

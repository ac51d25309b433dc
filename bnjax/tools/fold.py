r"""Folding an evaluation-mode batch norm into the Dense or Conv layer before it, for inference.

In evaluation, batch norm after a linear layer is itself affine per output channel, so the two
merge into one linear layer with a bias:

.. math::

   s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
   W' = W \cdot s \ \text{(on the output-feature axis)}, \qquad
   b' = (b - \mu) \, s + \beta

with :math:`\mu, \sigma^2` the running statistics and :math:`b = 0` when the layer has no bias.
This is exact in real arithmetic; in floating point the folded model differs from the original by
rounding only. It holds when the batch norm normalises the layer's output features directly (no
non-linearity, pooling or residual add in between) and runs in evaluation mode.

Kernel layouts (Flax's): ``Dense`` ``(in, out)``, ``Conv`` ``(*window, in // groups, out)``,
``ConvTranspose`` ``(*window, in, out)``: the output-feature axis is the last (``out_axis=-1``).
``ConvTranspose(transpose_kernel=True)`` stores ``(*window, out, in)``: pass ``out_axis=-2``.

This module imports no flax: it works on plain arrays and nested dicts.

Source: the same algebra as PyTorch's ``torch.nn.utils.fusion`` (``fuse_conv_bn_weights``,
``fuse_linear_bn_weights``), there for PyTorch's ``(out, in, ...)`` layouts.
"""

from collections.abc import Iterable, Mapping, Sequence
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax import _layer_trees
from bnjax.types import BatchNormParams
from bnjax.types import BatchNormState

__all__ = ["FoldPair", "fold_batch_norm", "fold_batch_norms"]

_WHERE = "bnjax.tools.fold_batch_norm"
_WHERE_TREE = "bnjax.tools.fold_batch_norms"


def fold_batch_norm(kernel: jax.Array, bias: jax.Array | None,
                    params: BatchNormParams | Mapping[str, Any] | None,
                    state: BatchNormState | Mapping[str, Any], *, epsilon: float = 1e-5,
                    out_axis: int = -1) -> tuple[jax.Array, jax.Array]:
  r"""Folds an evaluation-mode batch norm into the preceding layer's kernel and bias.

  ``W' = W * s`` along ``out_axis`` and ``b' = (b - mean) * s + beta``, with
  ``s = gamma / sqrt(var + epsilon)`` (see the module doc). Computed in at least float32 (float64
  stays float64); the folded kernel keeps ``kernel``'s dtype and the bias ``bias``'s (``kernel``'s
  when ``bias`` is None). Pure ``jax.numpy``: works under ``jit``.

  Args:
    kernel: the Dense/Conv kernel, Flax layout, output features along ``out_axis``.
    bias: the layer's bias of shape ``[C]``, or None if it has none.
    params: the batch norm's ``BatchNormParams`` or linen ``params`` dict (``scale``/``bias``, each
      optional), or None for a batch norm without affine parameters.
    state: its ``BatchNormState`` or linen ``batch_stats`` dict (``mean``, ``var``).
    epsilon: the batch norm's epsilon.
    out_axis: the kernel's output-feature axis.

  Returns:
    ``(folded_kernel, folded_bias)``.

  Raises:
    ValueError: if shapes disagree (the batch norm's feature size must be the kernel's size along
      ``out_axis``), ``out_axis`` is out of range or ``epsilon`` is not positive.
    TypeError: if an array is not floating.

  Examples:
    >>> from bnjax import tools
    >>> kernel = jnp.ones((3, 2))                                  # Dense(2) on 3 inputs
    >>> params = bnjax.BatchNormParams(scale=jnp.array([2.0, 1.0]), bias=jnp.array([0.5, 0.0]))
    >>> state = bnjax.BatchNormState(mean=jnp.array([1.0, -1.0]), var=jnp.array([4.0, 1.0]))
    >>> k, b = tools.fold_batch_norm(kernel, None, params, state)   # s = [2/2, 1/1]
    >>> k.round(4)
    Array([[1., 1.],
           [1., 1.],
           [1., 1.]], dtype=float32)
    >>> b.round(4)                                                # (0 - mean) * s + beta
    Array([-0.5,  1. ], dtype=float32)
  """
  params = _layer_trees.as_params(params, _WHERE)
  state = _layer_trees.as_state(state, _WHERE)
  kernel = jnp.asarray(kernel)
  _check_floating(kernel, "kernel")
  if kernel.ndim < 2:
    raise ValueError(f"{_WHERE}: `kernel` must have at least 2 dimensions (Dense `(in, out)`, "
                     f"Conv `(*window, in, out)`); got shape {kernel.shape}.")
  if isinstance(out_axis, bool) or not isinstance(out_axis, numbers.Integral) or not (
      -kernel.ndim <= out_axis < kernel.ndim):
    raise ValueError(f"{_WHERE}: `out_axis` must be an int in [{-kernel.ndim}, {kernel.ndim - 1}] "
                     f"for a kernel of shape {kernel.shape}; got {out_axis!r}.")
  if isinstance(epsilon, numbers.Real) and not epsilon > 0:
    raise ValueError(f"{_WHERE}: `epsilon` must be > 0 (the batch norm's); got {epsilon}.")
  out_axis = out_axis % kernel.ndim
  channels = kernel.shape[out_axis]
  named = {"bias": bias, "params.scale": params.scale, "params.bias": params.bias,
           "state.mean": state.mean, "state.var": state.var}
  for name, given in named.items():
    if given is None:
      continue
    value = jnp.asarray(given)
    _check_floating(value, name)
    if value.shape != (channels,):
      raise ValueError(
          f"{_WHERE}: `{name}` has shape {value.shape} but the kernel of shape {kernel.shape} has "
          f"{channels} output features along out_axis={out_axis}; expected ({channels},). Check "
          "that the batch norm follows this layer (channels last) and, for "
          "ConvTranspose(transpose_kernel=True), pass out_axis=-2.")

  compute = jnp.dtype(jnp.float64 if jnp.finfo(kernel.dtype).bits > 32 else jnp.float32)

  def as_compute(v: Any) -> jax.Array:
    return jnp.asarray(v).astype(compute)

  factor = jax.lax.rsqrt(as_compute(state.var) + jnp.asarray(epsilon, compute))
  if params.scale is not None:
    factor = factor * as_compute(params.scale)
  shift = jnp.zeros((channels,), compute) if bias is None else as_compute(bias)
  new_bias = (shift - as_compute(state.mean)) * factor
  if params.bias is not None:
    new_bias = new_bias + as_compute(params.bias)
  factor_shape = tuple(channels if a == out_axis else 1 for a in range(kernel.ndim))
  new_kernel = as_compute(kernel) * factor.reshape(factor_shape)
  bias_dtype = kernel.dtype if bias is None else jnp.asarray(bias).dtype
  return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


class FoldPair(NamedTuple):
  """One layer to fold.

  The Dense/Conv's path, the batch norm's path, its epsilon, the kernel's output-feature axis.
  Paths are tuples (``('block1', 'conv')``) or ``'block1/conv'`` strings.
  """

  layer: str | Sequence[str]
  norm: str | Sequence[str]
  epsilon: float = 1e-5
  out_axis: int = -1


def fold_batch_norms(variables: Mapping[str, Any],
                     pairs: Iterable[FoldPair | Sequence[Any]]) -> dict[str, Any]:
  r"""Folds each listed batch norm into its layer, for the same model built without those norms.

  For every ``(layer, norm)`` pair, the layer's ``kernel``/``bias`` are replaced by the folded
  ones (`fold_batch_norm`; a bias is created if the layer had none) and the norm's entries are
  removed from every collection (``params``, ``batch_stats``); emptied sub-dicts are dropped, and
  other collections are kept. The result is the variable tree of the model written without those
  batch norms and with a bias on each folded layer: apply that model to it.

  The recipe for a model: give it a flag that skips the norm layers and turns the bias on, e.g.
  ``nn.Conv(f, use_bias=self.folded)`` followed by
  ``x = x if self.folded else bnjax.BatchNorm(use_running_average=not train)(x)``, keeping explicit
  module names (or auto-names that do not shift when the norms are skipped, which holds for Flax's
  per-type counters); list the pairs; check ``model(folded=True).apply(fold_batch_norms(...), x)``
  against ``model.apply(variables, x, train=False)`` once.

  Args:
    variables: a linen variable tree (``params`` and ``batch_stats``), dicts or FrozenDicts.
    pairs: `FoldPair`\ s, or tuples ``(layer, norm[, epsilon[, out_axis]])``.

  Returns:
    A new variable tree of plain dicts; ``variables`` is not modified.

  Raises:
    ValueError: if a path is missing, a layer has no kernel, a norm has no running statistics,
      or a layer or norm is listed twice.

  Examples:
    >>> import flax.linen as nn
    >>> from bnjax import tools
    >>> class Net(nn.Module):
    ...   folded: bool = False
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.Dense(4, use_bias=self.folded, name='dense')(x)
    ...     return x if self.folded else bnjax.BatchNorm(use_running_average=True, name='bn')(x)
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> variables = Net().init(jax.random.key(1), x)
    >>> variables = {**variables, 'batch_stats': {'bn': {'mean': jnp.full(4, 0.5),
    ...                                                   'var': jnp.full(4, 2.0)}}}
    >>> folded = tools.fold_batch_norms(variables, [('dense', 'bn')])
    >>> jax.tree.map(jnp.shape, folded)
    {'params': {'dense': {'bias': (4,), 'kernel': (3, 4)}}}
    >>> bool(jnp.allclose(Net(folded=True).apply(folded, x), Net().apply(variables, x), atol=1e-6))
    True
  """
  if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
    raise ValueError(f"{_WHERE_TREE}: `variables` must be a linen variable tree with 'params' "
                     f"(as returned by `model.init`); got "
                     f"{sorted(variables) if isinstance(variables, Mapping) else type(variables)}.")
  result = _to_dicts(variables)
  pairs = [_as_pair(p) for p in pairs]
  seen_layers, seen_norms = set(), set()
  for pair in pairs:
    layer_path, norm_path = _as_path(pair.layer), _as_path(pair.norm)
    for path, seen, what in ((layer_path, seen_layers, "layer"), (norm_path, seen_norms, "norm")):
      if path in seen:
        raise ValueError(f"{_WHERE_TREE}: {what} {_show(path)} is listed twice.")
      seen.add(path)
    layer = _lookup(variables["params"], layer_path, "params", "layer")
    if not isinstance(layer, Mapping) or "kernel" not in layer:
      raise ValueError(f"{_WHERE_TREE}: layer {_show(layer_path)} has no 'kernel' in params; got "
                       f"{sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__}.")
    stats = _lookup(variables.get("batch_stats", {}), norm_path, "batch_stats", "norm")
    norm_params = _lookup(variables["params"], norm_path, "params", "norm", required=False)
    kernel, bias = fold_batch_norm(layer["kernel"], layer.get("bias"), norm_params, stats,
                                   epsilon=pair.epsilon, out_axis=pair.out_axis)
    _set(result["params"], layer_path, {**_to_dicts(layer), "kernel": kernel, "bias": bias})
  for norm_path in seen_norms:
    for collection in list(result):
      _remove(result, (collection, *norm_path))
  return result


# --- Nested dicts ------------------------------------------------------------------------------

_MISSING = object()


def _check_floating(value: jax.Array, name: str) -> None:
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(f"{_WHERE}: `{name}` must have a floating dtype; got {value.dtype}.")


def _as_pair(pair: Any) -> FoldPair:
  if isinstance(pair, FoldPair):
    return pair
  if isinstance(pair, str) or not isinstance(pair, Sequence) or not 2 <= len(pair) <= 4:
    raise ValueError(f"{_WHERE_TREE}: each pair must be (layer, norm[, epsilon[, out_axis]]); got "
                     f"{pair!r}.")
  return FoldPair(*pair)


def _as_path(path: Any) -> tuple[str, ...]:
  if isinstance(path, str):
    return tuple(part for part in path.split("/") if part)
  return tuple(path)


def _show(path: tuple[str, ...]) -> str:
  return repr("/".join(map(str, path)))


def _lookup(tree: Any, path: tuple[str, ...], collection: str, what: str,
            required: bool = True) -> Any:
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      if not required:
        return None
      raise ValueError(f"{_WHERE_TREE}: {what} {_show(path)} is not in `variables[{collection!r}]`"
                       f" (no {key!r} there).")
    node = node[key]
  return node


def _to_dicts(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {key: _to_dicts(value) for key, value in tree.items()}
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _remove(tree: dict[str, Any], path: tuple[str, ...]) -> None:
  """Deletes ``path`` if present, then every parent it left empty."""
  parents = [tree]
  for key in path[:-1]:
    node = parents[-1].get(key)
    if not isinstance(node, dict):
      return
    parents.append(node)
  if path[-1] not in parents[-1]:
    return
  del parents[-1][path[-1]]
  for depth in range(len(path) - 1, 0, -1):
    if not parents[depth]:
      del parents[depth - 1][path[depth - 1]]

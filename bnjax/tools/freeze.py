"""Frozen batch norm for fine-tuning.

Select every norm layer's ``scale``/``bias`` so that the optimizer leaves them alone, in linen
variable trees and NNX models.

A frozen batch-norm layer is an affine map ``y = scale * (x - mean) / sqrt(var + eps) + bias``
with all four per-channel arrays fixed (torchvision's and detectron2's ``FrozenBatchNorm2d``). It
has two halves:

* **Statistics**: normalise with the running statistics and do not update them. That is the
  layer's evaluation mode: ``use_running_average=True`` in linen (e.g.
  ``bnjax.BatchNorm(use_running_average=not train or self.freeze_norm)``), and in NNX
  ``model.set_attributes(bnjax.nnx.BatchNorm, use_running_average=True)`` after ``model.train()``
  (``train()`` sets every layer back to batch statistics).
* **Affine parameters**: exclude ``scale``/``bias`` from the update. This module provides it:
  an optax mask or ``optax.multi_transform`` labels for linen, an ``nnx`` filter for NNX.

How norm layers are recognised (and the limits):

* By type (exact): `norm_layer_paths` runs ``model.init`` abstractly (``jax.eval_shape``, no
  arithmetic) with a method interceptor that records the path of every module of the given types
  (default ``bnjax.BatchNorm``); in NNX `norm_params_filter` walks the model's modules. A norm
  layer written as another class is found only if its class is passed in ``types``.
* By structure (linen, no model needed): a layer is a batch norm when its ``params`` hold only
  ``scale`` and/or ``bias`` and its ``batch_stats`` at the same path hold ``mean`` and ``var``
  (the layout of ``bnjax.BatchNorm`` and ``flax.linen.BatchNorm``). The ``params`` tree alone
  cannot tell, since a LayerNorm also has ``scale``/``bias``: the rule needs ``batch_stats``.
  Any other module that keeps exactly that layout is taken for a batch norm; a batch norm
  without running statistics is not seen.

Sources: torchvision's and detectron2's ``FrozenBatchNorm2d`` (running statistics and affine
parameters as buffers); Wu & He, "Group Normalization" (2018), on freezing batch norm when
fine-tuning with small per-device batches.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flax import linen as nn
from flax import nnx
import jax

from bnjax.linen import BatchNorm as LinenBatchNorm
from bnjax.nnx import BatchNorm as NnxBatchNorm

__all__ = [
    "norm_layer_paths",
    "norm_params_filter",
    "norm_params_labels",
    "norm_params_mask",
    "params_except_norms",
]

Path = tuple[Any, ...]
_AFFINE = ("scale", "bias")


def norm_layer_paths(model: nn.Module, *args: Any, types: Sequence[type] = (LinenBatchNorm,),
                     rngs: Any = None, **kwargs: Any) -> frozenset[Path]:
  """The paths of every linen module of the given types that ``model`` calls, found by type.

  ``model.init(rngs, *args, **kwargs)`` is traced abstractly (``jax.eval_shape``: shapes only, no
  arithmetic) under ``flax.linen.intercept_methods``, recording ``module.path`` of each instance of
  ``types`` whose ``__call__`` runs. A layer that the traced call does not reach is not found.

  Args:
    model: an unbound linen module.
    *args: the example inputs ``model.init`` takes (arrays or ``jax.ShapeDtypeStruct``).
    types: the norm-layer classes; e.g. ``(bnjax.BatchNorm, flax.linen.BatchNorm)``.
    rngs: what ``model.init`` takes as its first argument; by default the same key for the
      ``params`` and ``dropout`` streams.
    **kwargs: keyword arguments for ``model.init`` (e.g. ``train=False``).

  Returns:
    A frozenset of path tuples, e.g. ``{('block1', 'bn'), ('BatchNorm_0',)}``.

  Examples:
    >>> import flax.linen as nn
    >>> from bnjax import tools
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = bnjax.BatchNorm(use_running_average=True, name='bn')(nn.Dense(4)(x))
    ...     return nn.LayerNorm()(x)
    >>> sorted(tools.norm_layer_paths(Net(), jnp.ones((2, 3))))
    [('bn',)]
  """
  types = tuple(types)
  if not types or not all(isinstance(t, type) for t in types):
    raise TypeError(f"norm_layer_paths: `types` must be a non-empty sequence of module classes; "
                    f"got {types!r}.")
  if rngs is None:
    key = jax.random.key(0)
    rngs = {"params": key, "dropout": key}
  found = set()

  def record(next_fun: Callable[..., Any], call_args: Any, call_kwargs: Any, context: Any) -> Any:
    if context.method_name == "__call__" and isinstance(context.module, types):
      found.add(tuple(context.module.path))
    return next_fun(*call_args, **call_kwargs)

  def init() -> Any:
    with nn.intercept_methods(record):
      return model.init(rngs, *args, **kwargs)

  jax.eval_shape(init)
  return frozenset(found)


def norm_params_mask(variables: Mapping[str, Any],
                     norm_paths: Iterable[Sequence[Any]] | None = None) -> dict[str, Any]:
  """A tree shaped like ``variables['params']``: True on every norm layer's ``scale`` and ``bias``.

  Args:
    variables: a linen variable tree with ``params`` (and ``batch_stats`` for the structural rule);
      with ``norm_paths``, the ``params`` tree alone will do.
    norm_paths: the norm layers' paths (from `norm_layer_paths`, or written by hand as tuples or
      ``'a/b'`` strings). If None, layers are recognised by structure: ``params`` holding only
      ``scale``/``bias`` where ``batch_stats`` holds ``mean`` and ``var`` (see the module doc).

  Returns:
    A nested dict of Python bools with the structure of ``variables['params']``, usable as
    ``optax.masked(..., mask)``.

  Raises:
    ValueError: if ``variables`` has no ``params`` (and no ``norm_paths`` are given), if
      ``norm_paths`` is None and there is no ``batch_stats`` to recognise layers by, or if a given
      path is not in ``params``.

  Examples:
    >>> import flax.linen as nn
    >>> from bnjax import tools
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return bnjax.BatchNorm(use_running_average=True)(nn.Dense(2)(x))
    >>> variables = Net().init(jax.random.key(0), jnp.ones((1, 3)))
    >>> mask = tools.norm_params_mask(variables)
    >>> mask['BatchNorm_0'], mask['Dense_0']
    ({'scale': True, 'bias': True}, {'kernel': False, 'bias': False})
  """
  if norm_paths is not None and isinstance(variables, Mapping) and not isinstance(
      variables.get("params"), Mapping):
    params = variables  # A bare params tree: the paths say which layers are norms.
  else:
    params = _mapping_at(variables, "params", "variables")
  if norm_paths is None:
    if "batch_stats" not in variables:
      raise ValueError(
          "norm_params_mask: `variables` has no 'batch_stats', so batch-norm layers cannot be told "
          "from other layers with scale/bias (e.g. LayerNorm). Pass the whole variable tree "
          "(`params` and `batch_stats`), or `norm_paths=tools.norm_layer_paths(model, x)`.")
    paths = _structural_norm_paths(params, variables["batch_stats"])
  else:
    paths = {_as_path(p) for p in norm_paths}
    for path in paths:
      node = _get(params, path)
      if node is _MISSING:
        known = sorted("/".join(map(str, p)) for p in _module_paths(params))
        raise ValueError(f"norm_params_mask: norm path {'/'.join(map(str, path))!r} is not in "
                         f"`variables['params']`; its modules are {known}.")
  return _map_with_path(params, lambda path, _: path[-1] in _AFFINE and path[:-1] in paths)


def norm_params_labels(variables: Mapping[str, Any],
                       norm_paths: Iterable[Sequence[Any]] | None = None, *,
                       norm_label: str = "frozen", other_label: str = "trainable"
                       ) -> dict[str, Any]:
  """Labels for ``optax.multi_transform``.

  ``norm_label`` on norm ``scale``/``bias``, else ``other_label``.

  ``optax.multi_transform({'trainable': tx, 'frozen': optax.set_to_zero()}, labels)`` leaves the
  norm parameters bit-identical and keeps no optimizer state for them. (Prefer it to
  ``optax.masked(tx, mask)``, which passes the raw gradient through where the mask is False.)

  Args:
    variables: a linen variable tree, as for `norm_params_mask`.
    norm_paths: as for `norm_params_mask`.
    norm_label: the label of norm parameters.
    other_label: the label of every other parameter.

  Returns:
    A nested dict of labels with the structure of ``variables['params']``.

  Examples:
    >>> import flax.linen as nn
    >>> import optax
    >>> from bnjax import tools
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return bnjax.BatchNorm(use_running_average=True)(nn.Dense(2)(x))
    >>> variables = Net().init(jax.random.key(0), jnp.ones((1, 3)))
    >>> labels = tools.norm_params_labels(variables)
    >>> labels['BatchNorm_0']
    {'bias': 'frozen', 'scale': 'frozen'}
    >>> tx = optax.multi_transform({'trainable': optax.sgd(0.1), 'frozen': optax.set_to_zero()},
    ...                            labels)
  """
  mask = norm_params_mask(variables, norm_paths)
  return jax.tree.map(lambda is_norm: norm_label if is_norm else other_label, mask)


def norm_params_filter(model: nnx.Module, types: Sequence[type] = (NnxBatchNorm,)
                       ) -> Callable[[Path, Any], bool]:
  """An ``nnx`` filter selecting the ``nnx.Param`` variables of ``model``'s norm layers.

  The norm layers are the modules of ``types`` found by walking ``model`` now
  (``nnx.iter_modules``); the filter matches a variable by its path, so it serves this model (and
  its splits, clones and states), not another model.

  Args:
    model: an NNX module.
    types: the norm-layer classes; e.g. ``(bnjax.nnx.BatchNorm, flax.nnx.BatchNorm)``.

  Returns:
    A predicate ``(path, value) -> bool``, usable wherever ``nnx`` takes a filter
    (``nnx.state``, ``nnx.split``, ``nnx.All``/``nnx.Not``, ``nnx.DiffState``).

  Examples:
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> from bnjax import tools
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.linear = nnx.Linear(3, 2, rngs=rngs)
    ...     self.bn = bnjax.nnx.BatchNorm(2, rngs=rngs)
    >>> net = Net(nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(net, tools.norm_params_filter(net))))
    {'bn': {'bias': (2,), 'scale': (2,)}}
  """
  types = tuple(types)
  if not types or not all(isinstance(t, type) for t in types):
    raise TypeError(f"norm_params_filter: `types` must be a non-empty sequence of module classes; "
                    f"got {types!r}.")
  paths = frozenset(tuple(path) for path, module in nnx.iter_modules(model)
                    if isinstance(module, types))

  def is_norm_param(path: Path, value: Any) -> bool:
    return isinstance(value, nnx.Param) and tuple(path[:-1]) in paths

  return is_norm_param


def params_except_norms(model: nnx.Module, types: Sequence[type] = (NnxBatchNorm,)) -> Any:
  """The ``nnx`` filter of every ``nnx.Param`` except the norm layers': what fine-tuning trains.

  Use it both for the optimizer and for the gradient, so that their trees agree::

    trainable = tools.params_except_norms(model)
    optimizer = nnx.Optimizer(model, tx, wrt=trainable)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
    optimizer.update(model, grads)

  Args:
    model: an NNX module.
    types: the norm-layer classes, as for `norm_params_filter`.

  Returns:
    ``nnx.All(nnx.Param, nnx.Not(norm_params_filter(model, types)))``.

  Examples:
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> from bnjax import tools
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.linear = nnx.Linear(3, 2, rngs=rngs)
    ...     self.bn = bnjax.nnx.BatchNorm(2, rngs=rngs)
    >>> net = Net(nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(net, tools.params_except_norms(net))))
    {'linear': {'bias': (2,), 'kernel': (3, 2)}}
  """
  return nnx.All(nnx.Param, nnx.Not(norm_params_filter(model, types)))


# --- Nested-mapping helpers (plain dicts or FrozenDicts) ----------------------------------------

_MISSING = object()


def _mapping_at(tree: Any, key: str, name: str) -> Mapping[str, Any]:
  if not isinstance(tree, Mapping) or not isinstance(tree.get(key), Mapping):
    got = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    raise ValueError(f"`{name}` must be a linen variable tree with a {key!r} collection "
                     f"(as returned by `model.init`); got {got}.")
  return tree[key]


def _as_path(path: Any) -> Path:
  if isinstance(path, str):
    return tuple(part for part in path.split("/") if part)
  return tuple(path)


def _get(tree: Any, path: Path) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return _MISSING
    tree = tree[key]
  return tree


def _module_paths(tree: Mapping[str, Any], prefix: Path = ()) -> list[Path]:
  """Paths of the mappings in ``tree`` that hold at least one array (the modules with variables)."""
  paths = []
  if any(not isinstance(v, Mapping) for v in tree.values()):
    paths.append(prefix)
  for key, value in tree.items():
    if isinstance(value, Mapping):
      paths.extend(_module_paths(value, (*prefix, key)))
  return paths


def _structural_norm_paths(params: Mapping[str, Any], batch_stats: Any) -> set[Path]:
  paths = set()
  for path in _module_paths(params):
    layer_params, layer_stats = _get(params, path), _get(batch_stats, path)
    if (set(layer_params) <= set(_AFFINE)
        and isinstance(layer_stats, Mapping) and {"mean", "var"} <= set(layer_stats)
        and not any(isinstance(layer_stats[k], Mapping) for k in ("mean", "var"))):
      paths.add(path)
  return paths


def _map_with_path(tree: Mapping[str, Any], fn: Callable[[Path, Any], Any],
                   prefix: Path = ()) -> dict[str, Any]:
  return {key: (_map_with_path(value, fn, (*prefix, key)) if isinstance(value, Mapping)
                else fn((*prefix, key), value))
          for key, value in tree.items()}

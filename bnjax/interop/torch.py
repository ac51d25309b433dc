r"""PyTorch batch-norm ``state_dict`` entries to bnjax and back, without importing torch.

PyTorch's ``BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) keep, under a module prefix:

============================  =====================  =========================================
PyTorch key                   bnjax                  present when
============================  =====================  =========================================
``weight``                    ``params.scale`` (γ)   ``affine=True``
``bias``                      ``params.bias`` (β)    ``affine=True`` and ``bias=True``
``running_mean``              ``state.mean``         ``track_running_stats=True``
``running_var``               ``state.var``          ``track_running_stats=True``
``num_batches_tracked``       (not kept)             ``track_running_stats=True``
============================  =====================  =========================================

Conventions that differ, and how to match PyTorch exactly:

* **Momentum.** PyTorch's ``momentum=p`` (default 0.1) is the weight of the *new* batch,
  ``running = (1 - p) * running + p * batch``; bnjax's is the decay of the old value. Pass
  ``momentum=bnjax.from_torch_momentum(p)`` (``1 - p``). PyTorch's ``momentum=None`` is a
  cumulative average: at its ``n``-th training step (``n = num_batches_tracked`` after the step)
  pass ``momentum=1 - 1 / n``.
* **Running variance.** PyTorch stores the unbiased batch variance ``m / (m - 1) * var`` in
  ``running_var`` (it normalises with the biased one in training, as bnjax does): pass
  ``unbiased_running_var=True``.
* **Layout.** PyTorch is channels-first: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``,
  ``(N, C, D, H, W)`` all have features on axis 1. Pass ``axis=1`` for such arrays, or transpose
  to channels-last (Flax's convention, ``axis=-1``).
* ``eps`` is the same (1e-5 by default in both).

NumPy arrays in, NumPy-compatible arrays out; this module never unpickles anything. Get a
``state_dict`` as NumPy arrays where torch runs, e.g.
``{k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}``, or read a safetensors
file with ``safetensors.numpy.load_file(path)``; go back with
``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

Source: PyTorch's ``torch.nn.BatchNorm2d`` documentation (the update rule, the unbiased running
variance, ``momentum=None``) and ``torch/nn/modules/batchnorm.py`` (the buffers and parameters).
"""

from collections.abc import Callable, Mapping
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _layer_trees
from bnjax.types import BatchNormParams
from bnjax.types import BatchNormState

__all__ = ["batch_norms_from_torch", "from_torch", "linen_path_from_torch", "to_torch"]

_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def from_torch(state_dict: Mapping[str, Any], prefix: str = "", *, param_dtype: Any = jnp.float32
               ) -> tuple[BatchNormParams, BatchNormState | None]:
  """Converts one PyTorch batch norm's ``state_dict`` entries to bnjax's ``(params, state)``.

  Reads ``prefix + 'weight'``, ``'bias'``, ``'running_mean'``, ``'running_var'`` (see the module doc
  for the key table and the momentum and variance conventions); other keys are ignored, so
  ``state_dict`` may be a whole model's.

  Args:
    state_dict: a mapping from PyTorch keys to NumPy arrays (or anything ``np.asarray`` takes).
    prefix: the module's prefix, e.g. ``'layer1.0.bn1'`` or ``'layer1.0.bn1.'``; ``''`` for a
      state_dict of the batch norm alone.
    param_dtype: the dtype of ``scale`` and ``bias``. Running statistics are always float32.

  Returns:
    ``(params, state)``, copies (later in-place changes to the source arrays do not reach them):
    ``params`` has None for a missing ``weight``/``bias`` (``affine=False``,
    or ``bias=False``); ``state`` is None without running statistics
    (``track_running_stats=False``: such a layer normalises with batch statistics in evaluation
    too, so call ``batch_norm(..., train=True)``, with ``bnjax.init(C)[1]`` as the state).

  Raises:
    ValueError: if no batch-norm entry is under ``prefix``, if the entries are inconsistent (a bias
      without a weight, one running statistic without the other) or not all of shape ``[C]``.
    TypeError: if a value is not numeric.

  Examples:
    >>> import numpy as np
    >>> from bnjax.interop import torch as bnjax_torch
    >>> sd = {'bn1.weight': np.array([1.0, 2.0], np.float32),
    ...       'bn1.bias': np.array([0.0, 0.5], np.float32),
    ...       'bn1.running_mean': np.array([0.1, 0.2], np.float32),
    ...       'bn1.running_var': np.array([1.5, 2.5], np.float32),
    ...       'bn1.num_batches_tracked': np.array(7)}
    >>> params, state = bnjax_torch.from_torch(sd, 'bn1')
    >>> params.scale, state.var
    (Array([1., 2.], dtype=float32), Array([1.5, 2.5], dtype=float32))
    >>> x_NCHW = jnp.ones((4, 2, 3, 3))
    >>> y, _ = bnjax.batch_norm(params, state, x_NCHW, train=False, axis=1)
    >>> batch = x_NCHW + jnp.arange(4.0).reshape(4, 1, 1, 1)      # channel means 2.5
    >>> y, new_state = bnjax.batch_norm(params, state, batch, train=True, axis=1,
    ...                                 momentum=bnjax.from_torch_momentum(0.1),
    ...                                 unbiased_running_var=True)  # PyTorch's update rule
    >>> [round(m, 4) for m in new_state.mean.tolist()]         # 0.9 * running + 0.1 * 2.5
    [0.34, 0.43]
  """
  prefix = _normalise_prefix(prefix)
  arrays = {key: _as_numpy(state_dict[prefix + key], prefix + key) for key in _KEYS
            if prefix + key in state_dict}
  where = f"bnjax.interop.torch.from_torch({prefix!r})"
  if not arrays:
    near = sorted(k for k in state_dict if k.startswith(prefix))[:5]
    raise ValueError(f"{where}: no batch-norm entry ({', '.join(_KEYS)}) under prefix "
                     f"{prefix!r}; keys there: {near or 'none'}.")
  if "bias" in arrays and "weight" not in arrays:
    raise ValueError(f"{where}: {prefix}bias without {prefix}weight; PyTorch's BatchNorm never "
                     "stores that, so this is not a batch norm's state_dict.")
  if ("running_mean" in arrays) != ("running_var" in arrays):
    raise ValueError(f"{where}: running_mean and running_var must come together; got only "
                     f"{'running_mean' if 'running_mean' in arrays else 'running_var'}.")
  if "num_batches_tracked" in arrays and "running_mean" not in arrays:
    raise ValueError(f"{where}: num_batches_tracked without running statistics.")
  vectors = {k: v for k, v in arrays.items() if k != "num_batches_tracked"}
  if not vectors:
    raise ValueError(f"{where}: only num_batches_tracked is under {prefix!r}; expected weight, "
                     "bias, running_mean or running_var.")
  shapes = {k: v.shape for k, v in vectors.items()}
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
    raise ValueError(f"{where}: every entry must have the same shape [C]; got {shapes}.")
  for key, value in vectors.items():
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise TypeError(f"{where}: {prefix}{key} must be floating; got {value.dtype}.")

  # Copies: on CPU `jnp.asarray` may share a NumPy array's memory, and a torch module's buffers
  # (behind `tensor.numpy()`) change in place when it trains.
  def copy(key: str, dtype: Any) -> jax.Array:
    return jnp.array(vectors[key], dtype, copy=True)

  params = BatchNormParams(*(copy(key, param_dtype) if key in vectors else None
                             for key in ("weight", "bias")))
  if "running_mean" not in vectors:
    return params, None
  return params, BatchNormState(copy("running_mean", jnp.float32),
                                copy("running_var", jnp.float32))


def to_torch(params: BatchNormParams | Mapping[str, Any] | None,
             state: BatchNormState | Mapping[str, Any] | None, *, num_batches_tracked: int = 0,
             prefix: str = "", dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """Converts bnjax's ``(params, state)`` to a PyTorch batch norm's ``state_dict`` entries.

  The inverse of `from_torch`. Load the result with ``module.load_state_dict`` after
  ``torch.from_numpy`` on each value; build the module to match: ``affine=False`` if ``params``
  has neither scale nor bias, ``bias=False`` if it has only a scale,
  ``track_running_stats=False`` if ``state`` is None.

  Args:
    params: ``BatchNormParams``, a linen ``params`` dict (``scale``/``bias``) or None.
    state: ``BatchNormState``, a linen ``batch_stats`` dict (``mean``/``var``) or None. For
      PyTorch's evaluation to match, the running variance should be the unbiased one (train with
      ``unbiased_running_var=True``).
    num_batches_tracked: the value of ``num_batches_tracked`` (bnjax does not count steps; PyTorch
      uses it only with ``momentum=None``).
    prefix: prepended to every key, e.g. ``'layer1.0.bn1'``.
    dtype: the dtype of the float arrays (PyTorch's default is float32).

  Returns:
    A dict from PyTorch keys to new, writable NumPy arrays; ``num_batches_tracked`` is an int64
    scalar array.

  Raises:
    ValueError: if ``params`` has a bias but no scale (PyTorch cannot hold that), or
      ``num_batches_tracked`` is negative or given without ``state``.

  Examples:
    >>> from bnjax.interop import torch as bnjax_torch
    >>> params, state = bnjax.init(2)
    >>> sd = bnjax_torch.to_torch(params, state, num_batches_tracked=3, prefix='bn1')
    >>> sorted(sd)
    ['bn1.bias', 'bn1.num_batches_tracked', 'bn1.running_mean', 'bn1.running_var', 'bn1.weight']
    >>> sd['bn1.running_var'], sd['bn1.num_batches_tracked']
    (array([1., 1.], dtype=float32), array(3))
  """
  where = "bnjax.interop.torch.to_torch"
  params = _layer_trees.as_params(params, where)
  if params.scale is None and params.bias is not None:
    raise ValueError(f"{where}: `params` has a bias but no scale; PyTorch's BatchNorm has a weight "
                     "and bias (affine=True), a weight alone (bias=False) or neither "
                     "(affine=False). Convert with scale=ones: "
                     "`BatchNormParams(jnp.ones_like(bias), bias)`.")
  if (isinstance(num_batches_tracked, bool) or not isinstance(num_batches_tracked, numbers.Integral)
      or num_batches_tracked < 0):
    raise ValueError(f"{where}: `num_batches_tracked` must be a non-negative int; got "
                     f"{num_batches_tracked!r}.")
  prefix = _normalise_prefix(prefix)
  out = {}
  if params.scale is not None:
    out[prefix + "weight"] = _vector(params.scale, dtype, "params.scale", where)
  if params.bias is not None:
    out[prefix + "bias"] = _vector(params.bias, dtype, "params.bias", where)
  if state is None:
    if num_batches_tracked:
      raise ValueError(f"{where}: `num_batches_tracked`={num_batches_tracked} needs running "
                       "statistics, but `state` is None (track_running_stats=False).")
    return out
  state = _layer_trees.as_state(state, where)
  out[prefix + "running_mean"] = _vector(state.mean, dtype, "state.mean", where)
  out[prefix + "running_var"] = _vector(state.var, dtype, "state.var", where)
  shapes = {k: v.shape for k, v in out.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"{where}: every array must have the same shape [C]; got {shapes}.")
  out[prefix + "num_batches_tracked"] = np.array(num_batches_tracked, np.int64)
  return out


def linen_path_from_torch(module_key: str) -> tuple[str, ...]:
  """Maps a PyTorch module path to a linen module path.

  The default rule of `batch_norms_from_torch`.

  PyTorch names children of ``nn.Sequential``/``nn.ModuleList`` by index (``'layer1.0'``); linen
  names the modules of a list attribute assigned in ``setup`` ``name_index`` (``'layer1_0'``). So
  each numeric component is joined to the one before it with ``'_'``: a torchvision ResNet's
  ``'layer1.0.downsample.1'`` becomes ``('layer1_0', 'downsample_1')``, matching a linen ResNet
  whose ``setup`` assigns ``self.layer1 = [Block(...), ...]`` and, in a block,
  ``self.downsample = [nn.Conv(...), bnjax.BatchNorm(...)]``. A leading number stays as it is.
  Write your own function for other naming (e.g. Flax's ``BatchNorm_0`` auto-names).

  Examples:
    >>> from bnjax.interop import torch as bnjax_torch
    >>> bnjax_torch.linen_path_from_torch('layer1.0.downsample.1')
    ('layer1_0', 'downsample_1')
    >>> bnjax_torch.linen_path_from_torch('bn1')
    ('bn1',)
  """
  path: list[str] = []
  for part in module_key.split("."):
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path)


def batch_norms_from_torch(
    state_dict: Mapping[str, Any], *,
    path_fn: Callable[[str], tuple[str, ...]] = linen_path_from_torch,
    param_dtype: Any = jnp.float32) -> dict[str, dict[str, Any]]:
  """Converts every batch norm of a model's ``state_dict`` into linen ``params``/``batch_stats``.

  A module prefix is taken for a batch norm when it holds ``running_mean`` and ``running_var`` (so
  layers with ``track_running_stats=False`` are not found: convert those with `from_torch`); each
  is converted with `from_torch` and placed at ``path_fn(prefix)`` in both trees. Other entries
  (convolutions, linear layers) are left out: convert them with their own layouts (PyTorch's
  ``Conv2d`` weight is ``OIHW``, Flax's ``HWIO``; ``Linear`` is ``(out, in)``, Flax's
  ``(in, out)``).

  Args:
    state_dict: a whole model's state_dict as NumPy arrays, e.g. a torchvision ResNet's
      (``bn1.*``, ``layer1.0.bn1.*``, ``layer1.0.downsample.1.*``, ...).
    path_fn: maps a PyTorch module path (``'layer1.0.bn1'``) to a linen path tuple; the default,
      `linen_path_from_torch`, gives ``('layer1_0', 'bn1')``.
    param_dtype: the dtype of ``scale``/``bias``.

  Returns:
    ``{'params': {...}, 'batch_stats': {...}}``, nested dicts keyed by the linen path; merge them
    into the model's variables.

  Raises:
    ValueError: if no batch norm is found, or two PyTorch modules map to the same linen path.

  Examples:
    >>> import numpy as np
    >>> from bnjax.interop import torch as bnjax_torch
    >>> ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    >>> sd = {'conv1.weight': np.zeros((2, 3, 3, 3), np.float32),
    ...       'layer1.0.downsample.1.weight': ones, 'layer1.0.downsample.1.bias': zeros,
    ...       'layer1.0.downsample.1.running_mean': zeros,
    ...       'layer1.0.downsample.1.running_var': ones,
    ...       'layer1.0.downsample.1.num_batches_tracked': np.array(0)}
    >>> tree = bnjax_torch.batch_norms_from_torch(sd)
    >>> jax.tree.map(jnp.shape, tree['batch_stats'])
    {'layer1_0': {'downsample_1': {'mean': (2,), 'var': (2,)}}}
  """
  prefixes = sorted({key[:-len(".running_mean")] for key in state_dict
                     if key.endswith(".running_mean")
                     and key[:-len("mean")] + "var" in state_dict})
  if "running_mean" in state_dict and "running_var" in state_dict:
    prefixes.insert(0, "")
  if not prefixes:
    raise ValueError("bnjax.interop.torch.batch_norms_from_torch: no batch norm found (no key "
                     "pair '<module>.running_mean' / '<module>.running_var').")
  tree: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
  sources: dict[tuple[str, ...], str] = {}
  for prefix in prefixes:
    path = tuple(path_fn(prefix))
    if path in sources:
      raise ValueError(f"bnjax.interop.torch.batch_norms_from_torch: {sources[path]!r} and "
                       f"{prefix!r} both map to the linen path {path}; adapt `path_fn`.")
    sources[path] = prefix
    params, state = from_torch(state_dict, prefix, param_dtype=param_dtype)
    if state is None:  # Unreachable: prefixes are found by their running statistics.
      raise RuntimeError(f"bnjax.interop.torch.batch_norms_from_torch: no running statistics "
                         f"for {prefix!r}.")
    _set(tree["batch_stats"], path, {"mean": state.mean, "var": state.var})
    layer_params = {k: v for k, v in (("scale", params.scale), ("bias", params.bias))
                    if v is not None}
    if layer_params:
      _set(tree["params"], path, layer_params)
  return tree


def _normalise_prefix(prefix: str) -> str:
  if not isinstance(prefix, str):
    raise TypeError(f"bnjax.interop.torch: `prefix` must be a str; got {type(prefix).__name__}.")
  return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _as_numpy(value: Any, key: str) -> np.ndarray:
  try:
    array = np.asarray(value)
  except (RuntimeError, TypeError) as error:  # e.g. a torch tensor that requires grad.
    raise TypeError(f"bnjax.interop.torch: {key!r} could not be read as a NumPy array ({error}); "
                    "pass `tensor.detach().cpu().numpy()`.") from error
  if not (jnp.issubdtype(array.dtype, jnp.number) or array.dtype == np.bool_):
    raise TypeError(f"bnjax.interop.torch: {key!r} must be a numeric array; got dtype "
                    f"{array.dtype}.")
  return array


def _vector(value: Any, dtype: Any, name: str, where: str) -> np.ndarray:
  array = np.array(value, dtype=dtype)  # A writable copy, never a view of a JAX buffer.
  if array.ndim != 1:
    raise ValueError(f"{where}: `{name}` must have shape [C]; got {array.shape}.")
  return array


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value

r"""Whitening batch normalization: decorrelate the channels, not just standardise them.

Batch norm makes each channel zero-mean and unit-variance on its own. Whitening goes the whole way:
zero mean and identity covariance, so the channels are also uncorrelated. Per group of ``d``
channels (the ``C`` channels are split into groups of ``group_size``; the last group may be
smaller) with ``m`` valid rows (positions of the batch, ``N·H·W`` for images):

.. math::

   X_c = X - \mu, \qquad \Sigma = \tfrac{1}{m} X_c X_c^\top + \epsilon I, \qquad
   \hat x = W x_c \ \text{with}\ W \Sigma W^\top = I, \qquad y = \gamma \odot \hat x + \beta.

The ``method`` chooses ``W``:

* ``"zca"``: :math:`W = \Sigma^{-1/2}` (Decorrelated Batch Normalization, Huang et al., CVPR
  2018), the whitening closest to the input in least squares. Its derivative is the derivative of
  the matrix function :math:`\Sigma^{-1/2}`, written with the divided differences
  :math:`(\lambda_i^{-1/2} - \lambda_j^{-1/2}) / (\lambda_i - \lambda_j) =
  -1 / (\sqrt{\lambda_i}\sqrt{\lambda_j}(\sqrt{\lambda_i} + \sqrt{\lambda_j}))`, whose right-hand
  side has no difference of eigenvalues at all: it is finite and exact for repeated or nearly
  repeated eigenvalues, where the textbook eigenvector derivative divides by
  :math:`\lambda_i - \lambda_j`.
* ``"pca"``: :math:`W = \Lambda^{-1/2} D^\top` (:math:`\Sigma = D \Lambda D^\top`, components by
  decreasing variance). Offered as the cautionary example: eigenvectors are defined only up to
  order and sign, so the same input channel maps to different outputs from batch to batch
  ("stochastic axis swapping"), its output is not equivariant to permuting the channels, the
  running average of its matrix is meaningless, and its derivative does not exist where
  eigenvalues repeat (bnjax then drops the undefined terms instead of returning NaN).
* ``"cholesky"``: :math:`W = L^{-1}` with :math:`\Sigma = L L^\top` (Siarohin et al., ICLR 2019).
  Cheap and stable, but the result depends on the order of the channels.
* ``"iterative"``: IterNorm (Huang et al., CVPR 2019), Newton–Schulz iterations toward
  :math:`\Sigma^{-1/2}` with matrix products only: :math:`\Sigma_N = \Sigma / \mathrm{tr}\,\Sigma`,
  :math:`P_0 = I`, :math:`P_k = \tfrac12 (3 P_{k-1} - P_{k-1}^3 \Sigma_N)` for
  :math:`k = 1..T`, :math:`W = P_T / \sqrt{\mathrm{tr}\,\Sigma}`. With a finite ``T`` the output is
  only approximately white (directions of small variance are the last to converge); that is the
  method, not an error.

``group_size=1`` is batch norm for every method: each "covariance" is a variance and
:math:`W = (\sigma^2 + \epsilon)^{-1/2}`, with ε in the same place as `bnjax.batch_norm`.

Statistics are exact: the mean comes from sums shifted by a pivot taken from the data, and the
cross products from the rows centred by that mean (`bnjax.stats.local_covariance`), in at least
float32 with full-precision matrix products. Across devices, per-device (count, mean, cross
products) are merged by counts with one all-reduce whose size does not depend on the number of
devices (`bnjax.distributed.combine_covariances`).

Running estimates. Two are kept, and ``running_estimate`` chooses which one evaluation uses:

* ``"covariance"`` (default): the running average of the batch covariance Σ_B (without ε);
  evaluation computes ``W`` from it with the same method. This is the consistent population
  estimator (Siarohin et al.; the "Sigma" variants of Huang et al., CVPR 2020).
* ``"whitening"``: the running average of the batch whitening matrix W_B, what the official DBN
  and IterNorm codes keep; cheaper at inference (no matrix function), but
  :math:`E[\Sigma_B^{-1/2}] \ne (E[\Sigma_B])^{-1/2}`, so it is biased, most at small batches.

Singular batch covariances (``m <= d`` valid rows, constant or duplicated channels) produce no NaN:
ε bounds every eigenvalue below, ZCA and PCA clamp the computed eigenvalues at ε (roundoff can
put them slightly below), Cholesky retries with a diagonal jitter of ``d · eps · tr Σ`` where the
float32 factorisation breaks down, and IterNorm needs no inverse at all. Directions without
variance are then multiplied by up to ``ε^(-1/2)`` (≈ 316 for ε = 1e-5) but carry (nearly) no
signal; a constant channel outputs exactly ``bias``.
"""

from collections.abc import Callable
import functools
import math
import numbers
from typing import Any, Literal, NamedTuple, cast, overload

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from bnjax import _checks
from bnjax import distributed
from bnjax import stats
from bnjax.types import BatchNormParams

_WHERE = "bnjax.whitening_batch_norm"
_HIGHEST = lax.Precision.HIGHEST

METHODS = ("zca", "pca", "cholesky", "iterative")
RUNNING_ESTIMATES = ("covariance", "whitening")


class GroupLayout(NamedTuple):
  """How ``channels`` are split into ``groups`` of ``size``; the last group holds ``last``.

  Internally every group has ``size`` channels: the last one is padded with zero channels, which
  have no variance and no correlation with the real ones, so they change nothing (their rows and
  columns of the stored matrices are those of the identity).
  """

  channels: int
  size: int
  groups: int
  last: int

  @property
  def padded(self) -> int:
    """The channels with padding, ``groups * size``."""
    return self.groups * self.size

  def valid(self) -> np.ndarray:
    """Bool [groups, size]: True at real channels, False at padding."""
    return (np.arange(self.padded) < self.channels).reshape(self.groups, self.size)


def group_layout(num_features: int, group_size: int) -> GroupLayout:
  """The group layout of `num_features` channels in groups of at most `group_size`.

  ``d = min(group_size, num_features)`` channels per group, ``ceil(num_features / d)`` groups; the
  last holds the remainder.

  Raises:
    ValueError: if either is not a positive int.

  Examples:
    >>> bnjax.whitening.group_layout(100, 64)
    GroupLayout(channels=100, size=64, groups=2, last=36)
  """
  _check_positive_int(num_features, "num_features", "bnjax.group_layout")
  _check_positive_int(group_size, "group_size", "bnjax.group_layout")
  size = min(int(group_size), int(num_features))
  groups = -(-int(num_features) // size)
  return GroupLayout(int(num_features), size, groups, int(num_features) - (groups - 1) * size)


class WhiteningState(NamedTuple):
  """Running statistics of a whitening layer: the mean and both running estimates.

  Both estimates are always updated (each is a [G, d, d] array, small next to the activations), so
  the structure of the state never depends on how it will be evaluated; ``running_estimate``
  chooses at evaluation time. Rows and columns of the last group beyond its real channels are
  those of the identity.
  """

  mean: jax.Array  # shape=[C], dtype=float32; running mean of each channel; starts at 0.
  covariance: jax.Array  # shape=[G, d, d], float32; running batch covariance (no ε); starts at I.
  whitening: jax.Array  # shape=[G, d, d], float32; running batch whitening matrix; starts at I.


class WhiteningStats(NamedTuple):
  """What one training step measured (``return_stats=True``); global across ``axis_name``."""

  mean: jax.Array  # shape=[C]; batch mean.
  covariance: jax.Array  # shape=[G, d, d]; biased batch covariance (÷ count), without ε.
  whitening: jax.Array  # shape=[G, d, d]; the whitening matrix the batch was normalised with.
  count: jax.Array  # shape=[G], integer; valid rows.
  updated: jax.Array  # shape=[G], bool; False where the running statistics were kept.


def init_whitening(num_features: int, *, group_size: int = 64, dtype: Any = jnp.float32,
                   use_scale: bool = True, use_bias: bool = True
                   ) -> tuple[BatchNormParams, WhiteningState]:
  """Creates the parameters and running statistics of a whitening batch-norm layer.

  Args:
    num_features: the number of channels C.
    group_size: channels per group, d (the last group may be smaller; see `group_layout`).
    dtype: the dtype of ``scale`` and ``bias``; the running statistics are float32.
    use_scale: if False, ``params.scale`` is None.
    use_bias: if False, ``params.bias`` is None.

  Returns:
    ``(params, state)``: scale ones, bias zeros (shape [C]); running mean zeros [C], running
    covariance and whitening matrix identities [G, d, d].

  Raises:
    ValueError: if `num_features` or `group_size` is not a positive int.

  Examples:
    >>> params, state = bnjax.whitening.init_whitening(6, group_size=4)
    >>> state.covariance.shape, params.scale.shape
    ((2, 4, 4), (6,))
  """
  layout = group_layout(num_features, group_size)
  params = BatchNormParams(
      scale=jnp.ones((layout.channels,), dtype) if use_scale else None,
      bias=jnp.zeros((layout.channels,), dtype) if use_bias else None)
  eye = jnp.broadcast_to(jnp.eye(layout.size, dtype=jnp.float32),
                         (layout.groups, layout.size, layout.size))
  state = WhiteningState(mean=jnp.zeros((layout.channels,), jnp.float32), covariance=eye,
                         whitening=eye)
  return params, state


# ============================================================================ matrix functions


def _t(a: jax.Array) -> jax.Array:
  return jnp.swapaxes(a, -1, -2)


def _sym(a: jax.Array) -> jax.Array:
  return 0.5 * (a + _t(a))


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _inverse_sqrt_parts(s: jax.Array, floor: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(S^(-1/2), U, sqrt(λ))`` from ``S = U diag(λ) Uᵀ``, ``λ`` clamped at `floor`."""
  eigenvalues, vectors = jnp.linalg.eigh(_sym(s), symmetrize_input=False)
  root = jnp.sqrt(jnp.maximum(eigenvalues, floor))
  return _mm(vectors / root[..., None, :], _t(vectors)), vectors, root


@jax.custom_jvp
def _inverse_sqrt(s: jax.Array, floor: jax.Array) -> jax.Array:
  """``S^(-1/2)`` of symmetric positive definite ``S`` [..., d, d], eigenvalues at least `floor`."""
  return _inverse_sqrt_parts(s, floor)[0]


@_inverse_sqrt.defjvp
def _inverse_sqrt_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, Any]
                      ) -> tuple[jax.Array, jax.Array]:
  """``dW = U (K ∘ (Uᵀ dS U)) Uᵀ`` with ``K_ij = -1 / (r_i r_j (r_i + r_j))``, ``r = sqrt(λ)``.

  ``K_ij`` is the divided difference ``(f(λ_i) - f(λ_j)) / (λ_i - λ_j)`` of ``f(λ) = λ^(-1/2)``,
  written without the difference of eigenvalues; at ``λ_i = λ_j`` it is ``f'(λ_i)``. The floor
  (ε, a guard against roundoff only) passes no derivative.
  """
  s, floor = primals
  ds = _sym(tangents[0])
  w, vectors, root = _inverse_sqrt_parts(s, floor)
  r_i, r_j = root[..., :, None], root[..., None, :]
  divided = -1.0 / (r_i * r_j * (r_i + r_j))
  inner = _mm(_mm(_t(vectors), ds), vectors)
  return w, _mm(_mm(vectors, divided * inner), _t(vectors))


@jax.custom_jvp
def _eigh_descending(s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues (decreasing) and eigenvectors (columns) of symmetric ``S``."""
  eigenvalues, vectors = jnp.linalg.eigh(_sym(s), symmetrize_input=False)
  return eigenvalues[..., ::-1], vectors[..., ::-1]


@_eigh_descending.defjvp
def _eigh_descending_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]
                         ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """The eigenvector derivative ``dU = U (F ∘ (Uᵀ dS U))``, ``F_ij = 1 / (λ_j - λ_i)``.

  The terms of (numerically) equal eigenvalues are dropped: there the eigenvectors are not unique
  and have no derivative (PCA whitening's own defect; the published codes guard the same division
  with tiny constants).
  """
  (s,), (ds,) = primals, tangents
  eigenvalues, vectors = _eigh_descending(s)
  inner = _mm(_mm(_t(vectors), _sym(ds)), vectors)
  gap = eigenvalues[..., None, :] - eigenvalues[..., :, None]
  tiny = (jnp.finfo(s.dtype).eps * 4
          * jnp.max(jnp.abs(eigenvalues), axis=-1, keepdims=True)[..., None])
  separated = jnp.abs(gap) > tiny
  f = jnp.where(separated, 1.0 / jnp.where(separated, gap, 1.0), 0.0)
  d_vectors = _mm(vectors, f * inner)
  d_eigenvalues = jnp.diagonal(inner, axis1=-2, axis2=-1)
  return (eigenvalues, vectors), (d_eigenvalues, d_vectors)


def _newton_schulz(s: jax.Array, iterations: int, valid: jax.Array) -> jax.Array:
  """IterNorm's ``P_T / sqrt(tr S)``; the trace counts only the real channels (`valid`)."""
  trace = jnp.sum(jnp.diagonal(s, axis1=-2, axis2=-1) * valid, axis=-1)[..., None, None]
  normalised = s / trace
  p = jnp.broadcast_to(jnp.eye(s.shape[-1], dtype=s.dtype), s.shape)
  for _ in range(iterations):
    p = 1.5 * p - 0.5 * _mm(_mm(_mm(p, p), p), normalised)
  return p * lax.rsqrt(trace)


def _lower_inverse(lower: jax.Array) -> jax.Array:
  """The inverse of lower-triangular matrices [..., n, n] by recursive halving.

  Matrix products only: ``[[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]`` (the
  recursive variant of LAPACK's ``trtri``; XLA:CPU's batched triangular solve is far slower for
  small matrices).
  """
  n = lower.shape[-1]
  if n == 1:
    return 1.0 / lower
  h = n // 2
  a_inv = _lower_inverse(lower[..., :h, :h])
  b_inv = _lower_inverse(lower[..., h:, h:])
  c = -_mm(_mm(b_inv, lower[..., h:, :h]), a_inv)
  top = jnp.concatenate([a_inv, jnp.zeros((*a_inv.shape[:-1], n - h), lower.dtype)], axis=-1)
  return jnp.concatenate([top, jnp.concatenate([c, b_inv], axis=-1)], axis=-2)


def _cholesky_factor_inverse(s: jax.Array) -> jax.Array:
  """``L^(-1)`` with ``S = L Lᵀ``.

  Where the factorisation of ``S`` breaks down in floating point (a singular covariance that
  roundoff made indefinite), that of ``S + d · eps · tr(S) · I``.
  """
  d = s.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(d, dtype=s.dtype), s.shape)
  probe = jnp.linalg.cholesky(s)
  factorised = jnp.all(jnp.isfinite(probe), axis=(-2, -1))[..., None, None]
  trace = jnp.trace(s, axis1=-2, axis2=-1)[..., None, None]
  jitter = d * jnp.finfo(s.dtype).eps * trace
  lower = jnp.where(factorised, probe, jnp.linalg.cholesky(s + jitter * eye))
  return _lower_inverse(lower)


@jax.custom_jvp
def _cholesky_inverse(s: jax.Array) -> jax.Array:
  """``W = L^(-1)`` with ``S = L Lᵀ`` (symmetric ``S`` [..., d, d])."""
  return _cholesky_factor_inverse(_sym(s))


@_cholesky_inverse.defjvp
def _cholesky_inverse_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]
                          ) -> tuple[jax.Array, jax.Array]:
  """``dW = -Φ(W dS Wᵀ) W``, Φ the lower triangle with half the diagonal.

  From ``dS = dL Lᵀ + L dLᵀ``: ``L⁻¹ dS L⁻ᵀ = X + Xᵀ`` with ``X = L⁻¹ dL`` lower triangular, so
  ``X = Φ(W dS Wᵀ)`` and ``dW = -W dL W = -X W``. Matrix products only (JAX's own Cholesky
  derivative uses triangular solves).
  """
  (s,), (ds,) = primals, tangents
  w = _cholesky_inverse(s)
  inner = _mm(_mm(w, _sym(ds)), _t(w))
  d = s.shape[-1]
  half = jnp.tril(jnp.ones((d, d), s.dtype)) - 0.5 * jnp.eye(d, dtype=s.dtype)
  return w, -_mm(inner * jnp.broadcast_to(half, inner.shape), w)


def _matrix(covariance: jax.Array, method: str, iterations: int, epsilon: jax.Array,
            valid: np.ndarray) -> jax.Array:
  """The whitening matrices [G, d, d] of the covariances [G, d, d] (ε not included).

  Rows and columns of padding channels (`valid` False) are replaced by ``0`` before ε is added,
  so they form a separate block ``ε I`` that changes nothing for the real channels (and comes
  last in PCA's order).
  """
  dtype = covariance.dtype
  real = jnp.asarray(valid)
  pair = real[..., :, None] & real[..., None, :]
  eye = jnp.broadcast_to(jnp.eye(covariance.shape[-1], dtype=dtype), covariance.shape)
  s = jnp.where(pair, covariance, jnp.zeros((), dtype)) + epsilon * eye
  if method == "zca":
    return _inverse_sqrt(s, jnp.broadcast_to(epsilon, ()).astype(dtype))
  if method == "pca":
    eigenvalues, vectors = _eigh_descending(s)
    root = jnp.sqrt(jnp.maximum(eigenvalues, epsilon))
    return _t(vectors) / root[..., :, None]
  if method == "cholesky":
    return _cholesky_inverse(s)
  return _newton_schulz(s, iterations, real.astype(dtype))


def whitening_matrix(covariance: jax.Array, *, method: str = "zca", iterations: int = 5,
                     epsilon: Any = 1e-5) -> jax.Array:
  r"""The whitening matrix ``W`` of covariance matrices, as the layer computes it.

  .. math:: W (\Sigma + \epsilon I) W^\top = I

  exactly for ``"zca"`` (:math:`(\Sigma + \epsilon I)^{-1/2}`), ``"pca"`` and ``"cholesky"``,
  approximately (``iterations`` Newton–Schulz steps) for ``"iterative"``. Differentiable; the
  ZCA derivative is exact for repeated eigenvalues.

  Args:
    covariance: symmetric positive semi-definite matrices, shape [..., d, d], without ε.
    method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"iterative"``.
    iterations: Newton–Schulz steps T for ``"iterative"``.
    epsilon: added to the diagonal, > 0.

  Returns:
    ``W``, of the shape and dtype of `covariance`.

  Raises:
    ValueError: on a bad `method`, `iterations` or `epsilon`, or a non-square `covariance`.

  Examples:
    >>> sigma = jnp.array([[4.0, 0.0], [0.0, 1.0]])
    >>> bnjax.whitening.whitening_matrix(sigma, epsilon=1e-12).round(3)
    Array([[0.5, 0. ],
           [0. , 1. ]], dtype=float32)
  """
  where = "bnjax.whitening_matrix"
  _check_method(method, iterations, where)
  _checks.check_hyperparameters(0.5, epsilon, where)
  covariance = jnp.asarray(covariance)
  _checks.check_floating(covariance, "covariance", where)
  if covariance.ndim < 2 or covariance.shape[-1] != covariance.shape[-2]:
    _checks.fail(where, f"`covariance` must have shape [..., d, d]; got {covariance.shape}.")
  valid = np.ones(covariance.shape[:-1], bool)
  return _matrix(covariance, method, iterations, jnp.asarray(epsilon, covariance.dtype), valid)


# ============================================================================ the layer


def _check_positive_int(value: Any, name: str, where: str) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    _checks.fail(where, f"`{name}` must be a positive int; got {value!r}.")


def _check_method(method: Any, iterations: Any, where: str) -> None:
  if method not in METHODS:
    _checks.fail(where, f"`method` must be one of {METHODS}; got {method!r}.")
  _check_positive_int(iterations, "iterations", where)


def _check_state(params: Any, state: Any, layout: GroupLayout, group_size: int) -> None:
  if not all(hasattr(params, f) for f in ("scale", "bias")):
    _checks.fail(_WHERE, f"`params` must have the fields ('scale', 'bias'); got {params!r}. "
                 "Create both with `bnjax.init_whitening(num_features, group_size=...)`.",
                 TypeError)
  if not all(hasattr(state, f) for f in WhiteningState._fields):
    _checks.fail(_WHERE, f"`state` must be a `bnjax.WhiteningState` with the fields "
                 f"{WhiteningState._fields}; got {type(state).__name__}. Create it with "
                 "`bnjax.init_whitening(num_features, group_size=...)`.", TypeError)
  fix = (f"Create them with `bnjax.init_whitening({layout.channels}, group_size={group_size})`, "
         "or pass the `group_size` and `axis` they were made for.")
  square = (layout.groups, layout.size, layout.size)
  for name, value, shape in (("params.scale", params.scale, (layout.channels,)),
                             ("params.bias", params.bias, (layout.channels,)),
                             ("state.mean", state.mean, (layout.channels,)),
                             ("state.covariance", state.covariance, square),
                             ("state.whitening", state.whitening, square)):
    if value is None:
      if name.startswith("state"):
        _checks.fail(_WHERE, f"`{name}` is None; the running statistics are required. {fix}")
      continue
    if tuple(np.shape(value)) != shape:
      _checks.fail(_WHERE, f"`{name}` has shape {tuple(np.shape(value))}, expected {shape} for "
                   f"{layout.channels} channels in groups of {group_size} ({layout.groups} "
                   f"group(s) of {layout.size}). {fix}")
    _checks.check_floating(value, name, _WHERE)


def _to_groups(v: jax.Array, layout: GroupLayout) -> jax.Array:
  """[..., C] -> [..., G, d], padding the last group with zeros."""
  pad = layout.padded - layout.channels
  if pad:
    v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
  return v.reshape((*v.shape[:-1], layout.groups, layout.size))


def _from_groups(v: jax.Array, layout: GroupLayout) -> jax.Array:
  """[..., G, d] -> [..., C]."""
  v = v.reshape((*v.shape[:-2], layout.padded))
  return v if layout.padded == layout.channels else v[..., :layout.channels]


def _output(w: jax.Array, rows_GxMxD: jax.Array, shift_GxD: jax.Array, scale: jax.Array | None,
            bias: jax.Array | None) -> jax.Array:
  """``y = scale * W (rows - shift) + bias`` row by row, shape [m, G, d].

  ``W rows`` is one batched product (group axis first); ``W shift`` is folded into the
  elementwise pass that transposes back to rows.
  """
  z = jnp.einsum("gij,gmj->gmi", w, rows_GxMxD, precision=_HIGHEST)
  w_shift = jnp.einsum("gij,gj->gi", w, shift_GxD, precision=_HIGHEST)
  y = jnp.transpose(z, (1, 0, 2)) - w_shift[None]
  if scale is not None:
    y = y * scale[None]
  return y if bias is None else y + bias[None]


def _pad_identity(matrix: jax.Array, layout: GroupLayout) -> jax.Array:
  """Rows and columns of padding channels set to those of the identity."""
  valid = jnp.asarray(layout.valid())
  pair = valid[:, :, None] & valid[:, None, :]
  return jnp.where(pair, matrix, jnp.broadcast_to(jnp.eye(layout.size, dtype=matrix.dtype),
                                                  matrix.shape))


_Returns = tuple[jax.Array, WhiteningState]
_ReturnsWithStats = tuple[jax.Array, WhiteningState, WhiteningStats]


@overload
def whitening_batch_norm(params: BatchNormParams, state: WhiteningState, x: jax.Array,
                         train: bool, *, group_size: int = ..., method: str = ...,
                         iterations: int = ..., axis: int = ..., momentum: Any = ...,
                         epsilon: Any = ..., axis_name: Any = ..., axis_index_groups: Any = ...,
                         mask: jax.Array | None = ..., running_estimate: str = ...,
                         unbiased_running_cov: bool = ..., dtype: Any = ...,
                         return_stats: Literal[False] = ..., stats_route: str = ...,
                         custom_vjp: bool = ...) -> _Returns: ...


@overload
def whitening_batch_norm(params: BatchNormParams, state: WhiteningState, x: jax.Array,
                         train: bool, *, group_size: int = ..., method: str = ...,
                         iterations: int = ..., axis: int = ..., momentum: Any = ...,
                         epsilon: Any = ..., axis_name: Any = ..., axis_index_groups: Any = ...,
                         mask: jax.Array | None = ..., running_estimate: str = ...,
                         unbiased_running_cov: bool = ..., dtype: Any = ...,
                         return_stats: Literal[True], stats_route: str = ...,
                         custom_vjp: bool = ...) -> _ReturnsWithStats: ...


def whitening_batch_norm(params: BatchNormParams, state: WhiteningState, x: jax.Array,
                         train: bool, *, group_size: int = 64, method: str = "zca",
                         iterations: int = 5, axis: int = -1, momentum: Any = 0.99,
                         epsilon: Any = 1e-5, axis_name: Any = None, axis_index_groups: Any = None,
                         mask: jax.Array | None = None, running_estimate: str = "covariance",
                         unbiased_running_cov: bool = False, dtype: Any = None,
                         return_stats: bool = False, stats_route: str = "auto",
                         custom_vjp: bool = True) -> _Returns | _ReturnsWithStats:
  r"""Whitening batch normalization (group-wise ZCA, PCA, Cholesky or IterNorm) as a pure function.

  .. math::

     y = \gamma \odot W (x - \mu) + \beta, \qquad W (\Sigma + \epsilon I) W^\top = I
     \ \text{per group of channels}

  In training, :math:`\mu` and :math:`\Sigma` are the mean and biased covariance of the valid rows
  of ``x`` (every axis but ``axis`` is a row axis), across devices along ``axis_name``; ``W`` is
  computed by ``method`` (see `bnjax.whitening`) and the running mean, covariance and whitening
  matrix move toward the batch's: ``new = momentum * old + (1 - momentum) * batch``. In
  evaluation, ``W`` comes from the running estimate named by ``running_estimate`` and ``state`` is
  returned as is. Training uses a closed-form backward pass (``custom_vjp=True``), with the exact
  derivative of ``Σ^(-1/2)`` for ZCA, finite where eigenvalues repeat.

  Warning:
    The covariance of d channels needs well over d valid rows per group: with ``m <= d`` it is
    singular and ε decides the whitening along the missing directions. Choose ``group_size``
    well below the number of rows (``N·H·W`` per step, over all devices); the defaults follow
    IterNorm (64 channels per group, T = 5).

  Args:
    params: ``BatchNormParams``; ``scale`` and ``bias`` of shape [C], or None.
    state: `WhiteningState` from `init_whitening` (same ``group_size``).
    x: a real floating array with the C channels along ``axis``.
    train: a static Python bool: batch statistics (True) or running statistics (False).
    group_size: channels per whitening group, d; the last group holds the remainder.
    method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"iterative"``.
    iterations: Newton–Schulz steps T of ``"iterative"``.
    axis: the one feature axis.
    momentum: decay of the running averages, a scalar in [0, 1].
    epsilon: added to the diagonal of every covariance, a scalar > 0.
    axis_name: a named axis (``shard_map``, ``pmap``, ``vmap``) or tuple of them: statistics as
      if the batches of all devices were concatenated.
    axis_index_groups: a partition of the named axis's indices; statistics are combined within
      each group (groups may differ in size).
    mask: bool array broadcastable to ``x`` and of size 1 along ``axis`` (a row is valid or not
      as a whole): statistics use only valid rows; a non-finite value in an invalid row is
      replaced by the mean, so it reaches neither the valid outputs nor any gradient. When no row
      is valid, the running statistics normalise the batch and are kept.
    running_estimate: what evaluation whitens with: ``"covariance"`` (``W`` computed from the
      running covariance) or ``"whitening"`` (the running whitening matrix). Both are updated in
      training whatever this says.
    unbiased_running_cov: average ``m / (m - 1)`` times the batch covariance into the running
      covariance (the unbiased population estimate, PyTorch's convention for variances).
    dtype: the output dtype; defaults to ``x.dtype``.
    return_stats: also return the step's `WhiteningStats` (training only).
    stats_route: ``"adaptive"`` (one pass over the rows shifted by a data pivot, a second over
      the centred rows where the first lost precision, chosen by `lax.cond`, and the same for
      the cross-device merge), ``"one_pass"`` (never the second pass: no data-dependent control
      flow) or ``"auto"``: adaptive on CPU, one-pass on GPU and TPU (see
      `bnjax.stats.local_covariance`).
    custom_vjp: differentiate training mode with bnjax's closed-form backward pass (three
      batched products over the rows and one all-reduce of ``G d (d + 1)`` values); False uses
      JAX's autodiff, which also supports forward mode (``jax.jvp``, ``jax.hessian``).

  Returns:
    ``(y, new_state)``, or ``(y, new_state, stats)`` with ``return_stats=True``.

  Raises:
    TypeError: if ``train`` is not a Python bool, ``x`` is not real floating, ``mask`` is not
      boolean or ``params``/``state`` are not bnjax's pytrees.
    ValueError: on a bad ``group_size``, ``method``, ``iterations``, ``axis``, ``momentum``,
      ``epsilon``, ``running_estimate`` or ``stats_route``, shapes that do not match, a mask that
      varies along ``axis``, or one row in training.

  Examples:
    >>> params, state = bnjax.whitening.init_whitening(3)
    >>> mixing = jnp.array([[1.0, 0.0, 0.0], [0.9, 0.4, 0.0], [0.5, 0.5, 0.7]])
    >>> x = jax.random.normal(jax.random.key(0), (512, 3)) @ mixing.T + 3.0
    >>> y, state = bnjax.whitening.whitening_batch_norm(params, state, x, train=True)
    >>> jnp.cov(y.T, bias=True).round(3) + 0.0  # identity: the channels are decorrelated
    Array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]], dtype=float32)
  """
  train = _checks.check_train(train, _WHERE)
  _checks.check_floating(x, "x", _WHERE)
  x = jnp.asarray(x)
  if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
    _checks.fail(_WHERE, f"`axis` must be one int (whitening decorrelates the channels of one "
                 f"feature axis); got {axis!r}.", TypeError)
  feature_axis = _checks.canonical_axes(x.ndim, axis, _WHERE)[0]
  _check_positive_int(group_size, "group_size", _WHERE)
  _check_method(method, iterations, _WHERE)
  if running_estimate not in RUNNING_ESTIMATES:
    _checks.fail(_WHERE, f"`running_estimate` must be one of {RUNNING_ESTIMATES}; got "
                 f"{running_estimate!r}.")
  if stats_route not in stats.ROUTES:
    _checks.fail(_WHERE, f"`stats_route` must be one of {stats.ROUTES}; got {stats_route!r}.")
  _checks.check_hyperparameters(momentum, epsilon, _WHERE)
  for name, value in (("momentum", momentum), ("epsilon", epsilon)):
    if np.ndim(value) != 0:
      _checks.fail(_WHERE, f"`{name}` must be a scalar; got shape {np.shape(value)}.")
  layout = group_layout(x.shape[feature_axis], group_size)
  _check_state(params, state, layout, group_size)
  if return_stats and not train:
    _checks.fail(_WHERE, "`return_stats=True` needs `train=True`; evaluation measures no batch "
                 "statistics.")

  x_last = jnp.moveaxis(x, feature_axis, -1)
  row_shape = x_last.shape[:-1]
  rows = math.prod(row_shape)
  if mask is not None:
    mask = _checks.mask_to_rank(mask, x.shape, _WHERE)
    if mask.shape[feature_axis] != 1:
      _checks.fail(_WHERE, f"`mask` of shape {tuple(mask.shape)} varies along the feature axis "
                   f"{feature_axis}; whitening needs whole rows valid or not, so it must have "
                   f"size 1 there (e.g. `mask[..., :1]`, or `valid[..., None]` for a mask of "
                   "the other axes).")
    mask = jnp.broadcast_to(jnp.moveaxis(mask, feature_axis, -1)[..., 0], row_shape)
    mask = mask.reshape(rows)

  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  stats_dtype = jnp.dtype(jnp.float64 if jnp.finfo(x.dtype).bits > 32 else jnp.float32)
  x_MxGxD = _to_groups(x_last.reshape(rows, layout.channels), layout)
  eps = jnp.asarray(epsilon, stats_dtype)
  running_mean = _to_groups(jnp.asarray(state.mean).astype(stats_dtype), layout)
  scale = (None if params.scale is None
           else _to_groups(jnp.asarray(params.scale).astype(stats_dtype), layout))
  bias = (None if params.bias is None
          else _to_groups(jnp.asarray(params.bias).astype(stats_dtype), layout))

  def finish(y_MxGxD: jax.Array) -> jax.Array:
    y = _from_groups(y_MxGxD, layout).reshape((*row_shape, layout.channels))
    return jnp.moveaxis(y, -1, feature_axis).astype(out_dtype)

  if not train:
    if running_estimate == "covariance":
      w = _matrix(jnp.asarray(state.covariance).astype(stats_dtype), method, iterations, eps,
                  layout.valid())
    else:
      w = jnp.asarray(state.whitening).astype(stats_dtype)
    xs = x_MxGxD.astype(stats_dtype)
    centred = xs - running_mean[None]
    if mask is not None:  # a non-finite value in an invalid row is centred to 0.
      keep = mask[:, None, None] | jnp.isfinite(xs)
      centred = jnp.where(keep, centred, jnp.zeros((), stats_dtype))
    rows_T = jnp.transpose(centred, (1, 0, 2))
    return finish(_output(w, rows_T, jnp.zeros_like(running_mean), scale, bias)), state

  devices = 1
  if axis_name is not None:
    size = distributed.axis_size(axis_name)
    if axis_index_groups is not None:
      distributed.partition_matrix(axis_index_groups, size, _WHERE)
      axis_index_groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    devices = distributed.smallest_group(axis_index_groups, size)
  _checks.check_values_per_channel(rows, devices, _WHERE)

  def sum_axes(value: jax.Array | None) -> tuple[Any, ...]:
    # Mesh axes over which `x` varies but `value` does not (under `shard_map`): its cotangent
    # is summed over them, as autodiff's transpose would.
    if value is None:
      return ()
    return tuple(sorted(distributed.varying_axes(x_MxGxD) - distributed.varying_axes(value),
                        key=str))

  config = _TrainConfig(
      layout=layout, method=method, iterations=iterations, axis_name=axis_name,
      axis_index_groups=axis_index_groups, route=stats_route,
      uniform_count=rows if mask is None else None,
      pivot_shared=(axis_name is not None
                    and distributed.typed_invariant(running_mean, axis_name, x_MxGxD)),
      scale_sum_axes=sum_axes(scale), bias_sum_axes=sum_axes(bias), in_dtype=x.dtype,
      stats_dtype=stats_dtype, out_dtype=out_dtype, has_bias=bias is not None)
  running_cov = jnp.asarray(state.covariance).astype(stats_dtype)
  train_fn = cast(Callable[..., tuple[jax.Array, stats.CovarianceMoments, jax.Array]],
                  _train_custom_vjp if custom_vjp else _train)
  y, moments, w = train_fn(config, x_MxGxD, mask, scale, bias, lax.stop_gradient(running_mean),
                           lax.stop_gradient(running_cov), eps)
  new_state, batch = _update_running(state, moments, w, None if config.all_valid else
                                     moments.count > 0, layout, momentum, unbiased_running_cov)
  if return_stats:
    return finish(y), new_state, batch
  return finish(y), new_state


class _TrainConfig(NamedTuple):
  """The static part of a training call (hashable: a `nondiff_argnums` argument)."""

  layout: GroupLayout
  method: str
  iterations: int
  axis_name: Any
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  route: str
  uniform_count: int | None  # rows per device without a mask; None: counts travel.
  pivot_shared: bool  # the running mean is provably equal on every device: a shared pivot.
  scale_sum_axes: tuple[Any, ...]
  bias_sum_axes: tuple[Any, ...]
  in_dtype: Any
  stats_dtype: Any
  out_dtype: Any
  has_bias: bool

  @property
  def all_valid(self) -> bool:
    """Every row of every device is valid (no mask, no named axis): there is always data."""
    return self.uniform_count is not None and self.axis_name is None


def _train_forward(config: _TrainConfig, x: jax.Array, mask: jax.Array | None,
                   scale: jax.Array | None, bias: jax.Array | None, running_mean: jax.Array,
                   running_cov: jax.Array, epsilon: jax.Array, *, keep_vjp: bool
                   ) -> tuple[tuple[jax.Array, stats.CovarianceMoments, jax.Array], tuple]:
  """Training-mode whitening: ``(y, moments, w)`` and what the closed-form backward needs.

  The rows shifted by the local data pivot, ``rows = x - pivot`` (transposed to [G, m, d]), are
  written once; with the global mean ``mu``, ``x - mu = rows - shift`` for the per-group
  ``shift = mu - pivot``, so the output ``W (x - mu) = W rows - W shift`` needs no centring pass
  of its own (it loses ``log2(1 + k)`` bits for a pivot ``k`` standard deviations from the mean;
  the data pivot is typically within one). Groups without any valid row use the running mean and
  covariance.
  """
  xs = x.astype(config.stats_dtype)
  local, rows_T = stats.local_covariance(xs, mask, config.route)
  moments = distributed.combine_covariances(
      local, config.axis_name, config.axis_index_groups,
      shared_pivot=running_mean if config.pivot_shared else None,
      uniform_count=config.uniform_count, route=config.route)
  shift = (moments.pivot - local.pivot) + moments.delta
  covariance = moments.covariance
  has_data = None
  if not config.all_valid:
    has_data = moments.count > 0
    shift = jnp.where(has_data[:, None], shift, running_mean - local.pivot)
    covariance = jnp.where(has_data[:, None, None], covariance, running_cov)

  def matrix(covariance: jax.Array) -> jax.Array:
    return _matrix(covariance, config.method, config.iterations, epsilon, config.layout.valid())

  if keep_vjp:
    w, matrix_vjp = jax.vjp(matrix, covariance)
  else:
    w, matrix_vjp = matrix(covariance), None
  keep = None
  out_rows_T = rows_T
  if mask is not None:  # every row is output; a non-finite value in an invalid row gives 0.
    keep = mask[:, None, None] | jnp.isfinite(xs)
    out_rows_T = jnp.transpose(
        jnp.where(keep, xs - local.pivot[None], shift[None]), (1, 0, 2))
  y = _output(w, out_rows_T, shift, scale, bias).astype(config.out_dtype)
  group = (None if config.axis_name is None
           else distributed.group_index(config.axis_name, config.axis_index_groups))
  residuals = (rows_T, out_rows_T if mask is not None else None, keep, mask, shift, w,
               matrix_vjp, has_data, moments.count, scale, group)
  outputs = (y, jax.tree.map(lax.stop_gradient, moments), lax.stop_gradient(w))
  return outputs, residuals


def _train(config: _TrainConfig, x: jax.Array, mask: jax.Array | None, scale: jax.Array | None,
           bias: jax.Array | None, running_mean: jax.Array, running_cov: jax.Array,
           epsilon: jax.Array) -> tuple[jax.Array, stats.CovarianceMoments, jax.Array]:
  """Training-mode whitening differentiated by JAX's autodiff (forward mode too)."""
  return _train_forward(config, x, mask, scale, bias, running_mean, running_cov, epsilon,
                        keep_vjp=False)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train_custom_vjp(config: _TrainConfig, x: jax.Array, mask: jax.Array | None,
                      scale: jax.Array | None, bias: jax.Array | None, running_mean: jax.Array,
                      running_cov: jax.Array, epsilon: jax.Array
                      ) -> tuple[jax.Array, stats.CovarianceMoments, jax.Array]:
  """`_train` with the closed-form backward pass (`_train_bwd`)."""
  return _train(config, x, mask, scale, bias, running_mean, running_cov, epsilon)


def _train_fwd(config: _TrainConfig, x: jax.Array, mask: jax.Array | None,
               scale: jax.Array | None, bias: jax.Array | None, running_mean: jax.Array,
               running_cov: jax.Array, epsilon: jax.Array) -> tuple[Any, tuple]:
  outputs, residuals = _train_forward(config, x, mask, scale, bias, running_mean, running_cov,
                                      epsilon, keep_vjp=True)
  return outputs, residuals


def _train_bwd(config: _TrainConfig, residuals: tuple, cotangents: tuple) -> tuple:
  r"""The closed-form backward pass, per group (the sums run over every device's rows).

  With ``g = scale * dy`` (the cotangent of ``x_hat = W (x - mu)``), ``n`` valid rows, and
  ``c = x - mu`` at valid rows:

  * ``dW = sum(g (x - mu)^T)`` (one all-reduce, with ``B = sum(g)``), ``dΣ`` from ``dW`` by the
    derivative of the matrix function (`jax.vjp` of the d x d computation), ``P = (dΣ + dΣ^T) / n``;
  * ``dx = W^T g + [valid] (P c - W^T B / n)``: the output's own path, the covariance's, and the
    mean's (the covariance's path through the mean vanishes, as ``sum(c) = 0``).

  Three batched products over the rows (``sum(dy (x - mu)^T)``, ``W^T g``, ``P c``), and
  ``d scale = sum(dy * x_hat)`` from the first: ``sum_j W_ij sum(dy_i (x - mu)_j)``.
  """
  (rows_T, out_rows_T, keep, mask, shift, w, matrix_vjp, has_data, count, scale,
   group) = residuals
  dtype = config.stats_dtype
  dy = cotangents[0].astype(dtype)
  dy_T = jnp.transpose(dy, (1, 0, 2))
  sum_dy = jnp.sum(dy, axis=0)
  out_T = rows_T if out_rows_T is None else out_rows_T
  # sum over rows of dy (x - mu)^T, with x - mu = out_rows - shift (0 where not kept).
  cross = stats.group_gram(dy_T, out_T) - sum_dy[:, :, None] * shift[:, None, :]
  d_scale = None if scale is None else jnp.sum(w * cross, axis=2)
  kept_dy = sum_dy if keep is None else jnp.sum(jnp.where(keep, dy, jnp.zeros((), dtype)), axis=0)
  local_w_bar = cross if scale is None else scale[:, :, None] * cross
  local_b = kept_dy if scale is None else scale * kept_dy
  groups, d = shift.shape
  packed = jnp.concatenate([local_w_bar.reshape(-1), local_b.reshape(-1)])
  packed = distributed.sum_over_devices(packed, config.axis_name, config.axis_index_groups, group)
  w_bar = packed[:groups * d * d].reshape(groups, d, d)
  total_g = packed[groups * d * d:].reshape(groups, d)
  (cov_bar,) = matrix_vjp(w_bar)
  n = jnp.maximum(count, 1).astype(dtype)[:, None, None]
  if has_data is not None:
    cov_bar = jnp.where(has_data[:, None, None], cov_bar, jnp.zeros((), dtype))
  p = (cov_bar + _t(cov_bar)) / n
  w_scaled = w if scale is None else w * scale[:, :, None]
  through_output = jnp.einsum("gij,gmi->gmj", w_scaled, dy_T, precision=_HIGHEST)
  through_covariance = jnp.einsum("gij,gmj->gmi", p, rows_T, precision=_HIGHEST)
  correction = (jnp.einsum("gij,gj->gi", p, shift, precision=_HIGHEST)
                + jnp.einsum("gij,gi->gj", w, total_g, precision=_HIGHEST) / n[:, :, 0])
  if mask is None or keep is None:
    dx_T = through_output + through_covariance - correction[:, None, :]
  else:
    zero = jnp.zeros((), dtype)
    keep_T = jnp.transpose(keep, (1, 0, 2))
    valid = mask[None, :, None]
    dx_T = (jnp.where(keep_T, through_output, zero)
            + jnp.where(valid, through_covariance - correction[:, None, :], zero))
  dx = jnp.transpose(dx_T, (1, 0, 2)).astype(config.in_dtype)
  if d_scale is not None:
    d_scale = distributed.sum_over_axes(d_scale, config.scale_sum_axes)
  d_bias = None
  if config.has_bias:
    d_bias = distributed.sum_over_axes(sum_dy, config.bias_sum_axes)
  return dx, None, d_scale, d_bias, None, None, None


_train_custom_vjp.defvjp(_train_fwd, _train_bwd)


def _update_running(state: WhiteningState, moments: stats.CovarianceMoments, w: jax.Array,
                    has_data: jax.Array | None, layout: GroupLayout, momentum: Any,
                    unbiased: bool) -> tuple[WhiteningState, WhiteningStats]:
  """The running averages moved toward the batch's statistics, group by group.

  A group keeps its old values where the batch had no valid row (or one, with `unbiased`) or any
  of its statistics is not finite, so a bad batch never poisons the state.
  """
  dtype = jnp.dtype(jnp.float64 if jnp.finfo(state.mean.dtype).bits > 32 else jnp.float32)
  count = moments.count
  mean = lax.stop_gradient(moments.mean).astype(dtype)
  covariance = lax.stop_gradient(moments.covariance).astype(dtype)
  w = _pad_identity(lax.stop_gradient(w).astype(dtype), layout)
  stored_cov = covariance
  if unbiased:
    n = count.astype(dtype)[:, None, None]
    stored_cov = covariance * (n / jnp.maximum(n - 1, 1))
  stored_cov = _pad_identity(stored_cov, layout)
  updated = ((count > (1 if unbiased else 0))
             & jnp.all(jnp.isfinite(mean), axis=-1)
             & jnp.all(jnp.isfinite(covariance), axis=(-2, -1))
             & jnp.all(jnp.isfinite(w), axis=(-2, -1)))
  if has_data is not None:
    updated = updated & has_data
  momentum = jnp.asarray(momentum, dtype)

  def move(old: jax.Array, new: jax.Array, keep_shape: tuple[int, ...]) -> jax.Array:
    old = jnp.asarray(old)
    blended = momentum * old.astype(dtype) + (1 - momentum) * new
    return jnp.where(updated.reshape(keep_shape), blended, old.astype(dtype)).astype(old.dtype)

  old_mean = _to_groups(jnp.asarray(state.mean), layout)
  new_state = WhiteningState(
      mean=_from_groups(move(old_mean, mean, (-1, 1)), layout),
      covariance=move(state.covariance, stored_cov, (-1, 1, 1)),
      whitening=move(state.whitening, w, (-1, 1, 1)))
  batch = WhiteningStats(mean=_from_groups(mean, layout), covariance=_pad_identity(covariance,
                                                                                   layout),
                         whitening=w, count=count, updated=updated)
  return new_state, batch


__all__ = [
    "METHODS",
    "RUNNING_ESTIMATES",
    "GroupLayout",
    "WhiteningState",
    "WhiteningStats",
    "group_layout",
    "init_whitening",
    "whitening_batch_norm",
    "whitening_matrix",
]

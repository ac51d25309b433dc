"""Property tests: random shapes, feature axes, masks and offsets against the float64 reference."""

from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from tests import reference


@st.composite
def _problems(draw):
  ndim = draw(st.integers(2, 4))
  shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
  n_feat = draw(st.integers(1, ndim - 1))
  axes = tuple(sorted(draw(st.permutations(range(ndim)))[:n_feat]))
  signed = tuple(a - ndim if draw(st.booleans()) else a for a in axes)
  reduce_count = int(np.prod([shape[a] for a in range(ndim) if a not in axes]))
  if reduce_count < 2:  # training needs more than one value per channel.
    shape = tuple(s + 1 if a not in axes else s for a, s in enumerate(shape))
  offset = draw(st.sampled_from([0.0, 10.0, -3e3, 1e5]))
  seed = draw(st.integers(0, 2**16))
  with_mask = draw(st.booleans())
  return shape, signed, offset, seed, with_mask


@settings(max_examples=20, deadline=None)
@given(_problems())
def test_training_matches_reference_for_any_shape_and_axes(problem):
  shape, axis, offset, seed, with_mask = problem
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(offset, 2.0, shape), jnp.float32)
  mask = None
  if with_mask:
    mask_np = rng.random(shape) < 0.7
    mask_np.flat[0] = True
    mask = jnp.asarray(mask_np)
  feat = tuple(shape[a] for a in reference.feature_axes(len(shape), axis))
  params, state = bnjax.init(feat)
  y, new_state = bnjax.batch_norm(params, state, x, True, axis=axis, mask=mask, momentum=0.5)
  y_ref, mean_ref, var_ref = reference.train_step(x, state.mean, state.var, axis=axis,
                                                  momentum=0.5, mask=mask)
  _, _, count = reference.moments(x, axis, mask)
  has = count > 0
  # Channels without valid data keep their state; the others follow the reference.
  np.testing.assert_allclose(np.asarray(new_state.mean)[has], mean_ref[has], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new_state.var)[has], var_ref[has], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(new_state.mean)[~has], 0.0)
  valid = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), shape)
  full_has = np.broadcast_to(
      np.expand_dims(has, tuple(a for a in range(len(shape))
                                if a not in reference.feature_axes(len(shape), axis))), shape)
  sel = valid & full_has
  np.testing.assert_allclose(np.asarray(y)[sel], y_ref[sel], rtol=1e-4, atol=1e-4)

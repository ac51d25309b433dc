"""The precise passes' progress report and a cumulative layer's count, for linen and NNX."""

import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import tools
import bnjax.nnx

BATCHES = [jnp.array([[1.0], [2.0], [6.0]]), jnp.array([[7.0], [9.0]])]


def _linen_pass(**kwargs):
  model = bnjax.BatchNorm(momentum=None)
  variables = jax.jit(model.init, static_argnames="use_running_average")(
      jax.random.key(0), BATCHES[0], use_running_average=True)
  return tools.precise_batch_stats(model.apply, variables, BATCHES, use_running_average=False,
                                   **kwargs)


def _nnx_pass(**kwargs):
  return tools.nnx_precise_batch_stats(bnjax.nnx.BatchNorm(1, rngs=nnx.Rngs(0)), BATCHES,
                                       **kwargs)


@pytest.mark.parametrize("precise_pass", [_linen_pass, _nnx_pass], ids=["linen", "nnx"])
def test_progress_true_without_tqdm_says_how_to_install_it(precise_pass, monkeypatch):
  monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
  with pytest.raises(ImportError, match=r"progress=True.*pip install tqdm"):
    precise_pass(progress=True)


@pytest.mark.parametrize("precise_pass", [_linen_pass, _nnx_pass], ids=["linen", "nnx"])
def test_progress_of_another_type_is_a_type_error(precise_pass):
  with pytest.raises(TypeError, match=r"`progress` must be None, a bool or a callable.*got str"):
    precise_pass(progress="yes")


def test_linen_precise_batch_stats_count_a_cumulative_layers_updates_under_a_tqdm_bar(capsys):
  # One pass for both (each pass compiles): the bar's last state, then the statistics.
  new = _linen_pass(progress=True)["batch_stats"]
  assert "2/2" in capsys.readouterr().err
  # Of [1, 2, 6, 7, 9]; one update per batch, as two training steps would count.
  np.testing.assert_allclose(new["mean"], [5.0], rtol=1e-6)
  np.testing.assert_allclose(new["var"], [9.2], rtol=1e-6)
  np.testing.assert_array_equal(new["count"], [2])

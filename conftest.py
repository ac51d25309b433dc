"""Suite-wide set-up, for every test path (`tests/`, the doctests in `bnjax/`, `README.md`).

8 simulated CPU devices and strict numerics, set here before JAX is imported, so that running
`pytest README.md` or `pytest bnjax` alone gets the same settings as the whole suite; and the
doctest namespace, which holds only what a pasted example would import itself.
"""

import os
import pathlib
import sys

# The repository's `examples`, `configs` and `benchmarks` packages come from this checkout.
REPO_ROOT = str(pathlib.Path(__file__).resolve().parent)
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (the device count must be set before JAX is imported)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  import bnjax
  import jax.numpy as jnp
  doctest_namespace.update(bnjax=bnjax, jax=jax, jnp=jnp)

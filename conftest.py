"""Doctest namespace for the docstring examples in bnjax/ and README.md.

Device count and strict numerics are set in tests/conftest.py, which must run before JAX is
imported; this file therefore imports JAX only inside the fixture.
"""

import pytest


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  import bnjax
  import jax
  import jax.numpy as jnp
  doctest_namespace.update(bnjax=bnjax, jax=jax, jnp=jnp)

"""Suite-wide set-up: 8 simulated CPU devices and strict numerics, before JAX starts."""

import os
import pathlib
import sys

# The repository's `examples` and `configs` packages, ahead of the `examples` that dm-haiku installs.
REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (the device count must be set before JAX is imported)

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


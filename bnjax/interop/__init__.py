"""Conversions to and from other libraries' batch-norm conventions (no dependency on them)."""

from bnjax.interop.torch import batch_norms_from_torch as batch_norms_from_torch
from bnjax.interop.torch import from_torch as from_torch
from bnjax.interop.torch import linen_path_from_torch as linen_path_from_torch
from bnjax.interop.torch import to_torch as to_torch

__all__ = ["batch_norms_from_torch", "from_torch", "linen_path_from_torch", "to_torch"]

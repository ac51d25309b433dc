"""bnjax: exact, fast batch normalization for JAX and Flax."""

from bnjax.functional import batch_norm as batch_norm
from bnjax.functional import from_torch_momentum as from_torch_momentum
from bnjax.functional import init as init
from bnjax.functional import update_running_stats as update_running_stats
from bnjax.linen import BatchNorm as BatchNorm
from bnjax.types import BatchNormParams as BatchNormParams
from bnjax.types import BatchNormState as BatchNormState
from bnjax.types import BatchStats as BatchStats

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormParams",
    "BatchNormState",
    "BatchStats",
    "batch_norm",
    "from_torch_momentum",
    "init",
    "update_running_stats",
]

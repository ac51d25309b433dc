"""Names and settings shared by the benchmark's measuring side and its report.

The workers write these names into the JSON and `report.py` reads them back to lay out its tables;
both import this module and neither imports the other. Nothing here imports JAX.
"""

# Implementations (rows of the tables; keys of each case's "impls" in the JSON).
BNJAX = "bnjax"
FLAX = "flax.linen"
FLAX_EXACT = "flax.linen exact"
NNX = "flax.nnx"
HAIKU = "haiku"
EQUINOX = "equinox"
TORCH_CL = "torch channels_last"
TORCH_NCHW = "torch NCHW"
FLOOR = "floor"
FLOOR_STATS = "floor+stats"
AUTODIFF_REFERENCE = "autodiff reference"  # only in the stack-memory table.

# Optional peer libraries: module name -> the name the report gives it. A peer whose module does
# not import is left out of every table and named in the report.
OPTIONAL_MODULES = {"haiku": "Haiku", "equinox": "Equinox", "torch": "PyTorch"}

# What each micro-benchmark program computes, in training mode: forward is `(y, new_state)`;
# forward+backward adds the gradients for a given dy, one layer's work in a training step.
FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
MODES = (FORWARD, FORWARD_BACKWARD)

# Ratio keys of a micro-benchmark entry: its time ÷ the named implementation's, same round.
VS_FLAX = "vs_flax"
VS_FLOOR = "vs_floor"
VS_TORCH_CL = "vs_torch_cl"

# Layer hyper-parameters every implementation uses (the new batch's weight is 1 - MOMENTUM).
MOMENTUM = 0.99
EPSILON = 1e-5

# The run plans (`cases.PLANS`): the full run of `make bench`, `--quick` and `--smoke`.
FULL = "full"
QUICK = "quick"
SMOKE = "smoke"

# Whitening (`peers.WHITENING`): one row per method and group size ("iterative g64"), the plain
# autodiff ZCA through `jnp.linalg.eigh` ("zca g64 eigh autodiff"), and bnjax's batch norm,
# which every ratio divides by. The full plan times it on these shapes, float32 only.
WHITENING = "whitening"
WHITENING_REFERENCE = "bnjax batch_norm"
WHITENING_METHODS = ("iterative", "zca", "cholesky", "pca")
WHITENING_GROUPS = (64, 16)
WHITENING_SHAPES = ((128, 16, 16, 256), (4096, 1024))
VS_BATCH_NORM = "vs_batch_norm"
# The stages timed on their own for the breakdown (`programs.whitening_stages`).
WHITENING_STAGES = ("covariance", "matrix function (iterative)", "matrix function (zca)",
                    "product", "whole layer (iterative)")


def whitening_row(method: str, group: int, eigh_autodiff: bool = False) -> str:
  """The row name of a whitening implementation."""
  return f"{method} g{group}" + (" eigh autodiff" if eigh_autodiff else "")

# Ghost batches (`peers.GHOST_BATCH`): bnjax's batch norm with `ghost_batch_size=GHOST_SIZE` against
# the plain one on the same input; the full plan times it on GHOST_SHAPES, float32 only, and the
# report's target is GHOST_TARGET times the plain layer's forward+backward.
GHOST_BATCH = "ghost batch"
GHOST_ROW = "bnjax ghost batches"
GHOST_REFERENCE = "bnjax plain"
GHOST_SIZE = 32
GHOST_SHAPES = ((256, 32, 32, 64),)
GHOST_TARGET = 1.1
VS_PLAIN = "vs_plain"

"""The bnjax training example, in the shape of the Flax examples.

Run from the repository root::

  python -m bnjax_examples.main --config=configs/default.py --workdir=DIR

The package is named ``bnjax_examples`` rather than ``examples`` because dm-haiku installs a
top-level ``examples`` namespace package into site-packages: under that name, a run started where
this repository is not on ``sys.path`` would import Haiku's package and fail far from the cause.

``models`` (networks taking a ``norm`` factory), ``input_pipeline`` (datasets and batches),
``train`` (the training library), ``checkpointing``, ``reporting`` and ``main`` (the entry point).
"""

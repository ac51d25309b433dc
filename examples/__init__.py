"""The bnjax training examples, in the shape of the Flax examples.

Run ``python -m examples.main --config=configs/default.py --workdir=DIR`` from the repository root.

``models`` (networks taking a ``norm`` factory), ``input_pipeline`` (datasets and batches),
``train`` (the training library), ``checkpointing``, ``reporting`` and ``main`` (the entry point).
"""

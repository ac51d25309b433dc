"""The bnjax training example, in the shape of the Flax examples.

Run from the repository root::

  python -m bnjax_examples.main --config=configs/default.py --workdir=DIR

The package is named ``bnjax_examples`` rather than ``examples`` because dm-haiku installs a
top-level ``examples`` namespace package into site-packages: under that name, a run started where
this repository is not on ``sys.path`` would import Haiku's package and fail far from the cause.

One job per module; imports point one way (``main`` -> ``train`` -> the rest):

* ``main``: the command line (flags, ``jax.distributed``, the final report);
* ``train``: ``train_and_evaluate(config, workdir)`` and ``compare_norms``, assembling a run;
* ``loop``: epochs, progress bar, evaluation, metrics lines, checkpoints, Ctrl-C;
* ``steps``: model, optimizer, train state and the pure ``train_step`` / ``eval_step``, which an
  experiment can run under ``jax.jit`` or ``lax.scan`` without the loop;
* ``parallel``: the mesh, ``data_parallel`` (``jax.shard_map``), each process's rows;
* ``config_check``, ``input_pipeline``, ``models``, ``metrics``, ``checkpointing``, ``reporting``.
"""

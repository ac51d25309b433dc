"""Experiments that test what the batch-norm literature claims, with bnjax, at CPU scale.

Run one from the repository root (it writes ``result.json`` and ``plot.png`` to the work
directory)::

  python -m bnjax_examples.experiments --config=configs/experiments/<name>.py --workdir=DIR

``make experiments`` runs them all into ``bnjax_examples/experiments/results/<name>/`` and
regenerates ``FINDINGS.md`` from the results (`findings`). One module per claim (a second one for a
separate part of a claim), sharing `harness`.
"""

# The claims, in the order FINDINGS.md lists them: experiment name -> module.
EXPERIMENTS = {
    "training_speed": "bnjax_examples.experiments.training_speed",
    "bias_gradient": "bnjax_examples.experiments.bias_gradient",
    "bias_gradient_norms": "bnjax_examples.experiments.bias_gradient_norms",
    "stop_gradient": "bnjax_examples.experiments.stop_gradient",
    "relu_order": "bnjax_examples.experiments.relu_order",
    "precise_statistics": "bnjax_examples.experiments.precise_statistics",
    "unbiased_variance": "bnjax_examples.experiments.unbiased_variance",
    "unbiased_variance_cnn": "bnjax_examples.experiments.unbiased_variance_cnn",
    "batch_renorm": "bnjax_examples.experiments.batch_renorm",
    "batch_renorm_non_iid": "bnjax_examples.experiments.batch_renorm_non_iid",
    "dropout_shift": "bnjax_examples.experiments.dropout_shift",
    "small_batch": "bnjax_examples.experiments.small_batch",
    "whitening": "bnjax_examples.experiments.whitening",
    "covariate_shift": "bnjax_examples.experiments.covariate_shift",
}

# What every result.json holds, as FINDINGS.md needs it.
RESULT_FIELDS = ("name", "claim_number", "claim", "source", "published", "criterion", "measured",
                 "verdict", "command", "plot", "seeds", "elapsed_s", "notes", "data")
VERDICTS = ("confirmed", "not confirmed", "inconclusive")
RESULT_FILE = "result.json"
PLOT_FILE = "plot.png"

r"""Runs one experiment and writes its ``result.json`` and ``plot.png``.

  python -m bnjax_examples.experiments --config=configs/experiments/<name>.py --workdir=DIR

Append ``:smoke`` to the config path for a tiny version (seconds), as the tests run it.
"""

import os

# The bias-gradient experiment shards a batch over 8 devices; on a CPU they are simulated, which
# must be requested before JAX is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

from absl import app
from absl import flags
from ml_collections import config_flags

from bnjax_examples.experiments import runner

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for result.json and plot.png.")
config_flags.DEFINE_config_file(
    "config", None, "Experiment configuration, e.g. configs/experiments/bias_gradient.py (:smoke).",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  """Runs the experiment of ``--config`` into ``--workdir`` and prints its verdict."""
  del argv
  result = runner.run_experiment(FLAGS.config, FLAGS.workdir)
  print(f"{result['name']}: {result['verdict']} ({result['elapsed_s']:.0f} s)\n"
        f"  {result['measured']}\n  -> {os.path.join(FLAGS.workdir, 'result.json')}")


if __name__ == "__main__":
  app.run(main)

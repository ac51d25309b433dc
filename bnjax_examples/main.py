r"""Trains an example model with bnjax; a thin entry point around `train.train_and_evaluate`.

  python -m bnjax_examples.main --config=configs/default.py --workdir=workdir/default

Override config fields with ``--config.<field>=<value>`` (e.g. ``--config.learning_rate=0.05``).
Rerunning the same command resumes from the newest checkpoint in the work directory.

Several processes (e.g. one per host) form one run through JAX's distributed runtime; give each the
same coordinator and its own id, and each feeds its own share of every global batch:

  python -m bnjax_examples.main --config=configs/default.py --workdir=workdir/dp \
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0   # and =1
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bnjax_examples import checkpointing
from bnjax_examples import config_check
from bnjax_examples import input_pipeline
from bnjax_examples import parallel
from bnjax_examples import reporting
from bnjax_examples import train

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file, e.g. configs/default.py (or :smoke).",
    lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, to run as one of several processes.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's id, 0 to num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(std_logging.Filter):
  """Drops orbax-checkpoint's INFO lines (dozens per save); its warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Joins a multi-process run through `jax.distributed` (before any other use of JAX).

  On CPU the processes talk through Gloo collectives, so this also works on a single machine.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def device_summary() -> str:
  """The devices each global batch is split over, with how to get more on a CPU."""
  summary = f"Training on {parallel.describe_devices(parallel.create_mesh())}."
  if jax.device_count() == 1 and jax.devices()[0].platform == "cpu":
    summary += (" To split each batch over 8 simulated CPU devices, set "
                "XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting Python.")
  return summary


def report_outputs(config, workdir: str) -> None:
  """Prints where the plot, the metrics and the checkpoint of a finished run are."""
  if config.compare_norms:
    runs = {norm: os.path.join(workdir, norm) for norm in config.compare_norms}
    plot = os.path.join(workdir, reporting.COMPARISON_PLOT_FILE)
  else:
    runs = {config.norm: workdir}
    plot = os.path.join(workdir, reporting.PLOT_FILE)
  rows = [("Plot", os.path.abspath(plot))]
  for norm, run_dir in runs.items():
    suffix = f" ({train.NORM_LABELS[norm]})" if config.compare_norms else ""
    records = reporting.read_metrics(os.path.join(run_dir, reporting.METRICS_FILE))
    if records:
      rows.append((f"Test accuracy{suffix}",
                   f"{records[-1]['test_accuracy']:.2%} after epoch {records[-1]['epoch']}"))
    rows.append((f"Metrics{suffix}", os.path.abspath(os.path.join(run_dir,
                                                                  reporting.METRICS_FILE))))
    rows.append((f"Checkpoint{suffix}", train.latest_checkpoint(run_dir)))
  width = max(len(label) for label, _ in rows) + 1
  print("\n".join(f"{label + ':':<{width}} {value}" for label, value in rows), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if FLAGS.coordinator_address:
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config = FLAGS.config
  logging.info("JAX process %d of %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  if jax.process_index() == 0:
    print(device_summary(), flush=True)
  try:
    if config.compare_norms:
      train.compare_norms(config, FLAGS.workdir)
    else:
      train.train_and_evaluate(config, FLAGS.workdir)
  except (config_check.ConfigError, input_pipeline.DatasetError,
          checkpointing.CheckpointMismatchError) as e:
    raise SystemExit(f"error: {e}") from e
  except KeyboardInterrupt:
    raise SystemExit(130) from None  # train_and_evaluate has logged where it stopped.
  if jax.process_index() == 0:
    report_outputs(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

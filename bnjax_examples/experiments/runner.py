"""Runs an experiment from its config: times it, checks its result, writes ``result.json``."""

import importlib
import json
import os
import time
from typing import Any

import ml_collections

from bnjax_examples.experiments import EXPERIMENTS
from bnjax_examples.experiments import PLOT_FILE
from bnjax_examples.experiments import RESULT_FIELDS
from bnjax_examples.experiments import RESULT_FILE
from bnjax_examples.experiments import VERDICTS


def run_experiment(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs ``config.experiment``, writes ``result.json`` (and the module's plot) in `workdir`.

  The module's ``run(config, plot_path)`` returns the claim-specific fields; this adds the name,
  the command that reproduces it, the elapsed time and the config, and checks every field of
  `RESULT_FIELDS` is present and the verdict is one of `VERDICTS`.

  Raises:
    ValueError: if the experiment is unknown or its result lacks a field.
  """
  name = config.experiment
  if name not in EXPERIMENTS:
    raise ValueError(f"Unknown experiment {name!r}; expected one of {sorted(EXPERIMENTS)}.")
  module = importlib.import_module(EXPERIMENTS[name])
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  result = dict(module.run(config, os.path.join(workdir, PLOT_FILE)))
  result.update(
      name=name, plot=PLOT_FILE, elapsed_s=round(time.perf_counter() - start, 1),
      command=(f"python -m bnjax_examples.experiments --config=configs/experiments/{name}.py"
               f"{':smoke' if config.get('smoke') else ''} --workdir=DIR"),
      config=json.loads(config.to_json()))
  missing = [field for field in RESULT_FIELDS if field not in result]
  if missing:
    raise ValueError(f"Experiment {name!r} returned no {', '.join(missing)}.")
  if result["verdict"] not in VERDICTS:
    raise ValueError(f"Experiment {name!r}: verdict {result['verdict']!r} is not one of "
                     f"{VERDICTS}.")
  with open(os.path.join(workdir, RESULT_FILE), "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
    f.write("\n")
  return result

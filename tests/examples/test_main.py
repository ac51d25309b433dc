"""Tests for bnjax_examples/main.py: the run says how many devices it splits each batch over, and
how to get 8 on a CPU when it has one."""

import os
import pathlib
import subprocess
import sys

from bnjax_examples import main

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_device_summary_counts_the_devices():
  assert main.device_summary() == "Training on 8 devices (cpu) in 1 process."


def test_a_run_on_one_cpu_device_says_how_to_get_eight(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(  # Stops at the config check, after the device line.
      [sys.executable, "-m", "bnjax_examples.main", "--config=configs/default.py",
       f"--workdir={tmp_path / 'run'}", "--config.learning_rate=-1.0"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.stdout.startswith("Training on 1 device (cpu) in 1 process. To split each batch "
                                  "over 8 simulated CPU devices, set "
                                  "XLA_FLAGS=--xla_force_host_platform_device_count=8 before ")
  assert result.returncode == 1

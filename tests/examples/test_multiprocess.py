"""Multi-process training: two processes on 127.0.0.1 form one `jax.distributed` cluster (CPU,
Gloo collectives), each feeding its own half of every global batch from its own 2 devices.

After a short run both must hold identical params and batch_stats, equal (to float32 tolerance)
to a single-process run on the same global batches (this process, 8 devices).
"""

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

from configs import default as default_config
from bnjax_examples import train

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2

# What each process runs: join the cluster, train the smoke config, save its variables; then, as
# the command line's final report does, process 0 alone looks up the newest checkpoint.
WORKER = textwrap.dedent("""
    import sys
    repo, coordinator, process_id, workdir, out = sys.argv[1:]
    sys.path.insert(0, repo)
    from bnjax_examples import main
    main.initialize_distributed(coordinator, {num_processes}, int(process_id))
    import jax
    import numpy as np
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    from configs import default
    from bnjax_examples import train
    assert jax.process_count() == {num_processes} and jax.device_count() == {num_devices}
    config = default.get_config("smoke")
    config.progress_bar = False
    config.num_epochs, config.steps_per_epoch = 1, 3
    state = train.train_and_evaluate(config, workdir)
    tree = {{"params": state.params, "batch_stats": state.batch_stats}}
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    np.savez(out, **{{"/".join(str(k.key) for k in path): np.asarray(leaf)
                      for path, leaf in leaves}})
    if jax.process_index() == 0:
      with open(out + ".latest", "w") as f:
        f.write(train.latest_checkpoint(workdir))
""").format(num_processes=NUM_PROCESSES, num_devices=NUM_PROCESSES * DEVICES_PER_PROCESS)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  assert jax.device_count() == 8
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
  coordinator = f"127.0.0.1:{free_port()}"
  workers = [subprocess.Popen(
      [sys.executable, "-c", WORKER, str(REPO_ROOT), coordinator, str(i),
       str(tmp_path / "multi"), str(tmp_path / f"process_{i}.npz")],
      env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(NUM_PROCESSES)]

  # Meanwhile, the same run in this single process, over its 8 devices.
  config = default_config.get_config("smoke")
  config.progress_bar = False
  config.num_epochs, config.steps_per_epoch = 1, 3
  single = train.train_and_evaluate(config, str(tmp_path / "single"))
  tree = jax.device_get({"params": single.params, "batch_stats": single.batch_stats})
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  expected = {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}

  logs = []
  try:
    for worker in workers:
      logs.append(worker.communicate(timeout=240)[0])
  finally:
    for worker in workers:
      worker.kill()
  for i, worker in enumerate(workers):
    assert worker.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"

  results = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(NUM_PROCESSES)]
  assert results[0].keys() == results[1].keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(results[1][name], results[0][name], err_msg=name)
    np.testing.assert_allclose(results[0][name], value, rtol=2e-5, atol=2e-6, err_msg=name)
  final_checkpoint = str(tmp_path / "multi" / "checkpoints" / "3")
  assert (tmp_path / "process_0.npz.latest").read_text() == final_checkpoint
  assert train.latest_checkpoint(str(tmp_path / "multi")) == final_checkpoint

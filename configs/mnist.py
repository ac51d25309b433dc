r"""python -m bnjax_examples.main --config=configs/mnist.py --workdir=workdir/mnist --config.data_dir=DIR

MNIST (28x28) with the default CNN and `bnjax.BatchNorm`, for 5 epochs. Nothing is downloaded:
``DIR`` must hold ``mnist.npz`` (the Keras layout: ``x_train``, ``y_train``, ``x_test``, ``y_test``)
or the four original IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``).
``:smoke`` shrinks it for tests.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the MNIST config."""
  config = default.get_config()
  config.dataset = "mnist"
  config.data_dir = "data/mnist"
  config.batch_size = 128
  config.eval_batch_size = 512
  config.num_epochs = 5
  config.log_every_steps = 20
  if arg:
    default.apply_option(config, arg)
  return config

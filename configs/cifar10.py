r"""python -m bnjax_examples.main --config=configs/cifar10.py --workdir=workdir/cifar10 --config.data_dir=DIR

CIFAR-10 with a ResNet-20 (three stages of three residual blocks, 16-32-64 channels) and
`bnjax.BatchNorm`, random crops and flips, for 60 epochs (an accelerator is advisable). Nothing is
downloaded: ``DIR`` must hold the binary version's ``data_batch_1.bin`` ... ``data_batch_5.bin``
and ``test_batch.bin`` (or their ``cifar-10-batches-bin/`` directory). ``:smoke`` shrinks it for
tests.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the CIFAR-10 ResNet config."""
  config = default.get_config()
  config.dataset = "cifar10"
  config.data_dir = "data/cifar10"
  config.augment = True
  config.model = "ResNet"
  config.resnet.stage_sizes = (3, 3, 3)
  config.resnet.num_filters = 16
  config.batch_size = 128
  config.eval_batch_size = 512
  config.num_epochs = 60
  config.warmup_epochs = 2.0
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.log_every_steps = 20
  if arg:
    default.apply_option(config, arg)
  return config

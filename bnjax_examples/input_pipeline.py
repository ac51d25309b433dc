"""Datasets for the examples: scikit-learn's bundled digits; MNIST and CIFAR-10 from local files.

Nothing here downloads anything. The default dataset, scikit-learn's 8x8 handwritten digits (1,797
images), ships inside the scikit-learn package; MNIST and CIFAR-10 are read from a directory the
user fills (`config.data_dir`). Files are parsed as raw bytes or as a NumPy ``.npz`` with
``allow_pickle=False``: no user file is ever unpickled.

Batches are a pure function of ``(seed, step)``: the order of epoch ``e`` is a permutation drawn
from ``(seed, e)``, so the data position of a run is its step, resuming from a checkpoint continues
exactly, and every process of a multi-process run agrees on the global batch while loading only its
own rows.
"""

from collections.abc import Iterator
import gzip
import os
import struct
import zlib
from typing import NamedTuple

import numpy as np

DATASETS = ("digits", "mnist", "cifar10")

MNIST_NPZ = "mnist.npz"
MNIST_IDX = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_SUBDIR = "cifar-10-batches-bin"  # What the official cifar-10-binary.tar.gz unpacks to.
_CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32  # One label byte, then a 3x32x32 uint8 image (CHW).


class DatasetError(Exception):
  """A dataset could not be loaded; the message names the files and the directory."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
  """The dataset's files are not in the directory."""


class MalformedDatasetError(DatasetError, ValueError):
  """A dataset file exists but does not hold what its format promises."""


class Dataset(NamedTuple):
  """A classification dataset in memory, images standardised per channel with train statistics."""

  train_images: np.ndarray  # shape=[N_train, H, W, C], dtype=float32.
  train_labels: np.ndarray  # shape=[N_train], dtype=int32, in [0, num_classes).
  test_images: np.ndarray  # shape=[N_test, H, W, C], dtype=float32.
  test_labels: np.ndarray  # shape=[N_test], dtype=int32.
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of one image."""
    return tuple(self.train_images.shape[1:])


def load_dataset(name: str, data_dir: str = "", *, seed: int = 0,
                 test_fraction: float = 0.2) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: one of ``DATASETS``: ``'digits'`` (bundled with scikit-learn), ``'mnist'`` or
      ``'cifar10'`` (read from ``data_dir``).
    data_dir: the directory holding the MNIST or CIFAR-10 files; unused for ``'digits'``.
    seed: seeds the train/test split of ``'digits'`` (which has no official split).
    test_fraction: the fraction of ``'digits'`` held out for testing.

  Returns:
    The `Dataset`, standardised with the per-channel mean and standard deviation of its train split.

  Raises:
    ValueError: if ``name`` is unknown.
    DatasetNotFoundError: if the files are missing (the message lists them and the directory).
    MalformedDatasetError: if a file is truncated or has the wrong format.
  """
  if name == "digits":
    raw = load_digits(seed=seed, test_fraction=test_fraction)
  elif name == "mnist":
    raw = load_mnist(data_dir)
  elif name == "cifar10":
    raw = load_cifar10(data_dir)
  else:
    raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS}.")
  return standardise(raw)


def standardise(dataset: Dataset) -> Dataset:
  """Scales every channel to zero mean and unit variance, with the train split's statistics."""
  train_NHWC = dataset.train_images.astype(np.float64)
  mean_C = train_NHWC.mean(axis=(0, 1, 2))
  std_C = np.maximum(train_NHWC.std(axis=(0, 1, 2)), 1e-6)
  scale = lambda images_NHWC: ((images_NHWC - mean_C) / std_C).astype(np.float32)
  return dataset._replace(train_images=scale(train_NHWC), test_images=scale(dataset.test_images))


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
  """scikit-learn's handwritten digits (8x8, 16 grey levels), split into train and test by `seed`.

  The split is a seeded permutation, so it is the same on every machine and in every process.
  Pixel values are scaled to [0, 1]; `load_dataset` then standardises them.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (only this loader needs it)

  digits = datasets.load_digits()
  images_NHWC = (digits.images / 16.0).astype(np.float32)[..., None]
  labels_N = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels_N))
  num_test = int(round(test_fraction * len(labels_N)))
  test_rows, train_rows = order[:num_test], order[num_test:]
  return Dataset(images_NHWC[train_rows], labels_N[train_rows], images_NHWC[test_rows],
                 labels_N[test_rows], num_classes=10)


def _read_bytes(path: str) -> bytes:
  """The contents of `path`, decompressed when the name ends in ``.gz``."""
  with open(path, "rb") as f:
    raw = f.read()
  if path.endswith(".gz"):
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise MalformedDatasetError(f"{path} is not a valid gzip file ({e}). Re-download it, or "
                                  "store it uncompressed without the .gz suffix.") from e
  return raw


def read_idx(path: str) -> np.ndarray:
  """Reads an unsigned-byte IDX file (the format of the original MNIST files), gzipped or not.

  The format: two zero bytes, the type code ``0x08`` (unsigned byte), the number of dimensions
  ``n``, then ``n`` big-endian uint32 sizes, then the data in C order.

  Args:
    path: the file; ``.gz`` names are decompressed.

  Returns:
    A uint8 array of the shape the header declares.

  Raises:
    MalformedDatasetError: on a bad magic number or a size that disagrees with the header.
  """
  raw = _read_bytes(path)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise MalformedDatasetError(
        f"{path} is not an unsigned-byte IDX file: expected the magic bytes 00 00 08 0N, got "
        f"{raw[:4].hex(' ') or 'an empty file'}.")
  ndim = raw[3]
  header_bytes = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header_bytes:
    raise MalformedDatasetError(f"{path}: the IDX header is truncated or declares {ndim} "
                                "dimensions.")
  shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
  expected_bytes = int(np.prod(shape))
  if len(raw) - header_bytes != expected_bytes:
    raise MalformedDatasetError(
        f"{path}: the IDX header declares shape {shape} ({expected_bytes} bytes of data) but the "
        f"file holds {len(raw) - header_bytes}; it is truncated or corrupt.")
  return np.frombuffer(raw, np.uint8, offset=header_bytes).reshape(shape)


def _where(data_dir: str) -> str:
  """`data_dir`, flagged when it does not exist."""
  return data_dir if os.path.isdir(data_dir) else f"{data_dir} (which does not exist)"


def _find(data_dir: str, name: str) -> str | None:
  """The path of `name` or `name.gz` in `data_dir`, or None."""
  for candidate in (name, name + ".gz"):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  return None


def _check_split(images: np.ndarray, labels: np.ndarray, image_shape: tuple[int, ...],
                 num_classes: int, source: str) -> None:
  """Raises unless `images` is [N, *image_shape] and `labels` is N integers in [0, num_classes)."""
  if images.ndim != 1 + len(image_shape) or tuple(images.shape[1:]) != image_shape:
    raise MalformedDatasetError(f"{source}: expected images of shape [N, "
                                f"{', '.join(map(str, image_shape))}], got {images.shape}.")
  if labels.ndim != 1 or len(labels) != len(images):
    raise MalformedDatasetError(f"{source}: expected one label per image ({len(images)}), got "
                                f"labels of shape {labels.shape}.")
  if len(images) == 0:
    raise MalformedDatasetError(f"{source}: holds no examples.")
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
    raise MalformedDatasetError(f"{source}: labels must be integers in [0, {num_classes}); got "
                                f"dtype {labels.dtype}, range [{labels.min()}, {labels.max()}].")


def load_mnist(data_dir: str) -> Dataset:
  """MNIST from ``mnist.npz`` (Keras layout) or the four original IDX files, gzipped or not.

  ``mnist.npz`` must hold ``x_train`` [60000, 28, 28] uint8, ``y_train``, ``x_test``, ``y_test``
  (any number of examples); it is read with ``allow_pickle=False``. Otherwise the directory must
  hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
  ``t10k-labels-idx1-ubyte``, each optionally with a ``.gz`` suffix.

  Raises:
    DatasetNotFoundError: if neither form is complete in `data_dir`.
    MalformedDatasetError: if a file does not hold what its format promises.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  npz_path = os.path.join(data_dir, MNIST_NPZ)
  if os.path.isfile(npz_path):
    arrays = _load_npz(npz_path, ("x_train", "y_train", "x_test", "y_test"))
    splits = (arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])
    for images, labels, split in ((splits[0], splits[1], "train"), (splits[2], splits[3], "test")):
      if images.dtype != np.uint8:
        raise MalformedDatasetError(f"{npz_path}: x_{split} must be uint8 pixels in [0, 255]; got "
                                    f"dtype {images.dtype}.")
      _check_split(images, labels, (28, 28), 10, f"{npz_path} ({split})")
  else:
    paths = {key: _find(data_dir, name) for key, name in MNIST_IDX.items()}
    missing = [MNIST_IDX[key] + "[.gz]" for key, path in paths.items() if path is None]
    if missing:
      raise DatasetNotFoundError(
          f"MNIST not found in {_where(data_dir)}: expected either {MNIST_NPZ} or the four IDX "
          f"files {', '.join(n + '[.gz]' for n in MNIST_IDX.values())}; missing "
          f"{', '.join(missing)}. Put the files there, or point --config.data_dir at the "
          "directory that holds them.")
    splits = tuple(read_idx(paths[key]) for key in MNIST_IDX)
    _check_split(splits[0], splits[1], (28, 28), 10,
                 f"{paths['train_images']} and {paths['train_labels']}")
    _check_split(splits[2], splits[3], (28, 28), 10,
                 f"{paths['test_images']} and {paths['test_labels']}")
  to_float = lambda images_NHW: (images_NHW.astype(np.float32) / 255.0)[..., None]
  return Dataset(to_float(splits[0]), splits[1].astype(np.int32), to_float(splits[2]),
                 splits[3].astype(np.int32), num_classes=10)


def _load_npz(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Reads `keys` from an ``.npz`` without unpickling anything."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      if not hasattr(npz, "files"):
        raise MalformedDatasetError(f"{path} is a single .npy array, not an .npz archive with "
                                    f"the arrays {', '.join(keys)}.")
      missing = [k for k in keys if k not in npz.files]
      if missing:
        raise MalformedDatasetError(f"{path} lacks the arrays {', '.join(missing)}; expected "
                                    f"{', '.join(keys)}, found {', '.join(npz.files) or 'none'}.")
      return {k: npz[k] for k in keys}
  except MalformedDatasetError:
    raise
  except Exception as e:  # zipfile.BadZipFile, pickled object arrays, truncated members, ...
    raise MalformedDatasetError(
        f"{path} is not a readable .npz archive of plain arrays ({e}). It is read with "
        "allow_pickle=False; save it with numpy.savez.") from e


def load_cifar10(data_dir: str) -> Dataset:
  """CIFAR-10, binary version: ``data_batch_1.bin`` ... ``data_batch_5.bin`` and ``test_batch.bin``.

  The files may sit in `data_dir` or in its ``cifar-10-batches-bin`` subdirectory (what the official
  ``cifar-10-binary.tar.gz`` unpacks to). Each record is one label byte followed by a 32x32 image
  as 1,024 red, 1,024 green and 1,024 blue bytes.

  Raises:
    DatasetNotFoundError: if a file is missing.
    MalformedDatasetError: if a file is not a whole number of records or has a label above 9.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  nested = os.path.join(data_dir, CIFAR10_SUBDIR)
  if not os.path.isfile(os.path.join(data_dir, CIFAR10_TEST_FILE)) and os.path.isdir(nested):
    data_dir = nested
  expected = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)
  missing = [name for name in expected if not os.path.isfile(os.path.join(data_dir, name))]
  if missing:
    raise DatasetNotFoundError(
        f"CIFAR-10 not found in {_where(data_dir)}: expected the binary version's files "
        f"{', '.join(expected)} (in that directory or its {CIFAR10_SUBDIR}/ subdirectory); "
        f"missing {', '.join(missing)}. Unpack cifar-10-binary.tar.gz there, or point "
        "--config.data_dir at the directory that holds them.")
  train = [_read_cifar10_file(os.path.join(data_dir, name)) for name in CIFAR10_TRAIN_FILES]
  test_images, test_labels = _read_cifar10_file(os.path.join(data_dir, CIFAR10_TEST_FILE))
  train_images = np.concatenate([images for images, _ in train])
  train_labels = np.concatenate([labels for _, labels in train])
  to_float = lambda images_NHWC: images_NHWC.astype(np.float32) / 255.0
  return Dataset(to_float(train_images), train_labels, to_float(test_images), test_labels,
                 num_classes=10)


def _read_cifar10_file(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(images [N, 32, 32, 3] uint8, labels [N] int32)`` of one CIFAR-10 binary file."""
  raw = _read_bytes(path)
  if not raw or len(raw) % _CIFAR10_RECORD_BYTES:
    raise MalformedDatasetError(
        f"{path} holds {len(raw)} bytes, not a positive multiple of the "
        f"{_CIFAR10_RECORD_BYTES}-byte CIFAR-10 record (1 label byte + 3x32x32 pixels); it is "
        "truncated or not the binary version (the Python version is pickled and is never read).")
  records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR10_RECORD_BYTES)
  labels_N = records[:, 0].astype(np.int32)
  if labels_N.max() > 9:
    raise MalformedDatasetError(f"{path}: label byte {labels_N.max()} is not a CIFAR-10 class "
                                "(0-9); the file is corrupt or not CIFAR-10.")
  images_NHWC = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images_NHWC), labels_N


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full batches per epoch; the remainder of each epoch's permutation is dropped."""
  return num_examples // global_batch_size


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the training examples: a permutation seeded by both."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def random_crop_and_flip(images_NHWC: np.ndarray, rng: np.random.Generator,
                         padding: int = 4) -> np.ndarray:
  """Pads by `padding` zeros (the mean, after standardising), crops back at random, flips half."""
  n, h, w, _ = images_NHWC.shape
  padded_NHWC = np.pad(images_NHWC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  top_N = rng.integers(0, 2 * padding + 1, n)
  left_N = rng.integers(0, 2 * padding + 1, n)
  flip_N = rng.random(n) < 0.5
  rows_NH = top_N[:, None] + np.arange(h)
  cols_NW = left_N[:, None] + np.where(flip_N[:, None], np.arange(w)[::-1], np.arange(w))
  return padded_NHWC[np.arange(n)[:, None, None], rows_NH[:, :, None], cols_NW[:, None, :]]


def train_batches(dataset: Dataset, *, global_batch_size: int, seed: int, start_step: int = 0,
                  batches_per_epoch: int | None = None, rows: slice | None = None,
                  augment: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's rows of the global training batches, from step `start_step` on, forever.

  Global batch ``s`` is rows ``[i * B, (i + 1) * B)`` of `epoch_order` for epoch
  ``e = s // batches_per_epoch`` (``i = s % batches_per_epoch``), so the stream depends only on the
  seed and the step: a resumed run sees exactly the batches an uninterrupted one would.

  Args:
    dataset: the data.
    global_batch_size: examples per step across all processes and devices.
    seed: seeds the order of every epoch and the augmentation.
    start_step: the global step of the first batch (the data position of a restored checkpoint).
    batches_per_epoch: steps per epoch; default (and at most) one pass over the training set.
      Fewer make each epoch a random subset (smoke tests).
    rows: the slice of each global batch this process feeds (all rows if None).
    augment: random crops and horizontal flips, drawn per global batch from ``(seed, step)``.

  Yields:
    ``{'image': float32 [rows, H, W, C], 'label': int32 [rows]}``.
  """
  rows = slice(0, global_batch_size) if rows is None else rows
  num_train = len(dataset.train_labels)
  full_epoch = steps_per_epoch(num_train, global_batch_size)
  batches_per_epoch = full_epoch if batches_per_epoch is None else batches_per_epoch
  if not 1 <= batches_per_epoch <= full_epoch:
    raise ValueError(f"batches_per_epoch={batches_per_epoch} must be in [1, {full_epoch}] for "
                     f"{num_train} examples in batches of {global_batch_size}.")
  step = start_step
  epoch, order = None, None
  while True:
    if step // batches_per_epoch != epoch:
      epoch = step // batches_per_epoch
      order = epoch_order(num_train, seed, epoch)
    start = (step % batches_per_epoch) * global_batch_size
    example_ids = order[start:start + global_batch_size]
    images_NHWC = dataset.train_images[example_ids]
    if augment:  # Drawn for the whole global batch, so it does not depend on the process split.
      images_NHWC = random_crop_and_flip(images_NHWC, np.random.default_rng([seed, epoch, step]))
    yield {"image": images_NHWC[rows], "label": dataset.train_labels[example_ids][rows]}
    step += 1


def eval_batches(dataset: Dataset, *, global_batch_size: int, rows: slice | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's rows of the test set in global batches, the last one padded.

  Padding examples repeat the first test image and have ``weight`` 0, so every batch has the same
  shape (one compilation) and metrics count only real examples.

  Yields:
    ``{'image': float32 [rows, H, W, C], 'label': int32 [rows], 'weight': float32 [rows]}``.
  """
  rows = slice(0, global_batch_size) if rows is None else rows
  num_test = len(dataset.test_labels)
  for start in range(0, num_test, global_batch_size):
    example_ids = np.arange(start, start + global_batch_size)
    weight_B = (example_ids < num_test).astype(np.float32)
    example_ids = np.where(example_ids < num_test, example_ids, 0)
    yield {"image": dataset.test_images[example_ids][rows],
           "label": dataset.test_labels[example_ids][rows], "weight": weight_B[rows]}

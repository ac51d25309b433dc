"""Tests for bnjax_examples/input_pipeline.py: every file format on tiny files the tests write,
each malformed-file error, and the batch stream that checkpoints and processes rely on."""

import gzip
import os
import pathlib
import struct

import numpy as np
import pytest

from bnjax_examples import input_pipeline

NUM_TRAIN, NUM_TEST = 6, 4


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  data = header + array.astype(np.uint8).tobytes()
  path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def mnist_arrays(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"x_train": rng.integers(0, 256, (NUM_TRAIN, 28, 28), dtype=np.uint8),
          "y_train": rng.integers(0, 10, NUM_TRAIN).astype(np.uint8),
          "x_test": rng.integers(0, 256, (NUM_TEST, 28, 28), dtype=np.uint8),
          "y_test": rng.integers(0, 10, NUM_TEST).astype(np.uint8)}


def write_mnist_idx(directory: pathlib.Path, arrays: dict[str, np.ndarray],
                    suffix: str = "") -> None:
  names = dict(zip(("x_train", "y_train", "x_test", "y_test"), input_pipeline.MNIST_IDX.values()))
  for key, name in names.items():
    write_idx(directory / (name + suffix), arrays[key])


def cifar_records(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``num`` random CIFAR-10 images [num, 32, 32, 3] and labels."""
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (num, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, num).astype(np.uint8))


def write_cifar_file(path: pathlib.Path, images_NHWC: np.ndarray, labels_N: np.ndarray) -> None:
  images_NCHW = images_NHWC.transpose(0, 3, 1, 2).reshape(len(labels_N), -1)
  path.write_bytes(np.concatenate([labels_N[:, None], images_NCHW], axis=1).tobytes())


def write_cifar10(directory: pathlib.Path, per_file: int = 2) -> dict[str, tuple]:
  directory.mkdir(parents=True, exist_ok=True)
  written = {}
  names = input_pipeline.CIFAR10_TRAIN_FILES + (input_pipeline.CIFAR10_TEST_FILE,)
  for i, name in enumerate(names):
    written[name] = cifar_records(per_file, seed=i)
    write_cifar_file(directory / name, *written[name])
  return written


class Unpicklable:
  """Records that it was unpickled; a loader that honours allow_pickle=False never does."""

  unpickled = False

  def __reduce__(self):
    return (_mark_unpickled, ())


def _mark_unpickled():
  Unpicklable.unpickled = True
  return "unpickled"


def test_digits_split_is_deterministic_by_seed():
  first = input_pipeline.load_digits(seed=3)
  again = input_pipeline.load_digits(seed=3)
  other = input_pipeline.load_digits(seed=4)
  np.testing.assert_array_equal(first.test_images, again.test_images)
  np.testing.assert_array_equal(first.train_labels, again.train_labels)
  assert not np.array_equal(first.test_images, other.test_images)
  assert len(first.train_labels) + len(first.test_labels) == 1797
  assert len(first.test_labels) == round(0.2 * 1797)


def test_load_dataset_standardises_with_train_statistics():
  dataset = input_pipeline.load_dataset("digits")
  assert dataset.train_images.dtype == np.float32 and dataset.image_shape == (8, 8, 1)
  np.testing.assert_allclose(dataset.train_images.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(dataset.train_images.std(), 1.0, atol=1e-4)


def test_mnist_loads_from_raw_idx_files(tmp_path):
  arrays = mnist_arrays()
  write_mnist_idx(tmp_path, arrays)
  dataset = input_pipeline.load_mnist(str(tmp_path))
  np.testing.assert_allclose(dataset.train_images[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(dataset.test_labels, arrays["y_test"])
  assert dataset.train_labels.dtype == np.int32 and dataset.image_shape == (28, 28, 1)


def test_mnist_loads_from_gzipped_idx_files(tmp_path):
  arrays = mnist_arrays()
  write_mnist_idx(tmp_path, arrays, suffix=".gz")
  dataset = input_pipeline.load_mnist(str(tmp_path))
  np.testing.assert_array_equal(dataset.train_labels, arrays["y_train"])
  np.testing.assert_allclose(dataset.test_images[..., 0], arrays["x_test"] / 255.0, rtol=1e-6)


def test_mnist_loads_from_npz(tmp_path):
  arrays = mnist_arrays()
  np.savez(tmp_path / "mnist.npz", **arrays)
  dataset = input_pipeline.load_mnist(str(tmp_path))
  np.testing.assert_array_equal(dataset.train_labels, arrays["y_train"])
  np.testing.assert_allclose(dataset.train_images[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)


def test_cifar10_loads_binary_files_as_NHWC(tmp_path):
  written = write_cifar10(tmp_path)
  dataset = input_pipeline.load_cifar10(str(tmp_path))
  expected_train = np.concatenate([written[n][0] for n in input_pipeline.CIFAR10_TRAIN_FILES])
  np.testing.assert_allclose(dataset.train_images, expected_train / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(dataset.test_labels, written["test_batch.bin"][1])
  assert dataset.image_shape == (32, 32, 3) and len(dataset.train_labels) == 10


def test_cifar10_found_in_batches_bin_subdirectory(tmp_path):
  write_cifar10(tmp_path / "cifar-10-batches-bin")
  assert len(input_pipeline.load_cifar10(str(tmp_path)).test_labels) == 2


def test_missing_directory_is_named_as_missing(tmp_path):
  with pytest.raises(input_pipeline.DatasetNotFoundError, match="which does not exist"):
    input_pipeline.load_mnist(str(tmp_path / "nowhere"))


def test_missing_mnist_error_names_files_and_directory(tmp_path):
  write_idx(tmp_path / "train-images-idx3-ubyte", mnist_arrays()["x_train"])
  with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
    input_pipeline.load_mnist(str(tmp_path))
  message = str(error.value)
  assert str(tmp_path) in message and "mnist.npz" in message
  assert "missing train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz]" in message


def test_missing_cifar10_error_names_files_and_directory(tmp_path):
  write_cifar10(tmp_path)
  os.remove(tmp_path / "data_batch_3.bin")
  with pytest.raises(input_pipeline.DatasetNotFoundError, match="missing data_batch_3.bin") as e:
    input_pipeline.load_cifar10(str(tmp_path))
  assert str(tmp_path) in str(e.value) and "test_batch.bin" in str(e.value)


def test_truncated_idx_file_is_rejected(tmp_path):
  arrays = mnist_arrays()
  write_mnist_idx(tmp_path, arrays)
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(input_pipeline.MalformedDatasetError, match="truncated") as error:
    input_pipeline.load_mnist(str(tmp_path))
  assert str(path) in str(error.value)


def test_idx_file_with_wrong_magic_is_rejected(tmp_path):
  write_mnist_idx(tmp_path, mnist_arrays())
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
  with pytest.raises(input_pipeline.MalformedDatasetError, match="magic bytes 00 00 08 0N"):
    input_pipeline.load_mnist(str(tmp_path))


def test_corrupt_gzip_is_rejected(tmp_path):
  write_mnist_idx(tmp_path, mnist_arrays(), suffix=".gz")
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  path.write_bytes(path.read_bytes()[:12])
  with pytest.raises(input_pipeline.MalformedDatasetError, match="not a valid gzip file"):
    input_pipeline.load_mnist(str(tmp_path))


def test_idx_images_and_labels_of_different_counts_are_rejected(tmp_path):
  arrays = mnist_arrays()
  arrays["y_train"] = arrays["y_train"][:-1]
  write_mnist_idx(tmp_path, arrays)
  with pytest.raises(input_pipeline.MalformedDatasetError, match="one label per image"):
    input_pipeline.load_mnist(str(tmp_path))


def test_npz_without_an_expected_array_is_rejected(tmp_path):
  arrays = mnist_arrays()
  del arrays["y_test"]
  np.savez(tmp_path / "mnist.npz", **arrays)
  with pytest.raises(input_pipeline.MalformedDatasetError, match="lacks the arrays y_test"):
    input_pipeline.load_mnist(str(tmp_path))


def test_npz_with_pickled_objects_is_rejected_without_unpickling(tmp_path):
  arrays = mnist_arrays()
  arrays["y_train"] = np.array([Unpicklable()] * NUM_TRAIN, dtype=object)
  np.savez(tmp_path / "mnist.npz", **arrays)
  Unpicklable.unpickled = False
  with pytest.raises(input_pipeline.MalformedDatasetError, match="allow_pickle=False"):
    input_pipeline.load_mnist(str(tmp_path))
  assert not Unpicklable.unpickled


def test_npz_with_out_of_range_labels_is_rejected(tmp_path):
  arrays = mnist_arrays()
  arrays["y_test"][0] = 12
  np.savez(tmp_path / "mnist.npz", **arrays)
  with pytest.raises(input_pipeline.MalformedDatasetError,
                     match=r"labels must be integers in \[0, 10\)"):
    input_pipeline.load_mnist(str(tmp_path))


def test_cifar10_file_of_partial_records_is_rejected(tmp_path):
  write_cifar10(tmp_path)
  path = tmp_path / "data_batch_2.bin"
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(input_pipeline.MalformedDatasetError, match="3073-byte") as error:
    input_pipeline.load_cifar10(str(tmp_path))
  assert str(path) in str(error.value)


def test_cifar10_label_above_nine_is_rejected(tmp_path):
  write_cifar10(tmp_path)
  path = tmp_path / "test_batch.bin"
  raw = bytearray(path.read_bytes())
  raw[0] = 10
  path.write_bytes(bytes(raw))
  with pytest.raises(input_pipeline.MalformedDatasetError, match="label byte 10"):
    input_pipeline.load_cifar10(str(tmp_path))


def test_unknown_dataset_name_is_rejected():
  with pytest.raises(ValueError, match="Unknown dataset 'imagenet'"):
    input_pipeline.load_dataset("imagenet")


def test_train_batches_from_a_step_continue_the_uninterrupted_stream():
  dataset = input_pipeline.load_digits()
  stream = input_pipeline.train_batches(dataset, global_batch_size=64, seed=1, augment=True)
  uninterrupted = [next(stream) for _ in range(30)]  # Crosses the epoch boundary at step 22.
  resumed = input_pipeline.train_batches(dataset, global_batch_size=64, seed=1, start_step=20,
                                         augment=True)
  for expected in uninterrupted[20:]:
    batch = next(resumed)
    np.testing.assert_array_equal(batch["image"], expected["image"])
    np.testing.assert_array_equal(batch["label"], expected["label"])


def test_process_rows_of_train_batches_concatenate_to_the_global_batch():
  dataset = input_pipeline.load_digits()
  kwargs = dict(global_batch_size=32, seed=0, start_step=21, augment=True)
  whole = input_pipeline.train_batches(dataset, **kwargs)
  halves = [input_pipeline.train_batches(dataset, rows=rows, **kwargs)
            for rows in (slice(0, 16), slice(16, 32))]
  for _ in range(3):
    expected = next(whole)
    parts = [next(half) for half in halves]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), expected["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), expected["label"])


def test_each_epoch_visits_every_example_once():
  dataset = input_pipeline.load_digits()
  stream = input_pipeline.train_batches(dataset, global_batch_size=2, seed=0)
  num_train = len(dataset.train_labels)
  images = np.concatenate([next(stream)["image"] for _ in range(num_train // 2)])
  assert len(np.unique(images.reshape(len(images), -1), axis=0)) == len(
      np.unique(dataset.train_images.reshape(num_train, -1), axis=0))


def test_eval_batches_cover_the_test_set_once_with_zero_weight_padding():
  dataset = input_pipeline.load_digits()
  batches = list(input_pipeline.eval_batches(dataset, global_batch_size=128))
  weights = np.concatenate([b["weight"] for b in batches])
  assert len(weights) == 128 * 3 and weights.sum() == len(dataset.test_labels) == 359
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:359],
                                dataset.test_labels)


def test_random_crop_and_flip_moves_pixels_within_the_padding():
  images_NHWC = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1) + 1
  augmented = input_pipeline.random_crop_and_flip(images_NHWC, np.random.default_rng(0), padding=1)
  assert augmented.shape == images_NHWC.shape
  for original, moved in zip(images_NHWC, augmented):
    assert set(moved[moved > 0].tolist()) <= set(original.ravel().tolist())
    assert (moved > 0).sum() >= 9  # At most one row and one column of padding is in view.

"""Input pipeline: in-memory data sets, train/validation/test splits, batches, augmentation.

Four sources, all returning a :class:`Dataset` of three :class:`Split` s:

* ``digits`` (the default): scikit-learn's 8 x 8 digits (1,797 images), shipped inside the
  scikit-learn package, so it works on a machine with no network. Split 60/20/20 at random.
* ``mnist``, ``cifar10``, ``cifar100``: tensorflow-datasets, read with ``tfds.data_source``
  (random access to ArrayRecord files; reading needs no TensorFlow). The validation split is held
  out of tfds' ``train`` split (``validation_fraction``, 10% by default); ``test`` is tfds' test.
* ``idx:DIR``: MNIST-format IDX files in ``DIR`` (e.g. the MNIST test set,
  ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``), split 60/20/20 at random.

Every selection an experiment makes (best checkpoint, weight decay, compression acceptance) reads
the ``validation`` split; ``test`` is only reported.

Preparing a tensorflow-datasets data set, once per machine (it downloads, so it needs the network,
and tfds encodes the images with TensorFlow, so it needs ``pip install tensorflow
importlib_resources`` for this step only)::

    python -m experiments.data prepare cifar10 [--data-dir DIR]

which is ``tfds.builder(name, data_dir=DIR, file_format="array_record").download_and_prepare()``
(or ``tfds build cifar10 --file_format=array_record``). Without it, loading raises
:class:`DatasetNotPreparedError` with that command in its message. ``DIR`` defaults to tfds'
own (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

Images stay in memory as stored (``uint8`` for tfds and IDX); :meth:`Dataset.normalize` turns a
batch into float32, scaled to [0, 1] and standardised per channel with the training split's mean
and standard deviation. Batches gather their rows from the stored arrays, so an epoch never copies
the whole data set.

Example:
  >>> data = load("digits")
  >>> data.train.images.shape, data.num_classes
  ((1078, 8, 8, 1), 10)
  >>> images, labels = next(batches(data.train, 32, seed=0, epoch=0))
  >>> data.normalize(images).dtype, labels.shape
  (dtype('float32'), (32,))
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "TFDS_NAMES",
    "Augmentation",
    "Dataset",
    "DatasetNotPreparedError",
    "PREPARE_NEEDS",
    "Split",
    "augment",
    "batches",
    "load",
    "load_digits",
    "load_idx",
    "load_tfds",
    "prepare_tfds",
    "read_idx",
    "split_indices",
]

TFDS_NAMES = ("mnist", "cifar10", "cifar100")
# What tensorflow-datasets imports to download and encode a data set (not to read it).
PREPARE_NEEDS = ("tensorflow", "importlib_resources")


class DatasetNotPreparedError(FileNotFoundError):
    """A tensorflow-datasets data set that has not been downloaded and prepared."""


class Split(NamedTuple):
    """One split of a data set.

    Attributes:
      images: ``(n, height, width, channels)``, as stored (``uint8`` or float).
      labels: ``(n,)`` int32 class indices.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits and how to normalise their images.

    Attributes:
      name: where the data came from.
      train: the training split.
      validation: held out of the training data; every selection reads it.
      test: only reported.
      num_classes: the number of classes.
      pixel_max: the stored value of a white pixel (255 for ``uint8``, 16 for digits).
      mean: per-channel mean of the training images, after scaling to [0, 1].
      std: per-channel standard deviation of the training images, after scaling to [0, 1].
    """

    name: str
    train: Split
    validation: Split
    test: Split
    num_classes: int
    pixel_max: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)``."""
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> Split:
        """The split called ``name`` (``train``, ``validation`` or ``test``)."""
        if name not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {name!r}.")
        return getattr(self, name)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """A batch as float32: scaled to [0, 1], then standardised per channel."""
        scaled = images.astype(np.float32) / np.float32(self.pixel_max)
        return (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def split_indices(
    n: int, fractions: tuple[float, ...], seed: int
) -> tuple[np.ndarray, ...]:
    """A seeded random partition of ``range(n)`` into parts of the given fractions.

    The last part takes what rounding leaves, so the parts are disjoint and cover ``range(n)``.

    Example:
      >>> [len(p) for p in split_indices(10, (0.6, 0.2, 0.2), seed=0)]
      [6, 2, 2]
    """
    if not fractions or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}.")
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.round(np.cumsum(fractions)[:-1] * n).astype(int)
    parts = tuple(np.sort(part) for part in np.split(order, cuts))
    if any(len(part) == 0 for part in parts):
        raise ValueError(f"{n} examples are too few to split as {fractions}.")
    return parts


def _from_arrays(
    name: str,
    train: Split,
    validation: Split,
    test: Split,
    num_classes: int,
    pixel_max: float,
) -> Dataset:
    scaled = train.images.astype(np.float64) / pixel_max
    axes = tuple(range(scaled.ndim - 1))
    std = np.maximum(scaled.std(axes), 1e-6)
    return Dataset(name, train, validation, test, num_classes, float(pixel_max),
                   tuple(float(v) for v in scaled.mean(axes)), tuple(float(v) for v in std))


def _three_way(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
               pixel_max: float, seed: int) -> Dataset:
    parts = split_indices(len(labels), (0.6, 0.2, 0.2), seed)
    train, validation, test = (Split(images[p], labels[p]) for p in parts)
    return _from_arrays(name, train, validation, test, num_classes, pixel_max)


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8 x 8 digits, split 60/20/20 (seeded): the embedded default."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32)[..., None]  # values 0..16
    return _three_way("digits", images, bunch.target.astype(np.int32), 10, 16.0, seed)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (``.gz`` or not) as a numpy array of its stored type and shape.

    The format: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed byte, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, each dimension as a
    big-endian int32, then the data, big-endian.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as file:
        raw = file.read()
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in types:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, offset=4))
    dtype = np.dtype(types[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape}, {expected} bytes; file has "
                         f"{len(raw)}.")
    data = np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _idx_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no {stem}[.gz] in {directory}.")


def load_idx(
    directory: str | os.PathLike,
    prefix: str = "t10k",
    seed: int = 0,
) -> Dataset:
    """MNIST-format IDX files ``{prefix}-images-idx3-ubyte[.gz]`` and ``{prefix}-labels-idx1-ubyte``
    in ``directory``, split 60/20/20 (seeded)."""
    directory = Path(directory)
    images = read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int32)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"expected images (n, h, w) and n labels, got {images.shape} and "
                         f"{labels.shape}.")
    return _three_way(f"idx:{directory}", images[..., None], labels,
                      int(labels.max()) + 1, 255.0, seed)


def _prepare_command(name: str, data_dir: str | None) -> str:
    where = f" --data-dir {data_dir}" if data_dir else ""
    return f"python -m experiments.data prepare {name}{where}"


def _read_tfds(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, int]:
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # tfds reports a missing data set in several ways
        if not tfds.builder(name, data_dir=data_dir).is_prepared():
            raise DatasetNotPreparedError(
                f"tensorflow-datasets has no prepared {name!r} in "
                f"{data_dir or 'its default data_dir'}. Prepare it once (needs the network and "
                f"`pip install tensorflow importlib_resources`): "
                f"{_prepare_command(name, data_dir)}"
            ) from error
        raise DatasetNotPreparedError(
            f"{name!r} is prepared in {data_dir or 'the default data_dir'} but cannot be read "
            f"without TensorFlow ({error}). Prepare it again in the ArrayRecord format: "
            f"{_prepare_command(name, data_dir)}"
        ) from error
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return images, labels, int(source.dataset_info.features["label"].num_classes)


def load_tfds(
    name: str,
    data_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """A prepared tensorflow-datasets image data set, with validation held out of ``train``.

    Raises:
      DatasetNotPreparedError: when the data set is not prepared in ``data_dir`` (the message
        says what to run).
    """
    if name not in TFDS_NAMES:
        raise ValueError(f"name must be one of {TFDS_NAMES}, got {name!r}.")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    data_dir = None if data_dir is None else os.fspath(data_dir)
    images, labels, num_classes = _read_tfds(name, "train", data_dir)
    test_images, test_labels, _ = _read_tfds(name, "test", data_dir)
    train_part, validation_part = split_indices(
        len(labels), (1 - validation_fraction, validation_fraction), seed)
    return _from_arrays(name, Split(images[train_part], labels[train_part]),
                        Split(images[validation_part], labels[validation_part]),
                        Split(test_images, test_labels), num_classes, 255.0)


def load(name: str = "digits", data_dir: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """A data set by name: ``digits``, ``mnist``, ``cifar10``, ``cifar100`` or ``idx:DIR``."""
    if name == "digits":
        return load_digits(seed)
    if name.startswith("idx:"):
        return load_idx(name[len("idx:"):], seed=seed)
    if name in TFDS_NAMES:
        return load_tfds(name, data_dir, seed=seed)
    raise ValueError(f"data set must be 'digits', 'idx:DIR' or one of {TFDS_NAMES}, got {name!r}.")


def prepare_tfds(name: str, data_dir: str | os.PathLike | None = None) -> None:
    """Downloads and prepares a tensorflow-datasets data set as ArrayRecord files (once)."""
    import tensorflow_datasets as tfds

    if name not in TFDS_NAMES:
        raise ValueError(f"name must be one of {TFDS_NAMES}, got {name!r}.")
    missing = [m for m in PREPARE_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"preparing {name!r} with tensorflow-datasets needs {', '.join(missing)} (tfds encodes "
            f"the images with TensorFlow): pip install {' '.join(missing)}. Only this step needs "
            "them; reading the prepared data does not.")
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir),
                           file_format="array_record")
    builder.download_and_prepare()


class Augmentation(NamedTuple):
    """Training-time augmentation.

    Attributes:
      pad: zero padding on each side before a random crop back to the image size (0: no crop).
      flip: flip each image horizontally with probability 1/2.
    """

    pad: int = 0
    flip: bool = False


def augment(images: np.ndarray, augmentation: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Random crops of the zero-padded images and random horizontal flips; shapes unchanged.

    Padding is with stored zeros (black), before normalisation, as torchvision's ``RandomCrop``.

    Example:
      >>> images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
      >>> out = augment(images, Augmentation(pad=1, flip=True), np.random.default_rng(0))
      >>> out.shape, out.dtype
      ((2, 4, 4, 1), dtype('uint8'))
    """
    if augmentation.pad < 0:
        raise ValueError(f"pad must be >= 0, got {augmentation.pad}.")
    n, height, width = images.shape[:3]
    if augmentation.pad:
        pad = augmentation.pad
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        top = rng.integers(0, 2 * pad + 1, n)
        left = rng.integers(0, 2 * pad + 1, n)
        rows = top[:, None] + np.arange(height)
        cols = left[:, None] + np.arange(width)
        images = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if augmentation.flip:
        flipped = rng.random(n) < 0.5
        images = np.where(flipped[:, None, None, None], images[:, :, ::-1], images)
    return images


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    augmentation: Augmentation | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(images, labels)`` batches, shuffled by ``(seed, epoch)``.

    Each batch gathers its rows from the split's arrays (a permutation of indices per epoch, no
    copy of the data set); the same ``(seed, epoch)`` gives the same batches and augmentation, so a
    run resumed at an epoch boundary sees what an uninterrupted run sees.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    rng = np.random.default_rng((seed, epoch))
    n = len(split)
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    if stop == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the split ({n} examples) and "
                         "drop_remainder is set.")
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        images = split.images[index]
        if augmentation is not None:
            images = augment(images, augmentation, rng)
        yield images, split.labels[index]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare a tensorflow-datasets data set once.")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("name", choices=TFDS_NAMES)
    parser.add_argument("--data-dir", default=None, help="tfds data_dir (default: tfds' own)")
    args = parser.parse_args(argv)
    prepare_tfds(args.name, args.data_dir)
    data = load_tfds(args.name, args.data_dir)
    print(f"{args.name}: {len(data.train)} train, {len(data.validation)} validation, "
          f"{len(data.test)} test images of shape {data.image_shape}")


if __name__ == "__main__":
    main()

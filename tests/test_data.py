"""experiments.data: splits, IDX files, tensorflow-datasets (mock data), augmentation, batches."""

import gzip
import hashlib
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given
from hypothesis import strategies as st
from sklearn.datasets import load_digits as sklearn_digits

from experiments import data as data_lib


def sorted_rows(images):
    """The multiset of images (rows of bytes, sorted) as its size and a digest: data sets compare
    by it, and a failing comparison prints two short values, not a diff of every image."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    digest = hashlib.sha256(b"".join(sorted(row.tobytes() for row in flat))).hexdigest()
    return len(flat), flat.shape[1:], digest[:16]


@given(n=st.integers(3, 500), cuts=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4),
       seed=st.integers(0, 10))
def test_split_indices_are_disjoint_and_cover(n, cuts, seed):
    fractions = tuple(c / sum(cuts) for c in cuts)
    try:
        parts = data_lib.split_indices(n, fractions, seed)
    except ValueError:  # a part would be empty: the boundaries round(n * cumulative) touch
        # (n = 9, fractions 4/13, 4/13, 1/13, 4/13: boundaries 3, 6, 6)
        bounds = [0, *(round(n * sum(fractions[: i + 1])) for i in range(len(fractions) - 1)), n]
        assert any(b <= a for a, b in zip(bounds, bounds[1:], strict=False))
        return
    together = np.concatenate(parts)
    assert len(together) == n and set(together.tolist()) == set(range(n))
    for part, fraction in zip(parts[:-1], fractions[:-1], strict=True):
        assert abs(len(part) - fraction * n) <= len(fractions)


def test_split_indices_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        data_lib.split_indices(10, (0.5, 0.6), 0)


def test_digits_splits_are_disjoint_and_cover_the_embedded_data():
    data = data_lib.load("digits", seed=3)
    bunch = sklearn_digits()
    assert (len(data.train), len(data.validation), len(data.test)) == (1078, 360, 359)
    images = np.concatenate([data.train.images, data.validation.images, data.test.images])
    labels = np.concatenate([data.train.labels, data.validation.labels, data.test.labels])
    joined = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
    original = np.concatenate([bunch.images.reshape(-1, 64), bunch.target[:, None]], axis=1)
    assert sorted_rows(joined.astype(np.float64)) == sorted_rows(original.astype(np.float64))
    # Seeded: the same seed gives the same split, another seed another.
    assert np.array_equal(data_lib.load("digits", seed=3).test.labels, data.test.labels)
    assert not np.array_equal(data_lib.load("digits", seed=4).test.images, data.test.images)


def test_normalize_standardises_the_training_split():
    data = data_lib.load("digits")
    train = data.normalize(data.train.images)
    assert train.dtype == np.float32
    np.testing.assert_allclose(train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(), 1.0, atol=1e-5)
    expected = (data.test.images / 16.0 - (data.train.images / 16.0).mean()) / (
        data.train.images / 16.0).std()
    np.testing.assert_allclose(data.normalize(data.test.images), expected, rtol=1e-5, atol=1e-5)


def write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    raw = header + array.astype(dtype).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as file:
            file.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_reads_what_was_written(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 4)).astype(np.uint8)
    write_idx(tmp_path / f"a{suffix}", images, 0x08)
    out = data_lib.read_idx(tmp_path / f"a{suffix}")
    assert out.dtype == np.uint8 and np.array_equal(out, images)
    values = rng.normal(size=(2, 3)).astype(np.float32)
    write_idx(tmp_path / f"b{suffix}", values, 0x0D)
    np.testing.assert_array_equal(data_lib.read_idx(tmp_path / f"b{suffix}"), values)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        data_lib.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8), 0x08)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        data_lib.read_idx(tmp_path / "short")


def test_load_idx_splits_a_directory_of_mnist_files(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 6, 6)).astype(np.uint8)
    labels = rng.integers(0, 10, 50).astype(np.uint8)
    labels[0] = 9
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x08)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, 0x08)
    data = data_lib.load(f"idx:{tmp_path}")
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 10, 10)
    assert data.image_shape == (6, 6, 1) and data.num_classes == 10 and data.pixel_max == 255
    splits = [data.train, data.validation, data.test]
    joined = np.concatenate([np.concatenate([s.images.reshape(len(s), -1), s.labels[:, None]], 1)
                             for s in splits])
    original = np.concatenate([images.reshape(50, -1), labels[:, None]], 1).astype(np.int64)
    assert sorted_rows(joined.astype(np.int64)) == sorted_rows(original)
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        data_lib.load_idx(tmp_path / "missing")


@pytest.mark.parametrize("name, shape, classes", [("mnist", (28, 28, 1), 10),
                                                  ("cifar10", (32, 32, 3), 10),
                                                  ("cifar100", (32, 32, 3), 100)])
def test_tfds_loaders_read_through_data_source(tmp_path, name, shape, classes):
    with tfds.testing.mock_data(num_examples=40):
        data = data_lib.load(name, data_dir=tmp_path, seed=0)
        source = tfds.data_source(name, split="train", data_dir=tmp_path)
        train_images = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
    assert data.image_shape == shape and data.num_classes == classes
    assert data.train.images.dtype == np.uint8
    assert (len(data.train), len(data.validation), len(data.test)) == (36, 4, 40)
    # Validation is held out of tfds' train split: together they are that split, once each.
    held = np.concatenate([data.train.images, data.validation.images])
    assert sorted_rows(held) == sorted_rows(train_images)


def test_unprepared_tfds_data_set_says_what_to_run(tmp_path):
    with pytest.raises(data_lib.DatasetNotPreparedError,
                       match=r"python -m experiments.data prepare cifar10 --data-dir"):
        data_lib.load("cifar10", data_dir=tmp_path)


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match="digits"):
        data_lib.load("imagenet")
    with pytest.raises(ValueError, match="validation_fraction"):
        data_lib.load_tfds("mnist", validation_fraction=1.0)


def is_crop_of_padded(out, image, pad, flips):
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    h, w = image.shape[:2]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[dy:dy + h, dx:dx + w]
            if np.array_equal(out, window) or (flips and np.array_equal(out, window[:, ::-1])):
                return True
    return False


@pytest.mark.parametrize("pad, flip", [(0, True), (2, False), (4, True)])
def test_augment_crops_padded_images_and_flips(pad, flip):
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (16, 8, 8, 3)).astype(np.uint8)
    out = data_lib.augment(images, data_lib.Augmentation(pad, flip), np.random.default_rng(5))
    assert out.shape == images.shape and out.dtype == images.dtype
    for a, b in zip(out, images, strict=True):
        assert is_crop_of_padded(a, b, pad, flip)
    if flip and pad == 0:  # some, not all, were flipped
        flipped = [np.array_equal(a, b[:, ::-1]) for a, b in zip(out, images, strict=True)]
        assert 0 < sum(flipped) < len(images)
    # Seeded.
    again = data_lib.augment(images, data_lib.Augmentation(pad, flip), np.random.default_rng(5))
    assert np.array_equal(out, again)


def test_batches_keep_labels_with_their_augmented_images():
    # Each image is filled with its label + 1, so a crop's maximum is its label + 1.
    labels = np.arange(40, dtype=np.int32) % 7
    images = np.broadcast_to((labels + 1).astype(np.uint8)[:, None, None, None],
                             (40, 6, 6, 1)).copy()
    split = data_lib.Split(images, labels)
    seen = []
    for x, y in data_lib.batches(split, 8, seed=1, epoch=2,
                                 augmentation=data_lib.Augmentation(pad=2, flip=True)):
        assert x.shape == (8, 6, 6, 1)
        assert np.array_equal(x.reshape(8, -1).max(1), y + 1)
        seen.append(y)
    assert sorted(np.concatenate(seen).tolist()) == sorted(labels.tolist())


def test_batches_are_seeded_by_seed_and_epoch_and_visit_every_example_once():
    split = data_lib.Split(np.arange(23, dtype=np.float32).reshape(23, 1, 1, 1),
                           np.arange(23, dtype=np.int32))

    def order(seed, epoch, **kwargs):
        return np.concatenate([y for _, y in data_lib.batches(split, 5, seed=seed, epoch=epoch,
                                                              **kwargs)])

    assert np.array_equal(order(0, 1), order(0, 1))
    assert not np.array_equal(order(0, 1), order(0, 2))
    assert not np.array_equal(order(0, 1), order(1, 1))
    assert len(order(0, 1)) == 20 and len(set(order(0, 1).tolist())) == 20
    full = order(0, 1, drop_remainder=False)
    assert sorted(full.tolist()) == list(range(23))
    assert np.array_equal(order(0, 1, shuffle=False, drop_remainder=False), np.arange(23))
    with pytest.raises(ValueError, match="batch_size"):
        next(data_lib.batches(split, 0, seed=0, epoch=0))


def test_prepare_says_which_modules_it_needs(monkeypatch, tmp_path):
    monkeypatch.setattr(data_lib, "PREPARE_NEEDS", ("no_such_module_for_jaxlr",))
    with pytest.raises(ModuleNotFoundError, match="pip install no_such_module_for_jaxlr"):
        data_lib.prepare_tfds("cifar10", tmp_path)
    with pytest.raises(ValueError, match="name must be one of"):
        data_lib.prepare_tfds("svhn", tmp_path)

"""Tests for fmd_tf.data: Fashion-MNIST / MNIST / digits, user .npz files and image directories,
search order, errors, the paper's splits and scripts/get_data.sh."""

import gzip
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fmd_tf import data
from fmd_tf.config import SplitConfig
from fmd_tf.data import (
    DataFormatError,
    DataNotAvailableError,
    fit_split_config,
    load_dataset,
    load_image_directory,
    load_npz,
    make_splits,
    paper_splits,
    stratified_split,
)

REPO = Path(__file__).resolve().parents[1]

REAL_DEBIAN_DIR = data.DEBIAN_FMNIST_DIR  # before any test monkeypatches it
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


# --------------------------------------------------------------------------- helpers / fixtures


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0,0,8,ndim, big-endian dims, then the bytes."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.tobytes()


def _write_gz(path, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _synthetic_arrays(n_train=3, n_test=2, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def _write_synthetic_set(directory, arrays):
    directory.mkdir(parents=True, exist_ok=True)
    for key, name in IDX_FILES.items():
        _write_gz(directory / name, _idx_bytes(arrays[key]))


@pytest.fixture
def isolated_sources(tmp_path, monkeypatch):
    """Every source empty: FMD_DATA_DIR unset, empty HOME, no Debian dir, no download."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FMD_DATA_DIR", raising=False)
    monkeypatch.setenv("FMD_NO_DOWNLOAD", "1")
    missing = tmp_path / "no-such-debian-dir"
    monkeypatch.setattr(data, "DEBIAN_FMNIST_DIR", missing)
    return {"home": home, "debian": missing}


@pytest.fixture(scope="module")
def fmnist():
    """The real Fashion-MNIST, from the default sources (skipped where none is available)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMD_NO_DOWNLOAD", "1")  # never hit the network from the test suite
        try:
            return load_dataset("fmnist")
        except DataNotAvailableError as e:
            pytest.skip(f"Fashion-MNIST not installed: {e}")


@pytest.fixture
def cached_fmnist(fmnist, monkeypatch):
    """Make `paper_splits` reuse the module's already-loaded arrays (fast split tests)."""
    calls = []

    def fake_load(name):
        calls.append(name)
        return fmnist

    monkeypatch.setattr(data, "load_dataset", fake_load)
    return calls


# --------------------------------------------------------------------------- real Fashion-MNIST


def test_unit_float_is_x_over_255_in_float32():
    x = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    out = data.unit_float(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, x.astype(np.float32) / np.float32(255.0))
    assert out[0, 0, 0] == 0.0 and out[-1, -1, -1] == 1.0


def test_load_fmnist_shapes_dtypes_ranges(fmnist):
    (x_train, y_train), (x_test, y_test) = fmnist
    assert x_train.shape == (60_000, 28, 28, 1) and x_test.shape == (10_000, 28, 28, 1)
    assert y_train.shape == (60_000,) and y_test.shape == (10_000,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    # Pixels are k / 255 for integer k (a plain rescaling of the uint8 file, no normalisation).
    sample = x_train[:500].astype(np.float64) * 255.0
    np.testing.assert_allclose(sample, np.round(sample), atol=1e-4)
    # Fashion-MNIST is balanced: 6,000 / 1,000 images of each of the 10 classes.
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [6_000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [1_000] * 10)


def test_paper_splits_default_sizes_and_disjoint(fmnist, monkeypatch):
    monkeypatch.setenv("FMD_NO_DOWNLOAD", "1")
    splits = paper_splits("fmnist", seed=0)
    (x_train, y_train), (x_test, y_test) = fmnist
    assert len(splits.x_train) == len(splits.y_train) == len(splits.train_index) == 20_000
    assert len(splits.x_val) == len(splits.y_val) == len(splits.val_index) == 2_000
    assert len(splits.x_cle) == len(splits.y_cle) == len(splits.cle_index) == 5_000
    for index, upper in [
        (splits.train_index, 60_000), (splits.val_index, 10_000), (splits.cle_index, 10_000)
    ]:
        assert np.all(np.diff(index) > 0)  # sorted and without repeats
        assert index.min() >= 0 and index.max() < upper
    # VAL and CLE are disjoint subsets of the official test set ...
    assert np.intersect1d(splits.val_index, splits.cle_index).size == 0
    # ... and TRAIN comes from the official training set only (indices into it, images equal).
    np.testing.assert_array_equal(splits.x_train, x_train[splits.train_index])
    np.testing.assert_array_equal(splits.y_train, y_train[splits.train_index])
    np.testing.assert_array_equal(splits.x_val, x_test[splits.val_index])
    np.testing.assert_array_equal(splits.y_val, y_test[splits.val_index])
    np.testing.assert_array_equal(splits.x_cle, x_test[splits.cle_index])
    np.testing.assert_array_equal(splits.y_cle, y_test[splits.cle_index])
    assert splits.x_val.dtype == np.float32 and splits.y_cle.dtype == np.int64


def test_paper_splits_deterministic_per_seed(cached_fmnist):
    a = paper_splits("fmnist", seed=7)
    b = paper_splits("fmnist", seed=7)
    c = paper_splits("fmnist", seed=8)
    assert cached_fmnist == ["fmnist"] * 3
    for name in ("train_index", "val_index", "cle_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(getattr(a, name), getattr(c, name)), name
    np.testing.assert_array_equal(a.x_cle, b.x_cle)
    # The documented recipe: numpy default_rng(seed), train permutation first, then test.
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(a.train_index, np.sort(rng.permutation(60_000)[:20_000]))
    perm = rng.permutation(10_000)
    np.testing.assert_array_equal(a.val_index, np.sort(perm[:2_000]))
    np.testing.assert_array_equal(a.cle_index, np.sort(perm[2_000:7_000]))


def test_paper_splits_custom_sizes_and_limits(cached_fmnist):
    s = paper_splits("fmnist", seed=0, sizes=SplitConfig(train_size=10, val_size=3, cle_size=4))
    assert (len(s.x_train), len(s.x_val), len(s.x_cle)) == (10, 3, 4)
    assert np.intersect1d(s.val_index, s.cle_index).size == 0
    with pytest.raises(ValueError, match="train_size 60001"):
        paper_splits("fmnist", sizes=SplitConfig(train_size=60_001))
    with pytest.raises(ValueError, match="val_size \\+ cle_size = 10001"):
        paper_splits("fmnist", sizes=SplitConfig(val_size=5_000, cle_size=5_001))
    # VAL + CLE may use the whole test set.
    s = paper_splits("fmnist", sizes=SplitConfig(train_size=1, val_size=4_000, cle_size=6_000))
    np.testing.assert_array_equal(np.union1d(s.val_index, s.cle_index), np.arange(10_000))


# --------------------------------------------------------------------------- source search order


def test_missing_data_error_names_every_place(isolated_sources, tmp_path, monkeypatch):
    empty = tmp_path / "empty-data-dir"
    empty.mkdir()
    monkeypatch.setenv("FMD_DATA_DIR", str(empty))
    with pytest.raises(DataNotAvailableError) as info:
        load_dataset("fmnist")
    message = str(info.value)
    for place in [
        empty,
        empty / "fashion-mnist",
        isolated_sources["debian"],
        isolated_sources["home"] / ".keras" / "datasets" / "fashion-mnist",
    ]:
        assert f"{place} (missing IDX .gz files)" in message, (place, message)
    assert "keras.datasets.fashion_mnist download (disabled by FMD_NO_DOWNLOAD)" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "FMD_DATA_DIR" in message


def test_fmd_data_dir_is_searched_first(tmp_path, monkeypatch):
    # The Debian directory (if installed) stays in place: FMD_DATA_DIR must still win.
    monkeypatch.setenv("FMD_NO_DOWNLOAD", "1")
    arrays = _synthetic_arrays()
    _write_synthetic_set(tmp_path / "mine", arrays)
    monkeypatch.setenv("FMD_DATA_DIR", str(tmp_path / "mine"))
    (x_train, y_train), (x_test, y_test) = load_dataset("fmnist")
    assert x_train.shape == (3, 28, 28, 1) and x_test.shape == (2, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    np.testing.assert_array_equal(x_train[..., 0], arrays["x_train"].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(x_test[..., 0], arrays["x_test"].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])


def test_fmd_data_dir_fashion_mnist_subdirectory(tmp_path, monkeypatch):
    monkeypatch.setenv("FMD_NO_DOWNLOAD", "1")
    arrays = _synthetic_arrays(n_train=4, n_test=1)
    _write_synthetic_set(tmp_path / "root" / "fashion-mnist", arrays)
    monkeypatch.setenv("FMD_DATA_DIR", str(tmp_path / "root"))
    (x_train, y_train), (x_test, _) = load_dataset("fmnist")
    assert x_train.shape == (4, 28, 28, 1) and x_test.shape == (1, 28, 28, 1)
    np.testing.assert_array_equal(y_train, arrays["y_train"])


def test_fmd_data_dir_with_symlinks_to_real_files(isolated_sources, tmp_path, monkeypatch):
    real = REAL_DEBIAN_DIR
    if not all((real / name).is_file() for name in IDX_FILES.values()):
        pytest.skip("Debian Fashion-MNIST files not installed")
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in IDX_FILES.values():
        (linked / name).symlink_to(real / name)
    monkeypatch.setenv("FMD_DATA_DIR", str(linked))
    (x_train, y_train), (x_test, y_test) = load_dataset("fmnist")
    assert x_train.shape == (60_000, 28, 28, 1) and x_test.shape == (10_000, 28, 28, 1)
    assert y_train.shape == (60_000,) and y_test.shape == (10_000,)


def test_keras_cache_is_a_source(isolated_sources):
    arrays = _synthetic_arrays(n_train=2, n_test=3, seed=1)
    _write_synthetic_set(isolated_sources["home"] / ".keras" / "datasets" / "fashion-mnist", arrays)
    (x_train, _), (x_test, y_test) = load_dataset("fmnist")
    assert x_train.shape == (2, 28, 28, 1) and x_test.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(y_test, arrays["y_test"])


def _truncated_gzip(path, payload):
    _write_gz(path, payload)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _truncated_idx(path, payload):
    _write_gz(path, payload[:-100])


def _not_gzip(path, payload):
    path.write_bytes(b"this is not a gzip file")


def _wrong_magic(path, payload):
    _write_gz(path, bytes([0, 0, 13]) + payload[3:])  # 0x0D: float data, not unsigned bytes


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_truncated_gzip, "Compressed file ended before the end-of-stream marker"),
        (_truncated_idx, "{bad} is truncated: expected 2352 values"),
        (_not_gzip, "Not a gzipped file"),
        (_wrong_magic, "{bad} is not an unsigned-byte IDX file"),
    ],
    ids=["truncated-gzip", "truncated-idx", "not-gzip", "wrong-magic"],
)
def test_corrupt_file_gives_clear_error(isolated_sources, tmp_path, monkeypatch, corrupt, reason):
    directory = tmp_path / "corrupt"
    arrays = _synthetic_arrays()
    _write_synthetic_set(directory, arrays)
    bad = directory / IDX_FILES["x_train"]  # 3 images: 3 * 28 * 28 = 2352 values
    corrupt(bad, _idx_bytes(arrays["x_train"]))
    monkeypatch.setenv("FMD_DATA_DIR", str(directory))
    with pytest.raises(DataNotAvailableError) as info:
        load_dataset("fmnist")
    message = str(info.value)
    # The directory is named with the reason; IDX-level errors also name the file.
    assert f"{directory} (unreadable: " in message, message
    assert reason.format(bad=bad) in message, message
    assert "FMD_DATA_DIR" in message


# --------------------------------------------------------------------------- dataset names


def test_unknown_dataset_name():
    with pytest.raises(
        ValueError, match="unknown dataset 'cifar10'; known: celeba, digits, fmnist, mnist"
    ):
        load_dataset("cifar10")


def test_missing_path_is_not_an_unknown_name(tmp_path):
    with pytest.raises(DataNotAvailableError, match="no such file or directory"):
        load_dataset(str(tmp_path / "no" / "such"))
    with pytest.raises(DataNotAvailableError, match="no such file"):
        load_dataset(tmp_path / "missing.npz")


# --------------------------------------------------------------------------- CelebA (fake tree)
# A small tree in the official layout: 178x218 JPEGs named like the real ones, and the real
# identity_CelebA.txt / list_eval_partition.txt formats. Each identity has its own colour in
# the central 178x178 square and green bands above and below it, which the crop must remove.
CELEBA_COUNTS = {2880: 6, 17: 5, 4000: 5, 9: 3, 77: 2, 500: 1}  # identity -> images
GREEN = (0, 255, 0)


def _identity_colour(identity):
    rng = np.random.default_rng(identity)
    return rng.integers(40, 200, 3)


def _fake_celeba(root, layout=("img_align_celeba", "identity_CelebA.txt"), counts=None):
    """Writes the tree under `root`; `counts` {identity: images} (default CELEBA_COUNTS)."""
    import tensorflow as tf

    images, identity_file = root / layout[0], root / layout[1]
    images.mkdir(parents=True)
    identity_file.parent.mkdir(parents=True, exist_ok=True)
    lines, number = [], 0
    for identity, count in (counts or CELEBA_COUNTS).items():
        for _ in range(count):
            number += 1
            name = f"{number:06d}.jpg"
            pixels = np.empty((218, 178, 3), np.uint8)
            pixels[:] = GREEN
            pixels[20:198] = _identity_colour(identity)
            (images / name).write_bytes(tf.io.encode_jpeg(pixels, quality=95).numpy())
            lines.append(f"{name} {identity}")
    identity_file.write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{n:06d}.jpg {n % 3}\n" for n in range(1, number + 1)))
    return lines


def test_celeba_reads_the_official_layout(tmp_path):
    lines = _fake_celeba(tmp_path)
    (x_train, y_train), (x_test, y_test) = data.load_celeba(tmp_path, num_identities=4,
                                                            image_size=16)
    # The 4 identities with most images (ties: lower number), labels by identity number.
    classes = [17, 2880, 4000, 9]
    assert sorted(classes) == [9, 17, 2880, 4000]
    x, y = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
    assert x.shape == (19, 16, 16, 3) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y).tolist() == [3, 5, 6, 5]  # ids 9, 17, 2880, 4000
    assert len(x_test) == round(0.25 * 19) and set(y_test) <= set(y_train)
    for label, identity in enumerate(sorted(classes)):  # the centre, not the green bands
        colour = _identity_colour(identity) / 255.0
        np.testing.assert_allclose(x[y == label].mean(axis=(0, 1, 2)), colour, atol=0.03)
    assert len(lines) == 22  # identities 77 and 500 are left out
    # Same seed, same split.
    again = data.load_celeba(tmp_path, num_identities=4, image_size=16)
    np.testing.assert_array_equal(again[1][1], y_test)


def test_celeba_archive_layout_through_load_dataset(isolated_sources, tmp_path, monkeypatch):
    root = tmp_path / "data" / "celeba"
    _fake_celeba(root, ("Img/img_align_celeba", "Anno/identity_CelebA.txt"))
    monkeypatch.setenv("FMD_DATA_DIR", str(tmp_path / "data"))
    assert data.celeba_root() == root
    with pytest.warns(UserWarning, match="5 identities with 2 or more images"):
        (x_train, y_train), (x_test, _) = load_dataset("celeba")
    assert x_train.shape[1:] == (64, 64, 3) and len(x_train) + len(x_test) == 21
    assert set(y_train) == set(range(5))


def test_celeba_missing_files_say_what_and_where(isolated_sources, tmp_path, monkeypatch):
    monkeypatch.setenv("FMD_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotAvailableError) as e:
        load_dataset("celeba")
    message = str(e.value)
    assert str(tmp_path / "celeba" / "img_align_celeba") in message
    assert str(tmp_path / "celeba" / "identity_CelebA.txt") in message
    assert "mmlab.ie.cuhk.edu.hk/projects/CelebA.html" in message and "FMD_DATA_DIR" in message
    root = tmp_path / "celeba"
    _fake_celeba(root)
    (root / "identity_CelebA.txt").unlink()
    with pytest.raises(DataNotAvailableError, match="identity_CelebA.txt") as e:
        data.load_celeba(root)
    assert "img_align_celeba," not in str(e.value)  # the folder is there


def test_celeba_malformed_identity_file_and_missing_images(tmp_path):
    _fake_celeba(tmp_path)
    identity_file = tmp_path / "identity_CelebA.txt"
    good = identity_file.read_text()
    identity_file.write_text(good + "000099.jpg person\n")
    with pytest.raises(DataFormatError, match=r"line 23: expected"):
        data.load_celeba(tmp_path)
    identity_file.write_text(good)
    (tmp_path / "img_align_celeba" / "000001.jpg").unlink()
    with pytest.raises(DataFormatError, match=r"missing from .* \(1, e\.g\. .*000001\.jpg\)"):
        data.load_celeba(tmp_path, num_identities=4, image_size=16)
    with pytest.raises(ValueError, match="num_identities"):
        data.load_celeba(tmp_path, num_identities=1)


# --------------------------------------------------------------------------- MNIST (IDX files)


def test_mnist_reads_official_idx_files(isolated_sources, tmp_path, monkeypatch):
    arrays = _synthetic_arrays(n_train=5, n_test=4, seed=2)
    _write_synthetic_set(tmp_path / "data" / "mnist", arrays)
    # The official format: gzip, big-endian magic 0x00000803 (images) / 0x00000801 (labels).
    with gzip.open(tmp_path / "data" / "mnist" / IDX_FILES["x_train"]) as f:
        assert f.read(16) == bytes.fromhex("00000803" "00000005" "0000001c" "0000001c")
    with gzip.open(tmp_path / "data" / "mnist" / IDX_FILES["y_test"]) as f:
        assert f.read(8) == bytes.fromhex("00000801" "00000004")
    monkeypatch.setenv("FMD_DATA_DIR", str(tmp_path / "data"))
    (x_train, y_train), (x_test, y_test) = load_dataset("mnist")
    assert x_train.shape == (5, 28, 28, 1) and x_test.shape == (4, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_test.dtype == np.int64
    np.testing.assert_allclose(x_test[..., 0], arrays["x_test"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])


def test_mnist_keras_cache_directory(isolated_sources):
    arrays = _synthetic_arrays(n_train=2, n_test=2, seed=3)
    _write_synthetic_set(isolated_sources["home"] / ".keras" / "datasets" / "mnist", arrays)
    (_, y_train), _ = load_dataset("mnist")
    np.testing.assert_array_equal(y_train, arrays["y_train"])


def test_idx_labels_with_image_magic_are_rejected(isolated_sources, tmp_path, monkeypatch):
    arrays = _synthetic_arrays()
    _write_synthetic_set(tmp_path / "d", arrays)
    bad = tmp_path / "d" / IDX_FILES["y_train"]
    _write_gz(bad, _idx_bytes(arrays["x_train"]))  # a 3-D images file where labels belong
    monkeypatch.setenv("FMD_DATA_DIR", str(tmp_path / "d"))
    with pytest.raises(DataNotAvailableError) as info:
        load_dataset("mnist")
    assert f"{bad} has magic 0x00000803, expected 0x00000801" in str(info.value)


def test_mnist_missing_error_says_where_to_put_and_get_the_files(isolated_sources, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("FMD_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DataNotAvailableError) as info:
        load_dataset("mnist")
    message = str(info.value)
    for name in IDX_FILES.values():
        assert name in message
    home = isolated_sources["home"]
    for place in [tmp_path / "data", tmp_path / "data" / "mnist", home / ".keras/datasets/mnist"]:
        assert f"{place} (missing IDX .gz files)" in message
    assert f"{home / '.keras/datasets/mnist.npz'} (missing)" in message
    assert "$FMD_DATA_DIR/mnist" in message and "yann.lecun.com/exdb/mnist" in message
    assert "dataset-fashion-mnist" not in message


# --------------------------------------------------------------------------- digits (sklearn)


def test_digits_shapes_range_labels_and_split():
    (x_train, y_train), (x_test, y_test) = load_dataset("digits")
    assert x_train.shape == (1_397, 8, 8, 1) and x_test.shape == (400, 8, 8, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64 and y_test.dtype == np.int64
    for x in (x_train, x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0
        np.testing.assert_allclose(x * 16.0, np.round(x * 16.0), atol=1e-5)  # k / 16
    assert x_train.max() == pytest.approx(1.0)
    assert set(np.unique(y_train)) == set(np.unique(y_test)) == set(range(10))
    # Stratified: each class's share of the test set is within one image of proportional.
    counts = np.bincount(y_train, minlength=10) + np.bincount(y_test, minlength=10)
    assert counts.sum() == 1_797
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - counts * 400 / 1_797) < 1.0)


def test_digits_is_deterministic():
    (a, ya), (b, yb) = load_dataset("digits")
    (c, yc), (d, yd) = load_dataset("digits")
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(yb, yd)
    np.testing.assert_array_equal(ya, yc)


def test_digits_paper_splits_with_fitted_sizes():
    (x_train, _), (x_test, _) = load_dataset("digits")
    sizes = fit_split_config(SplitConfig(), len(x_train), len(x_test))
    assert sizes == SplitConfig(train_size=1_397, val_size=200, cle_size=200)
    s = paper_splits("digits", seed=0, sizes=sizes)
    assert s.x_cle.shape == (200, 8, 8, 1) and len(s.y_val) == 200
    assert np.union1d(s.val_index, s.cle_index).size == 400


# --------------------------------------------------------------------------- stratified split


def test_stratified_split_exact_size_proportional_and_seeded():
    y = np.repeat([0, 1, 2], [10, 6, 4])
    train, test = stratified_split(y, 0.25, seed=0)  # 5 test images: quotas 2.5, 1.5, 1.0
    assert len(test) == 5 and len(train) == 15
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(20))
    np.testing.assert_array_equal(np.bincount(y[test]), [3, 1, 1])  # remainder: lower label
    again, test_again = stratified_split(y, 0.25, seed=0)
    np.testing.assert_array_equal(test, test_again)
    assert any(
        not np.array_equal(test, stratified_split(y, 5, seed=s)[1]) for s in range(1, 5)
    )
    with pytest.raises(ValueError, match="does not fit 20 images"):
        stratified_split(y, 21)


# --------------------------------------------------------------------------- user .npz files


def _save_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 5, 4), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_test": rng.integers(0, 256, (3, 5, 4), dtype=np.uint8),
        "y_test": np.array([2, 1, 0], dtype=np.uint8),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_uint8_gets_a_channel_axis_and_is_scaled(tmp_path):
    arrays = _save_npz(tmp_path / "d.npz")
    (x_train, y_train), (x_test, y_test) = load_npz(tmp_path / "d.npz")
    assert x_train.shape == (6, 5, 4, 1) and x_test.shape == (3, 5, 4, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_allclose(x_train[..., 0], arrays["x_train"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y_test, [2, 1, 0])
    # The same through load_dataset and paper_splits, by path.
    (x2, _), _ = load_dataset(str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(x2, x_train)
    s = paper_splits(tmp_path / "d.npz", seed=0, sizes=SplitConfig(4, 1, 2))
    assert s.x_train.shape == (4, 5, 4, 1) and s.x_val.shape == (1, 5, 4, 1)


def test_npz_float_rgb_is_kept(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.random((4, 3, 3, 3)).astype(np.float64)
    x_test = rng.random((2, 3, 3, 3)).astype(np.float32)
    _save_npz(tmp_path / "rgb.npz", x_train=x_train, x_test=x_test,
              y_train=np.array([[0], [1], [1], [0]]), y_test=np.array([1, 0]))
    (xa, ya), (xb, _) = load_npz(tmp_path / "rgb.npz")
    assert xa.shape == (4, 3, 3, 3) and xb.shape == (2, 3, 3, 3) and xa.dtype == np.float32
    np.testing.assert_allclose(xa, x_train, atol=1e-6)
    np.testing.assert_allclose(xb, x_test, atol=1e-7)
    np.testing.assert_array_equal(ya, [0, 1, 1, 0])  # [N, 1] labels are flattened


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"y_train": None, "x_test": None}, DataFormatError,
         "lacks the arrays y_train, x_test (it has: x_train, y_test)"),
        ({"y_train": np.arange(5) % 3}, DataFormatError,
         "x_train has 6 images but y_train 5 labels"),
        ({"x_test": np.full((3, 5, 4), 1.5, np.float32)}, DataFormatError,
         "float x_test has values in [1.5, 1.5], outside [0, 1]"),
        ({"x_train": np.zeros((6, 5, 4, 2), np.uint8)}, DataFormatError,
         "x_train has 2 channels (shape (6, 5, 4, 2)); expected 1 (grayscale) or 3 (RGB)"),
        ({"y_test": np.array([2.0, 1.0, 0.5])}, DataFormatError,
         "y_test has dtype float64; labels must be integers 0..K-1"),
        ({"y_train": np.array([0, 1, -1, 0, 1, 2])}, DataFormatError,
         "y_train has negative labels"),
        ({"x_test": np.zeros((3, 4, 5), np.uint8)}, DataFormatError,
         "train images are (5, 4, 1) but test images (4, 5, 1)"),
        ({"x_train": np.zeros((6, 5, 4), np.int32)}, DataFormatError,
         "x_train has dtype int32; save images as uint8 (0..255) or as floats in [0, 1]"),
        ({"x_train": np.zeros((6, 20), np.uint8)}, DataFormatError,
         "x_train has shape (6, 20); expected images [N, H, W] or [N, H, W, C]"),
        ({"y_train": np.eye(3)[[0, 1, 2, 0, 1, 2]].astype(np.int64)}, DataFormatError,
         "y_train has shape (6, 3); expected integer class labels [N]"),
    ],
    ids=["missing-keys", "length", "float-range", "channels", "float-labels", "negative-labels",
         "train-test-shapes", "int32-images", "not-images", "one-hot"],
)
def test_npz_errors_name_the_problem(tmp_path, overrides, error, message):
    path = tmp_path / "bad.npz"
    _save_npz(path, **overrides)
    with pytest.raises(error) as info:
        load_npz(path)
    assert message in str(info.value), str(info.value)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)  # DataFormatError is a ValueError ...
    assert isinstance(info.value, DataNotAvailableError)  # ... that scripts print cleanly


def test_npz_missing_or_unreadable_file(tmp_path):
    with pytest.raises(DataNotAvailableError, match="no such file; expected a .npz with arrays"):
        load_npz(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(DataNotAvailableError, match="is not a readable .npz file"):
        load_npz(tmp_path / "junk.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataFormatError, match="holds one array, not a .npz archive"):
        load_npz(tmp_path / "one.npy")


# --------------------------------------------------------------------------- image directories


def _write_image(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_class_tree(root, classes, per_class, shape, seed=0, ext=".png"):
    """Unique random uint8 images: {(class name, file stem): array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in classes:
        for i in range(per_class):
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            _write_image(root / name / f"img{i}{ext}", array)
            written[(name, f"img{i}")] = array
    return written


def _label_of(image, written, classes):
    """The sorted-class label of the written image equal to `image` [H, W, C] in [0, 1]."""
    sorted_classes = sorted(classes)
    for (name, _), array in written.items():
        ref = array.reshape(image.shape) / 255.0
        if np.allclose(image, ref, atol=1e-5):
            return sorted_classes.index(name)
    raise AssertionError("image not found among the written ones")


def test_image_directory_rgb_labels_follow_sorted_class_names(tmp_path):
    classes = ["zebra", "apple", "mango"]  # labels: apple 0, mango 1, zebra 2
    written = _write_class_tree(tmp_path / "imgs", classes, 6, (10, 12, 3))
    (x_train, y_train), (x_test, y_test) = load_image_directory(tmp_path / "imgs", seed=0)
    assert x_train.shape == (14, 10, 12, 3) and x_test.shape == (4, 10, 12, 3)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    for x, y in ((x_train, y_train), (x_test, y_test)):
        assert [_label_of(image, written, classes) for image in x] == list(y)
    # Disjoint, all 18 images used, stratified (test quota 4 * 6 / 18 = 1.33 per class).
    flat = np.concatenate([x_train, x_test]).reshape(18, -1)
    assert len(np.unique(np.round(flat * 255), axis=0)) == 18
    np.testing.assert_array_equal(np.bincount(y_test, minlength=3), [2, 1, 1])
    np.testing.assert_array_equal(np.bincount(y_train, minlength=3), [4, 5, 5])
    # Seeded: the same seed gives the same split, through load_dataset too.
    (_, _), (x_again, y_again) = load_dataset(str(tmp_path / "imgs"))
    np.testing.assert_allclose(x_again, x_test, atol=1e-6)
    np.testing.assert_array_equal(y_again, y_test)


def test_image_directory_train_test_folders_and_grayscale(tmp_path):
    root = tmp_path / "gray"
    train = _write_class_tree(root / "train", ["b", "a"], 3, (7, 9), seed=1)
    test = _write_class_tree(root / "test", ["b", "a"], 2, (7, 9), seed=2)
    (x_train, y_train), (x_test, y_test) = load_image_directory(root)
    assert x_train.shape == (6, 7, 9, 1) and x_test.shape == (4, 7, 9, 1)  # grayscale: C = 1
    assert [_label_of(im, train, ["a", "b"]) for im in x_train] == list(y_train)
    assert [_label_of(im, test, ["a", "b"]) for im in x_test] == list(y_test)
    np.testing.assert_array_equal(np.bincount(y_test), [2, 2])


def test_image_directory_jpeg_and_image_size(tmp_path):
    _write_class_tree(tmp_path / "j", ["cat", "dog"], 3, (6, 6, 3), ext=".jpg")
    _write_class_tree(tmp_path / "j", ["cat"], 1, (8, 5, 3), seed=3, ext=".JPEG")
    with pytest.raises(DataFormatError, match="images have different sizes .*pass image_size"):
        load_image_directory(tmp_path / "j")
    (x_train, _), (x_test, _) = load_image_directory(tmp_path / "j", image_size=(4, 5))
    assert x_train.shape[1:] == (4, 5, 3) and len(x_train) + len(x_test) == 7
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0


def test_image_directory_errors(tmp_path):
    with pytest.raises(DataNotAvailableError, match="no such directory"):
        load_image_directory(tmp_path / "none")
    _write_class_tree(tmp_path / "one", ["only"], 2, (4, 4))
    with pytest.raises(DataFormatError, match="1 class folder.*needs at least 2"):
        load_image_directory(tmp_path / "one")
    _write_class_tree(tmp_path / "empty", ["a"], 2, (4, 4))
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(DataFormatError, match="b has no images"):
        load_image_directory(tmp_path / "empty")
    _write_class_tree(tmp_path / "tt" / "train", ["a", "b"], 2, (4, 4))
    _write_class_tree(tmp_path / "tt" / "test", ["a", "c"], 1, (4, 4))
    with pytest.raises(DataFormatError, match="need the same class folders"):
        load_image_directory(tmp_path / "tt")


# --------------------------------------------------------------------------- generic splits


def _fake_dataset(n_train, n_test):
    x_train = np.arange(n_train, dtype=np.float32).reshape(n_train, 1, 1, 1)
    x_test = -np.arange(n_test, dtype=np.float32).reshape(n_test, 1, 1, 1)
    return (x_train, np.arange(n_train) % 10), (x_test, np.arange(n_test) % 10)


def _digest(index):
    return hashlib.sha256(np.asarray(index, np.int64).tobytes()).hexdigest()[:16]


def test_make_splits_keeps_the_shipped_fmnist_indices():
    # Pinned before make_splits existed: the shipped models' VAL / CLE images (seed 0).
    s = make_splits(*_fake_dataset(60_000, 10_000), SplitConfig(), seed=0)
    assert _digest(s.train_index) == "6d92d0c2562de650"
    assert _digest(s.val_index) == "9b7badfc93ebd114"
    assert _digest(s.cle_index) == "e3ba170878b1725c"


def test_make_splits_disjoint_and_from_the_right_sets():
    train, test = _fake_dataset(50, 30)
    s = make_splits(train, test, SplitConfig(train_size=20, val_size=10, cle_size=15), seed=3)
    assert (len(s.x_train), len(s.x_val), len(s.x_cle)) == (20, 10, 15)
    assert np.intersect1d(s.val_index, s.cle_index).size == 0
    np.testing.assert_array_equal(s.x_train[:, 0, 0, 0], s.train_index)  # training images
    np.testing.assert_array_equal(-s.x_val[:, 0, 0, 0], s.val_index)  # test images
    np.testing.assert_array_equal(-s.x_cle[:, 0, 0, 0], s.cle_index)
    np.testing.assert_array_equal(s.y_cle, s.cle_index % 10)
    with pytest.raises(ValueError, match="train_size 51 > 50 training images.*fit_split_config"):
        make_splits(train, test, SplitConfig(51, 1, 1))
    with pytest.raises(ValueError, match="val_size \\+ cle_size = 31 > 30 test images"):
        make_splits(train, test, SplitConfig(1, 16, 15))


@pytest.mark.parametrize(
    "sizes, n_train, n_test, expected",
    [
        (SplitConfig(), 60_000, 10_000, SplitConfig()),
        (SplitConfig(), 1_397, 400, SplitConfig(1_397, 200, 200)),
        (SplitConfig(512, 128, 128), 1_000, 200, SplitConfig(512, 100, 100)),
        (SplitConfig(512, 50, 500), 100, 300, SplitConfig(100, 50, 250)),
        (SplitConfig(512, 128, 128), 1_000, 256, SplitConfig(512, 128, 128)),
        (SplitConfig(10, 8, 1), 5, 7, SplitConfig(5, 3, 1)),
    ],
)
def test_fit_split_config(sizes, n_train, n_test, expected):
    assert fit_split_config(sizes, n_train, n_test) == expected


def test_fit_split_config_rule_holds_everywhere():
    for n_train in (0, 1, 7, 30_000):
        for n_test in (0, 1, 2, 3, 9, 400, 10_000):
            fitted = fit_split_config(SplitConfig(), n_train, n_test)
            assert fitted.train_size <= n_train
            assert fitted.val_size + fitted.cle_size <= n_test
            assert fitted.val_size <= max(n_test // 2, 0)
            make_splits(*_fake_dataset(n_train, n_test), fitted)  # fits, does not raise
    paper = SplitConfig()
    assert fit_split_config(paper, 60_000, 10_000) is paper  # fits: returned unchanged
    with pytest.raises(ValueError, match="must be >= 0"):
        fit_split_config(SplitConfig(), -1, 10)


# --------------------------------------------------------------------------- scripts/get_data.sh


@pytest.fixture
def get_data_env(tmp_path):
    """Fakes for scripts/get_data.sh: apt-get and python log their calls; no real source."""
    log = tmp_path / "calls.log"
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for name in ("apt-get", "python"):
        script = fakes / name
        script.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $* DEBIAN_FRONTEND=${{DEBIAN_FRONTEND:-}}" >> "{log}"\n'
            f'[ -n "${{FAKE_{name.upper().replace("-", "_")}_DO:-}}" ] && '
            f'eval "${{FAKE_{name.upper().replace("-", "_")}_DO}}"\n'
            f'exit "${{FAKE_{name.upper().replace("-", "_")}_RC:-1}}"\n'
        )
        script.chmod(0o755)
    (tmp_path / "home").mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "home"),
        "FMD_DEBIAN_DIR": str(tmp_path / "debian"),
        "APT_GET": str(fakes / "apt-get"),
        "PYTHON": str(fakes / "python"),
    }
    return {"env": env, "log": log, "tmp": tmp_path}


def _get_data(env):
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "get_data.sh")], env=env, capture_output=True,
        text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def _calls(log):
    return log.read_text().splitlines() if log.exists() else []


def test_get_data_nothing_to_do_when_fmd_data_dir_has_the_files(get_data_env):
    env = dict(get_data_env["env"])
    _write_synthetic_set(get_data_env["tmp"] / "mine" / "fashion-mnist", _synthetic_arrays())
    env["FMD_DATA_DIR"] = str(get_data_env["tmp"] / "mine")
    proc = _get_data(env)
    assert proc.returncode == 0, proc.stderr
    assert "found in " + str(get_data_env["tmp"] / "mine" / "fashion-mnist") in proc.stdout
    assert _calls(get_data_env["log"]) == []


def test_get_data_nothing_to_do_when_the_debian_dir_is_there(get_data_env):
    _write_synthetic_set(get_data_env["tmp"] / "debian", _synthetic_arrays())
    proc = _get_data(get_data_env["env"])
    assert proc.returncode == 0 and "found in" in proc.stdout
    assert _calls(get_data_env["log"]) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the apt-get path runs as root only")
def test_get_data_installs_the_debian_package_as_root(get_data_env):
    env = dict(get_data_env["env"])
    # The fake apt-get fails once (stale lists), then "installs" after `apt-get update`.
    marker = get_data_env["tmp"] / "updated"
    src = get_data_env["tmp"] / "pkg"
    _write_synthetic_set(src, _synthetic_arrays())
    env["FAKE_APT_GET_DO"] = (
        f'case "$1" in update) touch {marker}; exit 0;; install) [ -e {marker} ] || exit 100; '
        f'cp -r {src} {env["FMD_DEBIAN_DIR"]}; exit 0;; esac'
    )
    proc = _get_data(env)
    assert proc.returncode == 0, proc.stderr
    assert "found in " + env["FMD_DEBIAN_DIR"] in proc.stdout
    assert _calls(get_data_env["log"]) == [
        "apt-get install -y -q dataset-fashion-mnist DEBIAN_FRONTEND=noninteractive",
        "apt-get update -q DEBIAN_FRONTEND=noninteractive",
        "apt-get install -y -q dataset-fashion-mnist DEBIAN_FRONTEND=noninteractive",
    ]


def test_get_data_falls_back_to_the_keras_download(get_data_env):
    env = dict(get_data_env["env"], APT_GET=str(get_data_env["tmp"] / "no-apt-get"))
    env["FAKE_PYTHON_RC"] = "0"
    proc = _get_data(env)
    assert proc.returncode == 0, proc.stderr
    assert "loaded by fmd_tf" in proc.stdout
    assert _calls(get_data_env["log"]) == ["python - DEBIAN_FRONTEND="]


def test_get_data_fails_with_what_to_do(get_data_env):
    proc = _get_data(get_data_env["env"])  # apt-get and the download both fail
    assert proc.returncode == 1
    for text in ["apt-get install dataset-fashion-mnist", "FMD_DATA_DIR", *IDX_FILES.values(),
                 "load_dataset('fmnist')"]:
        assert text in proc.stderr, (text, proc.stderr)
    calls = _calls(get_data_env["log"])
    assert calls[-1].startswith("python - ")
    if os.geteuid() == 0:
        assert [c.split(" DEBIAN")[0] for c in calls[:-1]] == [
            "apt-get install -y -q dataset-fashion-mnist", "apt-get update -q",
        ]  # the update failed too (the fake exits 1), so no second install


def test_make_demo_gets_the_data_first():
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    proc = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    fetch = next(i for i, line in enumerate(lines) if "scripts/get_data.sh" in line)
    demo = next(i for i, line in enumerate(lines) if "scripts/demo.py" in line)
    assert fetch < demo
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/get_data.sh" in ci and ci.index("get_data.sh") < ci.index("make test")

"""Tests for fmd_tf.data: Fashion-MNIST loading, search order, errors and the paper's splits."""

import gzip

import numpy as np
import pytest

from fmd_tf import data
from fmd_tf.config import SplitConfig
from fmd_tf.data import DataNotAvailableError, load_dataset, paper_splits

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
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'; known: celeba, fmnist, mnist"):
        load_dataset("cifar10")


def test_celeba_is_not_available():
    with pytest.raises(DataNotAvailableError, match="celeba"):
        load_dataset("celeba")

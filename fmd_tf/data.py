"""Datasets and the paper's disjoint splits.

`load_dataset(name)` returns ``((x_train, y_train), (x_test, y_test))`` with images float32
``[N, 28, 28, 1]`` in [0, 1] and labels int64 ``[N]``.

Fashion-MNIST sources, in search order:

1. ``$FMD_DATA_DIR`` (the four IDX ``.gz`` files, directly or in ``$FMD_DATA_DIR/fashion-mnist``);
2. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
3. the Keras cache ``~/.keras/datasets/fashion-mnist``;
4. a ``keras.datasets.fashion_mnist`` download (skipped when ``FMD_NO_DOWNLOAD=1``).

`paper_splits(name, seed)` (§IV-A of the paper): TRAIN is `train_size` (20,000) images of the
official training set (for the combo-VAE); VAL (2,000, threshold calibration) and CLE (5,000,
clean test images) are disjoint subsets of the official *test* set, which the classifier never
trains on.
The permutation is ``numpy.random.default_rng(seed)``; the same seed always gives the same sets.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmd_tf.config import SplitConfig

__all__ = ["DataNotAvailableError", "Splits", "load_dataset", "paper_splits", "DATASETS"]

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataNotAvailableError(RuntimeError):
    """No source of the dataset could be read; the message names every place looked at."""


@dataclass(frozen=True)
class Splits:
    """The paper's disjoint sets; every `x_*` is float32 [N,28,28,1] in [0,1], `y_*` int64 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_cle: np.ndarray
    y_cle: np.ndarray
    train_index: np.ndarray  # indices into the official training set
    val_index: np.ndarray  # indices into the official test set
    cle_index: np.ndarray  # indices into the official test set


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataNotAvailableError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise DataNotAvailableError(f"{path} is truncated: expected {count} values")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_dir_candidates(name: str) -> list[Path]:
    out = []
    env = os.environ.get("FMD_DATA_DIR")
    if env:
        out += [Path(env), Path(env) / name]
    if name == "fashion-mnist":
        out.append(DEBIAN_FMNIST_DIR)
    out.append(Path.home() / ".keras" / "datasets" / name)
    return out


def _normalise(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = (x.astype(np.float32) / 255.0)[..., None]
    return x, y.astype(np.int64)


def _load_idx_dataset(name: str, keras_loader: str):
    looked = []
    for d in _idx_dir_candidates(name):
        files = {k: d / v for k, v in _IDX_FILES.items()}
        if all(p.is_file() for p in files.values()):
            try:
                arrays = {k: _read_idx(p) for k, p in files.items()}
            except (OSError, EOFError, DataNotAvailableError) as e:
                looked.append(f"{d} (unreadable: {e})")
                continue
            if any(len(arrays["x" + s]) != len(arrays["y" + s]) for s in ("_train", "_test")):
                looked.append(f"{d} (image and label counts differ)")
                continue
            return (
                _normalise(arrays["x_train"], arrays["y_train"]),
                _normalise(arrays["x_test"], arrays["y_test"]),
            )
        looked.append(f"{d} (missing IDX .gz files)")
    if name == "mnist":
        npz = Path.home() / ".keras" / "datasets" / "mnist.npz"
        if npz.is_file():
            with np.load(npz) as f:
                return _normalise(f["x_train"], f["y_train"]), _normalise(f["x_test"], f["y_test"])
        looked.append(f"{npz} (missing)")
    if os.environ.get("FMD_NO_DOWNLOAD", "") not in ("", "0"):
        looked.append(f"keras.datasets.{keras_loader} download (disabled by FMD_NO_DOWNLOAD)")
    else:
        try:
            import keras

            (xtr, ytr), (xte, yte) = getattr(keras.datasets, keras_loader).load_data()
            return _normalise(xtr, ytr), _normalise(xte, yte)
        except Exception as e:  # network errors come in many types
            looked.append(f"keras.datasets.{keras_loader} download (failed: {type(e).__name__})")
    fixes = (
        "Fix: `sudo apt-get install dataset-fashion-mnist` (Debian), or put the four IDX .gz files "
        "(train-images-idx3-ubyte.gz, ...) in a directory and set FMD_DATA_DIR to it."
    )
    raise DataNotAvailableError(
        f"dataset {name!r} not found. Looked in:\n  - " + "\n  - ".join(looked) + "\n" + fixes
    )


def _load_fmnist():
    return _load_idx_dataset("fashion-mnist", "fashion_mnist")


def _load_mnist():
    return _load_idx_dataset("mnist", "mnist")


def _load_celeba():
    raise DataNotAvailableError(
        "dataset 'celeba' is not available in this release: CelebA (identity classification, "
        "paper §IV) needs the aligned images and identity labels, which cannot be downloaded "
        "automatically. Place them under $FMD_DATA_DIR/celeba; support is planned."
    )


DATASETS = {"fmnist": _load_fmnist, "mnist": _load_mnist, "celeba": _load_celeba}


def load_dataset(name: str):
    """((x_train, y_train), (x_test, y_test)); images float32 [N,28,28,1] in [0,1], labels int64."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]()


def paper_splits(name: str, seed: int = 0, sizes: SplitConfig | None = None) -> Splits:
    """The paper's disjoint TRAIN / VAL / CLE sets (see the module docstring)."""
    sizes = sizes or SplitConfig()
    (x_train, y_train), (x_test, y_test) = load_dataset(name)
    if sizes.train_size > len(x_train):
        raise ValueError(f"train_size {sizes.train_size} > {len(x_train)} training images")
    if sizes.val_size + sizes.cle_size > len(x_test):
        raise ValueError(
            f"val_size + cle_size = {sizes.val_size + sizes.cle_size} > {len(x_test)} test images"
        )
    rng = np.random.default_rng(seed)
    train_index = np.sort(rng.permutation(len(x_train))[: sizes.train_size])
    test_perm = rng.permutation(len(x_test))
    val_index = np.sort(test_perm[: sizes.val_size])
    cle_index = np.sort(test_perm[sizes.val_size : sizes.val_size + sizes.cle_size])
    return Splits(
        x_train=x_train[train_index], y_train=y_train[train_index],
        x_val=x_test[val_index], y_val=y_test[val_index],
        x_cle=x_test[cle_index], y_cle=y_test[cle_index],
        train_index=train_index, val_index=val_index, cle_index=cle_index,
    )

"""Datasets and the paper's disjoint splits.

`load_dataset(source)` returns ``((x_train, y_train), (x_test, y_test))`` with images float32
``[N, H, W, C]`` in [0, 1] (C = 1 grayscale or 3 RGB) and labels int64 ``[N]`` in 0..K-1.
`source` is a name in `DATASETS` or a path:

- ``"fmnist"`` / ``"mnist"``: [N, 28, 28, 1], read from the official IDX ``.gz`` files;
- ``"digits"``: scikit-learn's bundled 8x8 digits, [N, 8, 8, 1] (see `_load_digits`);
- ``"celeba"``: identity classification on the user's CelebA copy, [N, 64, 64, 3] (see
  `load_celeba`; the official files in ``$FMD_DATA_DIR/celeba``);
- a ``.npz`` file with arrays x_train, y_train, x_test, y_test (`load_npz`);
- a directory of images, one sub-folder per class (`load_image_directory`).

IDX sources of Fashion-MNIST (MNIST: the same with ``mnist`` for ``fashion-mnist``, no Debian
directory, then ``~/.keras/datasets/mnist.npz``), in search order:

1. ``$FMD_DATA_DIR`` (the four IDX ``.gz`` files, directly or in ``$FMD_DATA_DIR/fashion-mnist``);
2. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
3. the Keras cache ``~/.keras/datasets/fashion-mnist``;
4. a ``keras.datasets.fashion_mnist`` download (skipped when ``FMD_NO_DOWNLOAD=1``).

`paper_splits(source, seed)` (§IV-A of the paper): TRAIN is `train_size` (20,000) images of the
official training set (for the combo-VAE); VAL (2,000, threshold calibration) and CLE (5,000,
clean test images) are disjoint subsets of the official *test* set, which the classifier never
trains on. `make_splits` draws them from any ((x, y) train, (x, y) test) pair and
`fit_split_config` shrinks the sizes for a small dataset.
The permutation is ``numpy.random.default_rng(seed)``; the same seed always gives the same sets.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmd_tf.config import SplitConfig

__all__ = [
    "DATASETS",
    "DataFormatError",
    "DataNotAvailableError",
    "Splits",
    "celeba_root",
    "fit_split_config",
    "load_celeba",
    "load_dataset",
    "load_image_directory",
    "load_npz",
    "make_splits",
    "paper_splits",
    "read_celeba_identities",
    "stratified_split",
]

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
_IDX_NDIM = {"x_train": 3, "y_train": 1, "x_test": 3, "y_test": 1}  # magic 0x0803 / 0x0801
# Where each IDX dataset's four files come from (named in the missing-data error).
_IDX_HOMES = {
    "fashion-mnist": "the Fashion-MNIST repository, github.com/zalandoresearch/fashion-mnist",
    "mnist": "the MNIST database page, yann.lecun.com/exdb/mnist",
}
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# The extensions keras.utils.image_dataset_from_directory reads (compared lower-cased).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})  # PIL modes
DIGITS_TEST_SIZE = 400  # digits: images held out as the official-like test set
DIGITS_SPLIT_SEED = 0
DIRECTORY_TEST_FRACTION = 0.2  # image directory without train/ and test/: 80/20 split


class DataNotAvailableError(RuntimeError):
    """No source of the dataset could be read; the message names every place looked at."""


class DataFormatError(DataNotAvailableError, ValueError):
    """The data were found but are malformed; the message names the problem and the fix.

    Both a ValueError and a DataNotAvailableError, so `fmd_tf.cli` prints it without a traceback.
    """


@dataclass(frozen=True)
class Splits:
    """The paper's disjoint sets; every `x_*` is float32 [N,H,W,C] in [0,1], `y_*` int64 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_cle: np.ndarray
    y_cle: np.ndarray
    train_index: np.ndarray  # indices into the official training set
    val_index: np.ndarray  # indices into the official test set
    cle_index: np.ndarray  # indices into the official test set


# --------------------------------------------------------------------------- IDX files


def _read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """An unsigned-byte IDX file (gzip): uint8 array of the header's shape; `ndim` is checked."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataNotAvailableError(f"{path} is not an unsigned-byte IDX file")
    if ndim is not None and data[3] != ndim:
        raise DataNotAvailableError(
            f"{path} has magic 0x0000080{data[3]:x}, expected 0x0000080{ndim:x} "
            f"({ndim}-D {'images' if ndim == 3 else 'labels'})"
        )
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


def unit_float(x: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 in [0, 1], x / 255 in float32, in one pass (`x.astype(float32) /
    255` gives the same values through a second float32 array of that size: 188 MB more for
    the 60,000 Fashion-MNIST training images)."""
    return np.divide(x, np.float32(255.0), dtype=np.float32)


def _normalise(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N,H,W] 0..255 -> float32 [N,H,W,1] in [0,1]; labels -> int64 [N]."""
    return unit_float(x)[..., None], y.astype(np.int64)


def _idx_fix(name: str) -> str:
    """What to do when an IDX dataset is missing: where to put the files, where to get them."""
    files = ", ".join(_IDX_FILES.values())
    where = f"$FMD_DATA_DIR, $FMD_DATA_DIR/{name} or ~/.keras/datasets/{name}"
    fix = f"Fix: put the four official IDX files ({files}; from {_IDX_HOMES[name]}) in {where}"
    if name == "fashion-mnist":
        return "Fix: `sudo apt-get install dataset-fashion-mnist` (Debian), or " + fix[5:] + "."
    return fix + ", or allow the keras.datasets download (unset FMD_NO_DOWNLOAD)."


def _load_idx_dataset(name: str, keras_loader: str):
    looked = []
    for d in _idx_dir_candidates(name):
        files = {k: d / v for k, v in _IDX_FILES.items()}
        if all(p.is_file() for p in files.values()):
            try:
                arrays = {k: _read_idx(p, _IDX_NDIM[k]) for k, p in files.items()}
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
    raise DataNotAvailableError(
        f"dataset {name!r} not found. Looked in:\n  - " + "\n  - ".join(looked) + "\n"
        + _idx_fix(name)
    )


def _load_fmnist():
    return _load_idx_dataset("fashion-mnist", "fashion_mnist")


def _load_mnist():
    return _load_idx_dataset("mnist", "mnist")


def _load_celeba():
    return load_celeba()


# --------------------------------------------------------------------------- CelebA

CELEBA_IDENTITIES = 1000  # K: the most frequent identities, ~31,000 images (20,000 TRAIN +
CELEBA_TEST_FRACTION = 0.25  # ~7,800 test images for the paper's 2,000 VAL + 5,000 CLE)
CELEBA_IMAGE_SIZE = 64  # side of the square images (the paper's 64x64)
_CELEBA_IMAGES = "img_align_celeba"
_CELEBA_IDENTITY_FILE = "identity_CelebA.txt"
# Where the official files are, in the flat layout or the official archive's folders.
_CELEBA_LAYOUTS = ((_CELEBA_IMAGES, _CELEBA_IDENTITY_FILE),
                   (f"Img/{_CELEBA_IMAGES}", f"Anno/{_CELEBA_IDENTITY_FILE}"))
_CELEBA_HOME = ("the CelebA page, mmlab.ie.cuhk.edu.hk/projects/CelebA.html (\"Align&Cropped "
                "Images\": img_align_celeba.zip, unzipped; Anno/identity_CelebA.txt)")


def celeba_root() -> Path:
    """Where `load_dataset("celeba")` looks: $FMD_DATA_DIR/celeba, else ~/.keras/datasets/celeba."""
    env = os.environ.get("FMD_DATA_DIR")
    return Path(env) / "celeba" if env else Path.home() / ".keras" / "datasets" / "celeba"


def _celeba_files(root: Path) -> tuple[Path, Path]:
    """(image folder, identity file) of a CelebA copy in either layout of `_CELEBA_LAYOUTS`;
    DataNotAvailableError naming each missing file and where to get it."""
    for images, identities in _CELEBA_LAYOUTS:
        if (root / images).is_dir() and (root / identities).is_file():
            return root / images, root / identities
    tests = (Path.is_dir, Path.is_file)  # the image folder, the identity file
    missing = [str(root / _CELEBA_LAYOUTS[0][k]) for k in range(2)
               if not any(tests[k](root / layout[k]) for layout in _CELEBA_LAYOUTS)]
    raise DataNotAvailableError(
        f"dataset 'celeba' not found: missing "
        f"{', '.join(missing) or 'the image folder and the identity file in one layout'} (also "
        f"looked for Img/{_CELEBA_IMAGES}/ and Anno/{_CELEBA_IDENTITY_FILE} under {root}).\n"
        f"Fix: get {_CELEBA_IMAGES}/ and {_CELEBA_IDENTITY_FILE} from {_CELEBA_HOME} and put "
        "them in $FMD_DATA_DIR/celeba (or ~/.keras/datasets/celeba); they cannot be "
        "downloaded automatically."
    )


def read_celeba_identities(path) -> tuple[list[str], np.ndarray]:
    """(image file names, int64 identity of each) of an identity_CelebA.txt: one line per image,
    ``000001.jpg 2880``. DataFormatError naming the first malformed line."""
    names, ids = [], []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit():
                raise DataFormatError(f"{path}, line {number}: expected '<image file> "
                                      f"<identity number>', got {line.strip()!r}")
            names.append(fields[0])
            ids.append(int(fields[1]))
    if not names:
        raise DataFormatError(f"{path} lists no images")
    return names, np.asarray(ids, np.int64)


def _read_face_images(paths: list[Path], size: int) -> np.ndarray:
    """JPEG/PNG files -> float32 [N, size, size, 3] in [0, 1]: the central square of each image
    (side min(H, W)), resized with antialiasing (tf.data, files read in parallel)."""
    import tensorflow as tf

    def read(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        side = tf.minimum(h, w)
        image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side,
                                              side)
        image = tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)
        return tf.clip_by_value(image / 255.0, 0.0, 1.0)

    dataset = tf.data.Dataset.from_tensor_slices([str(p) for p in paths]).map(
        read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(512)
    return np.concatenate([batch.numpy() for batch in dataset]).astype(np.float32)


def load_celeba(root=None, num_identities: int = CELEBA_IDENTITIES,
                image_size: int = CELEBA_IMAGE_SIZE, seed: int = 0):
    """CelebA identity classification from the user's copy: ((x_train, y_train), (x_test, y_test)).

    `root` (default `celeba_root()`) holds the official ``img_align_celeba/`` (178x218 JPEGs)
    and ``identity_CelebA.txt``, flat or as the archive's ``Img/`` and ``Anno/`` folders. The
    `num_identities` identities with the most images (ties: lower identity number) are the
    classes, label k the k-th of them by identity number; when the copy has fewer identities
    with two or more images, all of those (a warning says so). Images: the central 178x178
    square resized to `image_size` (float32 [N, S, S, 3] in [0, 1]). Each identity's images are
    split `stratified_split(y, CELEBA_TEST_FRACTION, seed)`: the official partition file
    (list_eval_partition.txt) is not used, because it puts each identity in one part only
    (attribute-prediction protocol), so an identity classifier could not be tested on it.

    Raises DataNotAvailableError naming the missing files and where to get them, and
    DataFormatError for a malformed identity file or listed images that are missing.
    """
    import warnings

    root = Path(root).expanduser() if root is not None else celeba_root()
    if num_identities < 2 or image_size < 8:
        raise ValueError(f"num_identities must be >= 2 and image_size >= 8, got "
                         f"{num_identities}, {image_size}")
    images, identity_file = _celeba_files(root)
    names, ids = read_celeba_identities(identity_file)
    values, counts = np.unique(ids, return_counts=True)
    order = np.lexsort((values, -counts))  # most images first, then lower identity number
    chosen = values[order][counts[order] >= 2][:num_identities]
    if len(chosen) < 2:
        raise DataFormatError(f"{identity_file}: fewer than 2 identities with 2 or more images")
    if len(chosen) < num_identities:
        warnings.warn(f"CelebA: {len(chosen)} identities with 2 or more images in "
                      f"{identity_file}, fewer than the {num_identities} asked for; using "
                      "them all", stacklevel=2)
    classes = np.sort(np.asarray(chosen, np.int64))
    keep = np.flatnonzero(np.isin(ids, classes))
    paths = [images / names[i] for i in keep]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise DataFormatError(f"images listed in {identity_file} are missing from {images} "
                              f"({len(absent)}, e.g. {', '.join(absent[:3])}); unzip the whole "
                              f"img_align_celeba.zip there")
    x = _read_face_images(paths, int(image_size))
    y = np.searchsorted(classes, ids[keep]).astype(np.int64)
    train_index, test_index = stratified_split(y, CELEBA_TEST_FRACTION, seed)
    return (x[train_index], y[train_index]), (x[test_index], y[test_index])


# --------------------------------------------------------------------------- stratified split


def stratified_split(y: np.ndarray, test_size: int | float, seed: int = 0):
    """Seeded stratified split of labels y [N]: (train_index, test_index), sorted int64 arrays.

    `test_size` is a count or, as a float in (0, 1), a fraction of N (rounded). Each class gets
    its proportional share of the test set, ``count_c * n_test / N``, rounded down; the images
    left over go to the classes with the largest fractional parts (ties: lower label first),
    so the test set has exactly n_test images. Which images of a class are held out comes from
    ``numpy.random.default_rng(seed).permutation``, class by class in label order.
    """
    y = np.asarray(y)
    n = len(y)
    n_test = round(test_size * n) if isinstance(test_size, float) else int(test_size)
    if not 0 <= n_test <= n:
        raise ValueError(f"test_size {test_size} does not fit {n} images")
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n_test / max(n, 1)
    share = np.floor(quota).astype(np.int64)
    order = np.lexsort((np.arange(len(classes)), -(quota - share)))
    share[order[: n_test - int(share.sum())]] += 1
    rng = np.random.default_rng(seed)
    test = [
        rng.permutation(np.flatnonzero(y == c))[:k]
        for c, k in zip(classes, share, strict=True)
    ]
    test_index = np.sort(np.concatenate(test + [np.zeros(0, np.int64)])).astype(np.int64)
    train_index = np.setdiff1d(np.arange(n, dtype=np.int64), test_index)
    return train_index, test_index


def _load_digits():
    """scikit-learn's bundled 8x8 digits (1,797 real images of 0..9, no download).

    Pixels 0..16 are divided by 16: float32 [N, 8, 8, 1] in [0, 1]. The official-like test set
    is `DIGITS_TEST_SIZE` (400) images held out by `stratified_split(y, 400, seed=0)`; the
    other 1,397 are the training set. The split never changes.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataNotAvailableError(
            "dataset 'digits' needs scikit-learn: `pip install scikit-learn`"
        ) from e
    bunch = load_digits()
    x = (np.asarray(bunch.images, np.float32) / 16.0)[..., None]
    y = np.asarray(bunch.target, np.int64)
    train_index, test_index = stratified_split(y, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
    return (x[train_index], y[train_index]), (x[test_index], y[test_index])


# --------------------------------------------------------------------------- user .npz


def _npz_images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """[N,H,W] or [N,H,W,C] (C 1 or 3), uint8 0..255 or float in [0,1] -> float32 [N,H,W,C]."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataFormatError(
            f"{path}: {key} has shape {x.shape}; expected images [N, H, W] or [N, H, W, C]"
        )
    if x.shape[-1] not in (1, 3):
        raise DataFormatError(
            f"{path}: {key} has {x.shape[-1]} channels (shape {x.shape}); expected 1 (grayscale) "
            "or 3 (RGB) in the last axis (channels-last; drop an alpha channel)"
        )
    if len(x) == 0:
        raise DataFormatError(f"{path}: {key} has no images")
    if x.dtype == np.uint8:
        return unit_float(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataFormatError(
            f"{path}: {key} has dtype {x.dtype}; save images as uint8 (0..255) or as floats "
            "in [0, 1]"
        )
    low, high = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
        raise DataFormatError(
            f"{path}: float {key} has values in [{low:g}, {high:g}], outside [0, 1]; scale them "
            "to [0, 1] (e.g. divide 0..255 pixels by 255) or save them as uint8"
        )
    return x.astype(np.float32)


def _npz_labels(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Integer labels [N] (or [N, 1]) in 0..K-1 -> int64 [N]."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataFormatError(
            f"{path}: {key} has shape {y.shape}; expected integer class labels [N] "
            "(one-hot labels: save y.argmax(axis=1))"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise DataFormatError(
            f"{path}: {key} has dtype {y.dtype}; labels must be integers 0..K-1 "
            "(e.g. y.astype(np.int64))"
        )
    if len(y) and y.min() < 0:
        raise DataFormatError(f"{path}: {key} has negative labels; labels must be 0..K-1")
    return y.astype(np.int64)


def load_npz(path):
    """A user dataset in one ``.npz`` file: ((x_train, y_train), (x_test, y_test)).

    The file holds arrays ``x_train, y_train, x_test, y_test`` (``numpy.savez``). Images are
    [N, H, W] (a channel axis is added) or [N, H, W, C] with C in {1, 3}, uint8 0..255 (divided
    by 255) or float in [0, 1]; labels integer 0..K-1, [N]. Returns images float32
    [N, H, W, C] in [0, 1] and labels int64 [N]. Raises DataNotAvailableError when the file is
    missing or unreadable and DataFormatError (a ValueError) naming the problem otherwise.
    """
    path = Path(path).expanduser()
    keys = ", ".join(NPZ_KEYS)
    if not path.is_file():
        raise DataNotAvailableError(
            f"{path}: no such file; expected a .npz with arrays {keys} "
            "(numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...))"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataNotAvailableError(f"{path} is not a readable .npz file: {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataFormatError(
            f"{path} holds one array, not a .npz archive; save the dataset with "
            f"numpy.savez(path, {', '.join(f'{k}=...' for k in NPZ_KEYS)})"
        )
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise DataFormatError(
                f"{path} lacks the arrays {', '.join(missing)} (it has: "
                f"{', '.join(archive.files) or 'none'}); a dataset .npz needs {keys}"
            )
        try:
            arrays = {k: archive[k] for k in NPZ_KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataFormatError(f"{path}: cannot read its arrays: {e}") from e
    out = []
    for split in ("train", "test"):
        x = _npz_images(arrays[f"x_{split}"], f"x_{split}", path)
        y = _npz_labels(arrays[f"y_{split}"], f"y_{split}", path)
        if len(x) != len(y):
            raise DataFormatError(
                f"{path}: x_{split} has {len(x)} images but y_{split} {len(y)} labels; "
                "they must be the same length"
            )
        out.append((x, y))
    if out[0][0].shape[1:] != out[1][0].shape[1:]:
        raise DataFormatError(
            f"{path}: train images are {out[0][0].shape[1:]} but test images "
            f"{out[1][0].shape[1:]} ([H, W, C]); both sets need the same image shape"
        )
    return tuple(out)


# --------------------------------------------------------------------------- image directory


def _class_folders(directory: Path) -> list[str]:
    """Sub-folder names, sorted, without hidden ones (as Keras infers the classes)."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """The image files Keras reads in a class folder (recursive, extension checked lower-case)."""
    out = []
    for root, _, files in sorted(os.walk(folder), key=lambda t: t[0]):
        out += [Path(root) / f for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def _probe_images(directories: list[Path]) -> tuple[list[str], dict[tuple[int, int], Path], bool]:
    """(class names, {(height, width): an example file}, all grayscale) of class trees.

    Every tree must have the same >= 2 class folders, none of them empty.
    """
    from PIL import Image  # Pillow comes with matplotlib and keras.utils.load_img

    classes = None
    sizes: dict[tuple[int, int], Path] = {}
    gray = True
    for directory in directories:
        names = _class_folders(directory)
        if classes is not None and names != classes:
            raise DataFormatError(
                f"{directory} has the class folders {names}, but {directories[0]} has {classes}; "
                "train/ and test/ need the same class folders"
            )
        classes = names
        if len(names) < 2:
            raise DataFormatError(
                f"{directory} has {len(names)} class folder(s) {names}; a classification "
                "dataset needs at least 2 (one sub-folder of images per class)"
            )
        for name in names:
            files = _image_files(directory / name)
            if not files:
                raise DataFormatError(
                    f"{directory / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "add some or remove the folder"
                )
            for file in files:
                try:
                    with Image.open(file) as image:
                        width, height = image.size
                        gray &= image.mode in _GRAY_MODES
                except OSError as e:
                    raise DataFormatError(f"{file} is not a readable image: {e}") from e
                sizes.setdefault((height, width), file)
    return classes, sizes, gray


def _read_image_tree(directory: Path, classes: list[str], image_size, color_mode: str):
    """keras.utils.image_dataset_from_directory -> (float32 [N,H,W,C] in [0,1], int64 [N])."""
    import keras

    dataset = keras.utils.image_dataset_from_directory(
        str(directory), labels="inferred", label_mode="int", class_names=classes,
        color_mode=color_mode, batch_size=256, image_size=tuple(image_size), shuffle=False,
        verbose=False,
    )
    xs, ys = [], []
    for x, y in dataset:
        xs.append(np.asarray(x, np.float32))
        ys.append(np.asarray(y, np.int64))
    x = np.clip(np.concatenate(xs) / 255.0, 0.0, 1.0).astype(np.float32)
    return x, np.concatenate(ys).astype(np.int64)


def load_image_directory(path, image_size: tuple[int, int] | None = None, seed: int = 0):
    """A user dataset of image files: ((x_train, y_train), (x_test, y_test)).

    `path` holds one sub-folder of images (PNG, JPEG; also BMP, GIF) per class, or ``train/``
    and ``test/`` directories with the same class sub-folders. Classes are the sub-folder names
    sorted alphabetically: label k is the k-th name (the Keras default). Without train/ and
    test/ the images are split by `stratified_split(y, 0.2, seed)` (80 % train, 20 % test,
    each class in proportion). Images are read by `keras.utils.image_dataset_from_directory`,
    grayscale (C = 1) when every image is single-channel, else RGB (C = 3), at their own size
    (all must be the same) or resized (bilinear) to `image_size` = (height, width).
    Returns float32 [N, H, W, C] in [0, 1] and int64 [N].
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataNotAvailableError(
            f"{path}: no such directory; expected one sub-folder of images per class"
        )
    split = (path / "train").is_dir() and (path / "test").is_dir()
    trees = [path / "train", path / "test"] if split else [path]
    classes, sizes, gray = _probe_images(trees)
    if image_size is None:
        if len(sizes) > 1:
            seen = ", ".join(f"{h}x{w} ({f})" for (h, w), f in list(sizes.items())[:4])
            raise DataFormatError(
                f"{path}: images have different sizes (height x width): {seen}; pass "
                "image_size=(height, width) to resize them all"
            )
        image_size = next(iter(sizes))
    color_mode = "grayscale" if gray else "rgb"
    if split:
        return tuple(_read_image_tree(t, classes, image_size, color_mode) for t in trees)
    x, y = _read_image_tree(path, classes, image_size, color_mode)
    train_index, test_index = stratified_split(y, DIRECTORY_TEST_FRACTION, seed)
    return (x[train_index], y[train_index]), (x[test_index], y[test_index])


# --------------------------------------------------------------------------- entry points


DATASETS = {
    "fmnist": _load_fmnist,
    "mnist": _load_mnist,
    "digits": _load_digits,
    "celeba": _load_celeba,
}


def load_dataset(source):
    """((x_train, y_train), (x_test, y_test)) of a name in `DATASETS`, a .npz or a directory.

    Images float32 [N, H, W, C] in [0, 1], labels int64 [N]; see the module docstring. A name
    wins over a same-named path (write ``./digits`` for a directory called digits). Raises
    ValueError for an unknown name, DataNotAvailableError for a missing path or data.
    """
    if isinstance(source, str) and source in DATASETS:
        return DATASETS[source]()
    path = Path(source).expanduser()
    if path.is_dir():
        return load_image_directory(path)
    if path.is_file() or path.suffix.lower() == ".npz":
        return load_npz(path)
    text = os.fspath(source)
    if os.sep in text or "/" in text or not isinstance(source, str):
        raise DataNotAvailableError(
            f"{path}: no such file or directory; pass a .npz file or a directory of images"
        )
    raise ValueError(
        f"unknown dataset {source!r}; known: {', '.join(sorted(DATASETS))} "
        "(or pass the path of a .npz file or of an image directory)"
    )


def fit_split_config(sizes: SplitConfig, n_train: int, n_test: int) -> SplitConfig:
    """`sizes` shrunk to fit a dataset of n_train training and n_test test images.

    ``train_size`` becomes ``min(train_size, n_train)``. When ``val_size + cle_size`` fits
    n_test both are kept; otherwise VAL gets ``min(val_size, n_test // 2)`` (at most half of the
    test set) and CLE ``min(cle_size, n_test - val)``. `sizes` is returned unchanged when it
    already fits (the paper's sizes on Fashion-MNIST).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train {n_train} and n_test {n_test} must be >= 0")
    val, cle = sizes.val_size, sizes.cle_size
    if val + cle > n_test:
        val = min(val, n_test // 2)
        cle = min(cle, n_test - val)
    fitted = dataclasses.replace(
        sizes, train_size=min(sizes.train_size, n_train), val_size=val, cle_size=cle
    )
    return sizes if fitted == sizes else fitted


def make_splits(train, test, sizes: SplitConfig | None = None, seed: int = 0) -> Splits:
    """The paper's disjoint TRAIN / VAL / CLE sets drawn from train=(x, y) and test=(x, y).

    ``rng = numpy.random.default_rng(seed)``; TRAIN is the first `train_size` of
    ``rng.permutation(len(x_train))``, then from ``rng.permutation(len(x_test))`` VAL is the
    first `val_size` and CLE the next `cle_size` (indices sorted). x: [N, H, W, C], y: [N].
    Raises ValueError when the sizes do not fit (see `fit_split_config`).
    """
    sizes = sizes or SplitConfig()
    (x_train, y_train), (x_test, y_test) = train, test
    hint = "; shrink the sizes (fmd_tf.data.fit_split_config)"
    if sizes.train_size > len(x_train):
        raise ValueError(f"train_size {sizes.train_size} > {len(x_train)} training images{hint}")
    if sizes.val_size + sizes.cle_size > len(x_test):
        raise ValueError(
            f"val_size + cle_size = {sizes.val_size + sizes.cle_size} > {len(x_test)} test "
            f"images{hint}"
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


def paper_splits(name, seed: int = 0, sizes: SplitConfig | None = None) -> Splits:
    """The paper's disjoint TRAIN / VAL / CLE sets of `load_dataset(name)` (`make_splits`).

    `name` is a dataset name or the path of a .npz file or image directory.
    """
    train, test = load_dataset(name)
    return make_splits(train, test, sizes, seed)

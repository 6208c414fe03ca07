"""Loading a saved defense, checked against its model card.

    import fmd_tf
    fmd = fmd_tf.load_defense("saved_models/fmnist")          # OUT/fmd.keras of train.py
    fmd = fmd_tf.load_defense("saved_models/fmnist/fmd.keras")

The model card (`model_card.json` next to the file, written by `scripts/train.py` and
`fmd_tf.fit_defense`) records the SHA-256 and size of every artifact it describes under
"artifacts" ({path relative to the model directory: {"sha256", "bytes"}}: fmd.keras,
combo_vae.keras, classifier.keras, each SavedModel version serving/N, ...). `load_defense`
says precisely what is wrong with a file before Keras sees it: missing, not a zip / truncated,
a checksum that differs from the card, written by a newer fmd_tf, or a class that is not
registered. `keras.models.load_model` keeps working on the same files (without these checks).
"""

from __future__ import annotations

import json
import os
import re
import zipfile

from fmd_tf.files import sha256, write_json

__all__ = ["ModelFileError", "artifact_records", "check_model_file", "check_save_format",
           "load_defense", "model_artifacts", "record_artifacts", "verify_artifacts"]

CARD = "model_card.json"
# What a card records a SHA-256 of, besides every SavedModel version under serving*/.
MODEL_ARTIFACTS = ("classifier.keras", "combo_vae.keras", "fmd.keras", "fmd_ensemble.keras",
                   "val_resistance.npy")
SERVING_DIRS = ("serving", "serving_ensemble")


# The layout of a saved FMDefense / FMDefenseEnsemble config, stored in every file with the
# fmd_tf version that wrote it. Raise it when a file written now could not be read by an older
# fmd_tf; files without it (written before it existed) are format 1.
SAVE_FORMAT = 2  # 2: DefenseConfig.morph_check_margin
FORMAT_KEYS = ("fmd_tf_format", "fmd_tf_version")


def check_save_format(config: dict) -> dict:
    """`config` (a saved defense's) without the format keys; ModelFileError (a ValueError) if
    a newer fmd_tf wrote it."""
    from fmd_tf import __version__

    config = dict(config)
    written, version = config.pop("fmd_tf_format", 1), config.pop("fmd_tf_version", "<= 0.1.0")
    if int(written) > SAVE_FORMAT:
        raise ModelFileError(
            f"saved by fmd_tf {version} in file format {written}; this fmd_tf {__version__} "
            f"reads formats up to {SAVE_FORMAT}: upgrade fmd_tf (pip install -U fmd_tf)")
    return config


class ModelFileError(ValueError):
    """A model file that cannot be used as it is; the message says why and what to do."""


def artifact_records(model_dir, names) -> dict:
    """{name: {"sha256": hex, "bytes": size}} of the artifacts `names` (paths relative to
    `model_dir`; files or directories) that exist."""
    records = {}
    for name in names:
        path = os.path.join(os.fspath(model_dir), name)
        if os.path.exists(path):
            records[name] = {"sha256": sha256(path), "bytes": _size(path)}
    return records


def model_artifacts(model_dir) -> list[str]:
    """The artifacts of `MODEL_ARTIFACTS` in `model_dir` and its SavedModel versions
    ("serving/1", ...), as names relative to it."""
    model_dir = os.fspath(model_dir)
    names = [n for n in MODEL_ARTIFACTS if os.path.isfile(os.path.join(model_dir, n))]
    for serving in SERVING_DIRS:
        base = os.path.join(model_dir, serving)
        if os.path.isdir(base):
            versions = [v for v in os.listdir(base)
                        if v.isdigit() and os.path.isdir(os.path.join(base, v))]
            names += [f"{serving}/{v}" for v in sorted(versions, key=int)]
    return names


def record_artifacts(model_dir, names=None) -> dict:
    """Add (or refresh) `names` (default: `model_artifacts(model_dir)`) in the "artifacts" of
    `model_dir`'s card; returns them all."""
    card_path = os.path.join(os.fspath(model_dir), CARD)
    with open(card_path) as f:
        card = json.load(f)
    names = model_artifacts(model_dir) if names is None else names
    card["artifacts"] = {**card.get("artifacts", {}), **artifact_records(model_dir, names)}
    write_json(card_path, card, sort_keys=True)
    return card["artifacts"]


def verify_artifacts(model_dir, names=None) -> dict:
    """Check the artifacts of `model_dir` against its card: {name: "ok"} for each checked one.

    Args:
        names: the artifacts to check (default: every one the card records).

    Raises:
        FileNotFoundError: an artifact the card records is missing.
        ModelFileError: a checksum differs from the card.
    Artifacts of `names` the card does not record are not checked (not in the result).
    """
    model_dir = os.fspath(model_dir)
    card_path = os.path.join(model_dir, CARD)
    with open(card_path) as f:
        recorded = json.load(f).get("artifacts", {})
    names = list(recorded) if names is None else list(names)
    checked = {}
    for name in names:
        if name not in recorded:
            continue
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: {card_path} describes it (copy the "
                                    "whole model directory)")
        actual = sha256(path)
        if actual != recorded[name]["sha256"]:
            raise ModelFileError(
                f"{path} is not the file {card_path} describes: SHA-256 {actual[:16]}... "
                f"instead of {recorded[name]['sha256'][:16]}... ({_size(path)} instead of "
                f"{recorded[name]['bytes']} bytes); it was changed or replaced after training. "
                "Copy the model directory again, or load it with verify=False if you changed "
                "it on purpose (then record the new checksums: python scripts/verify_model.py "
                "--record)")
        checked[name] = "ok"
    return checked


def check_model_file(path, verify: bool = True, name: str = "fmd.keras") -> str:
    """The checks of `load_defense` that need no TensorFlow (so that a script answers at once):
    returns the .keras file's path.

    Raises:
        FileNotFoundError: no such file.
        ModelFileError (a ValueError): not a .keras archive (truncated, or another kind of
            file), a checksum that differs from the card, written by a newer fmd_tf.
    """
    path = os.fspath(path)
    file = os.path.join(path, name) if os.path.isdir(path) else path
    if not os.path.exists(file):
        hint = (f"{path} holds no {name}" if os.path.isdir(path) else f"{file}: no such file")
        raise FileNotFoundError(f"{hint}; train a defense with `python scripts/train.py` (it "
                                "writes OUT/fmd.keras) or give the path of a .keras file")
    if not zipfile.is_zipfile(file):
        raise ModelFileError(
            f"{file} is not a .keras archive (a zip file) but {_size(file)} bytes of something "
            "else: truncated by an interrupted copy or download, or another kind of file. "
            "Copy it again or re-run training")
    try:
        with zipfile.ZipFile(file) as archive:
            broken = archive.testzip()
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ModelFileError(f"{file} is a damaged .keras archive ({e}): copy it again or "
                             "re-run training") from None
    if broken is not None:
        raise ModelFileError(f"{file} is damaged: {broken} inside it fails its CRC check; copy "
                             "it again or re-run training")
    inner = config.get("config")
    if isinstance(inner, dict):
        try:
            check_save_format(inner)
        except ModelFileError as e:
            raise ModelFileError(f"{file} was {e}") from None
    model_dir = os.path.dirname(file) or "."
    if verify and os.path.isfile(os.path.join(model_dir, CARD)):
        verify_artifacts(model_dir, [os.path.relpath(file, model_dir)])
    return file


def load_defense(path, verify: bool = True, name: str = "fmd.keras"):
    """The `FMDefense` / `FMDefenseEnsemble` saved at `path`, checked first
    (`check_model_file`).

    Args:
        path: a .keras file, or a model directory holding `name` (e.g. train.py's --out).
        verify: compare the file's SHA-256 with the card next to it, when the card records
            one (cards written before checksums existed are not checked).
        name: the file to load from a directory ("fmd.keras", or "fmd_ensemble.keras").

    Raises:
        FileNotFoundError: no such file.
        ModelFileError (a ValueError): not a .keras archive (truncated, or another kind of
            file), checksum differs from the card, written by a newer fmd_tf, a class that is
            not registered, or not a defense.
    """
    import keras

    from fmd_tf.defense.fm_defense import BatchedDefense

    file = check_model_file(path, verify, name)
    try:
        model = keras.models.load_model(file)
    except TypeError as e:
        if "Could not locate" not in str(e):
            raise
        found = re.search(r"Could not locate class '([^']+)'", str(e))
        name = repr(found.group(1)) if found else "a class"
        raise ModelFileError(
            f"{file} uses the Keras class {name}, which is not registered in this process. "
            "fmd_tf's classes are registered by `import fmd_tf`; a custom layer or model of "
            "your classifier must be imported (and decorated with "
            "@keras.saving.register_keras_serializable) before loading") from None
    if not isinstance(model, BatchedDefense):
        raise ModelFileError(f"{file} holds a {type(model).__name__}, not an FMDefense or "
                             "FMDefenseEnsemble")
    return model


def _size(path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files)

"""Protect any Keras image classifier: `fit_defense` and the training stages it shares with
`scripts/train.py` (combo-VAE training, calibration, operating point, model card).

    import fmd_tf
    defense = fmd_tf.fit_defense(classifier, (x_train, y_train), (x_val, y_val))
    defense.save("fmd.keras"); fmd_tf.export_saved_model(defense, "serving/1")
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from fmd_tf.config import (
    ADVERSARIAL_TRAINING_DEFAULTS,
    ClassifierConfig,
    ExperimentConfig,
    get_config,
    quick_config,
    to_dict,
)
from fmd_tf.files import StagedOutputs, write_json
from fmd_tf.loading import artifact_records, model_artifacts
from fmd_tf.operating_point import (
    GRIDS,
    OPERATING_POINTS,
    STAGE_POINTS,
    OperatingPointConfig,
    grid,
    select_operating_point,
)
from fmd_tf.options import check_value

__all__ = ["MIN_VAL_IMAGES", "PRESETS", "calibrate_defense", "experiment_config",
           "fit_defense", "operating_point_config", "train_combo_vae", "with_classifier_training",
           "with_latent"]

PRESETS = ("full", "fast")
MIN_VAL_IMAGES = 50  # fewer clean VAL images cannot place the thresholds' quantiles
MIN_SIDE = 8


def _conv_pairs(side: int, most: int = 2) -> int:
    """Pairs of valid 3x3 convolutions + 2x2 pooling the classifier can afford on `side`."""
    pairs = 0
    while pairs < most and (side - 4) // 2 >= 1:
        side = (side - 4) // 2
        pairs += 1
    return max(pairs, 1)


def architecture(image_shape) -> dict:
    """Layer widths that follow the image size: the paper's Table I for 28x28 (four stride-2
    encoder convolutions, two stride-2 decoder deconvolutions), one more stride-2 stage on each
    side per doubling above 32 pixels, and a classifier with as many conv-conv-pool blocks as
    the image allows (two for 28x28, one for 8x8)."""
    h, w, _ = image_shape
    side = min(h, w)
    extra = 0
    while side > 32 * 2 ** extra and extra < 3:
        extra += 1
    encoder = (32, 32, 64, 64) + (128,) * extra
    decoder = (128,) * extra + (64, 32)
    classifier = (32, 32, 64, 64)[: 2 * _conv_pairs(side)]
    return {"encoder_filters": encoder, "decoder_filters": decoder,
            "classifier_filters": classifier}


def feature_map_size(image_shape) -> int:
    """h = w of a feature-map latent for images (H, W, C): the side after three halvings
    (4 for 28x28 and 32x32, 8 for 64x64), at least 2."""
    side = min(int(image_shape[0]), int(image_shape[1]))
    for _ in range(3):
        if -(-side // 2) < 2:
            break
        side = -(-side // 2)
    return side


def with_latent(cfg: ExperimentConfig, latent: str) -> ExperimentConfig:
    """`cfg` with the class-shared latent `latent` ("vector" or "feature_map"). A feature map
    takes the paper's CelebA settings: a basic combo-VAE (gamma 0, no TC term) and maps of
    `feature_map_size(cfg.image_shape)` per side; "vector" changes only the field."""
    if latent == "feature_map":
        return dataclasses.replace(cfg, combo=dataclasses.replace(
            cfg.combo, latent=latent, gamma=0.0,
            feature_map_size=feature_map_size(cfg.image_shape)))
    return dataclasses.replace(cfg, combo=dataclasses.replace(cfg.combo, latent=latent))


def with_classifier_training(cfg: ExperimentConfig, training: str) -> ExperimentConfig:
    """`cfg` with the classifier trained by `training` ("standard", "pgd_at" or "trades"). The
    adversarial ones also take `ADVERSARIAL_TRAINING_DEFAULTS` (no dropout, more epochs: the
    shipped robust classifier's recipe); "standard" changes only the field."""
    training = check_value(ClassifierConfig, "training", training)
    extra = {} if training == "standard" else ADVERSARIAL_TRAINING_DEFAULTS
    return dataclasses.replace(cfg, classifier=dataclasses.replace(
        cfg.classifier, training=training, **extra))


def experiment_config(image_shape, num_classes: int, preset: str = "full",
                      dataset: str = "custom", base: ExperimentConfig | None = None,
                      latent: str | None = None,
                      classifier_training: str | None = None) -> ExperimentConfig:
    """The config for images of `image_shape` (H, W, C) and `num_classes` classes: `base`
    (default: the paper's Fashion-MNIST settings) with the architecture of `architecture`,
    shrunk by `preset` "fast" (`fmd_tf.config.quick_config`); `latent` ("vector" or
    "feature_map", `with_latent`; None keeps the base's) selects the class-shared latent and
    `classifier_training` (`with_classifier_training`; None keeps the base's) how the
    classifier is trained."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    cfg = base or get_config("fmnist")
    image_shape = tuple(int(s) for s in image_shape)
    if image_shape != tuple(cfg.image_shape) or base is None:
        arch = architecture(image_shape)
        cfg = dataclasses.replace(
            cfg,
            classifier=dataclasses.replace(cfg.classifier, conv_filters=arch["classifier_filters"]),
            combo=dataclasses.replace(cfg.combo, encoder_filters=arch["encoder_filters"],
                                      decoder_filters=arch["decoder_filters"]))
    cfg = dataclasses.replace(cfg, dataset=dataset, image_shape=image_shape,
                              num_classes=int(num_classes))
    if latent is not None:
        cfg = with_latent(cfg, latent)
    if classifier_training is not None:
        cfg = with_classifier_training(cfg, classifier_training)
    return quick_config(cfg) if preset == "fast" else cfg


def operating_point_config(preset: str, operating_point: str = "auto",
                           robust_eps: float | None = None) -> OperatingPointConfig | None:
    """The grid a table-chosen `operating_point` ("auto", "robust") chooses from for a preset
    (fewer attacked VAL images for "fast"; "robust" at L∞ `robust_eps`, `grid`); None for the
    points that use no table ("paper", "config")."""
    if operating_point not in GRIDS:
        return None
    return grid(operating_point, preset == "fast", robust_eps)


# ------------------------------------------------------------------------------- input checks
def _as_arrays(data, name: str):
    """(x float32 [n, H, W, C], y int64 [n]) from a pair of arrays or a tf.data.Dataset of
    (x, y) batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    elif hasattr(data, "as_numpy_iterator"):
        xs, ys = [], []
        for batch in data.as_numpy_iterator():
            if not isinstance(batch, tuple) or len(batch) != 2:
                raise ValueError(f"{name}: the dataset must yield (x, y) batches")
            xs.append(np.asarray(batch[0]))
            ys.append(np.asarray(batch[1]))
        if not xs:
            raise ValueError(f"{name}: the dataset is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
    else:
        raise TypeError(f"{name} must be (x, y) numpy arrays or a tf.data.Dataset of (x, y) "
                        f"batches, got {type(data).__name__}")
    try:
        x, y = np.asarray(x), np.asarray(y).reshape(-1)
    except ValueError as e:  # nested lists of uneven lengths
        raise ValueError(f"{name}: images and labels must be arrays: {e}") from None
    if x.ndim != 4:
        raise ValueError(f"{name}: images must be [N, H, W, C], got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{name}: no images")
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} images but {len(y)} labels")
    if not np.issubdtype(x.dtype, np.floating):
        hint = " (divide uint8 images by 255)" if np.issubdtype(x.dtype, np.integer) else ""
        raise ValueError(f"{name}: images must be float in [0, 1], got dtype {x.dtype}{hint}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: labels must be integers 0..K-1, got dtype {y.dtype}")
    # The values as given, before the cast (a float64 1e300 would read as Inf).
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: images contain NaN or Inf")
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"{name}: images must be in [0, 1], found values in "
                         f"[{x.min():.3g}, {x.max():.3g}]")
    return x.astype(np.float32, copy=False), y.astype(np.int64)


def _num_classes(classifier, x) -> int:
    """K of a classifier's logits [B, K] on `x`; ValueError when it does not take `x`."""
    want = getattr(classifier, "input_shape", None) if getattr(classifier, "inputs", None) \
        else None
    if want is not None and tuple(want[1:]) != tuple(x.shape[1:]) and None not in want[1:]:
        raise ValueError(f"the classifier takes images {tuple(want[1:])}, the data has "
                         f"{tuple(x.shape[1:])}")
    try:
        out = np.asarray(classifier(x[:2]))
    except Exception as e:  # noqa: BLE001  (any Keras error means the shapes do not fit)
        raise ValueError(f"the classifier cannot take images of shape {tuple(x.shape[1:])}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(f"the classifier must return logits [B, K] with K >= 2, got shape "
                         f"{out.shape}")
    return int(out.shape[1])


def check_data(classifier, train, val) -> int:
    """Refuse unusable inputs before any training; returns the class count K."""
    (x_train, y_train), (x_val, y_val) = train, val
    h, w, c = x_train.shape[1:]
    if min(h, w) < MIN_SIDE or c not in (1, 3):
        raise ValueError(f"images must be [N, H, W, C] with H, W >= {MIN_SIDE} and C in {{1, 3}}, "
                         f"got {tuple(x_train.shape[1:])}")
    if x_val.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"train images are {tuple(x_train.shape[1:])}, VAL images "
                         f"{tuple(x_val.shape[1:])}")
    if len(x_val) < MIN_VAL_IMAGES:
        raise ValueError(f"val_data has {len(x_val)} images; calibration needs at least "
                         f"{MIN_VAL_IMAGES} clean VAL images (2,000 in the paper)")
    k = _num_classes(classifier, x_val)
    for name, y in (("train_data", y_train), ("val_data", y_val)):
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"{name}: labels must be in [0, {k}) for a classifier with {k} "
                             f"logits, found [{y.min()}, {y.max()}]")
    if np.shares_memory(x_train, x_val) or _overlap(x_train, x_val) > 0.5:
        raise ValueError("val_data overlaps train_data: VAL must be clean images the combo-VAE "
                         "never trains on (thresholds are chosen on them)")
    return k


def _overlap(x_train, x_val, probe: int = 256) -> float:
    """Share of (up to `probe`) VAL images that also occur, byte for byte, in the train set."""
    seen = {row.tobytes() for row in x_train}
    rows = x_val[:probe]
    return float(np.mean([row.tobytes() in seen for row in rows]))


# ------------------------------------------------------------------------------- stages
def train_combo_vae(cfg: ExperimentConfig, classifier, x_dgmm, y_dgmm, x_vae, seed: int = 0,
                    strategy=None, log_dir: str | None = None, verbose="auto"):
    """Stage 1 (DGMM on labeled images) and stage 2 (Es + decoder + D_tc on images) of the
    combo-VAE; returns an uncompiled copy ready to save. `seed` seeds the model."""
    from fmd_tf import training

    strategy = strategy or training.get_strategy("default")
    combo = training.new_combo_vae(cfg, strategy, seed)
    training.train_dgmm(cfg, combo, x_dgmm, y_dgmm, log_dir, verbose)
    training.train_vae(cfg, combo, x_vae, log_dir, verbose, classifier)
    return training.inference_copy(combo)


def calibrate_defense(classifier, combo, defense_cfg, x_val, y_val, operating_point="auto",
                      op_cfg: OperatingPointConfig | None = None, val_resistance=None,
                      cache_dir: str | None = None, seed: int = 0, verbose: int = 0):
    """(calibrated FMDefense, calibration report, operating-point card entry).

    Calibrates `defense_cfg` on the clean VAL images (all morphs, or the stored
    `val_resistance` [n, m] re-thresholded), then moves to `operating_point` ("auto",
    "robust", "paper", or "config": `defense_cfg`'s own thresholds) on the same resistances.
    The report's `val_resistance` [n, m] is what `val_resistance` takes next time.
    """
    from fmd_tf.defense import FMDefense

    if operating_point not in STAGE_POINTS:
        raise ValueError(f"operating_point must be one of {STAGE_POINTS}, "
                         f"got {operating_point!r}")
    fmd = FMDefense.from_config_dataclass(classifier, combo, defense_cfg, name="fmd")
    if verbose:
        print(f"calibrating on {len(x_val)} clean VAL images "
              f"({fmd.num_codes} codes x {fmd.num_morphs} morphs each)", flush=True)
    report = fmd.calibrate(x_val, val_resistance=val_resistance, verbose=verbose)
    r_val, outcomes = report["val_resistance"], report.pop("val_morph_outcomes", None)
    entry = {"rule": "config", "options": {}}
    if operating_point != "config":
        fmd, report, entry = select_operating_point(
            fmd, x_val, y_val, r_val, operating_point, op_cfg, cache_dir, seed, verbose,
            val_outcomes=outcomes)
    report["val_resistance"] = r_val
    return fmd, report, entry


def fit_defense(classifier, train_data, val_data, config: ExperimentConfig | None = None,
                preset: str = "full", operating_point: str = "auto", out_dir: str | None = None,
                verbose: int = 1, seed: int = 0):
    """Train a combo-VAE for `classifier` and calibrate an FMDefense around it.

    Args:
        classifier: any keras.Model, float32 [B, H, W, C] in [0, 1] -> logits [B, K]; it is
            not trained or changed.
        train_data: (x, y) numpy arrays or a tf.data.Dataset of (x, y) batches: images float
            in [0, 1] [N, H, W, C] (H, W >= 8, C in {1, 3}), labels int in [0, K). They train
            the DGMM (labels) and the combo-VAE (images).
        val_data: (x, y) clean images disjoint from `train_data`; the normal ranges, thresholds
            and the operating point are chosen on them (at least `MIN_VAL_IMAGES`).
        config: an `fmd_tf.ExperimentConfig`; None derives one from the data's shape
            (`experiment_config`).
        preset: "full" (paper scale) or "fast" (minutes on 2 CPU cores: trials and tests);
            applies only when `config` is None.
        operating_point: "auto" (thresholds, gate and morph budget chosen on VAL against
            FGSM and PGD, `fmd_tf.operating_point`), "robust" (the same against APGD at L∞
            `config.classifier.adversarial_eps`, 0.1 by default, with a classifier-margin
            gate: for a classifier trained to hold there) or "paper" (ρ 0.999 per code, no
            reconstruction gate, all morphs).
        out_dir: when given, fmd.keras, combo_vae.keras, val_resistance.npy and
            model_card.json are written there (existing files are refused).
        verbose: 0 silent, 1 progress bars, 2 one line per epoch.
        seed: seeds the combo-VAE's weights.

    Returns:
        the calibrated `FMDefense`.
    """
    import keras

    if operating_point not in OPERATING_POINTS:
        raise ValueError(f"operating_point must be one of {OPERATING_POINTS}, "
                         f"got {operating_point!r}")
    train = _as_arrays(train_data, "train_data")
    val = _as_arrays(val_data, "val_data")
    num_classes = check_data(classifier, train, val)
    if out_dir is not None:
        existing = [n for n in ("fmd.keras", "combo_vae.keras", "model_card.json")
                    if os.path.exists(os.path.join(out_dir, n))]
        if existing:
            raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; choose "
                                  "another out_dir or remove them")
    if config is None:
        config = experiment_config(train[0].shape[1:], num_classes, preset)
    elif tuple(config.image_shape) != tuple(train[0].shape[1:]) or \
            config.num_classes != num_classes:
        raise ValueError(f"config is for images {tuple(config.image_shape)} and "
                         f"{config.num_classes} classes; the data has "
                         f"{tuple(train[0].shape[1:])} and the classifier {num_classes}")
    started = time.time()
    keras.utils.set_random_seed(seed)
    from fmd_tf import training

    x_train, y_train = train
    size = config.splits.train_size  # the TRAIN split: the first images of train_data
    split = (x_train[:size], y_train[:size])
    x_dgmm, y_dgmm = training.dgmm_training_data(config.combo, split, train)
    x_vae = training.vae_training_images(config.combo, split[0], x_train)
    combo = train_combo_vae(config, classifier, x_dgmm, y_dgmm, x_vae, seed, verbose=verbose)
    fmd, report, entry = calibrate_defense(
        classifier, combo, config.defense, *val, operating_point,
        operating_point_config(preset, operating_point, config.classifier.adversarial_eps),
        seed=seed, verbose=verbose)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        stage = StagedOutputs(out_dir)  # out_dir gets all files or none
        np.save(stage.path("val_resistance.npy"), report.pop("val_resistance"))
        combo.save(stage.path("combo_vae.keras"))
        fmd.save(stage.path("fmd.keras"))
        write_json(stage.path("model_card.json"), sort_keys=True, data={
            "artifacts": artifact_records(stage.dir, model_artifacts(stage.dir)),
            "api": "fmd_tf.fit_defense", "preset": preset, "operating_point": entry,
            "image_shape": list(config.image_shape), "num_classes": num_classes,
            "num_train": int(len(x_train)), "num_val": int(len(val[0])),
            "hyperparameters": to_dict(config), "calibration": report,
            "seconds": time.time() - started})
        stage.commit(last="model_card.json")
    return fmd


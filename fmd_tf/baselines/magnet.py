"""MagNet baseline (Meng & Chen, CCS 2017) with its MNIST settings.

MagNet = detectors + reformer, all built from denoising autoencoders (AEs) trained on clean
images only:

* **Detector I** (also the **reformer**): conv AE
  ``Conv 3x3x3 sigmoid - AvgPool 2 - Conv 3x3x3 sigmoid - Conv 3x3x3 sigmoid - Upsample 2 -
  Conv 3x3x3 sigmoid - Conv 3x3x1 sigmoid``; its score is the **L2** reconstruction error
  ``mean((x - AE(x))**2)`` over pixels.
* **Detector II**: ``Conv 3x3x3 sigmoid - Conv 3x3x3 sigmoid - Conv 3x3x1 sigmoid``; its score is
  the **L1** reconstruction error ``mean(|x - AE(x)|)``.

Both exactly as in MagNet's MNIST code (``AEDetector(MNIST_I, p=2)``,
``AEDetector(MNIST_II, p=1)``, ``SimpleReformer(MNIST_I)``): "L2" / "L1" are the pixel means of
``|x - AE(x)|**p``.

Training (MagNet §5.1, MNIST): MSE loss, Adam (lr 1e-3), batch 256, L2 activity
regularisation 1e-9 on every conv output, inputs corrupted with Gaussian noise of volume 0.1
(``clip(x + 0.1*N(0, 1), 0, 1)``, target the clean x). MagNet trains 100 epochs; the default
here is ``DEFAULT_EPOCHS`` = 20 to fit a CPU budget (the epochs used are recorded in the saved
report; pass 100 for the paper's setting). Measured on the 20k Fashion-MNIST TRAIN split (2
busy CPU cores, ~3-5 s per epoch and AE): the sigmoid AEs sit on a plateau for the first few
epochs; after 8 epochs detector II had levelled off (train MSE 0.018) while detector I was still
improving (0.032), so 20 epochs under-trains detector I relative to MagNet. Unlike the
reference code, which draws the noise once, a fresh draw is made for every batch.

Thresholds. An input is adversarial iff *some* detector's score is above its threshold. The
thresholds are set on clean VAL images so that the *union's* false-positive rate is at most the
target `fpr` (FM-Defense uses 1 - ρ = 0.001): see :func:`calibrate_thresholds` (the budget is
shared between the detectors one VAL image at a time, detector I first). MagNet's own code gives
each detector the full drop rate, so its joint rate can exceed the target; here it cannot.

Decision (FM-Defense convention): verdict 0 (passed) with label = classifier(reformer(x)), or
verdict 2 (rejected) with label -1. MagNet never "purifies" in FM-Defense's sense (verdict 1):
every passed input is reformed.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from fmd_tf.baselines.threshold_detector import ThresholdDetector
from fmd_tf.defense.fm_defense import (
    VERDICT_PASSED,
    VERDICT_REJECTED,
    check_image_values,
)
from fmd_tf.files import atomic_path, write_json
from fmd_tf.models.layer_stack import apply_layers, build_layers
from fmd_tf.progress import concat_outputs, in_batches

__all__ = [
    "DEFAULT_EPOCHS",
    "DETECTOR_NORMS",
    "MagNet",
    "MagNetAutoencoder",
    "calibrate_thresholds",
    "check_images",
    "union_false_positive_rate",
]

DEFAULT_EPOCHS = 20  # MagNet: 100
DETECTOR_NORMS = {"I": 2, "II": 1}  # detector name -> p of mean(|x - AE(x)|**p)
VARIANTS = ("I", "II")
_JSON_NAME = "magnet.json"


# --------------------------------------------------------------------------------- helpers
def check_images(x, image_shape=None) -> np.ndarray:
    """Images as float32 numpy [n, H, W, C] in [0, 1]; TypeError / ValueError naming the problem."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"images must be float32 in [0, 1], got dtype {x.dtype} (divide uint8 images by 255)"
        )
    if x.ndim != 4:
        raise ValueError(f"images must have rank 4 [batch, H, W, C], got shape {x.shape}")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"images must be [batch, {', '.join(map(str, image_shape))}], "
                         f"got {x.shape}")
    return check_image_values(x)


def check_fpr(fpr) -> float:
    fpr = float(fpr)
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    return fpr


def _threshold_flagging(sorted_scores: np.ndarray, allowed: int) -> float:
    """Threshold t such that at most `allowed` of the (ascending) scores are > t.

    Placed half-way between the largest passed and the smallest flagged VAL score; with
    ``allowed`` = 0 it is the largest VAL score (nothing on VAL is flagged).
    """
    n = len(sorted_scores)
    if allowed <= 0:
        return float(sorted_scores[-1])
    if allowed >= n:
        return float(sorted_scores[0]) - 1.0  # everything flagged
    return float(0.5 * (sorted_scores[n - 1 - allowed] + sorted_scores[n - allowed]))


def union_false_positive_rate(scores: dict, thresholds: dict) -> float:
    """Share of rows flagged by at least one detector (score > threshold)."""
    flagged = np.zeros(len(next(iter(scores.values()))), dtype=bool)
    for name, s in scores.items():
        flagged |= np.asarray(s) > thresholds[name]
    return float(flagged.mean())


def calibrate_thresholds(scores: dict, fpr: float) -> dict:
    """Per-detector thresholds (flag iff score > threshold) whose joint VAL FPR is <= `fpr`.

    Args:
        scores: detector name -> clean VAL scores [n] (larger = more suspicious); every array
            has the same n.
        fpr: target false-positive rate of the union of the detectors, in [0, 1).

    The budget is k = floor(fpr * n) VAL images. Starting from "nothing flagged", each detector
    in turn (in `scores` order) is allowed one more flagged VAL image as long as the union still
    flags at most k; this stops when no detector can take another. With one detector this is
    the usual (1 - fpr) quantile rule; with several the union flags exactly k images unless
    ties prevent it. With k = 0 (fpr < 1/n) every threshold is the largest VAL score.

    Returns:
        detector name -> float threshold.
    """
    fpr = check_fpr(fpr)
    if not scores:
        raise ValueError("scores: no detectors")
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in scores.items()}
    n = {len(v) for v in arrays.values()}
    if len(n) != 1 or 0 in n:
        raise ValueError(f"scores must be non-empty and of equal length, got lengths {n}")
    (n,) = n
    for name, v in arrays.items():
        if not np.all(np.isfinite(v)):
            raise ValueError(f"scores[{name!r}] contain NaN or Inf")
    budget = int(np.floor(fpr * n + 1e-9))
    ordered = {k: np.sort(v) for k, v in arrays.items()}
    allowed = dict.fromkeys(arrays, 0)
    thresholds = {k: _threshold_flagging(ordered[k], 0) for k in arrays}
    grew = True
    while grew:
        grew = False
        for name in arrays:
            if allowed[name] >= n:
                continue
            trial = dict(thresholds)
            trial[name] = _threshold_flagging(ordered[name], allowed[name] + 1)
            if union_false_positive_rate(arrays, trial) * n <= budget + 1e-9:
                allowed[name] += 1
                thresholds = trial
                grew = True
    return {k: float(v) for k, v in thresholds.items()}


# --------------------------------------------------------------------------------- model
@keras.saving.register_keras_serializable(package="fmd_tf")
class MagNetAutoencoder(keras.Model):
    """MagNet's MNIST autoencoders (all 3x3 'same' convolutions with `activation`).

    Args:
        variant: "I" (conv f - avgpool 2 - conv f - conv f - upsample 2 - conv f - conv channels;
            detector I and reformer) or "II" (conv f - conv f - conv channels; detector II).
        filters: f, the filters of the hidden convolutions (MagNet: 3).
        channels: image channels (the output convolution's filters).
        activation: of every convolution (MagNet: sigmoid, which also keeps outputs in [0, 1]).
        reg_strength: L2 activity regularisation of every convolution output (MagNet: 1e-9;
            Keras 3 divides it by the batch size).

    Call: images float32 [B, H, W, channels] -> reconstructions of the same shape (variant I
    needs even H and W).
    """

    def __init__(
        self,
        variant="I",
        filters=3,
        channels=1,
        activation="sigmoid",
        reg_strength=1e-9,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.variant = str(variant)
        self.filters = int(filters)
        self.channels = int(channels)
        self.activation = str(activation)
        self.reg_strength = float(reg_strength)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if self.filters < 1 or self.channels < 1:
            raise ValueError(f"filters and channels must be >= 1, got {filters}, {channels}")
        if self.reg_strength < 0:
            raise ValueError(f"reg_strength must be >= 0, got {reg_strength}")

        def conv(units, name):
            return layers.Conv2D(
                units, 3, padding="same", activation=self.activation, name=name,
                activity_regularizer=(
                    keras.regularizers.L2(self.reg_strength) if self.reg_strength else None
                ),
            )

        if self.variant == "I":
            self.ae_layers = [
                conv(self.filters, "conv0"),
                layers.AveragePooling2D(2, padding="same", name="pool"),
                conv(self.filters, "conv1"),
                conv(self.filters, "conv2"),
                layers.UpSampling2D(2, name="upsample"),
                conv(self.filters, "conv3"),
                conv(self.channels, "output"),
            ]
        else:
            self.ae_layers = [
                conv(self.filters, "conv0"),
                conv(self.filters, "conv1"),
                conv(self.channels, "output"),
            ]

    def build(self, input_shape):
        shape = tuple(input_shape)
        if len(shape) != 4 or shape[-1] != self.channels:
            raise ValueError(f"MagNetAutoencoder(channels={self.channels}) needs input shape "
                             f"[B, H, W, {self.channels}], got {shape}")
        if self.variant == "I" and any(s is not None and s % 2 for s in shape[1:3]):
            raise ValueError(f"variant I needs even image height and width, got {shape[1:3]}")
        build_layers(self.ae_layers, shape)
        self.built = True

    def call(self, images, training=False):
        return apply_layers(self.ae_layers, images, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            variant=self.variant,
            filters=self.filters,
            channels=self.channels,
            activation=self.activation,
            reg_strength=self.reg_strength,
        )
        return config


# --------------------------------------------------------------------------------- defense
class MagNet(ThresholdDetector):
    """MagNet detector + reformer around a classifier (plain Python object, numpy API).

    Args:
        classifier: Keras model (or callable), images -> logits; needed by `defend` only
            (None for detection only).
        image_shape: [H, W, C] of the images.
        filters: hidden filters of both AEs (MagNet: 3).
        noise_volume: std of the Gaussian training noise (MagNet: 0.1).
        reg_strength: L2 activity regularisation (MagNet: 1e-9).
        epochs: training epochs of each AE (MagNet: 100; default `DEFAULT_EPOCHS`).
        batch_size: training batch (MagNet: 256).
        learning_rate: Adam learning rate (MagNet: Keras' default 1e-3).
        seed: seed of the AE weight initialisation, shuffling and training noise.
        detector_i, detector_ii: trained `MagNetAutoencoder`s to use instead of new ones.

    Usage::

        magnet = MagNet(classifier)
        magnet.fit(x_train, x_val, fpr=0.001)  # or magnet.calibrate(x_val, fpr) if trained
        out = magnet.defend(x)                 # label (-1 when rejected), verdict (0 or 2)
    """

    _threshold_attr = "thresholds"
    _calibrate_call = "fit(x_train, x_val, fpr) or calibrate(x_val, fpr)"

    @staticmethod
    def _parse_threshold(value):
        return {name: float(v) for name, v in value.items()}

    def __init__(
        self,
        classifier=None,
        image_shape=(28, 28, 1),
        filters=3,
        noise_volume=0.1,
        reg_strength=1e-9,
        epochs=DEFAULT_EPOCHS,
        batch_size=256,
        learning_rate=1e-3,
        seed=0,
        detector_i=None,
        detector_ii=None,
    ):
        self.classifier = classifier
        self.image_shape = tuple(int(s) for s in image_shape)
        self.filters = int(filters)
        self.noise_volume = float(noise_volume)
        self.reg_strength = float(reg_strength)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.learning_rate = float(learning_rate)
        self.seed = int(seed)
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be [H, W, C], got {image_shape}")
        if self.image_shape[0] % 2 or self.image_shape[1] % 2:
            raise ValueError(f"MagNet's detector I needs even H and W, got {image_shape}")
        if self.filters < 1:
            raise ValueError(f"filters must be >= 1, got {filters}")
        if self.noise_volume < 0 or self.reg_strength < 0:
            raise ValueError("noise_volume and reg_strength must be >= 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.autoencoders = {
            "I": detector_i if detector_i is not None else self._new_autoencoder("I"),
            "II": detector_ii if detector_ii is not None else self._new_autoencoder("II"),
        }
        for name, ae in self.autoencoders.items():
            if not isinstance(ae, MagNetAutoencoder) or ae.variant != name:
                raise ValueError(f"detector_{name.lower()} must be a MagNetAutoencoder of "
                                 f"variant {name!r}")
            if not ae.built:
                ae.build((None, *self.image_shape))
        self.thresholds: dict | None = None
        self.fpr: float | None = None
        self.report: dict = {}
        self._reconstruct_fns = {}

    def _new_autoencoder(self, variant):
        ae = MagNetAutoencoder(
            variant=variant, filters=self.filters, channels=self.image_shape[-1],
            reg_strength=self.reg_strength, name=f"magnet_{variant}",
        )
        ae.build((None, *self.image_shape))
        return ae

    @property
    def reformer(self) -> MagNetAutoencoder:
        """Detector I's autoencoder."""
        return self.autoencoders["I"]

    # ----------------------------------------------------------------------------- training
    def _noisy_dataset(self, x, seed):
        noise = self.noise_volume

        def corrupt(clean, key):
            noisy = clean + noise * tf.random.stateless_normal(tf.shape(clean), key)
            return tf.clip_by_value(noisy, 0.0, 1.0), clean

        count = len(x)
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.from_tensor_slices(x).shuffle(
            min(count, 20_000), seed=seed, reshuffle_each_iteration=True
        ).batch(self.batch_size)
        return tf.data.Dataset.zip(ds, keys).map(corrupt).prefetch(2)

    def train(self, x_train, x_val=None, verbose=0) -> dict:
        """Train both denoising AEs on clean images `x_train`; returns per-AE loss histories.

        `x_val` (clean) is only used to report a validation MSE. The trained AEs replace the
        current ones and any calibration is dropped. Calls ``keras.utils.set_random_seed(seed)``
        (weight initialisation), which resets the global random state.
        """
        x_train = check_images(x_train, self.image_shape)
        if x_val is not None:
            x_val = check_images(x_val, self.image_shape)
        history = {}
        for offset, name in enumerate(VARIANTS):
            keras.utils.set_random_seed(self.seed + offset)
            ae = self._new_autoencoder(name)
            ae.compile(optimizer=keras.optimizers.Adam(self.learning_rate), loss="mse")
            fit = ae.fit(
                self._noisy_dataset(x_train, self.seed + offset), epochs=self.epochs,
                validation_data=None if x_val is None else (x_val, x_val),
                validation_batch_size=self.batch_size, shuffle=False, verbose=verbose,
            )
            history[name] = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
            trained = ae
            ae = MagNetAutoencoder.from_config(trained.get_config())  # drop optimizer state
            ae.build((None, *self.image_shape))
            ae.set_weights(trained.get_weights())
            self.autoencoders[name] = ae
        self._reconstruct_fns = {}
        self.thresholds = None
        self.fpr = None
        return history

    def fit(self, x_train, x_val, fpr, verbose=0) -> dict:
        """Train the AEs on `x_train`, then calibrate on clean `x_val` at `fpr` (ART's `fit`)."""
        fpr = check_fpr(fpr)
        started = time.time()
        history = self.train(x_train, x_val, verbose=verbose)
        train_seconds = time.time() - started
        report = self.calibrate(x_val, fpr)
        report.update(
            history=history, epochs=self.epochs, num_train=int(len(x_train)),
            train_seconds=train_seconds,
        )
        self.report = {k: v for k, v in report.items() if k != "val_scores"}
        return report

    # ----------------------------------------------------------------------------- scoring
    def _reconstruct_fn(self, name):
        if name not in self._reconstruct_fns:
            ae = self.autoencoders[name]
            spec = tf.TensorSpec([None, *self.image_shape], tf.float32)
            self._reconstruct_fns[name] = tf.function(
                lambda x: ae(x, training=False), input_signature=[spec]
            )
        return self._reconstruct_fns[name]

    def reform(self, x, batch_size: int = 500) -> np.ndarray:
        """Reformer output AE_I(x) [n, H, W, C]."""
        x = check_images(x, self.image_shape)
        fn = self._reconstruct_fn("I")
        return np.concatenate(
            [fn(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
        )

    def scores(self, x, batch_size: int = 500) -> dict:
        """Reconstruction errors {"I": mean((x - AE_I(x))^2), "II": mean(|x - AE_II(x)|)} [n]."""
        x = check_images(x, self.image_shape)
        out = {}
        for name, p in DETECTOR_NORMS.items():
            fn = self._reconstruct_fn(name)
            parts = []
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size]
                err = np.abs(xb - fn(xb).numpy()) ** p
                parts.append(err.reshape(len(xb), -1).mean(axis=1))
            out[name] = np.concatenate(parts).astype(np.float32)
        return out

    def calibrate(self, x_val, fpr) -> dict:
        """Set the detector thresholds on clean `x_val` so the joint VAL FPR is <= `fpr`."""
        fpr = check_fpr(fpr)
        val_scores = self.scores(x_val)
        thresholds = calibrate_thresholds(val_scores, fpr)
        self.thresholds = thresholds
        self.fpr = fpr
        report = {
            "num_val": int(len(val_scores["I"])),
            "fpr_target": fpr,
            "thresholds": dict(thresholds),
            "val_false_positive_rate": union_false_positive_rate(val_scores, thresholds),
            "val_false_positive_rate_per_detector": {
                k: float(np.mean(val_scores[k] > thresholds[k])) for k in thresholds
            },
            "detector_norms": {k: f"L{p}" for k, p in DETECTOR_NORMS.items()},
            "val_scores": val_scores,
        }
        self.report = {**self.report, **{k: v for k, v in report.items() if k != "val_scores"}}
        return report

    # ----------------------------------------------------------------------------- decisions
    def detect(self, x, batch_size: int = 500):
        """ART-style detection: (scores dict {"I", "II"} of [n], is_adversarial bool [n])."""
        self._require_calibrated()
        scores = self.scores(x, batch_size)
        return scores, self._flagged(scores)

    def _flagged(self, scores: dict) -> np.ndarray:
        """bool [n]: flagged by either detector (its score {"I", "II"} above its threshold)."""
        flagged = np.zeros(len(scores["I"]), dtype=bool)
        for name in DETECTOR_NORMS:
            flagged |= scores[name] > self.thresholds[name]
        return flagged

    def measure(self, x, batch_size: int | None = None, verbose: int = 0) -> dict:
        """`score_I`, `score_II` float32 [n] (the detectors' reconstruction errors),
        `reformed_label` int64 [n] (classifier(reformer(x))) and `classifier_label` int64 [n]
        (classifier(x), no defense), `batch_size` images at a time; no threshold."""
        if self.classifier is None:
            raise ValueError("MagNet.measure and defend need a classifier "
                             "(MagNet(classifier, ...))")
        x = check_images(x, self.image_shape)
        return concat_outputs(in_batches(self._measure_batch, x, batch_size or self._batch_size,
                                         verbose))

    def _measure_batch(self, x) -> dict:
        """`measure`'s outputs for one batch of checked images."""
        scores = self.scores(x, len(x))
        return {"score_I": scores["I"], "score_II": scores["II"],
                "reformed_label": self._labels(self.reform(x, len(x)), len(x)),
                "classifier_label": self._labels(x, len(x))}

    def decide(self, measured: dict) -> dict:
        """`defend`'s outputs: `label` int64 [n] (classifier(reformer(x)); -1 when rejected),
        `verdict` int32 [n] (0 passed, 2 rejected), `score` float32 [n] (max over detectors of
        score / threshold; > 1 means rejected), `score_I`, `score_II` (raw reconstruction
        errors), `classifier_label` int64 [n] (classifier(x), no defense)."""
        self._require_calibrated()
        ratio = np.max([measured[f"score_{k}"] / max(self.thresholds[k], 1e-12)
                        for k in DETECTOR_NORMS], axis=0).astype(np.float32)
        flagged = self._flagged({k: measured[f"score_{k}"] for k in DETECTOR_NORMS})
        return {
            "label": np.where(flagged, -1, measured["reformed_label"]).astype(np.int64),
            "verdict": np.where(flagged, VERDICT_REJECTED, VERDICT_PASSED).astype(np.int32),
            "score": ratio,
            "score_I": measured["score_I"],
            "score_II": measured["score_II"],
            "classifier_label": measured["classifier_label"],
        }

    def _measurement_settings(self) -> dict:
        return {"image_shape": list(self.image_shape), "detector_norms": dict(DETECTOR_NORMS)}

    def _measurement_models(self) -> list:
        return [self.autoencoders[k] for k in DETECTOR_NORMS]

    def adaptive_surface(self, x):
        """Differentiable white-box view for adaptive attacks (tensors in, tensors out).

        Returns (logits [B, K] of classifier(AE_I(x)), the label a passed input gets;
        ratio [B] = max over detectors of score / threshold, the input is rejected iff > 1).
        """
        self._require_calibrated()
        x = tf.convert_to_tensor(x, tf.float32)
        ratios = []
        for name, p in DETECTOR_NORMS.items():
            err = tf.abs(x - self.autoencoders[name](x, training=False)) ** p
            score = tf.reduce_mean(tf.reshape(err, [tf.shape(x)[0], -1]), axis=-1)
            ratios.append(score / max(self.thresholds[name], 1e-12))
        logits = self.classifier(self.reformer(x, training=False), training=False)
        return tf.convert_to_tensor(logits, tf.float32), tf.reduce_max(tf.stack(ratios), axis=0)

    # ----------------------------------------------------------------------------- saving
    def _settings(self) -> dict:
        return {
            "image_shape": list(self.image_shape),
            "filters": self.filters,
            "noise_volume": self.noise_volume,
            "reg_strength": self.reg_strength,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "seed": self.seed,
        }

    def save(self, directory: str) -> None:
        """Write detector_I.keras, detector_II.keras and magnet.json (settings, thresholds)."""
        os.makedirs(directory, exist_ok=True)
        for name, ae in self.autoencoders.items():
            with atomic_path(os.path.join(directory, f"detector_{name}.keras")) as tmp:
                ae.save(tmp)
        state = {
            "settings": self._settings(),
            **self._calibration_state(),
            "detector_norms": {k: f"L{p}" for k, p in DETECTOR_NORMS.items()},
        }
        write_json(os.path.join(directory, _JSON_NAME), state, sort_keys=True)

    @classmethod
    def load(cls, directory: str, classifier=None) -> MagNet:
        """Inverse of `save`; `classifier` is needed for `defend` only."""
        state = cls._read_state(os.path.join(directory, _JSON_NAME))
        aes = {
            name: keras.models.load_model(os.path.join(directory, f"detector_{name}.keras"),
                                          compile=False)
            for name in VARIANTS
        }
        magnet = cls(classifier, detector_i=aes["I"], detector_ii=aes["II"], **state["settings"])
        magnet._restore_calibration(state)
        return magnet

"""Feature Squeezing baseline (Xu, Evans & Qi, NDSS 2018).

Squeezers: by default its MNIST configuration (paper Table 3 / EvadeML-Zoo), **bit-depth
reduction to 1 bit** and a **2x2 median filter**; `choose_squeezers` picks them for another
dataset on VAL, as Xu et al. did per dataset (`fmd_tf.evaluation.baselines` does). Score of
an image x: the largest L1 distance between the classifier's softmax on x and on a squeezed x,
``max_s ||softmax(f(x)) - softmax(f(s(x)))||_1`` (in [0, 2]). An image is adversarial iff its
score is above a threshold set on clean VAL images at a target false-positive rate (that of
the FM-Defense it is compared with); see :func:`fmd_tf.baselines.magnet.calibrate_thresholds`.

Bit-depth reduction to b bits: ``round(x * (2**b - 1)) / (2**b - 1)`` with round-half-to-even
(numpy's ``rint``, as in the reference code): for b = 1, values <= 0.5 become 0, the rest 1.

Median filter (choice documented here): identical to the reference implementation
``scipy.ndimage.median_filter(x, size=(1, k, k, 1), mode="reflect")``. For the even 2x2 window
this means:

* window: the pixel, its upper neighbour, its left neighbour and the upper-left one (scipy's
  origin-0 placement of an even window: offsets -1 and 0 in each axis);
* borders: scipy's "reflect" (the edge pixel is repeated, ``d c b a | a b c d``), which is
  TensorFlow's ``"SYMMETRIC"`` padding, not TF's ``"REFLECT"``;
* the median of an even count is the *upper* of the two middle values (scipy's rank filter
  with rank k*k // 2), not their mean, so outputs are always pixel values of the input.

The filter is written in TF (``tf.image.extract_patches`` + ``tf.sort``), any window size k.
Decision (FM-Defense convention): verdict 0 (passed) with the classifier's label, or verdict 2
(rejected) with label -1.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from fmd_tf.baselines.magnet import (
    calibrate_thresholds,
    check_fpr,
    check_images,
    union_false_positive_rate,
)
from fmd_tf.baselines.threshold_detector import ThresholdDetector
from fmd_tf.defense.fm_defense import VERDICT_PASSED, VERDICT_REJECTED
from fmd_tf.files import write_json
from fmd_tf.progress import concat_outputs, in_batches

__all__ = ["SQUEEZER_CANDIDATES", "FeatureSqueezing", "choose_squeezers", "median_filter",
           "reduce_bit_depth"]

# (bit depth, median window) settings `choose_squeezers` picks from: each squeezer alone and
# every pair (None: that squeezer left out).
# Images per graph call of `score` / `detect` / `defend` and of `choose_squeezers`.
BATCH_SIZE = 500

SQUEEZER_CANDIDATES = tuple((bits, median) for bits in (None, 1, 2, 3, 4, 5)
                            for median in (None, 2, 3) if (bits, median) != (None, None))


def reduce_bit_depth(images, bits: int = 1):
    """Quantise [0, 1] images to 2**bits levels (round half to even); same shape, float32."""
    bits = int(bits)
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    levels = float(2**bits - 1)
    images = tf.convert_to_tensor(images, tf.float32)
    return tf.round(images * levels) / levels


def median_filter(images, size: int = 2):
    """k x k median filter of images [B, H, W, C], like scipy's ``median_filter(mode='reflect')``.

    Window offsets ``-(k // 2) .. k - 1 - k // 2`` in each spatial axis, symmetric (edge-
    repeating) padding, and the element of rank ``k*k // 2`` (the upper median for even k).
    Channels are filtered independently.
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    images = tf.convert_to_tensor(images, tf.float32)
    if size == 1:
        return images
    before, after = size // 2, size - 1 - size // 2
    padded = tf.pad(images, [[0, 0], [before, after], [before, after], [0, 0]], mode="SYMMETRIC")
    patches = tf.image.extract_patches(
        padded, sizes=[1, size, size, 1], strides=[1, 1, 1, 1], rates=[1, 1, 1, 1],
        padding="VALID",
    )  # [B, H, W, size*size*C], ordered (row, col, channel)
    shape = tf.shape(images)
    patches = tf.reshape(patches, [shape[0], shape[1], shape[2], size * size, shape[3]])
    ordered = tf.sort(patches, axis=3)
    return ordered[:, :, :, (size * size) // 2, :]


class FeatureSqueezing(ThresholdDetector):
    """Feature Squeezing detector around a classifier (plain Python object, numpy API).

    Args:
        classifier: Keras model (or callable), images float32 [B, H, W, C] -> logits (or
            probabilities with ``from_logits=False``).
        bit_depth: bits of the bit-depth squeezer (MNIST: 1); None to leave it out.
        median_size: window of the median squeezer (MNIST: 2, i.e. 2x2); None to leave it out.
        from_logits: whether the classifier returns logits (FM-Defense's classifier does).

    Usage::

        fs = FeatureSqueezing(classifier)
        fs.calibrate(x_val, fpr=0.001)
        out = fs.defend(x)  # label (-1 when rejected), verdict (0 or 2), score
    """

    _batch_size = BATCH_SIZE

    def __init__(self, classifier, bit_depth=1, median_size=2, from_logits=True):
        if classifier is None or not callable(classifier):
            raise ValueError("FeatureSqueezing needs a callable classifier (images -> logits)")
        self.classifier = classifier
        self.bit_depth = None if bit_depth is None else int(bit_depth)
        self.median_size = None if median_size is None else int(median_size)
        self.from_logits = bool(from_logits)
        if self.bit_depth is None and self.median_size is None:
            raise ValueError("FeatureSqueezing needs at least one squeezer")
        if self.bit_depth is not None and not 1 <= self.bit_depth <= 16:
            raise ValueError(f"bit_depth must be in [1, 16], got {bit_depth}")
        if self.median_size is not None and self.median_size < 2:
            raise ValueError(f"median_size must be >= 2, got {median_size}")
        self.threshold: float | None = None
        self.fpr: float | None = None
        self.report: dict = {}
        self._score_fn = None

    @property
    def squeezer_names(self) -> tuple[str, ...]:
        names = []
        if self.bit_depth is not None:
            names.append(f"bit_depth_{self.bit_depth}")
        if self.median_size is not None:
            names.append(f"median_{self.median_size}x{self.median_size}")
        return tuple(names)

    def squeeze(self, images) -> dict:
        """Squeezed versions of `images`: squeezer name -> tensor of the same shape."""
        out = {}
        if self.bit_depth is not None:
            out[f"bit_depth_{self.bit_depth}"] = reduce_bit_depth(images, self.bit_depth)
        if self.median_size is not None:
            out[f"median_{self.median_size}x{self.median_size}"] = median_filter(
                images, self.median_size
            )
        return out

    # ----------------------------------------------------------------------------- scoring
    def _probabilities(self, images):
        out = tf.convert_to_tensor(self.classifier(images), tf.float32)
        return tf.nn.softmax(out, axis=-1) if self.from_logits else out

    def _batch(self, images):
        p = self._probabilities(images)
        distances = {
            name: tf.reduce_sum(tf.abs(p - self._probabilities(squeezed)), axis=-1)
            for name, squeezed in self.squeeze(images).items()
        }
        return tf.argmax(p, axis=-1), distances

    def adaptive_surface(self, x):
        """Differentiable white-box view for adaptive attacks (tensors in, tensors out).

        Returns (logits [B, K] of the classifier on x, the label a passed input gets; ratio [B]
        = score / threshold, the input is rejected iff > 1). Bit-depth reduction is not
        differentiable: its gradient is replaced by the identity (BPDA, Athalye et al. 2018);
        the median filter's gradient flows through `tf.sort`.
        """
        self._require_calibrated()
        x = tf.convert_to_tensor(x, tf.float32)
        logits = tf.convert_to_tensor(self.classifier(x), tf.float32)
        p = tf.nn.softmax(logits, axis=-1) if self.from_logits else logits
        distances = []
        for name, squeezed in self.squeeze(x).items():
            if name.startswith("bit_depth"):
                squeezed = x + tf.stop_gradient(squeezed - x)
            distances.append(tf.reduce_sum(tf.abs(p - self._probabilities(squeezed)), axis=-1))
        score = tf.reduce_max(tf.stack(distances), axis=0)
        return logits, score / max(self.threshold, 1e-12)

    def _run(self, x, batch_size, verbose: int = 0):
        """(classifier labels int64 [n], {name: L1 softmax distance float32 [n]} for every
        squeezer of `squeeze`)."""
        x = check_images(x)
        if self._score_fn is None:
            self._score_fn = tf.function(self._batch, reduce_retracing=True)

        def batch(xb):
            label, distances = self._score_fn(tf.constant(xb))
            return {**{k: d.numpy() for k, d in distances.items()},
                    "classifier_label": label.numpy()}

        out = concat_outputs(in_batches(batch, x, batch_size, verbose))
        labels = out.pop("classifier_label")  # no squeezer has that name
        return labels.astype(np.int64), {k: v.astype(np.float32) for k, v in out.items()}

    def _score(self, per_squeezer: dict) -> np.ndarray:
        """Max over this detector's squeezers of their distances in `per_squeezer`."""
        return np.max(np.stack([per_squeezer[name] for name in self.squeezer_names]), axis=0)

    def score(self, x, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Max over squeezers of the L1 softmax distance, float32 [n] in [0, 2]."""
        return self._score(self._run(x, batch_size)[1])

    def calibrate(self, x_val, fpr) -> dict:
        """Set the threshold on clean `x_val` so that the VAL FPR is <= `fpr` (tight)."""
        fpr = check_fpr(fpr)
        return self._calibrate_scores(self.score(x_val), fpr)

    def _calibrate_scores(self, val_scores, fpr: float) -> dict:
        threshold = calibrate_thresholds({"score": val_scores}, fpr)["score"]
        self.threshold = threshold
        self.fpr = fpr
        self.report = {
            "num_val": int(len(val_scores)),
            "fpr_target": fpr,
            "threshold": threshold,
            "val_false_positive_rate": union_false_positive_rate(
                {"score": val_scores}, {"score": threshold}
            ),
        }
        return {**self.report, "val_scores": val_scores}

    # ----------------------------------------------------------------------------- decisions
    def detect(self, x, batch_size: int = BATCH_SIZE):
        """ART-style detection: (scores float32 [n], is_adversarial bool [n])."""
        self._require_calibrated()
        scores = self.score(x, batch_size)
        return scores, scores > self.threshold

    def measure(self, x, batch_size: int | None = None, verbose: int = 0) -> dict:
        """`classifier_label` int64 [n] and each squeezer's L1 softmax distance float32 [n]
        (keyed by its name in `squeezer_names`); no threshold."""
        labels, per_squeezer = self._run(x, batch_size or BATCH_SIZE, verbose)
        return {"classifier_label": labels, **per_squeezer}

    def decide(self, measured: dict) -> dict:
        """`label` int64 [n] (classifier label; -1 when rejected), `verdict` int32 [n] (0
        passed, 2 rejected), `score` float32 [n], `classifier_label` int64 [n], and one
        ``score_<squeezer>`` float32 [n] per squeezer."""
        self._require_calibrated()
        return self._outputs(measured["classifier_label"], measured)

    def _measurement_settings(self) -> dict:
        return {"squeezers": list(self.squeezer_names), "from_logits": self.from_logits}

    def _outputs(self, labels, per_squeezer: dict) -> dict:
        """`defend`'s outputs from `_run`'s (of this detector or of one with more squeezers)."""
        score = self._score(per_squeezer)
        flagged = score > self.threshold
        out = {
            "label": np.where(flagged, -1, labels).astype(np.int64),
            "verdict": np.where(flagged, VERDICT_REJECTED, VERDICT_PASSED).astype(np.int32),
            "score": score,
            "classifier_label": labels,
        }
        out.update({f"score_{k}": per_squeezer[k] for k in self.squeezer_names})
        return out

    # ----------------------------------------------------------------------------- saving
    def save(self, path: str) -> None:
        """Write the squeezer settings and threshold to a JSON file (not the classifier)."""
        state = {
            "bit_depth": self.bit_depth,
            "median_size": self.median_size,
            "from_logits": self.from_logits,
            "squeezers": list(self.squeezer_names),
            **self._calibration_state(),
        }
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        write_json(path, state, sort_keys=True)

    @classmethod
    def load(cls, path: str, classifier) -> FeatureSqueezing:
        """Inverse of `save`, around `classifier`."""
        state = cls._read_state(path)
        fs = cls(classifier, bit_depth=state["bit_depth"], median_size=state["median_size"],
                 from_logits=state["from_logits"])
        fs._restore_calibration(state)
        return fs


def choose_squeezers(classifier, x_val, y_val, adversarial: dict, fpr,
                     candidates=SQUEEZER_CANDIDATES, from_logits: bool = True
                     ) -> tuple[int, list[dict]]:
    """(index of the chosen candidate, one row per candidate): the squeezers chosen on VAL.

    Each (bit depth, median window) of `candidates` is calibrated on the clean VAL images
    `x_val` (labels `y_val`) at `fpr` and run on them and on every attacked VAL set of
    `adversarial` {name: (x_adv, y)}; the chosen row is the one FM-Defense's operating-point
    rule would take (`fmd_tf.operating_point.max_min_row`): the largest *smallest* defended
    accuracy over clean VAL and the attacks, the first on ties. Rows: bit_depth, median_size,
    threshold, val_false_positive_rate, val_clean_defended_accuracy and
    val_<name>_defended_accuracy.
    """
    from fmd_tf.evaluation.metrics import defended_accuracy
    from fmd_tf.operating_point import max_min_row

    if not candidates or not adversarial:
        raise ValueError("choose_squeezers needs candidates and at least one attacked VAL set")
    fpr = check_fpr(fpr)
    # Every squeezer of the candidates runs once per image set: a squeezer's distance does not
    # depend on the others, so each candidate's scores are the max over its own.
    every = _EverySqueezer(classifier, candidates, from_logits)
    clean_run = every._run(x_val, BATCH_SIZE)
    adversarial_runs = {name: (every._run(x_adv, BATCH_SIZE), y_adv)
                        for name, (x_adv, y_adv) in adversarial.items()}
    rows = []
    for bits, median in candidates:
        fs = FeatureSqueezing(classifier, bit_depth=bits, median_size=median,
                              from_logits=from_logits)
        report = fs._calibrate_scores(fs._score(clean_run[1]), fpr)
        clean = fs._outputs(*clean_run)
        row = {"bit_depth": bits, "median_size": median, "threshold": report["threshold"],
               "val_false_positive_rate": report["val_false_positive_rate"],
               "val_clean_defended_accuracy": defended_accuracy(
                   clean["label"], clean["verdict"], y_val, False)}
        for name, (run, y_adv) in adversarial_runs.items():
            out = fs._outputs(*run)
            row[f"val_{name}_defended_accuracy"] = defended_accuracy(
                out["label"], out["verdict"], y_adv, True)
        rows.append(row)
    return max_min_row(rows, list(adversarial)), rows


class _EverySqueezer(FeatureSqueezing):
    """The squeezers of several (bit depth, median window) candidates in one detector: its
    `_run` gives every squeezer's distances, which each candidate's `_outputs` reads."""

    def __init__(self, classifier, candidates, from_logits: bool):
        super().__init__(classifier, from_logits=from_logits)
        self._bits = sorted({b for b, _ in candidates if b is not None})
        self._medians = sorted({m for _, m in candidates if m is not None})

    @property
    def squeezer_names(self) -> tuple[str, ...]:
        return (tuple(f"bit_depth_{b}" for b in self._bits)
                + tuple(f"median_{m}x{m}" for m in self._medians))

    def squeeze(self, images) -> dict:
        out = {f"bit_depth_{b}": reduce_bit_depth(images, b) for b in self._bits}
        out.update({f"median_{m}x{m}": median_filter(images, m) for m in self._medians})
        return out

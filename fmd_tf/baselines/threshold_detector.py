"""`ThresholdDetector`: what the baseline detectors share about being calibrated and saved."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from fmd_tf.defense.fm_defense import NotCalibratedError

__all__ = ["ThresholdDetector"]


class ThresholdDetector:
    """Mixin of a detector that flags inputs whose score passes thresholds set on clean VAL
    images: it is calibrated once the attribute `_threshold_attr` is set (not None), and its
    scoring methods call `_require_calibrated` first. `_calibrate_call` names the call that
    calibrates it, for the error message.

    Defending is two steps: `measure(x)`, the costly pass that does not depend on the
    thresholds (scores, purified labels), and `decide(measured)`, the verdicts and labels at the
    current thresholds. `defend(x)` is both; an evaluation caches `measure`'s outputs under
    `measurement_fingerprint()`, so calibrating again at another false-positive rate costs no
    new pass. A subclass defines `measure`, `decide`, `_measurement_settings` and
    `_measurement_models`.

    Saving: `_calibration_state` is what a saved file holds of the calibration (the thresholds
    under `_threshold_attr`, `fpr`, `report`), `_restore_calibration` its inverse and
    `_read_state` reads a saved JSON file."""

    _threshold_attr = "threshold"
    _calibrate_call = "calibrate(x_val, fpr)"
    # Images per graph call of `defend` when no batch size is given.
    _batch_size = 500

    @property
    def is_calibrated(self) -> bool:
        return getattr(self, self._threshold_attr) is not None

    def _require_calibrated(self):
        if not self.is_calibrated:
            raise NotCalibratedError(
                f"{type(self).__name__} is not calibrated: call {self._calibrate_call} first "
                "(or load a calibrated one)")

    def defend(self, x, batch_size: int | None = None, verbose: int = 0) -> dict:
        """`decide(measure(x))`: the defense's outputs on images x [n, H, W, C] (`verbose`: a
        progress bar over the images), `batch_size` images per graph call."""
        self._require_calibrated()
        return self.decide(self.measure(x, batch_size or self._batch_size, verbose))

    def measure(self, x, batch_size: int | None = None, verbose: int = 0) -> dict:
        """Threshold-free outputs on images x (numpy arrays, one row per image)."""
        raise NotImplementedError

    def decide(self, measured: dict) -> dict:
        """`defend`'s outputs from `measure`'s, at the current thresholds."""
        raise NotImplementedError

    def measurement_fingerprint(self) -> str:
        """sha256 (16 hex digits) of what `measure` depends on besides the classifier and the
        images: the settings and weights, not the calibration."""
        h = hashlib.sha256(json.dumps(self._measurement_settings(), sort_keys=True).encode())
        for model in self._measurement_models():
            for w in model.get_weights():
                h.update(np.ascontiguousarray(w).tobytes())
        return h.hexdigest()[:16]

    def calibration_key(self) -> str:
        """The thresholds as JSON: with `measurement_fingerprint`, all that the decisions (and
        an attack adapted to them) depend on besides the classifier."""
        return json.dumps(getattr(self, self._threshold_attr), sort_keys=True)

    def _measurement_settings(self) -> dict:
        raise NotImplementedError

    def _measurement_models(self) -> list:
        return []

    def _labels(self, x, batch_size: int) -> np.ndarray:
        """The classifier's labels [N] (int64) of images x [N, H, W, C], batch by batch."""
        return np.concatenate([
            np.argmax(np.asarray(self.classifier(x[i : i + batch_size])), axis=-1)
            for i in range(0, len(x), batch_size)
        ]).astype(np.int64)

    @staticmethod
    def _parse_threshold(value):
        """A saved threshold as the detector holds it (a float; MagNet: one per detector)."""
        return float(value)

    def _calibration_state(self) -> dict:
        return {self._threshold_attr: getattr(self, self._threshold_attr), "fpr": self.fpr,
                "report": self.report}

    def _restore_calibration(self, state: dict) -> None:
        if state.get(self._threshold_attr) is not None:
            setattr(self, self._threshold_attr,
                    self._parse_threshold(state[self._threshold_attr]))
            self.fpr = state.get("fpr")
        self.report = state.get("report", {})

    @classmethod
    def _read_state(cls, path: str) -> dict:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: not a saved {cls.__name__}")
        with open(path) as f:
            return json.load(f)

"""`ThresholdDetector`: what the baseline detectors share about being calibrated."""

from __future__ import annotations

from fmd_tf.defense.fm_defense import NotCalibratedError

__all__ = ["ThresholdDetector"]


class ThresholdDetector:
    """Mixin of a detector that flags inputs whose score passes thresholds set on clean VAL
    images: it is calibrated once the attribute `_threshold_attr` is set (not None), and its
    scoring methods call `_require_calibrated` first. `_calibrate_call` names the call that
    calibrates it, for the error message."""

    _threshold_attr = "threshold"
    _calibrate_call = "calibrate(x_val, fpr)"

    @property
    def is_calibrated(self) -> bool:
        return getattr(self, self._threshold_attr) is not None

    def _require_calibrated(self):
        if not self.is_calibrated:
            raise NotCalibratedError(
                f"{type(self).__name__} is not calibrated: call {self._calibrate_call} first "
                "(or load a calibrated one)")

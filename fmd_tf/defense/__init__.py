"""Defense: natural morphs, calibration of θr / θd, and the FMDefense model."""

from fmd_tf.defense.fm_defense import (
    OUTPUT_KEYS,
    VERDICT_PASSED,
    VERDICT_PURIFIED,
    VERDICT_REJECTED,
    FMDefense,
    NotCalibratedError,
)

__all__ = [
    "FMDefense", "NotCalibratedError", "OUTPUT_KEYS",
    "VERDICT_PASSED", "VERDICT_PURIFIED", "VERDICT_REJECTED",
]

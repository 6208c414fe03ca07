"""Defense: natural morphs, calibration of θr / θd, and the FMDefense model."""

from fmd_tf.defense.fm_defense import (
    OUTPUT_KEYS,
    VERDICT_PASSED,
    VERDICT_PURIFIED,
    VERDICT_REJECTED,
    FMDefense,
    NotCalibratedError,
)
from fmd_tf.defense.fm_defense_ensemble import FMDefenseEnsemble, select_members

__all__ = [
    "FMDefense", "FMDefenseEnsemble", "NotCalibratedError", "select_members", "OUTPUT_KEYS",
    "VERDICT_PASSED", "VERDICT_PURIFIED", "VERDICT_REJECTED",
]

"""Attacks: on the classifier alone, as in the paper (§IV), and adaptive white-box attacks on
the whole FM-Defense (`adaptive`) and on detector baselines (`adaptive_detector_pgd`)."""

from fmd_tf.attacks.adaptive import (
    adaptive_pgd,
    adaptive_resistance,
    adaptive_success,
    cw_high_confidence_transfer,
    soft_resistance,
)
from fmd_tf.attacks.adaptive_detector_pgd import adaptive_detector_pgd
from fmd_tf.attacks.carlini_wagner import carlini_wagner_l2
from fmd_tf.attacks.deepfool import deepfool
from fmd_tf.attacks.gradient_attacks import fgsm, mim, pgd

__all__ = [
    "adaptive_detector_pgd", "adaptive_pgd", "adaptive_resistance", "adaptive_success",
    "carlini_wagner_l2", "cw_high_confidence_transfer", "deepfool", "fgsm", "mim", "pgd",
    "soft_resistance",
]

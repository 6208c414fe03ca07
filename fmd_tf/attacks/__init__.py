"""Attacks: on the classifier alone, as in the paper (§IV), white-box or black-box
(`black_box`: score- and decision-based, through ART), adaptive white-box attacks on the
whole FM-Defense (`adaptive`; APGD-CE / APGD-DLR in `apgd`) and on detector baselines
(`adaptive_detector_pgd`), and black-box attacks on the defended endpoint through its public
outputs only (`api_attacks`: Square, RayS, HopSkipJump and the ball's corners, with query
budgets, via a `QueryOracle`)."""

from fmd_tf.attacks.adaptive import (
    adaptive_pgd,
    adaptive_resistance,
    adaptive_success,
    cw_high_confidence_transfer,
    soft_resistance,
)
from fmd_tf.attacks.adaptive_detector_pgd import adaptive_detector_pgd
from fmd_tf.attacks.apgd import adaptive_apgd, apgd
from fmd_tf.attacks.api_attacks import (
    QueryOracle,
    api_corners,
    api_hop_skip_jump,
    api_rays,
    api_square,
)
from fmd_tf.attacks.black_box import art_classifier, hop_skip_jump, square
from fmd_tf.attacks.carlini_wagner import carlini_wagner_l2
from fmd_tf.attacks.deepfool import deepfool
from fmd_tf.attacks.gradient_attacks import fgsm, mim, pgd

__all__ = [
    "QueryOracle", "adaptive_apgd", "adaptive_detector_pgd", "adaptive_pgd",
    "adaptive_resistance", "adaptive_success", "apgd", "api_corners", "api_hop_skip_jump",
    "api_rays", "api_square",
    "art_classifier", "carlini_wagner_l2", "cw_high_confidence_transfer", "deepfool", "fgsm",
    "hop_skip_jump", "mim", "pgd", "soft_resistance", "square",
]

"""Attacks against the (undefended) classifier; the defense is not known to them (paper §IV)."""

from fmd_tf.attacks.carlini_wagner import carlini_wagner_l2
from fmd_tf.attacks.deepfool import deepfool
from fmd_tf.attacks.gradient_attacks import fgsm, mim, pgd

__all__ = ["carlini_wagner_l2", "deepfool", "fgsm", "mim", "pgd"]

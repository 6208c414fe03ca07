"""Attacks against the (undefended) classifier; the defense is not known to them (paper §IV)."""

from fmd_tf.attacks.gradient_attacks import fgsm, mim, pgd

__all__ = ["fgsm", "mim", "pgd"]

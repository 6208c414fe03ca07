"""A classifier's own robustness on VAL images: how `scripts/robust_val.py` picks between robust
classifiers (PGD-AT or TRADES, more or fewer epochs) without looking at test images, and how
`scripts/train.py` checks each adversarial training for a classifier that fooled its training
attack."""

from __future__ import annotations

import numpy as np

from fmd_tf.config import CHECK_IMAGES, CHECK_STEPS, MASKING_RATIO

APGD_LOSSES = ("ce", "dlr")


def val_robustness(classifier, x, y, eps: float = 0.1, norm: str = "linf",
                   losses=APGD_LOSSES, nb_iter: int = CHECK_STEPS, seed: int = 0,
                   batch_size: int = 128) -> dict:
    """Clean and APGD accuracy of `classifier` alone on images `x` [n, H, W, C] in [0, 1] with
    labels `y` [n] (`fmd_tf.attacks.apgd.apgd`, one run per loss in `losses`).

    Returns {"n", "eps", "norm", "nb_iter", "clean_accuracy", "apgd_<loss>_accuracy" per loss,
    "worst_case_accuracy"}: the last is the share of images the classifier labels right clean
    and under every loss's attack (per image, as the report's worst case).
    """
    from fmd_tf.attacks.apgd import apgd

    x = np.asarray(x, np.float32)
    y = np.asarray(y).astype(np.int64).reshape(-1)

    def right(images):
        return np.argmax(classifier.predict(images, batch_size=512, verbose=0), -1) == y

    ok = right(x)
    result = {"n": int(len(x)), "eps": float(eps), "norm": norm, "nb_iter": int(nb_iter),
              "clean_accuracy": float(ok.mean())}
    for loss in losses:
        r = right(apgd(classifier, x, y, eps=eps, norm=norm, loss=loss, nb_iter=nb_iter,
                       seed=seed, batch_size=batch_size))
        result[f"apgd_{loss}_accuracy"] = float(r.mean())
        ok &= r
    result["worst_case_accuracy"] = float(ok.mean())
    return result


def masking_suspected(result: dict, ratio: float = MASKING_RATIO) -> bool:
    """Whether a `val_robustness` result shows an adversarially trained classifier whose
    robustness is the training attack's blind spot (gradient masking, catastrophic overfitting):
    worst-case APGD accuracy below `ratio` x clean accuracy.

    Measured on Fashion-MNIST (TRADES, 5 PGD steps at L∞ 0.1, 500 VAL images): dropout 0.5,
    40 epochs, 85.4 % clean, 77.2 % worst case (training PGD accuracy 81.7 %); dropout 0,
    30 epochs, 89.2 % clean, 12.2 % worst case although its training PGD accuracy was 89.2 %.
    """
    return bool(result["worst_case_accuracy"] < ratio * result["clean_accuracy"])


def robust_training_check(classifier, x_val, y_val, eps: float, n: int = CHECK_IMAGES,
                          nb_iter: int = CHECK_STEPS) -> dict:
    """`val_robustness` of an adversarially trained `classifier` on the first `n` VAL images at
    its training budget `eps` (L∞), with "masking_suspected" (`masking_suspected`) added: what
    `scripts/train.py` records in the card as `classifier_val_robustness`."""
    result = val_robustness(classifier, x_val[:n], y_val[:n], eps=eps, nb_iter=nb_iter)
    return {**result, "masking_suspected": masking_suspected(result)}


def robustness_summary(result: dict) -> str:
    """One line for a `robust_training_check` result, with what to do when masking is
    suspected."""
    line = (f"classifier on {result['n']} VAL images, APGD L∞ {result['eps']:g} "
            f"({result['nb_iter']} steps, CE and DLR): clean "
            f"{result['clean_accuracy']:.3f}, worst case {result['worst_case_accuracy']:.3f}")
    if result.get("masking_suspected"):
        line += (f"\nWARNING: APGD leaves less than {MASKING_RATIO:.0%} of the clean accuracy: "
                 "the training attack overrates this classifier's robustness (gradient "
                 "masking or catastrophic overfitting). Train again with more "
                 "--classifier-adversarial-steps or with dropout (--classifier-dropout 0.5).")
    return line

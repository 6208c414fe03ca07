"""A classifier's own robustness on VAL images: how `scripts/robust_val.py` picks between robust
classifiers (PGD-AT or TRADES, more or fewer epochs) without looking at test images."""

from __future__ import annotations

import numpy as np

APGD_LOSSES = ("ce", "dlr")


def val_robustness(classifier, x, y, eps: float = 0.1, norm: str = "linf",
                   losses=APGD_LOSSES, nb_iter: int = 100, seed: int = 0,
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

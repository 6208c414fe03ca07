"""FGSM, PGD (L∞, L2) and MIM through cleverhans 4 on Keras 3 classifiers that return logits."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
from cleverhans.tf2.attacks.momentum_iterative_method import momentum_iterative_method
from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent


def _batched(fn, x, y, batch_size):
    x = np.asarray(x, dtype=np.float32)
    out = []
    for i in range(0, len(x), batch_size):
        yb = None if y is None else tf.constant(np.asarray(y[i : i + batch_size]), tf.int64)
        out.append(fn(tf.constant(x[i : i + batch_size]), yb).numpy())
    return np.concatenate(out).astype(np.float32)


def fgsm(model, x, eps: float = 0.3, y=None, batch_size: int = 256) -> np.ndarray:
    """Untargeted FGSM, L∞ budget `eps`, pixels clipped to [0, 1]; uses labels `y` if given."""
    return _batched(
        lambda xb, yb: fast_gradient_method(model, xb, eps, np.inf, clip_min=0.0, clip_max=1.0,
                                            y=yb),
        x, y, batch_size,
    )


NORMS = {"linf": np.inf, "l2": 2}


def pgd(model, x, eps: float = 0.3, eps_iter: float = 0.01, nb_iter: int = 40, y=None,
        batch_size: int = 256, norm: str = "linf") -> np.ndarray:
    """Untargeted PGD (Madry et al.) in the L∞ or L2 ball of radius `eps` (`norm` "linf" or
    "l2"), random start, pixels clipped to [0, 1]."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    return _batched(
        lambda xb, yb: projected_gradient_descent(
            model, xb, eps, eps_iter, nb_iter, NORMS[norm], clip_min=0.0, clip_max=1.0, y=yb,
            rand_init=True, sanity_checks=False,
        ),
        x, y, batch_size,
    )


def mim(model, x, eps: float = 0.3, eps_iter: float = 0.01, nb_iter: int = 40, y=None,
        batch_size: int = 256) -> np.ndarray:
    """Momentum iterative method, L∞, pixels clipped to [0, 1]."""
    return _batched(
        lambda xb, yb: momentum_iterative_method(
            model, xb, eps, eps_iter, nb_iter, np.inf, clip_min=0.0, clip_max=1.0, y=yb,
            sanity_checks=False,
        ),
        x, y, batch_size,
    )

"""Adaptive PGD on a detector defense that exposes a differentiable white-box view.

The baselines (MagNet, Feature Squeezing) publish ``adaptive_surface(x) -> (logits, ratio)``:
the logits that give a passed input its label, and ``ratio`` = detection score / threshold
(rejected iff ratio > 1). This attack maximises, per example,

    min(margin_y(logits), κ) - λ·τ·softplus((ratio - 1 + δ) / τ)

(``margin_y = max_{k≠y} Z_k - Z_y``) by PGD in the L∞ or L2 ``eps`` ball intersected with
[0, 1]: it fools the defended label while keeping the detector score under its threshold, the
attack Carlini & Wagner (2017) used on MagNet, with the same hinge as `adaptive_pgd` uses for
FM-Defense. Success is judged by the real defense (`defend`) afterwards.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fmd_tf.attacks.adaptive import NORMS, _ascent_step, _margin, _project, _random_start

__all__ = ["adaptive_detector_pgd"]


def adaptive_detector_pgd(
    defense,
    x,
    y=None,
    eps: float = 0.1,
    eps_iter: float | None = None,
    nb_iter: int = 50,
    norm: str = "linf",
    kappa: float = 5.0,
    detection_weight: float = 10.0,
    detection_margin: float = 0.05,
    tau: float = 0.05,
    rand_init: bool = True,
    batch_size: int = 128,
    seed: int = 0,
) -> np.ndarray:
    """PGD against a defense with `adaptive_surface` (see the module docstring).

    Args:
        defense: a calibrated baseline (`MagNet`, `FeatureSqueezing`) or any object with
            `adaptive_surface(x) -> (logits [B, K], ratio [B])`.
        x: images float [n, H, W, C] in [0, 1]; not modified.
        y: true labels int [n]; default the label the defense gives the clean image.
        eps, eps_iter, nb_iter, norm: the budget and steps (eps_iter default 2.5·eps/nb_iter).
        kappa: κ, the margin beyond which only the detector term counts.
        detection_weight: λ. detection_margin: δ. tau: τ of the softplus hinge.
        rand_init: random start in the ball. batch_size: images per batch. seed: start noise.

    Returns:
        float32 array, the shape of `x`, within `eps` of `x` and in [0, 1].
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if eps is None or not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if nb_iter < 0:
        raise ValueError(f"nb_iter must be >= 0, got {nb_iter}")
    if not hasattr(defense, "adaptive_surface"):
        raise TypeError(f"{type(defense).__name__} has no adaptive_surface(x)")
    x = np.array(x, dtype=np.float32)
    if x.ndim != 4 or (len(x) and (x.min() < 0.0 or x.max() > 1.0)):
        raise ValueError("x must be a batch of images [n, H, W, C] in [0, 1]")
    if y is None:
        y = np.concatenate([
            np.argmax(defense.adaptive_surface(x[i : i + batch_size])[0].numpy(), axis=-1)
            for i in range(0, len(x), batch_size)
        ]) if len(x) else np.zeros(0, np.int64)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"{len(y)} labels for {len(x)} images")
    eps_iter = 2.5 * eps / max(nb_iter, 1) if eps_iter is None else eps_iter
    c = {k: tf.constant(float(v), tf.float32) for k, v in dict(
        eps=eps, eps_iter=eps_iter, kappa=kappa, weight=detection_weight,
        margin=detection_margin, tau=tau).items()}

    def objective(x_adv, y_onehot):
        logits, ratio = defense.adaptive_surface(x_adv)
        hinge = c["tau"] * tf.nn.softplus((ratio - 1.0 + c["margin"]) / c["tau"])
        return tf.minimum(_margin(logits, y_onehot), c["kappa"]) - c["weight"] * hinge

    @tf.function(reduce_retracing=True)
    def run(xb, x_adv, y_onehot):
        def body(i, x_adv):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                loss = tf.reduce_sum(objective(x_adv, y_onehot))
            x_adv = _ascent_step(x_adv, tape.gradient(loss, x_adv), c["eps_iter"], norm)
            return i + 1, _project(x_adv, xb, c["eps"], norm)

        return tf.while_loop(lambda i, _: i < nb_iter, body, (tf.constant(0), x_adv))[1]

    out = np.empty_like(x)
    for b, start in enumerate(range(0, len(x), batch_size)):
        xb = tf.constant(x[start : start + batch_size])
        logits_k = int(defense.adaptive_surface(xb[:1])[0].shape[-1])
        y_onehot = tf.one_hot(y[start : start + batch_size], logits_k, dtype=tf.float32)
        x_adv = xb
        if rand_init:
            x_adv = _random_start(xb, c["eps"], norm, tf.constant([int(seed), b], tf.int32))
        out[start : start + len(y_onehot)] = run(xb, x_adv, y_onehot).numpy()
    return out

"""DeepFool (Moosavi-Dezfooli, Fawzi and Frossard, CVPR 2016), batched, in TensorFlow 2.

cleverhans 4 has no TF2 DeepFool and ART's takes minutes for a few hundred images, so this is a
re-implementation of the authors' reference code (https://github.com/LTS4/DeepFool), on a batch:

* the label attacked is the model's prediction ``k0`` on the clean image;
* at every iteration the gradients of all class logits w.r.t. the input come from one
  ``tape.batch_jacobian``; with ``w_k = grad Z_k - grad Z_k0`` and ``f_k = Z_k - Z_k0`` the
  closest linearised boundary is ``l = argmin_{k != k0} |f_k| / ||w_k||_q`` and the step is

  - L2: ``r = (|f_l| / ||w_l||_2 + 1e-4) * w_l / ||w_l||_2``;
  - L∞: ``r = (|f_l| / ||w_l||_1 + 1e-4) * sign(w_l)`` (the paper's p = ∞ case, q = 1);

* ``r_total`` accumulates the steps and the iterate is ``clip(x + (1 + overshoot) * r_total,
  0, 1)`` (overshoot applied inside the loop, as in the reference code);
* an example stops moving (its ``r_total`` is frozen) once its iterate is classified
  differently from ``k0``; the loop ends when all are fooled or after ``max_iterations``.

The whole loop runs in one ``tf.function`` (a ``tf.while_loop``), cached per model and norm and
traced per batch shape (after a second shape, once with a relaxed batch dimension).
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

__all__ = ["deepfool"]

_NORMS = ("l2", "linf")
_TINY = 1e-12  # guards the divisions by gradient norms

# model -> {norm: tf.function}, so that repeated calls on the same model reuse traced graphs.
_LOOP_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_loop_fn(model, norm):
    @tf.function(reduce_retracing=True)
    def run(x, overshoot, max_iterations):
        batch = tf.shape(x)[0]
        rows = tf.range(batch)

        def logits_and_jacobian(x_adv):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                logits = model(x_adv, training=False)
            jac = tape.batch_jacobian(logits, x_adv)  # [B, K, *image]
            return logits, tf.reshape(jac, [batch, tf.shape(logits)[1], -1])  # [B, K, D]

        k0 = tf.argmax(model(x, training=False), axis=1, output_type=tf.int32)
        idx0 = tf.stack([rows, k0], axis=1)

        def body(i, active, r_total, x_adv):
            logits, jac = logits_and_jacobian(x_adv)
            num_classes = tf.shape(logits)[1]
            f = logits - tf.gather_nd(logits, idx0)[:, None]  # [B, K]
            w = jac - tf.gather_nd(jac, idx0)[:, None, :]  # [B, K, D]
            if norm == "l2":
                w_norm = tf.norm(w, axis=2)
            else:
                w_norm = tf.reduce_sum(tf.abs(w), axis=2)
            ratio = tf.abs(f) / (w_norm + _TINY)
            is_k0 = tf.one_hot(k0, num_classes, on_value=True, off_value=False)
            ratio = tf.where(is_k0, tf.constant(np.inf, ratio.dtype), ratio)
            closest = tf.argmin(ratio, axis=1, output_type=tf.int32)
            idx = tf.stack([rows, closest], axis=1)
            pert = tf.gather_nd(ratio, idx) + 1e-4  # [B]
            w_l = tf.gather_nd(w, idx)  # [B, D]
            if norm == "l2":
                r = pert[:, None] * w_l / (tf.norm(w_l, axis=1, keepdims=True) + _TINY)
            else:
                r = pert[:, None] * tf.sign(w_l)
            r = tf.reshape(r, tf.shape(x))
            mask = tf.reshape(active, [-1] + [1] * (len(x.shape) - 1))
            r_total = r_total + tf.where(mask, r, tf.zeros_like(r))
            x_adv = tf.clip_by_value(x + (1.0 + overshoot) * r_total, 0.0, 1.0)
            pred = tf.argmax(model(x_adv, training=False), axis=1, output_type=tf.int32)
            active = active & tf.equal(pred, k0)
            return i + 1, active, r_total, x_adv

        _, _, _, x_adv = tf.while_loop(
            lambda i, active, *_: (i < max_iterations) & tf.reduce_any(active),
            body,
            (tf.constant(0), tf.ones([batch], tf.bool), tf.zeros_like(x), x),
        )
        return x_adv

    return run


def _loop_fn(model, norm):
    try:
        fns = _LOOP_FNS.get(model)
        if fns is None:
            fns = _LOOP_FNS[model] = {}
    except TypeError:  # not weak-referenceable / hashable: no caching
        return _make_loop_fn(model, norm)
    if norm not in fns:
        fns[norm] = _make_loop_fn(model, norm)
    return fns[norm]


def deepfool(
    model,
    x,
    num_classes: int = 10,
    overshoot: float = 0.02,
    max_iterations: int = 50,
    norm: str = "l2",
    batch_size: int = 128,
) -> np.ndarray:
    """Untargeted DeepFool against a classifier returning logits.

    Args:
        model: callable ``images [B, ...] float32 in [0, 1] -> logits [B, num_classes]``
            (e.g. :class:`fmd_tf.models.Classifier`).
        x: images, array-like float [N, ...] in [0, 1]; not modified.
        num_classes: number of logits of `model` (checked); all of them are candidate classes.
        overshoot: the final perturbation is ``(1 + overshoot) * r_total``.
        max_iterations: maximum number of linearisation steps.
        norm: ``"l2"`` (default) or ``"linf"``.
        batch_size: images attacked together.

    Returns:
        float32 array, the shape of `x`, in [0, 1]. Examples not fooled within `max_iterations`
        are returned at their last iterate (as the reference implementation does).
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch of images, got shape {x.shape}")
    if len(x) == 0:
        return x.copy()
    out_classes = int(model(tf.constant(x[:1]), training=False).shape[-1])
    if out_classes != num_classes:
        raise ValueError(f"model returns {out_classes} logits, num_classes={num_classes}")
    run = _loop_fn(model, norm)
    shoot = tf.constant(overshoot, tf.float32)
    iters = tf.constant(int(max_iterations), tf.int32)
    out = np.empty_like(x)
    for start in range(0, len(x), batch_size):
        xb = tf.constant(x[start : start + batch_size])
        out[start : start + len(xb)] = run(xb, shoot, iters).numpy()
    return out

"""DeepFool (Moosavi-Dezfooli, Fawzi and Frossard, CVPR 2016), batched, in TensorFlow 2.

cleverhans 4 has no TF2 DeepFool and ART's takes minutes for a few hundred images, so this is a
re-implementation of the authors' reference code (https://github.com/LTS4/DeepFool), on a batch:

* the label attacked is the model's prediction ``k0`` on the clean image;
* at every iteration, with ``f_k = Z_k - Z_k0`` and ``w_k = grad (Z_k - Z_k0)`` for the
  classes ``k != k0``, the closest linearised boundary is ``l = argmin_k |f_k| / ||w_k||_q``
  (ties: the lowest class) and the step is

  - L2: ``r = (|f_l| / ||w_l||_2 + 1e-4) * w_l / ||w_l||_2``;
  - L∞: ``r = (|f_l| / ||w_l||_1 + 1e-4) * sign(w_l)`` (the paper's p = ∞ case, q = 1);

* ``r_total`` accumulates the steps and the iterate is ``clip(x + (1 + overshoot) * r_total,
  0, 1)`` (overshoot applied inside the loop, as in the reference code);
* an example stops moving (its ``r_total`` is frozen) once its iterate is classified
  differently from ``k0``; the loop ends when all are fooled or after ``max_iterations``.

The whole loop runs in one ``tf.function`` (a ``tf.while_loop``), cached per model, norm and
number of classes and traced per batch shape (after a second shape, once with a relaxed batch
dimension). Speed (about 3.5x over the plain batched loop on a CPU, same outputs):

* the batch is compacted every iteration: only the rows still classified ``k0`` are gathered,
  differentiated and stepped (then scattered back into ``r_total`` and the iterates), so the
  examples already fooled cost nothing while the last stragglers finish (on 100 Fashion-MNIST
  images about 35 % of the rows x iterations of the uncompacted loop are left);
* the ``K - 1`` vectors ``w_k`` come from ``K - 1`` backward passes (cotangents
  ``e_k - e_k0``) of one forward pass on a persistent tape, which on a CPU is faster than a
  ``tape.batch_jacobian`` of all ``K`` logits (its pfor-vectorised backward pass) followed by
  differences;
* the "still ``k0``?" check after a step is a separate forward pass on the active rows
  (cheap next to ``K - 1`` backward passes); folding it into the next iteration's taped forward
  pass would differentiate the just-fooled rows once for nothing, which costs more.
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

__all__ = ["deepfool"]

_NORMS = ("l2", "linf")
_TINY = 1e-12  # guards the divisions by gradient norms

# model -> {(norm, num_classes): tf.function}, so that repeated calls on the same model reuse
# traced graphs.
_LOOP_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_loop_fn(model, norm, num_classes):
    others_idx = np.array([[k for k in range(num_classes) if k != k0] for k0 in range(num_classes)],
                          dtype=np.int32)  # [K, K-1]: the classes other than k0, in order

    @tf.function(reduce_retracing=True)
    def run(x, overshoot, max_iterations):
        batch = tf.shape(x)[0]
        k0 = tf.argmax(model(x, training=False), axis=1, output_type=tf.int32)

        def body(i, active, r_total, x_adv):
            # Compact: only the rows still classified k0 are differentiated and stepped.
            idx = tf.where(active)  # [A, 1]
            xa = tf.gather_nd(x_adv, idx)
            ka = tf.gather_nd(k0, idx)  # [A]
            others = tf.gather(others_idx, ka)  # [A, K-1]
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                tape.watch(xa)
                logits = model(xa, training=False)  # [A, K]
            z0 = tf.gather(logits, ka[:, None], batch_dims=1)  # [A, 1]
            f = tf.gather(logits, others, batch_dims=1) - z0  # [A, K-1]
            # w_k = grad (Z_k - Z_k0), one backward pass per k != k0 (cotangent e_k - e_k0).
            neg0 = tf.one_hot(ka, num_classes, on_value=-1.0, off_value=0.0, dtype=logits.dtype)
            w = tf.stack(
                [tf.reshape(tape.gradient(logits, xa, output_gradients=neg0 + tf.one_hot(
                    others[:, j], num_classes, dtype=logits.dtype)), [tf.shape(xa)[0], -1])
                 for j in range(num_classes - 1)],
                axis=1,
            )  # [A, K-1, D]
            del tape
            if norm == "l2":
                w_norm = tf.norm(w, axis=2)
            else:
                w_norm = tf.reduce_sum(tf.abs(w), axis=2)
            ratio = tf.abs(f) / (w_norm + _TINY)
            closest = tf.argmin(ratio, axis=1, output_type=tf.int32)  # [A]
            pert = tf.gather(ratio, closest[:, None], batch_dims=1) + 1e-4  # [A, 1]
            w_l = tf.gather(w, closest, batch_dims=1)  # [A, D]
            if norm == "l2":
                r = pert * w_l / (tf.norm(w_l, axis=1, keepdims=True) + _TINY)
            else:
                r = pert * tf.sign(w_l)
            ra = tf.gather_nd(r_total, idx) + tf.reshape(r, tf.shape(xa))
            xa = tf.clip_by_value(tf.gather_nd(x, idx) + (1.0 + overshoot) * ra, 0.0, 1.0)
            r_total = tf.tensor_scatter_nd_update(r_total, idx, ra)
            x_adv = tf.tensor_scatter_nd_update(x_adv, idx, xa)
            pred = tf.argmax(model(xa, training=False), axis=1, output_type=tf.int32)
            active = tf.tensor_scatter_nd_update(active, idx, tf.equal(pred, ka))
            return i + 1, active, r_total, x_adv

        _, _, _, x_adv = tf.while_loop(
            lambda i, active, *_: (i < max_iterations) & tf.reduce_any(active),
            body,
            (tf.constant(0), tf.ones([batch], tf.bool), tf.zeros_like(x), x),
        )
        return x_adv

    return run


def _loop_fn(model, norm, num_classes):
    key = (norm, int(num_classes))
    try:
        fns = _LOOP_FNS.get(model)
        if fns is None:
            fns = _LOOP_FNS[model] = {}
    except TypeError:  # not weak-referenceable / hashable: no caching
        return _make_loop_fn(model, *key)
    if key not in fns:
        fns[key] = _make_loop_fn(model, *key)
    return fns[key]


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
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch of images, got shape {x.shape}")
    if len(x) == 0:
        return x.copy()
    out_classes = int(model(tf.constant(x[:1]), training=False).shape[-1])
    if out_classes != num_classes:
        raise ValueError(f"model returns {out_classes} logits, num_classes={num_classes}")
    run = _loop_fn(model, norm, num_classes)
    shoot = tf.constant(overshoot, tf.float32)
    iters = tf.constant(int(max_iterations), tf.int32)
    out = np.empty_like(x)
    for start in range(0, len(x), batch_size):
        xb = tf.constant(x[start : start + batch_size])
        out[start : start + len(xb)] = run(xb, shoot, iters).numpy()
    return out

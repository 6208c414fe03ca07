"""Carlini & Wagner L2 attack (Carlini and Wagner, 2017), batched, in TensorFlow 2.

cleverhans 4's ``carlini_wagner_l2`` does not run on Keras 3 models, so this is a
re-implementation of the original attack (https://github.com/carlini/nn_robust_attacks,
``l2_attack.py``), untargeted:

* change of variables ``x' = (tanh(w) + 1) / 2`` (pixels stay in [0, 1]); ``w`` starts at
  ``arctanh((2x - 1) * 0.999999)`` and is optimised with Adam (fresh state at every
  binary-search step);
* objective ``||x' - x||_2^2 + c * max(Z_y(x') - max_{i != y} Z_i(x') + confidence, 0)`` on the
  logits ``Z`` (loss f6 of the paper);
* a per-example binary search on ``c``: halve towards the lower bound after a success, else
  raise it (x10 until an upper bound is known);
* per example, the successful iterate with the smallest L2 distance over all steps is kept
  (success: ``max_{i != y} Z_i > Z_y + confidence``); examples never successful are returned
  unchanged.

The optimisation loop of one binary-search step (``max_iterations`` Adam steps) runs inside one
``tf.function`` (a ``tf.while_loop``), cached per model and traced per batch shape (after a
second shape, once with a relaxed batch dimension); only the binary-search bookkeeping is in
Python. Unlike the original there is no early abort: every step
runs all ``max_iterations`` iterations.
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

__all__ = ["carlini_wagner_l2"]

_TANH_SMOOTHER = 0.999999  # keeps arctanh finite at pixels 0 and 1 (as in the original code)
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8
_UPPER_BOUND_INIT = 1e10  # the original's "no upper bound yet" value

# model -> tf.function, so that repeated calls on the same model reuse the traced graphs.
_STEP_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_step_fn(model):
    """tf.function running one binary-search step (all Adam iterations) on one batch."""

    @tf.function(reduce_retracing=True)
    def step(x, y_onehot, const, best_l2, best_adv, confidence, learning_rate, max_iterations):
        axes = list(range(1, len(x.shape)))
        w0 = tf.atanh((2.0 * x - 1.0) * _TANH_SMOOTHER)

        def evaluate(delta):
            x_new = (tf.tanh(w0 + delta) + 1.0) / 2.0
            logits = model(x_new, training=False)
            l2 = tf.reduce_sum(tf.square(x_new - x), axis=axes)
            real = tf.reduce_sum(y_onehot * logits, axis=1)
            other = tf.reduce_max(logits - y_onehot * 1e4, axis=1)
            margin = other - real  # > confidence <=> adversarial with the asked confidence
            f = tf.maximum(confidence - margin, 0.0)
            return x_new, l2, margin, f

        def track(x_new, l2, margin, best_l2, best_adv, succeeded):
            success = margin > confidence
            improved = success & (l2 < best_l2)
            best_l2 = tf.where(improved, l2, best_l2)
            mask = tf.reshape(improved, [-1] + [1] * (len(x.shape) - 1))
            best_adv = tf.where(mask, x_new, best_adv)
            return best_l2, best_adv, succeeded | success

        def body(i, delta, m, v, best_l2, best_adv, succeeded):
            with tf.GradientTape() as tape:
                tape.watch(delta)
                x_new, l2, margin, f = evaluate(delta)
                loss = tf.reduce_sum(l2 + const * f)
            grad = tape.gradient(loss, delta)
            # Bookkeeping on the point the gradient was taken at (as the original does).
            best_l2, best_adv, succeeded = track(x_new, l2, margin, best_l2, best_adv, succeeded)
            # Adam (TF1 AdamOptimizer formulation, as in the original).
            t = tf.cast(i + 1, tf.float32)
            m = _ADAM_BETA1 * m + (1.0 - _ADAM_BETA1) * grad
            v = _ADAM_BETA2 * v + (1.0 - _ADAM_BETA2) * tf.square(grad)
            lr_t = learning_rate * tf.sqrt(1.0 - _ADAM_BETA2**t) / (1.0 - _ADAM_BETA1**t)
            delta = delta - lr_t * m / (tf.sqrt(v) + _ADAM_EPS)
            return i + 1, delta, m, v, best_l2, best_adv, succeeded

        zeros = tf.zeros_like(x)
        succeeded = tf.zeros(tf.shape(x)[:1], tf.bool)
        _, delta, _, _, best_l2, best_adv, succeeded = tf.while_loop(
            lambda i, *_: i < max_iterations,
            body,
            (tf.constant(0), zeros, zeros, zeros, best_l2, best_adv, succeeded),
        )
        # The final iterate was never evaluated inside the loop.
        x_new, l2, margin, _ = evaluate(delta)
        return track(x_new, l2, margin, best_l2, best_adv, succeeded)

    return step


def _step_fn(model):
    try:
        fn = _STEP_FNS.get(model)
        if fn is None:
            fn = _STEP_FNS[model] = _make_step_fn(model)
        return fn
    except TypeError:  # not weak-referenceable / hashable: no caching
        return _make_step_fn(model)


def carlini_wagner_l2(
    model,
    x,
    y=None,
    confidence: float = 0.0,
    learning_rate: float = 0.01,
    max_iterations: int = 100,
    binary_search_steps: int = 5,
    initial_const: float = 1.0,
    batch_size: int = 128,
) -> np.ndarray:
    """Untargeted C&W L2 attack on a classifier returning logits.

    Args:
        model: callable ``images [B, ...] float32 in [0, 1] -> logits [B, num_classes]``
            (e.g. :class:`fmd_tf.models.Classifier`).
        x: images, array-like float [N, ...] in [0, 1]; not modified.
        y: true labels int [N]; defaults to the model's predictions on `x`.
        confidence: margin kappa the adversarial logit must exceed the true one by.
        learning_rate: Adam step size (on the tanh variables).
        max_iterations: Adam iterations per binary-search step.
        binary_search_steps: number of values of the constant ``c`` tried per example.
        initial_const: first value of ``c``.
        batch_size: images attacked together.

    Returns:
        float32 array, the shape of `x`, in [0, 1]: per example the successful adversarial
        example with the smallest L2 distance found, or the unchanged image if none was found.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch of images, got shape {x.shape}")
    if y is not None:
        y = np.asarray(y).astype(np.int64).reshape(-1)
        if len(y) != len(x):
            raise ValueError(f"{len(y)} labels for {len(x)} images")
    if len(x) == 0:
        return x.copy()
    step = _step_fn(model)
    conf = tf.constant(confidence, tf.float32)
    lr = tf.constant(learning_rate, tf.float32)
    iters = tf.constant(int(max_iterations), tf.int32)
    out = np.empty_like(x)
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        xb_t = tf.constant(xb)
        if y is None:
            logits = model(xb_t, training=False)
            yb = np.argmax(np.asarray(logits), axis=1)
            num_classes = int(logits.shape[-1])
        else:
            yb = y[start : start + batch_size]
            num_classes = int(model(xb_t[:1], training=False).shape[-1])
        y_onehot = tf.one_hot(yb, num_classes, dtype=tf.float32)
        n = len(xb)
        lower = np.zeros(n)
        upper = np.full(n, _UPPER_BOUND_INIT)
        const = np.full(n, float(initial_const))
        best_l2 = tf.fill([n], np.float32(np.inf))
        best_adv = xb_t
        for _ in range(binary_search_steps):
            best_l2, best_adv, succeeded = step(
                xb_t, y_onehot, tf.constant(const, tf.float32), best_l2, best_adv, conf, lr, iters
            )
            ok = succeeded.numpy()
            upper = np.where(ok, np.minimum(upper, const), upper)
            lower = np.where(ok, lower, np.maximum(lower, const))
            bounded = upper < 1e9
            const = np.where(bounded, (lower + upper) / 2.0, const * 10.0)
        out[start : start + n] = np.clip(best_adv.numpy(), 0.0, 1.0)
    return out

"""APGD (Croce & Hein, ICML 2020): parameter-free PGD, on a classifier or on the whole
FM-Defense (through the BPDA + EOT surrogate of `fmd_tf.attacks.adaptive`).

Per example: a step η that starts at 2ε, a momentum step
``z = P(x_k + η·s(∇f(x_k)))``, ``x_{k+1} = P(x_k + α(z - x_k) + (1 - α)(x_k - x_{k-1}))``
(α = 0.75; s = sign for L∞, the normalised gradient for L2; P projects onto the ε-ball and
[0, 1]). At the checkpoints w_j = p_j·N (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); `apgd_checkpoints`) η is halved, and the
iterate moved back to the best point so far, when the objective rose in fewer than
ρ·(w_j - w_{j-1}) of the steps since the last checkpoint (ρ = 0.75), or when η was not halved
at the last checkpoint and the best value has not changed since (Croce & Hein, §3.2).
Restarts start again from a random point of the ball; per example the first restart that
succeeds is kept, else the last restart's best point.

Losses: "ce" (cross-entropy of the true label), "dlr" (`dlr_loss`, the Difference of
Logits Ratio, invariant to shifts and scales of the logits) and "margin" (`wrong_margin_loss`,
how far the best wrong class leads all others, clipped at κ: the attack on a classifier-margin
gate, which rejects inputs whose top two logits are closer than θm). On the defense they
replace the classifier margin of `adaptive.adaptive_pgd`'s objective (clipped at κ; the
detector penalty and EOT as there).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fmd_tf.attacks import adaptive

__all__ = ["LOSSES", "apgd", "adaptive_apgd", "apgd_checkpoints", "dlr_loss",
           "wrong_margin_loss"]

LOSSES = ("ce", "dlr", "margin")
# κ of the defense objective per loss: beyond it only the detector term moves the input. The
# margin loss's κ is also its clip on the classifier alone: a margin gate's θm must be below
# it (the robust classifier's VAL θm at a few % of clean images is below 1 logit).
KAPPA = {"ce": 5.0, "dlr": 1.0, "margin": 5.0}


def dlr_loss(logits, onehot):
    """DLR(x, y) = -(z_y - max_{i≠y} z_i) / (z_π1 - z_π3 + 1e-12) [B] (Croce & Hein, Eq. 6),
    z the logits [B, K] (K >= 3), π the classes by decreasing logit; > 0 iff misclassified."""
    logits = tf.convert_to_tensor(logits, tf.float32)
    top = tf.math.top_k(logits, k=3).values
    real = tf.reduce_sum(onehot * logits, axis=-1)
    other = tf.reduce_max(logits - adaptive._BIG * onehot, axis=-1)
    return -(real - other) / (top[:, 0] - top[:, 2] + 1e-12)


def wrong_margin_loss(logits, onehot):
    """Z_a - max_{k≠a} Z_k [B] with a = argmax_{k≠y} Z_k the best wrong class, for logits
    [B, K] and the true class `onehot` [B, K]: < 0 (= Z_a - Z_y) while the input is classified
    right, the logit margin top-1 minus top-2 once it is misclassified (continuous at the
    boundary). Maximising it, clipped at κ, gives a wrong label that wins by κ: what a
    classifier-margin gate at θm < κ lets through."""
    logits = tf.convert_to_tensor(logits, tf.float32)
    wrong = logits - adaptive._BIG * onehot
    best_wrong = tf.one_hot(tf.argmax(wrong, axis=-1), tf.shape(logits)[-1])
    return tf.reduce_max(wrong, axis=-1) - tf.reduce_max(logits - adaptive._BIG * best_wrong,
                                                         axis=-1)


def _ce_loss(logits, onehot):
    return tf.nn.softmax_cross_entropy_with_logits(labels=onehot, logits=logits)


_LOSS_FNS = {"ce": _ce_loss, "dlr": dlr_loss, "margin": wrong_margin_loss}


def apgd_checkpoints(nb_iter: int) -> list[int]:
    """The iterations w_j where APGD may halve its step: p_j·N in the integer form of the
    reference implementation (first after ⌊0.22·N⌋ steps, each interval ⌊0.03·N⌋ shorter than
    the previous, at least ⌊0.06·N⌋; every term at least 1): 22, 41, 57, 70, 80, 87, 93, 99
    for N = 100."""
    first, shrink, least = (max(int(f * nb_iter), 1) for f in (0.22, 0.03, 0.06))
    points, at, span = [], 0, first
    while at + span <= nb_iter:
        at += span
        points.append(at)
        span = max(span - shrink, least)
    return points


def _where(mask, a, b):
    """Rows of `a` where `mask` [B] else of `b`."""
    shape = tf.concat([tf.shape(mask), tf.ones([len(a.shape) - 1], tf.int32)], 0)
    return tf.where(tf.reshape(mask, shape), a, b)


def _apgd_batch(value_and_grad, x, eps, nb_iter, norm, x_start, rho=0.75, alpha=0.75):
    """One APGD run on a batch: per row, the first iterate that succeeded, else the iterate of
    the best objective [B, ...]. `value_and_grad(x_adv, i)` -> (objective [B], gradient,
    success bool [B] at `x_adv`, or None when success is judged afterwards)."""
    checkpoints = apgd_checkpoints(nb_iter)
    batch = tf.shape(x)[0]
    eta = tf.fill([batch], 2.0 * eps)
    x_adv = x_start
    value, grad, ok = value_and_grad(x_adv, 0)
    best_x, best_value, best_grad = x_adv, value, grad
    x_prev = x_adv
    rises = tf.zeros([batch], tf.int32)
    last_value = value
    best_at_checkpoint, halved = best_value, tf.ones([batch], tf.bool)
    found = None if ok is None else tf.zeros([batch], tf.bool)
    found_x = x_adv
    previous_checkpoint = 0
    for i in range(nb_iter):
        shape = tf.concat([[batch], tf.ones([len(x.shape) - 1], tf.int32)], 0)
        z = adaptive._project(adaptive._ascent_step(x_adv, grad, tf.reshape(eta, shape), norm),
                              x, eps, norm)
        a = 1.0 if i == 0 else alpha
        x_new = adaptive._project(x_adv + a * (z - x_adv) + (1.0 - a) * (x_adv - x_prev), x,
                                  eps, norm)
        x_prev, x_adv = x_adv, x_new
        value, grad, ok = value_and_grad(x_adv, i + 1)
        rises += tf.cast(value > last_value, tf.int32)
        last_value = value
        better = value > best_value
        best_x = _where(better, x_adv, best_x)
        best_grad = _where(better, grad, best_grad)
        best_value = tf.where(better, value, best_value)
        if found is not None:
            ok = ok & ~found
            found_x = _where(ok, x_adv, found_x)
            found = found | ok
        if i + 1 in checkpoints:
            span = i + 1 - previous_checkpoint
            stalled = tf.cast(rises, tf.float32) < rho * span
            flat = (~halved) & (best_value <= best_at_checkpoint)
            halve = stalled | flat
            eta = tf.where(halve, eta / 2.0, eta)
            x_adv = _where(halve, best_x, x_adv)
            x_prev = _where(halve, best_x, x_prev)
            grad = _where(halve, best_grad, grad)
            halved, best_at_checkpoint = halve, best_value
            rises = tf.zeros_like(rises)
            previous_checkpoint = i + 1
    return best_x if found is None else _where(found, found_x, best_x)


def _check(loss, nb_iter, restarts):
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if nb_iter < 1 or restarts < 1:
        raise ValueError(f"nb_iter and restarts must be >= 1, got {nb_iter}, {restarts}")


def _restarts(run_once, x, y, eps, norm, restarts, seed, batch_size, success):
    """Per batch, `restarts` runs from random starts; each row keeps the first successful
    run's iterate (`success(x_adv, y)` -> bool [B]), else the last run's."""
    out = np.empty_like(x)
    for b, start in enumerate(range(0, len(x), batch_size)):
        xb = tf.constant(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        done = np.zeros(len(yb), bool)
        kept = xb.numpy()
        for r in range(restarts):
            base = adaptive._base_seed(seed + 7 * r, b)
            x0 = adaptive._START_FNS[norm](xb, tf.constant(eps, tf.float32), base)
            x_adv = run_once(xb, yb, x0, base).numpy()
            ok = success(x_adv, yb)
            take = ~done & (ok | (r == restarts - 1))
            kept[take] = x_adv[take]
            done |= ok
            if done.all():
                break
        out[start : start + len(yb)] = kept
    return out


def apgd(classifier, x, y, eps: float = 0.1, norm: str = "linf", loss: str = "ce",
         nb_iter: int = 100, restarts: int = 1, batch_size: int = 128, seed: int = 0):
    """Untargeted APGD-`loss` on a classifier alone (images [n, H, W, C] in [0, 1], labels
    [n]); returns float32 adversarial images within `eps` of `x` and in [0, 1].

    With "ce" and "dlr" an input succeeds once misclassified (the first such iterate is
    kept); with "margin" once misclassified by a logit margin of at least `KAPPA["margin"]`,
    and otherwise the iterate with the largest clipped margin is kept."""
    _check(loss, nb_iter, restarts)
    x = np.array(x, np.float32)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    num_classes = int(classifier(tf.constant(x[:1]), training=False).shape[-1])
    loss_fn = _LOSS_FNS[loss]
    kappa = KAPPA[loss] if loss == "margin" else np.inf

    @tf.function(reduce_retracing=True)
    def value_and_grad(x_adv, onehot):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = tf.cast(classifier(x_adv, training=False), tf.float32)
            value = tf.minimum(loss_fn(logits, onehot), kappa)
            total = tf.reduce_sum(value)
        done = tf.argmax(logits, -1) != tf.argmax(onehot, -1)
        if loss == "margin":
            done = value >= kappa
        return value, tape.gradient(total, x_adv), done

    def wrong(x_adv, yb):
        logits = np.concatenate([np.asarray(classifier(tf.constant(x_adv[i:i + 512]),
                                                       training=False))
                                 for i in range(0, len(x_adv), 512)])
        if loss == "margin":
            return wrong_margin_loss(logits, tf.one_hot(yb, num_classes)).numpy() >= kappa
        return np.argmax(logits, -1) != yb

    def run_once(xb, yb, x0, _):
        onehot = tf.one_hot(yb, num_classes)
        return _apgd_batch(lambda xa, _: value_and_grad(xa, onehot), xb, eps, nb_iter, norm, x0)

    return _restarts(run_once, x, y, eps, norm, restarts, seed, batch_size, wrong)


def adaptive_apgd(fmd, x, y=None, eps: float = 0.1, norm: str = "linf", loss: str = "ce",
                  nb_iter: int = 100, restarts: int = 1, eot_samples: int | None = 8,
                  resistance_weight: float = 10.0, resistance_margin: float = 0.05,
                  tau: float = 0.05, temperature: float = 1.0, morph_source: str = "fresh",
                  batch_size: int = 32, seed: int = 0):
    """APGD-`loss` against the whole defense: the objective of `adaptive.adaptive_pgd` (BPDA
    + EOT over `eot_samples` morphs per code and step, the detector and gate penalties) with
    the classifier margin replaced by `loss`, clipped at `KAPPA[loss]`. Success is judged by
    the real defense (`adaptive.adaptive_success`) after each restart. Returns float32 images
    within `eps` of `x` and in [0, 1]."""
    _check(loss, nb_iter, restarts)
    adaptive._check_defense(fmd, need_thresholds=True)
    x, y = adaptive._check_common(x, y, eps, norm, nb_iter, eot_samples, morph_source, fmd)
    if len(x) == 0:
        return x
    num_classes = adaptive._num_classes(fmd.classifier, x)
    objective = adaptive._objective(fmd, "defense", eot_samples, morph_source, False,
                                    fooled_loss=_LOSS_FNS[loss])
    params = adaptive._params(eps=eps, kappa=KAPPA[loss], resistance_weight=resistance_weight,
                              resistance_margin=resistance_margin, tau=tau,
                              temperature=temperature, purified_weight=0.0)

    @tf.function(reduce_retracing=True)
    def value_and_grad(x_adv, onehot, seed_pair):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            value = objective(x_adv, onehot, onehot, seed_pair, params)
            total = tf.reduce_sum(value)
        return value, tape.gradient(total, x_adv)

    def run_once(xb, yb, x0, base):
        onehot = tf.one_hot(yb, num_classes, dtype=tf.float32)
        return _apgd_batch(
            lambda xa, i: (*value_and_grad(xa, onehot, tf.stack([base, tf.constant(i)])), None),
            xb, eps, nb_iter, norm, x0)

    def success(x_adv, yb):
        return adaptive.adaptive_success(fmd, x_adv, yb)["success"]

    return _restarts(run_once, x, y, eps, norm, restarts, seed, batch_size, success)

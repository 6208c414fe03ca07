"""Adaptive white-box attacks on the whole FM-Defense (security evaluation).

The attacks of the paper (§IV) only know the classifier. These ones know the whole defense
(classifier, combo-VAE, normal ranges, θr, θd) and attack the combined pipeline, in the spirit
of Athalye et al. (BPDA + EOT, ICML 2018) and of Carlini & Wagner's attack on MagNet (2017).

**Differentiable surrogate of the defense.** The real detector is not differentiable: the
resistance r(i) is a share of morph *labels* (argmax) agreeing with the input's label (argmax),
the morph values come from a discrete search (first N candidates inside the normal range) and
the verdict is a hard threshold test. The surrogate replaces

* the morph labels by the classifier's softmax probabilities of the input's label on the
  decoded morphs: the *soft resistance*
  ``r~(i) = mean_e softmax(Z(decode(zs_e(i), zu)) / T)[label]`` (``T`` = ``temperature``);
* the input's label argmax by a straight-through one-hot of the *adversarial* label
  ``argmax_{k≠y} Z_k(x)`` (the input's label once it is misclassified, the label the attack is
  heading for before): forward ``one_hot(argmax)``, backward the gradient of the softmax over
  the wrong classes (moving the prediction towards a wrong class whose morphs agree with it is
  rewarded too). Using the input's own argmax instead would reward returning to the true
  class, whose morphs agree best: on a real model that stalled the attack at correctly
  classified, passing inputs;
* the morph search by its expectation (EOT): at every step each selected code gets
  ``eot_samples`` morph values drawn afresh: a new offset table from the same search
  distribution as the defense's (step t uniform in ``[-t·Δr, t·Δr]`` of the range width), the
  defense's own rule (first N candidates inside the normal range, in search order), then
  ``eot_samples`` of those N picked at random. The selection is treated as constant (BPDA);
  gradients flow through the morph values ``μs_i(x) + offset`` (inside the range), the other
  codes ``μs(x)`` (encoder), ``zu(x)`` (DGMM), the decoder and the classifier.
  ``morph_source="defense"`` uses the defense's saved search table instead (the white-box
  attacker knows it: the morphs are then a deterministic function of the input);
* the verdict by a smooth hinge on the worst code: with ``gap_i = θr_i + δ - r~(i)``
  (``δ`` = ``resistance_margin``, a safety margin for the soft/hard gap), the detection penalty
  is ``τ·softplus(smoothmax_τ(gap)/τ)``, ``smoothmax_τ = τ·logsumexp(·/τ)`` (``τ`` =
  ``tau``): ~0 when every code is above its threshold with margin, ~``max_i gap_i`` when one
  is below. Passing (verdict 0) needs r(i) > θr(i) for all i, hence the max. When the
  defense's reconstruction gate is on, ``τ·softplus((e(x)/θe - 1 + δ)/τ)`` is added (the
  reconstruction error e(x) is differentiable as it is); when its classifier-margin gate is
  on, ``τ·softplus((θm + δ - m(x))/τ)`` on misclassified inputs (m(x) = top-1 minus top-2
  logit: the wrong label must win by at least θm, `_margin_gate_penalty`). A detector whose
  thresholds θr are all below 0 cannot flag anything: its term and its morphs are left out.

**Objective** (maximised, per example):
``min(margin_y(x), κ) - λ·penalty(x) [+ μ·min(margin_y(purified(x)), κ)]`` with
``margin_y = max_{k≠y} Z_k - Z_y`` (> 0: misclassified), ``λ`` = ``resistance_weight``, the
optional purification term (``μ`` = ``purified_weight``) fooling the classifier on the
purified reconstruction too (a suspicious input with Dis <= θd is purified). The clip at κ
makes the objective lexicographic: once the input is misclassified with margin κ only the
detector term moves it. Steps: L∞ sign steps or L2 normalised-gradient steps of ``eps_iter``,
projection to the ``eps`` ball and to [0, 1], random start in the ball.

**Success** is judged by the real defense afterwards (`adaptive_success`): final label wrong
and verdict != rejected. With ``check_every`` the real defense is also run every so many
iterations and each example keeps its latest iterate that was a real success.

All inner loops run inside one ``tf.function`` (a ``tf.while_loop``), cached per defense and
configuration; randomness is stateless (seed, batch index, iteration): the same seed gives the
same output.
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from fmd_tf.attacks.carlini_wagner import carlini_wagner_l2
from fmd_tf.defense import fm_defense, morphs

__all__ = [
    "adaptive_pgd",
    "adaptive_resistance",
    "adaptive_success",
    "cw_high_confidence_transfer",
    "soft_resistance",
    "soft_resistance_tensor",
]

NORMS = ("linf", "l2")
MORPH_SOURCES = ("fresh", "defense")
_TINY = 1e-12
_BIG = 1e9  # masks the true / target logit out of a max
# Temperature T of the smooth "pixel_share" gate error: a pixel's weight goes from 0.12 to 0.88
# within τ ± 2T.
PIXEL_SHARE_TEMPERATURE = 0.02

# fmd -> {configuration: tf.function}, so repeated calls reuse the traced graphs.
_LOOP_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- surrogate


def _fresh_offsets(fmd, seed):
    """A new search table [m, S·Bc] from the defense's search distribution (stateless)."""
    steps, per_step = fmd.max_steps, fmd.candidates_per_step
    radius = fmd.radius_step * tf.repeat(tf.range(1, steps + 1, dtype=tf.float32), per_step)
    unit = tf.random.stateless_uniform(
        [fmd.num_codes, steps * per_step], seed=seed, minval=-1.0, maxval=1.0
    )
    return unit * radius[None, :]


def _morph_values(fmd, mean, seed, eot_samples, morph_source):
    """Morph values [B, m, E] of the selected codes (E = eot_samples, or N when None)."""
    selected = tf.constant(fmd.selected_codes, tf.int32)
    low = tf.gather(fmd.code_low, selected)
    high = tf.gather(fmd.code_high, selected)
    if morph_source == "defense":
        table = tf.convert_to_tensor(fmd.search_table)
    else:
        table = _fresh_offsets(fmd, seed)
    values = morphs.natural_morph_codes(
        tf.gather(fmd.combo_vae.code_values(mean), selected, axis=1), low, high, table,
        fmd.num_morphs
    )  # [B, m, N]; the candidate selection carries no gradient (BPDA), the values do
    if eot_samples is None:
        return values
    pick = tf.random.stateless_uniform(
        [tf.shape(mean)[0], fmd.num_codes, eot_samples], seed=seed + tf.constant([0, 1]),
        minval=0, maxval=fmd.num_morphs, dtype=tf.int32,
    )
    return tf.gather(values, pick, batch_dims=2)


def _encode_and_soft_resistance(fmd, x, label_weights, seed, eot_samples, morph_source,
                                temperature):
    mean, _, zu = fmd.combo_vae.encode(x)
    values = _morph_values(fmd, mean, seed, eot_samples, morph_source)
    selected = tf.constant(fmd.selected_codes, tf.int32)
    zs = fmd.combo_vae.with_code_values(mean, selected, values)  # [B, m, E, D]
    batch, m, e = tf.shape(zs)[0], tf.shape(zs)[1], tf.shape(zs)[2]
    zu_all = tf.broadcast_to(zu[:, None, None, :], [batch, m, e, tf.shape(zu)[-1]])
    flat = batch * m * e
    images = fmd.combo_vae.decode(
        tf.reshape(zs, [flat, tf.shape(zs)[-1]]), tf.reshape(zu_all, [flat, tf.shape(zu)[-1]])
    )
    logits = fmd.classifier(images, training=False)
    probs = tf.nn.softmax(logits / temperature, axis=-1)
    probs = tf.reshape(probs, [batch, m, e, tf.shape(logits)[-1]])
    agree = tf.reduce_sum(probs * label_weights[:, None, None, :], axis=-1)  # [B, m, E]
    return mean, zu, tf.reduce_mean(agree, axis=-1)


def soft_resistance_tensor(fmd, x, label_weights, seed, eot_samples=None, morph_source="fresh",
                           temperature=1.0):
    """Differentiable soft resistance r~ [B, m] of images `x` (a tensor; use in a tape).

    Args:
        fmd: an `FMDefense` with its normal ranges set (`calibrate`).
        x: float32 [B, H, W, C] in [0, 1].
        label_weights: [B, K] weights of the classes whose agreement counts: a one-hot label,
            or the straight-through one-hot of the input's prediction.
        seed: int32 [2] stateless seed of the morph randomness.
        eot_samples: morphs per code (random among the N natural morphs); None = all N.
        morph_source: "fresh" (a new search table from `seed`) or "defense" (its saved table).
        temperature: softmax temperature T of the morph logits (T -> 0: the hard share).
    """
    return _encode_and_soft_resistance(
        fmd, tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(label_weights, tf.float32),
        tf.convert_to_tensor(seed, tf.int32), eot_samples, morph_source,
        tf.convert_to_tensor(temperature, tf.float32),
    )[2]


def _straight_through_label(logits, exclude_onehot=None):
    """Forward one_hot(argmax), backward d softmax: [B, K] (classes in `exclude_onehot` out)."""
    if exclude_onehot is not None:
        logits = logits - _BIG * exclude_onehot
    probs = tf.nn.softmax(logits, axis=-1)
    hard = tf.one_hot(tf.argmax(logits, axis=-1), tf.shape(logits)[-1], dtype=probs.dtype)
    return hard + probs - tf.stop_gradient(probs)


def _margin(logits, onehot):
    """max_{k != c} Z_k - Z_c for the class c of `onehot`, [B]."""
    real = tf.reduce_sum(onehot * logits, axis=-1)
    other = tf.reduce_max(logits - _BIG * onehot, axis=-1)
    return other - real


def soft_reconstruction_error(images, reconstruction, metric, pixel_tol,
                              temperature=PIXEL_SHARE_TEMPERATURE):
    """Differentiable e(x) [B]: `fm_defense.reconstruction_error`, except that "pixel_share"
    counts each pixel with sigmoid((|x - x̂| - τ)/T) instead of the step 1[|x - x̂| > τ]
    (T -> 0 gives the exact share)."""
    if metric != "pixel_share":
        return fm_defense.reconstruction_error(images, reconstruction, metric)
    diff = tf.reshape(images - reconstruction, [tf.shape(images)[0], -1])
    return tf.reduce_mean(tf.sigmoid((tf.abs(diff) - pixel_tol) / temperature), axis=-1)


def _recon_gate_penalty(fmd, x, mean, zu, margin_r, tau):
    """τ·softplus((e(x)/θe - 1 + δ)/τ): smooth surrogate of 'rejected by the reconstruction
    gate' [B]; ~0 when the gate is off (θe = inf)."""
    error = soft_reconstruction_error(x, fmd.combo_vae.decode(mean, zu), fmd.recon_metric,
                                      fmd.recon_pixel_tol)
    gap = error / tf.convert_to_tensor(fmd.theta_e) - 1.0 + margin_r
    return tau * tf.nn.softplus(gap / tau)


def _margin_gate_penalty(fmd, logits, y_onehot, margin_r, tau):
    """τ·softplus((θm + δ - m(x))/τ) on the rows of `logits` [B, K] that are misclassified
    (true class `y_onehot` [B, K]), 0 on the others: smooth surrogate of 'misclassified but
    rejected by the classifier-margin gate' [B] (m(x) = top-1 minus top-2 logit); 0 when the
    gate is off (θm = -inf). Correctly classified rows get no penalty, so that the fooling term
    alone moves them across the decision boundary, where every margin is small."""
    theta_m = tf.convert_to_tensor(fmd.theta_m, tf.float32)
    on = tf.math.is_finite(theta_m)
    top = tf.math.top_k(logits, k=2).values
    gap = tf.where(on, theta_m, 0.0) + margin_r - (top[:, 0] - top[:, 1])
    wrong = tf.not_equal(tf.argmax(logits, axis=-1), tf.argmax(y_onehot, axis=-1))
    return tf.where(tf.logical_and(wrong, on), tau * tf.nn.softplus(gap / tau), 0.0)


def _detector_can_flag(fmd):
    """bool tensor: whether any input can be flagged by the resistance thresholds, i.e. a row
    of zeros is (r(i) <= θr(i) for some i; `operating_point.resistance_can_flag`)."""
    return tf.reduce_any(tf.convert_to_tensor(fmd.theta_r) >= 0.0)


def _detection_penalty(soft_r, theta_r, margin_r, tau):
    """τ·softplus(smoothmax_τ(θr + δ - r~)/τ): smooth surrogate of 'flagged' [B]."""
    gap = theta_r[None, :] + margin_r - soft_r
    smooth_max = tau * tf.reduce_logsumexp(gap / tau, axis=-1)
    return tau * tf.nn.softplus(smooth_max / tau)


# ----------------------------------------------------------------------------- PGD machinery


def _project(x_adv, x, eps, norm):
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        axes = list(range(1, len(x.shape)))
        length = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=axes, keepdims=True))
        delta = delta * tf.minimum(1.0, eps / (length + _TINY))
    return tf.clip_by_value(x + delta, 0.0, 1.0)


def _ascent_step(x_adv, grad, eps_iter, norm):
    grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
    if norm == "linf":
        return x_adv + eps_iter * tf.sign(grad)
    axes = list(range(1, len(grad.shape)))
    length = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=axes, keepdims=True))
    return x_adv + eps_iter * grad / (length + _TINY)


def _random_start(x, eps, norm, seed):
    if norm == "linf":
        noise = tf.random.stateless_uniform(tf.shape(x), seed=seed, minval=-eps, maxval=eps)
    else:
        axes = list(range(1, len(x.shape)))
        direction = tf.random.stateless_normal(tf.shape(x), seed=seed)
        direction /= tf.sqrt(tf.reduce_sum(tf.square(direction), axis=axes, keepdims=True))
        radius = tf.random.stateless_uniform(
            tf.concat([tf.shape(x)[:1], tf.ones([len(x.shape) - 1], tf.int32)], 0),
            seed=seed + tf.constant([0, 1]), maxval=eps,
        )
        noise = direction * radius
    return _project(x + noise, x, eps, norm)


def _objective(fmd, mode, eot_samples, morph_source, use_purified, fooled_loss=None):
    """The per-example objective [B] maximised by the attacks of this module (module doc):
    `objective(x_adv, y_onehot, target_onehot, seed, params)`.

    Modes: "defense" (adaptive_pgd), "targeted" (classifier only, towards `target`),
    "agreement" (targeted + the soft resistance of the target label). `fooled_loss(logits,
    y_onehot)` [B] replaces the classifier margin of "defense" (APGD's CE and DLR losses).
    """
    classifier = fmd.classifier
    members = _members(fmd)
    fooled_loss = fooled_loss or _margin

    def over_members(term, seed):
        """EOT over the ensemble: the mean of a per-member term (one member: the term)."""
        values = [term(member, seed + tf.constant([104_729 * k, 0]))
                  for k, member in enumerate(members)]
        return tf.add_n(values) / float(len(values))

    def objective(x_adv, y_onehot, target_onehot, seed, p):
        logits = classifier(x_adv, training=False)
        if mode == "targeted":
            return tf.minimum(_margin(logits, target_onehot) * -1.0, p["kappa"])
        if mode == "agreement":
            def agreement(member, member_seed):
                mean, zu, soft_r = _encode_and_soft_resistance(
                    member, x_adv, target_onehot, member_seed, eot_samples, morph_source,
                    p["temperature"])
                gate = _recon_gate_penalty(member, x_adv, mean, zu, 0.05, 0.05)
                gate += _margin_gate_penalty(member, logits, y_onehot, 0.05, 0.05)
                return tf.reduce_mean(soft_r, axis=-1) - gate

            fooled = tf.minimum(-_margin(logits, target_onehot), p["kappa"])
            return fooled + p["resistance_weight"] * over_members(agreement, seed)
        fooled = tf.minimum(fooled_loss(logits, y_onehot), p["kappa"])
        label = _straight_through_label(logits, y_onehot)  # the adversarial label

        def detected_or_purified(member, member_seed):
            """-λ·penalty [+ μ·purified margin] of one member [B]."""
            def with_detector():
                mean, zu, soft_r = _encode_and_soft_resistance(
                    member, x_adv, label, member_seed, eot_samples, morph_source,
                    p["temperature"])
                return mean, zu, _detection_penalty(soft_r, member.theta_r,
                                                    p["resistance_margin"], p["tau"])

            def without_detector():
                mean, _, zu = member.combo_vae.encode(x_adv)
                return mean, zu, tf.zeros([tf.shape(x_adv)[0]])

            # A detector whose thresholds are all below 0 flags nothing (r >= 0 > θr): it is
            # left out exactly, with its EOT morph passes (most of a step's cost).
            mean, zu, penalty = tf.cond(_detector_can_flag(member), with_detector,
                                        without_detector)
            penalty += _recon_gate_penalty(member, x_adv, mean, zu, p["resistance_margin"],
                                           p["tau"])
            penalty += _margin_gate_penalty(member, logits, y_onehot, p["resistance_margin"],
                                            p["tau"])
            term = -p["resistance_weight"] * penalty
            if use_purified:
                zu_p = (member.combo_vae.dgmm.class_mean(zu) if member.purify_zu == "class_mean"
                        else zu)
                purified_logits = classifier(member.combo_vae.decode(mean, zu_p), training=False)
                term += p["purified_weight"] * tf.minimum(
                    _margin(purified_logits, y_onehot), p["kappa"]
                )
            return term

        return fooled + over_members(detected_or_purified, seed)

    return objective


def _make_loop_fn(fmd, mode, norm, eot_samples, morph_source, use_purified):
    """tf.function running PGD iterations [start, stop) of one batch for one objective
    (`_objective`)."""
    objective = _objective(fmd, mode, eot_samples, morph_source, use_purified)

    @tf.function(reduce_retracing=True)
    def run(x, x_adv, y_onehot, target_onehot, start, stop, base_seed, params):
        def body(i, x_adv):
            seed = tf.stack([base_seed, i])
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                loss = tf.reduce_sum(objective(x_adv, y_onehot, target_onehot, seed, params))
            grad = tape.gradient(loss, x_adv)
            x_adv = _ascent_step(x_adv, grad, params["eps_iter"], norm)
            return i + 1, _project(x_adv, x, params["eps"], norm)

        _, x_adv = tf.while_loop(lambda i, _: i < stop, body, (start, x_adv))
        return x_adv

    return run


def _loop_fn(fmd, *key):
    try:
        fns = _LOOP_FNS.get(fmd)
        if fns is None:
            fns = _LOOP_FNS[fmd] = {}
    except TypeError:  # not weak-referenceable / hashable: no caching
        return _make_loop_fn(fmd, *key)
    if key not in fns:
        fns[key] = _make_loop_fn(fmd, *key)
    return fns[key]


_START_FNS = {
    norm: tf.function(lambda x, eps, base, norm=norm: _random_start(
        x, eps, norm, tf.stack([base, tf.constant(-1)])), reduce_retracing=True)
    for norm in NORMS
}


# ----------------------------------------------------------------------------- helpers


def _members(fmd):
    """The FMDefense members of an `FMDefenseEnsemble`, or [fmd] for a single defense."""
    return list(getattr(fmd, "members", [fmd]))


def _check_defense(fmd, need_thresholds=True):
    for member in _members(fmd):
        for name in ("classifier", "combo_vae", "selected_codes", "search_table", "theta_r"):
            if not hasattr(member, name):
                raise TypeError(f"fmd must be a built FMDefense or FMDefenseEnsemble (missing "
                                f"{name!r})")
        if need_thresholds and not member.is_calibrated:
            raise fm_defense.NotCalibratedError(
                "FMDefense is not calibrated: call calibrate(x_val) before attacking it"
            )
        if not need_thresholds and not np.any(member.code_high.numpy() >
                                              member.code_low.numpy()):
            raise fm_defense.NotCalibratedError(
                "normal ranges are not set: call calibrate(x_val)")


def _check_common(x, y, eps, norm, nb_iter, eot_samples, morph_source, fmd):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if morph_source not in MORPH_SOURCES:
        raise ValueError(f"morph_source must be one of {MORPH_SOURCES}, got {morph_source!r}")
    if eps is None or not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if nb_iter < 0:
        raise ValueError(f"nb_iter must be >= 0, got {nb_iter}")
    if eot_samples is not None and eot_samples < 1:
        raise ValueError(f"eot_samples must be >= 1 or None, got {eot_samples}")
    x = np.array(x, dtype=np.float32)  # a copy: the input is never modified
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images [n, H, W, C], got shape {x.shape}")
    if len(x) and (x.min() < 0.0 or x.max() > 1.0 or not np.all(np.isfinite(x))):
        raise ValueError("x must be finite and in [0, 1]")
    if not fmd.built:
        fmd.build((None, *x.shape[1:]))
    if y is None:
        y = _predict(fmd.classifier, x) if len(x) else np.zeros(0, np.int64)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"{len(y)} labels for {len(x)} images")
    return x, y


def _predict(classifier, x, batch_size=256):
    return np.concatenate([
        np.argmax(np.asarray(classifier(tf.constant(x[i : i + batch_size]), training=False)), 1)
        for i in range(0, len(x), batch_size)
    ]).astype(np.int64)


def _num_classes(classifier, x):
    return int(classifier(tf.constant(x[:1]), training=False).shape[-1])


def _base_seed(seed, batch_index):
    return tf.constant((int(seed) * 1_000_003 + 7919 * int(batch_index)) % (2**31 - 1), tf.int32)


def _params(**values):
    return {k: tf.constant(float(v), tf.float32) for k, v in values.items()}


def adaptive_success(fmd, x_adv, y, batch_size: int = 64) -> dict:
    """The real defense on `x_adv`: success = final label != y and verdict != rejected.

    Returns numpy arrays: `success` bool [n], `classifier_fooled` bool [n] (classifier label
    != y), `verdict` int32 [n] and `label` int64 [n] (the defense's final labels).
    """
    out = fmd.defend(x_adv, batch_size=batch_size)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    return {
        "success": (out["verdict"] != fm_defense.VERDICT_REJECTED) & (out["label"] != y),
        "classifier_fooled": out["classifier_label"] != y,
        "verdict": out["verdict"],
        "label": out["label"],
    }


def _run_pgd(fmd, x, y, segments, eps, norm, rand_init, seed, batch_size, check_every,
             target=None):
    """Batched PGD; `segments` = [(loop_fn, num_iterations, params)], run in order."""
    num_classes = _num_classes(fmd.classifier, x)
    out = np.empty_like(x)
    for b, start in enumerate(range(0, len(x), batch_size)):
        xb = tf.constant(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        y_onehot = tf.one_hot(yb, num_classes, dtype=tf.float32)
        t_onehot = y_onehot if target is None else tf.one_hot(
            target[start : start + batch_size], num_classes, dtype=tf.float32)
        base = _base_seed(seed, b)
        x_adv = _START_FNS[norm](xb, tf.constant(eps, tf.float32), base) if rand_init else xb
        best = x_adv.numpy()
        succeeded = np.zeros(len(yb), bool)
        step = 0
        for loop, count, params in segments:
            stop_at = step + count
            while step < stop_at:
                nxt = min(stop_at, step + check_every) if check_every else stop_at
                x_adv = loop(xb, x_adv, y_onehot, t_onehot, tf.constant(step), tf.constant(nxt),
                             base, params)
                step = nxt
                if check_every:  # keep each example's latest iterate that really succeeded
                    current = x_adv.numpy()
                    ok = adaptive_success(fmd, current, yb)["success"]
                    succeeded |= ok
                    best[ok | ~succeeded] = current[ok | ~succeeded]
        out[start : start + len(yb)] = best if check_every else x_adv.numpy()
    return out


# ----------------------------------------------------------------------------- attacks


def adaptive_pgd(
    fmd,
    x,
    y=None,
    eps: float = 0.1,
    eps_iter: float | None = None,
    nb_iter: int = 50,
    norm: str = "linf",
    eot_samples: int | None = 4,
    kappa: float = 5.0,
    resistance_weight: float = 10.0,
    resistance_margin: float = 0.05,
    tau: float = 0.05,
    temperature: float = 1.0,
    purified_weight: float = 0.0,
    morph_source: str = "fresh",
    rand_init: bool = True,
    check_every: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> np.ndarray:
    """BPDA + EOT PGD on classifier + FM-Defense detector (see the module docstring).

    Maximises ``min(margin_y, κ) - λ·penalty [+ μ·min(margin_y(purified), κ)]`` by PGD in the
    `eps` ball (`norm` "linf" or "l2") intersected with [0, 1].

    Args:
        fmd: a calibrated `FMDefense`.
        x: images float [n, H, W, C] in [0, 1]; not modified.
        y: true labels int [n]; defaults to the classifier's predictions on `x`.
        eps: perturbation budget (L∞ or L2 radius).
        eps_iter: step size; default 2.5·eps/nb_iter (Madry et al.).
        nb_iter: PGD iterations.
        norm: "linf" (sign steps) or "l2" (normalised-gradient steps).
        eot_samples: morphs per selected code per step (EOT); None = all N natural morphs.
        kappa: κ, the classifier margin beyond which only the detector term counts.
        resistance_weight: λ; 0 gives plain (margin-loss) PGD on the classifier.
        resistance_margin: δ added to θr in the penalty (soft vs hard resistance gap).
        tau: τ of the smooth max / softplus of the penalty.
        temperature: softmax temperature of the morph logits.
        purified_weight: μ, weight of fooling the classifier on the purified image too.
        morph_source: "fresh" (EOT over the search distribution) or "defense" (its saved table).
        rand_init: start uniformly (L∞) / radially uniform (L2) in the ball.
        check_every: run the real defense every so many iterations and keep each example's
            latest real success; None = return the last iterate.
        batch_size: images per batch (each costs m·eot_samples decoder+classifier passes).
        seed: seed of the random start and of the EOT morph draws.

    Returns:
        float32 array, the shape of `x`, within `eps` of `x` and in [0, 1].
    """
    _check_defense(fmd, need_thresholds=True)
    x, y = _check_common(x, y, eps, norm, nb_iter, eot_samples, morph_source, fmd)
    if len(x) == 0:
        return x
    eps_iter = 2.5 * eps / max(nb_iter, 1) if eps_iter is None else eps_iter
    use_purified = purified_weight != 0.0
    loop = _loop_fn(fmd, "defense", norm, eot_samples, morph_source, use_purified)
    params = _params(eps=eps, eps_iter=eps_iter, kappa=kappa, resistance_weight=resistance_weight,
                     resistance_margin=resistance_margin, tau=tau, temperature=temperature,
                     purified_weight=purified_weight)
    return _run_pgd(fmd, x, y, [(loop, int(nb_iter), params)], eps, norm, rand_init, seed,
                    batch_size, check_every)


def adaptive_resistance(
    fmd,
    x,
    y=None,
    eps: float = 0.1,
    eps_iter: float | None = None,
    nb_iter: int = 50,
    fool_iter: int | None = None,
    norm: str = "linf",
    eot_samples: int | None = 4,
    kappa: float = 5.0,
    resistance_weight: float = 10.0,
    temperature: float = 1.0,
    morph_source: str = "fresh",
    rand_init: bool = True,
    check_every: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> np.ndarray:
    """Detector-aware two-phase attack: fool the classifier, then make the morphs agree.

    Phase 1 (`fool_iter` iterations, default nb_iter // 2): targeted PGD on the classifier
    towards the most likely wrong class t of the clean image, maximising
    ``min(Z_t - max_{k≠t} Z_k, κ)``. Phase 2 (the remaining iterations): the same term plus
    ``λ·mean_i r~_t(i)``, the soft resistance of t over all selected codes (EOT over morphs as
    in `adaptive_pgd`): the input keeps (or reaches) label t with margin κ while the morphs of
    every code are pushed to be classified t too, i.e. the resistance of the adversarial label
    is raised above θr. Same budget, projection and arguments as `adaptive_pgd`.

    Returns:
        float32 array, the shape of `x`, within `eps` of `x` and in [0, 1].
    """
    _check_defense(fmd, need_thresholds=check_every is not None)
    x, y = _check_common(x, y, eps, norm, nb_iter, eot_samples, morph_source, fmd)
    if len(x) == 0:
        return x
    fool_iter = nb_iter // 2 if fool_iter is None else int(fool_iter)
    if not 0 <= fool_iter <= nb_iter:
        raise ValueError(f"fool_iter must be in [0, nb_iter], got {fool_iter}")
    eps_iter = 2.5 * eps / max(nb_iter, 1) if eps_iter is None else eps_iter
    logits = np.concatenate([
        np.asarray(fmd.classifier(tf.constant(x[i : i + 256]), training=False))
        for i in range(0, len(x), 256)
    ])
    logits[np.arange(len(x)), y] = -np.inf
    target = np.argmax(logits, axis=1).astype(np.int64)
    params = _params(eps=eps, eps_iter=eps_iter, kappa=kappa, resistance_weight=resistance_weight,
                     temperature=temperature)
    segments = [
        (_loop_fn(fmd, "targeted", norm, None, morph_source, False), fool_iter, params),
        (_loop_fn(fmd, "agreement", norm, eot_samples, morph_source, False),
         int(nb_iter) - fool_iter, params),
    ]
    return _run_pgd(fmd, x, y, segments, eps, norm, rand_init, seed, batch_size, check_every,
                    target=target)


def cw_high_confidence_transfer(
    model,
    x,
    y=None,
    kappa: float = 20.0,
    eps: float | None = None,
    norm: str = "l2",
    learning_rate: float = 0.1,
    max_iterations: int = 100,
    binary_search_steps: int = 5,
    initial_const: float = 1.0,
    batch_size: int = 128,
) -> np.ndarray:
    """High-confidence C&W-L2 on the classifier alone (the attack that broke MagNet).

    Carlini & Wagner (2017, "MagNet and 'Efficient defenses...' are not robust") transferred
    C&W examples with a large confidence κ: misclassified by a logit margin >= κ, they stay
    adversarial after the small changes a reformer/purifier makes. Here the margin is also what
    a morph must overcome to change the label, so such examples may keep a high resistance.

    Args:
        model: an `FMDefense` (its classifier is attacked) or a classifier returning logits
            (so that `fmd_tf.evaluation.harness.adversarial_set` can run it).
        x, y: images in [0, 1] and true labels (default: the classifier's predictions).
        kappa: confidence κ of `carlini_wagner_l2`.
        eps: optional budget: perturbations are scaled into the L2 ball (`norm="l2"`) or
            clipped to the L∞ ball (`norm="linf"`) of radius eps; None = unbounded C&W.
        learning_rate, max_iterations, binary_search_steps, initial_const, batch_size: those
            of `carlini_wagner_l2`.

    Returns:
        float32 array, the shape of `x`, in [0, 1]. Examples C&W did not fool with margin κ are
        unchanged; successful ones have a logit margin >= κ unless the eps projection shrank
        them.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be > 0 or None, got {eps}")
    classifier = getattr(model, "classifier", model) if hasattr(model, "combo_vae") else model
    x = np.asarray(x, dtype=np.float32)
    x_adv = carlini_wagner_l2(
        classifier, x, y, confidence=kappa, learning_rate=learning_rate,
        max_iterations=max_iterations, binary_search_steps=binary_search_steps,
        initial_const=initial_const, batch_size=batch_size,
    )
    if eps is None:
        return x_adv
    return np.concatenate([
        _project(tf.constant(x_adv[i : i + batch_size]), tf.constant(x[i : i + batch_size]),
                 tf.constant(eps, tf.float32), norm).numpy()
        for i in range(0, len(x), batch_size)
    ]).astype(np.float32) if len(x) else x_adv


def soft_resistance(
    fmd,
    x,
    labels=None,
    eot_samples: int | None = None,
    morph_source: str = "defense",
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """The attacks' soft resistance r~ [n, m] of images `x` (numpy), e.g. to compare with r.

    Args:
        labels: the label whose agreement is measured per image; default the classifier's
            prediction on `x` (as the real defense).
        eot_samples, morph_source, temperature: as in `adaptive_pgd` (defaults: all N morphs of
            the defense's own table, i.e. the real morphs with softmax instead of argmax).
    """
    _check_defense(fmd, need_thresholds=False)
    if morph_source not in MORPH_SOURCES:
        raise ValueError(f"morph_source must be one of {MORPH_SOURCES}, got {morph_source!r}")
    x = np.asarray(x, dtype=np.float32)
    labels = _predict(fmd.classifier, x) if labels is None else np.asarray(labels, np.int64)
    num_classes = _num_classes(fmd.classifier, x)
    fn = tf.function(
        lambda xb, w, s, t: soft_resistance_tensor(fmd, xb, w, s, eot_samples, morph_source, t),
        reduce_retracing=True,
    )
    parts = []
    for b, start in enumerate(range(0, len(x), batch_size)):
        xb = tf.constant(x[start : start + batch_size])
        w = tf.one_hot(labels[start : start + batch_size], num_classes, dtype=tf.float32)
        seed_pair = tf.stack([_base_seed(seed, b), tf.constant(0)])
        parts.append(fn(xb, w, seed_pair, tf.constant(temperature, tf.float32)).numpy())
    return np.concatenate(parts)

"""How much each class-shared code of a combo-VAE is used: KL, traversal effect, activity.

The detector morphs one class-shared code at a time (paper §III-C); a code that the decoder
ignores gives morphs identical to the input, so its resistance is 1 whatever the input. These
figures say which codes carry a visible feature, without ground-truth factors:

* `kl_nats[i]`: mean over images of KL(q(z_i | x) || N(0, 1)) = 0.5 (μ² + σ² − log σ² − 1),
  summed over the code's dimensions (a feature-map code: its channel's h·w positions),
  the code's share of L_KL (Eq. 8); about 0 for a code the encoder does not use.
* `sweep_pixel_change[i]`: the paper's Fig. 1 traversal, measured. For each image, code i is set
  to `steps` values evenly spaced over its normal range [low_i, high_i] (the other codes at
  μs(x), zu(x) unchanged) and decoded; the figure is the mean absolute pixel difference between
  those images and the reconstruction decoder(μs(x), zu(x)), over images, steps and pixels.
* `sweep_label_kept[i]`: share of those decoded images that keep the classifier's label of the
  reconstruction (what a full-range morph of the code does to the label).
* `active[i]`: sweep_pixel_change >= `ACTIVE_PIXEL_CHANGE`.
* `total_correlation`: the TC discriminator's estimate (Eq. 6) on sampled codes of the images.
* `sweep_readback_slope[i]`: what the encoder reads back from the traversal: code i's value of
  μs(decoded image) against the value the sweep set, as the least-squares slope over images and
  steps (each image's sweep centred). About 1 when the decoded images carry the code to the
  encoder, about 0 when they do not (a code the decoder ignores, whatever its KL). A code with
  a slope near 1 but no visible traversal effect would be read back from a pixel change too
  small to see.

`zero_resistance_breakdown` says where a clean image's zero resistance comes from: a code whose
every morph changes the classifier's label of the input. When the reconstruction
decoder(μs(x), zu(x)) itself gets another label, every morph (a decoded image near it) does too,
so the image has resistance 0 on its codes whatever they encode.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from fmd_tf import losses

__all__ = ["ACTIVE_PIXEL_CHANGE", "MORPH_BASES", "code_activity", "input_morph_resistance",
           "morph_pixel_change", "morph_strength_sweep", "readback_slope",
           "zero_resistance_breakdown"]

# Mean |Δpixel| (pixels in [0, 1]) below which a full-range traversal counts as no change: on the
# Fashion-MNIST model a code the encoder dropped moved pixels by 3e-4, the weakest used ones
# by 0.02 or more.
ACTIVE_PIXEL_CHANGE = 0.01

# What a morph changes in `morph_strength_sweep`: "reconstruction", the detector's morphs (the
# decoded image decoder(z'), paper §III-C), or "input", the same change of features added to the
# input itself, clip(x + decoder(z') - decoder(z)) (`input_morph_resistance`).
MORPH_BASES = ("reconstruction", "input")


def _sweep_latents(mean, values, combo=None):
    """[B, c, S, D] latents: μs(x) with code i set to values[i, s], for every code i and s.

    mean: [B, D]; values: [c, S] sweep values per code. Without `combo`, or for a vector
    latent, a code is a dimension (c = D); for a feature map (c = `combo.num_codes` channels)
    the channel moves as a whole (`ComboVAE.with_code_values`).
    """
    if combo is not None and combo.num_codes != combo.shared_dim:
        sweep = tf.broadcast_to(values[None], tf.concat([tf.shape(mean)[:1],
                                                         tf.shape(values)], 0))
        return combo.with_code_values(mean, tf.range(combo.num_codes), sweep)
    eye = tf.eye(mean.shape[-1], dtype=mean.dtype)  # [code, d_s]
    shift = values[None, :, :] - mean[:, :, None]  # [B, d_s, S]: sweep value - own value
    return mean[:, None, None, :] + shift[..., None] * eye[None, :, None, :]


def code_activity(combo, classifier, x, low, high, steps: int = 9, batch_size: int = 128,
                  seed: int = 0) -> dict:
    """The figures of the module docstring for `combo` on images x [n, H, W, C].

    Args:
        combo: a `ComboVAE` (encode / decode / discriminator).
        classifier: Keras classifier, images -> logits (for `sweep_label_kept`).
        x: float32 images in [0, 1].
        low, high: [codes] normal range of each class-shared code's value (e.g. the 1st and
            99th percentiles of `combo.code_values(μs)` on training images).
        steps: sweep values per code (9 as in the figure `latent_traversals.png`).

    Returns:
        dict of per-code lists (`kl_nats`, `sweep_pixel_change`, `sweep_label_kept`, `active`,
        `sweep_readback_slope`) and `num_active`, `num_codes`, `total_correlation`, `images`,
        `steps`, `active_pixel_change`.
    """
    x = np.asarray(x, np.float32)
    values = tf.constant(np.linspace(np.asarray(low, np.float32), np.asarray(high, np.float32),
                                     steps, axis=1))  # [d_s, S]

    @tf.function(autograph=False, reduce_retracing=True)
    def batch_figures(xb, noise_seed):
        mean, log_var, zu = combo.encode(xb)
        b, d_s, codes = tf.shape(mean)[0], mean.shape[-1], combo.num_codes
        kl = losses.code_kl(mean, log_var, codes)  # [B, codes]: a code's dimensions summed
        reconstruction = combo.decode(mean, zu)
        label = tf.argmax(classifier(reconstruction), axis=-1)
        latents = tf.reshape(_sweep_latents(mean, values, combo), [-1, d_s])
        zu_all = tf.reshape(tf.broadcast_to(zu[:, None, None, :], [b, codes, steps, zu.shape[-1]]),
                            [-1, zu.shape[-1]])
        flat = combo.decode(latents, zu_all)  # [B·codes·S, H, W, C]
        decoded = tf.reshape(flat, tf.concat([[b, codes, steps], tf.shape(xb)[1:]], 0))
        change = tf.reduce_mean(tf.abs(decoded - reconstruction[:, None, None]), axis=[3, 4, 5])
        sweep_label = tf.reshape(tf.argmax(classifier(flat), axis=-1), [b, codes, steps])
        kept = tf.reduce_mean(tf.cast(tf.equal(sweep_label, label[:, None, None]), tf.float32),
                              axis=-1)
        zs = mean + tf.exp(0.5 * log_var) * tf.random.stateless_normal(tf.shape(mean),
                                                                        seed=noise_seed)
        tc_logits = tf.reshape(combo.discriminator(zs), [-1])
        read_back = tf.reshape(combo.code_values(combo.shared_encoder(flat)[0]),
                               [b, codes, steps, codes])
        read_back = tf.linalg.diag_part(tf.transpose(read_back, [0, 2, 1, 3]))  # [B, S, codes]
        return (kl, tf.reduce_mean(change, axis=-1), kept, tc_logits,
                tf.transpose(read_back, [0, 2, 1]))

    parts = [batch_figures(tf.constant(x[i : i + batch_size]), tf.constant([seed, i]))
             for i in range(0, len(x), batch_size)]
    kl, change, kept, tc, read_back = (np.concatenate([p[k].numpy() for p in parts])
                                       for k in range(5))
    pixel_change = change.mean(axis=0)
    active = pixel_change >= ACTIVE_PIXEL_CHANGE
    return {
        "images": int(len(x)), "steps": int(steps), "num_codes": int(kl.shape[1]),
        "kl_nats": kl.mean(axis=0).tolist(),
        "sweep_pixel_change": pixel_change.tolist(),
        "sweep_label_kept": kept.mean(axis=0).tolist(),
        "active": active.tolist(), "num_active": int(active.sum()),
        "active_pixel_change": ACTIVE_PIXEL_CHANGE,
        "total_correlation": float(losses.total_correlation_estimate(tc)),
        "sweep_readback_slope": readback_slope(values.numpy(), read_back).tolist(),
    }


def readback_slope(values, read_back):
    """[codes] least-squares slope of read_back [B, codes, S] on values [codes, S] (the values
    a sweep set, the same for every image), each image's sweep centred over its S steps:
    slope_i = Σ_b,s v̄_is r̄_bis / (B Σ_s v̄_is²), v̄ and r̄ centred over s."""
    v = np.asarray(values, np.float64)
    r = np.asarray(read_back, np.float64)
    v = v - v.mean(axis=-1, keepdims=True)
    r = r - r.mean(axis=-1, keepdims=True)
    return np.einsum("is,bis->i", v, r) / (len(r) * np.maximum(np.sum(v * v, axis=-1), 1e-12))


def _decoded_morphs(fmd, xb):
    """(reconstruction decoder(μs(x) ‖ zu(x)) [B, H, W, C], every decoded natural morph
    decoder(z'_ij) [B·m·N, H, W, C] in (image, code, morph) order, shape [B, m, N]) of the
    images xb (`FMDefense.morph_latents`)."""
    mean, _, zu = fmd.combo_vae.encode(xb)
    latents = fmd.morph_latents(mean, zu)  # [B, m, N, d_s + K]
    shape = tf.shape(latents)
    d_s = mean.shape[-1]
    flat = tf.reshape(latents, [-1, shape[-1]])
    return (fmd.combo_vae.decode(mean, zu), fmd.combo_vae.decode(flat[:, :d_s], flat[:, d_s:]),
            shape[:3])


def morph_pixel_change(fmd, x, batch_size: int = 16) -> dict:
    """How far the detector's morphs move the image, per selected code, on images x.

    For each image and selected code i, its N natural morphs (`FMDefense.morph_latents`) are
    decoded and compared with the reconstruction decoder(μs(x), zu(x)):

    * `morph_pixel_change[i]`: mean |Δpixel| over images, morphs and pixels;
    * `morph_label_kept[i]`: share of the morphs whose classifier label is the
      reconstruction's (1 - this is what a code's morphs can take off a clean resistance
      besides a reconstruction that changes the label).

    Returns per-code lists, `codes` (the selected code indices) and `images`.
    """
    x = np.asarray(x, np.float32)

    @tf.function(autograph=False, reduce_retracing=True)
    def batch_figures(xb):
        reconstruction, decoded, shape = _decoded_morphs(fmd, xb)
        label = tf.argmax(fmd.classifier(reconstruction), axis=-1)
        labels = tf.reshape(tf.argmax(fmd.classifier(decoded), axis=-1), shape)
        decoded = tf.reshape(decoded, tf.concat([shape, tf.shape(xb)[1:]], 0))
        change = tf.reduce_mean(tf.abs(decoded - reconstruction[:, None, None]),
                                axis=[2, 3, 4, 5])  # [B, m]
        kept = tf.reduce_mean(tf.cast(tf.equal(labels, label[:, None, None]), tf.float32),
                              axis=-1)
        return change, kept

    parts = [batch_figures(tf.constant(x[i : i + batch_size]))
             for i in range(0, len(x), batch_size)]
    change, kept = (np.concatenate([p[k].numpy() for p in parts]) for k in range(2))
    return {"images": int(len(x)), "codes": [int(c) for c in fmd.selected_codes],
            "morph_pixel_change": change.mean(axis=0).tolist(),
            "morph_label_kept": kept.mean(axis=0).tolist()}


def input_morph_resistance(fmd, x, batch_size: int = 16) -> np.ndarray:
    """Resistance [n, m] of images x [n, H, W, C] to morphs applied to the input itself.

    Morph j of selected code i moves x by the change it makes to the reconstruction:
    x'_ij = clip(x + decoder(z'_ij) - decoder(z), 0, 1), with z = μs(x) ‖ zu(x) and z'_ij the
    detector's natural morph (`FMDefense.morph_latents`, all N); r_i = share of the N morphs
    whose classifier label is classifier(x)'s. The detector's own morphs are decoder(z'_ij),
    which carry the reconstruction's error as well: where the classifier labels the
    reconstruction differently from x, every such morph does too and r_i = 0. Here a morph
    that changes no feature (z' = z) is x itself, so r_i = 1.
    """
    x = np.asarray(x, np.float32)

    @tf.function(autograph=False, reduce_retracing=True)
    def batch_resistance(xb):
        label = tf.argmax(fmd.classifier(xb), axis=-1)
        reconstruction, decoded, shape = _decoded_morphs(fmd, xb)
        per_image = shape[1] * shape[2]
        moved = tf.clip_by_value(tf.repeat(xb, per_image, axis=0) + decoded
                                 - tf.repeat(reconstruction, per_image, axis=0), 0.0, 1.0)
        labels = tf.reshape(tf.argmax(fmd.classifier(moved), axis=-1), shape)
        return tf.reduce_mean(tf.cast(tf.equal(labels, label[:, None, None]), tf.float32),
                              axis=-1)

    parts = [batch_resistance(tf.constant(x[i : i + batch_size])).numpy()
             for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, fmd.num_codes), np.float32)


def morph_strength_sweep(fmd, x, adversarial: dict, scales, pixel_images: int = 64,
                         bases=("reconstruction",)) -> list:
    """Does a stronger morph separate clean from attacked inputs? One row per scale k of
    `scales` and base of `bases` (`MORPH_BASES`): the defense's search table (the morph
    offsets, §III-C) multiplied by k, all N morphs of every selected code, on clean images x
    and each attacked set of `adversarial` {name: x_adv} (the same images attacked); with base
    "reconstruction" the detector's resistance, with "input" `input_morph_resistance`.

    Row: `scale`, `base`; `morph_pixel_change`, `morph_label_kept` per code
    (`morph_pixel_change` on the first `pixel_images` of x; the change a morph makes, the same
    for both bases before clipping); `clean_zero_share` (min_i r_i = 0) and
    `clean_mean_resistance`; per attack `auc_min_<a>` / `auc_mean_<a>` (ROC AUC of -min_i r_i /
    -mean_i r_i, attacked positive) and `<a>_zero_share`. `fmd` is not changed (a full-budget
    copy is scaled).
    """
    from fmd_tf.evaluation.metrics import roc_auc

    unknown = sorted(set(bases) - set(MORPH_BASES))
    if unknown or not bases:
        raise ValueError(f"bases must be some of {MORPH_BASES}, got {tuple(bases)}")
    full = fmd.copy_with(adaptive_budget=False)
    table = fmd.search_table.numpy()
    rows = []
    for k in scales:
        full.search_table.assign(table * float(k))
        pixels = morph_pixel_change(full, x[:pixel_images])
        for base in bases:
            resistance = full.resistance if base == "reconstruction" else \
                functools.partial(input_morph_resistance, full)
            r = {"clean": resistance(x)}
            r.update({name: resistance(x_adv) for name, x_adv in adversarial.items()})
            row = {"scale": float(k), "base": base, **pixels,
                   "clean_zero_share": float((r["clean"].min(axis=1) == 0).mean()),
                   "clean_mean_resistance": float(r["clean"].mean())}
            for name in adversarial:
                row[f"auc_min_{name}"] = roc_auc(-r["clean"].min(axis=1), -r[name].min(axis=1))
                row[f"auc_mean_{name}"] = roc_auc(-r["clean"].mean(axis=1),
                                                  -r[name].mean(axis=1))
                row[f"{name}_zero_share"] = float((r[name].min(axis=1) == 0).mean())
            rows.append(row)
    return rows


def zero_resistance_breakdown(resistance, label, recon_label, y) -> dict:
    """Clean images with a zero-resistance code, against those whose reconstruction changes the
    label.

    Args:
        resistance: [n, m] resistances (k/N) of clean images.
        label: [n] classifier label of each image; recon_label: [n] of its reconstruction;
        y: [n] true labels.

    Returns shares of the n images: `zero_code` (min_i r_i = 0), `recon_label_differs`
    (recon_label != label), `zero_code_and_recon_label_differs`; `zero_code_given_recon_differs`
    and `recon_differs_given_zero_code` (conditional shares, None when the condition is empty);
    `classifier_error` overall and `classifier_error_given_zero_code`.
    """
    resistance = np.asarray(resistance)
    label, recon_label, y = (np.asarray(a) for a in (label, recon_label, y))
    zero = resistance.min(axis=1) == 0
    differs = label != recon_label
    wrong = label != y

    def given(event, condition):
        return float(event[condition].mean()) if condition.any() else None

    return {
        "images": int(len(zero)), "zero_code": float(zero.mean()),
        "recon_label_differs": float(differs.mean()),
        "zero_code_and_recon_label_differs": float((zero & differs).mean()),
        "zero_code_given_recon_differs": given(zero, differs),
        "recon_differs_given_zero_code": given(differs, zero),
        "classifier_error": float(wrong.mean()),
        "classifier_error_given_zero_code": given(wrong, zero),
    }


def _labels(fmd, x, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(classifier label of each image, of its reconstruction decoder(μs(x), zu(x)))."""
    labels, recon_labels = [], []
    for i in range(0, len(x), batch_size):
        xb = tf.constant(x[i : i + batch_size])
        mean, _, zu = fmd.combo_vae.encode(xb)
        labels.append(tf.argmax(fmd.classifier(xb), axis=-1).numpy())
        recon_labels.append(tf.argmax(fmd.classifier(fmd.combo_vae.decode(mean, zu)),
                                      axis=-1).numpy())
    return np.concatenate(labels), np.concatenate(recon_labels)


def defense_code_activity(model_dir: str, dataset: str = "fmnist", n: int = 500,
                          seed: int = 0, morph_scales=(), morph_n: int = 200,
                          morph_attacks=("fgsm", "pgd"), cache_dir: str | None = None,
                          morph_bases=("reconstruction",)) -> dict:
    """`code_activity` of the combo-VAE in `model_dir`/fmd.keras on the first `n` VAL images of
    the paper split of `dataset`, over the defense's calibrated normal ranges (the ranges its
    morphs stay in); with the model's VAL resistances (val_resistance.npy), also
    `zero_resistance_breakdown` on all VAL images ("zero_resistance"). With `morph_scales`,
    also `morph_strength_sweep` ("morph_strength") on the first `morph_n` VAL images and their
    `morph_attacks` versions made against the classifier (`harness.adversarial_set`, cached in
    `cache_dir`), for each of `morph_bases`."""
    import os

    from fmd_tf.evaluation.report import model_splits
    from fmd_tf.loading import load_defense

    fmd = load_defense(model_dir)
    splits = model_splits(model_dir, dataset, seed)
    report = code_activity(fmd.combo_vae, fmd.classifier, splits.x_val[:n],
                           fmd.code_low.numpy(), fmd.code_high.numpy())
    out = {"model": model_dir, "dataset": dataset, "images_from": "VAL", **report}
    path = os.path.join(model_dir, "val_resistance.npy")
    if os.path.isfile(path):
        resistance = np.load(path)
        if len(resistance) == len(splits.x_val):
            out["zero_resistance"] = zero_resistance_breakdown(
                resistance, *_labels(fmd, splits.x_val), splits.y_val)
    if morph_scales:
        from fmd_tf.evaluation import harness

        x, y = splits.x_val[:morph_n], splits.y_val[:morph_n]
        adversarial = {a: harness.adversarial_set(a, fmd.classifier, x, y, cache_dir, seed)[0]
                       for a in morph_attacks}
        out["morph_strength"] = {"images": int(len(x)), "images_from": "VAL",
                                 "attacks": {a: harness.ATTACKS[a].params for a in morph_attacks},
                                 "rows": morph_strength_sweep(fmd, x, adversarial, morph_scales,
                                                              bases=morph_bases)}
    return out

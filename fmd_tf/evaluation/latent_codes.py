"""How much each class-shared code of a combo-VAE is used: KL, traversal effect, activity.

The detector morphs one class-shared code at a time (paper §III-C); a code that the decoder
ignores gives morphs identical to the input, so its resistance is 1 whatever the input. These
figures say which codes carry a visible feature, without ground-truth factors:

* `kl_nats[i]`: mean over images of KL(q(z_i | x) || N(0, 1)) = 0.5 (μ² + σ² − log σ² − 1),
  the code's share of L_KL (Eq. 8); about 0 for a code the encoder does not use.
* `sweep_pixel_change[i]`: the paper's Fig. 1 traversal, measured. For each image, code i is set
  to `steps` values evenly spaced over its normal range [low_i, high_i] (the other codes at
  μs(x), zu(x) unchanged) and decoded; the figure is the mean absolute pixel difference between
  those images and the reconstruction decoder(μs(x), zu(x)), over images, steps and pixels.
* `sweep_label_kept[i]`: share of those decoded images that keep the classifier's label of the
  reconstruction (what a full-range morph of the code does to the label).
* `active[i]`: sweep_pixel_change >= `ACTIVE_PIXEL_CHANGE`.
* `total_correlation`: the TC discriminator's estimate (Eq. 6) on sampled codes of the images.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fmd_tf import losses

__all__ = ["ACTIVE_PIXEL_CHANGE", "code_activity"]

# Mean |Δpixel| (pixels in [0, 1]) below which a full-range traversal counts as no change: on the
# Fashion-MNIST model a code the encoder dropped moved pixels by 3e-4, the weakest used ones
# by 0.02 or more.
ACTIVE_PIXEL_CHANGE = 0.01


def _sweep_latents(mean, values):
    """[B, d_s, S, d_s] latents: μs(x) with code i set to values[i, s], for every i and s.

    mean: [B, d_s]; values: [d_s, S] sweep values per code.
    """
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
        low, high: [d_s] normal range of each class-shared code (e.g. the 1st and 99th
            percentiles of μs on training images).
        steps: sweep values per code (9 as in the figure `latent_traversals.png`).

    Returns:
        dict of per-code lists (`kl_nats`, `sweep_pixel_change`, `sweep_label_kept`, `active`)
        and `num_active`, `num_codes`, `total_correlation`, `images`, `steps`,
        `active_pixel_change`.
    """
    x = np.asarray(x, np.float32)
    values = tf.constant(np.linspace(np.asarray(low, np.float32), np.asarray(high, np.float32),
                                     steps, axis=1))  # [d_s, S]

    @tf.function(autograph=False, reduce_retracing=True)
    def batch_figures(xb, noise_seed):
        mean, log_var, zu = combo.encode(xb)
        b, d_s = tf.shape(mean)[0], mean.shape[-1]
        kl = losses.gaussian_kl_per_dim(mean, log_var)  # [B, d_s]
        reconstruction = combo.decode(mean, zu)
        label = tf.argmax(classifier(reconstruction), axis=-1)
        latents = tf.reshape(_sweep_latents(mean, values), [-1, d_s])
        zu_all = tf.reshape(tf.broadcast_to(zu[:, None, None, :], [b, d_s, steps, zu.shape[-1]]),
                            [-1, zu.shape[-1]])
        decoded = combo.decode(latents, zu_all)
        decoded = tf.reshape(decoded, tf.concat([[b, d_s, steps], tf.shape(xb)[1:]], 0))
        change = tf.reduce_mean(tf.abs(decoded - reconstruction[:, None, None]), axis=[3, 4, 5])
        sweep_label = tf.reshape(
            tf.argmax(classifier(tf.reshape(decoded, tf.concat([[-1], tf.shape(xb)[1:]], 0))),
                      axis=-1), [b, d_s, steps])
        kept = tf.reduce_mean(tf.cast(tf.equal(sweep_label, label[:, None, None]), tf.float32),
                              axis=-1)
        zs = mean + tf.exp(0.5 * log_var) * tf.random.stateless_normal(tf.shape(mean),
                                                                        seed=noise_seed)
        tc_logits = tf.reshape(combo.discriminator(zs), [-1])
        return kl, tf.reduce_mean(change, axis=-1), kept, tc_logits

    parts = [batch_figures(tf.constant(x[i : i + batch_size]), tf.constant([seed, i]))
             for i in range(0, len(x), batch_size)]
    kl, change, kept, tc = (np.concatenate([p[k].numpy() for p in parts]) for k in range(4))
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
    }


def defense_code_activity(model_dir: str, dataset: str = "fmnist", n: int = 500,
                          seed: int = 0) -> dict:
    """`code_activity` of the combo-VAE in `model_dir`/fmd.keras on the first `n` VAL images of
    the paper split of `dataset`, over the defense's calibrated normal ranges (the ranges its
    morphs stay in)."""
    from fmd_tf.data import paper_splits
    from fmd_tf.loading import load_defense

    fmd = load_defense(model_dir)
    x = paper_splits(dataset, seed).x_val[:n]
    report = code_activity(fmd.combo_vae, fmd.classifier, x, fmd.code_low.numpy(),
                           fmd.code_high.numpy())
    return {"model": model_dir, "dataset": dataset, "images_from": "VAL", **report}

"""fmd_tf.evaluation.latent_codes: per-code KL, traversal effect and activity of a combo-VAE."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import TINY_COMBO_CONFIG, tiny_images

from fmd_tf import losses
from fmd_tf.evaluation import latent_codes
from fmd_tf.evaluation.latent_codes import MORPH_BASES
from fmd_tf.models import Classifier, build_combo_vae


def _models():
    keras.utils.set_random_seed(3)
    combo = build_combo_vae(TINY_COMBO_CONFIG, (28, 28, 1), 10)
    hidden = combo.decoder.stack[0]  # Dense on concat(zs, zu): row i reads code i
    kernel = hidden.kernel.numpy() * 20.0  # a decoder that reacts to its codes
    kernel[0] = 0.0  # ... except code 0, which it ignores
    hidden.kernel.assign(kernel)
    clf = Classifier(conv_filters=(4, 4), dense_units=(8,))
    clf.build((None, 28, 28, 1))
    return combo, clf


def test_sweep_latents_set_one_code_per_row():
    mean = tf.constant([[0.5, -1.0, 2.0]])
    values = tf.constant([[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]])
    got = latent_codes._sweep_latents(mean, values).numpy()  # [1, 3, 2, 3]
    for i in range(3):
        for s in range(2):
            expected = mean.numpy()[0].copy()
            expected[i] = values.numpy()[i, s]
            np.testing.assert_array_equal(got[0, i, s], expected)


def test_ignored_code_is_inactive_and_figures_match_closed_forms():
    combo, clf = _models()
    x = tiny_images(20, seed=5)
    low, high = np.full(4, -2.0, np.float32), np.full(4, 2.0, np.float32)
    report = latent_codes.code_activity(combo, clf, x, low, high, steps=5, batch_size=8)
    assert report["num_codes"] == 4 and report["images"] == 20 and report["steps"] == 5
    change = np.array(report["sweep_pixel_change"])
    assert change[0] < 1e-6 and np.all(change[1:] > latent_codes.ACTIVE_PIXEL_CHANGE)
    assert report["active"] == [False, True, True, True] and report["num_active"] == 3
    assert report["sweep_label_kept"][0] == 1.0  # an ignored code never changes the label
    assert all(0.0 <= k <= 1.0 for k in report["sweep_label_kept"])
    # Per-code KL sums to L_KL (Eq. 8) averaged over the images.
    mean, log_var = combo.shared_encoder(x)
    np.testing.assert_allclose(sum(report["kl_nats"]),
                               np.mean(losses.gaussian_kl(mean, log_var).numpy()), rtol=1e-5)
    # The pixel change of code 1 by hand for the first image.
    zs, zu = mean.numpy()[:1], combo.dgmm(x[:1]).numpy()
    reconstruction = combo.decode(zs, zu).numpy()
    sweep = np.repeat(zs, 5, axis=0)
    sweep[:, 1] = np.linspace(-2.0, 2.0, 5)
    by_hand = np.abs(combo.decode(sweep, np.repeat(zu, 5, axis=0)).numpy() - reconstruction)
    one = latent_codes.code_activity(combo, clf, x[:1], low, high, steps=5)
    np.testing.assert_allclose(one["sweep_pixel_change"][1], by_hand.mean(), rtol=1e-4)
    assert np.isfinite(report["total_correlation"])
    # Read-back: an ignored code's traversal images are all alike, so nothing is read back;
    # code 1's slope by hand for the first image.
    assert abs(report["sweep_readback_slope"][0]) < 1e-4
    read_back = combo.shared_encoder(combo.decode(sweep, np.repeat(zu, 5, axis=0)))[0].numpy()
    grid = np.linspace(-2.0, 2.0, 5)
    slope = np.polyfit(grid, read_back[:, 1], 1)[0]
    np.testing.assert_allclose(one["sweep_readback_slope"][1], slope, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("gain", [0.0, 1.0, -2.5])
def test_readback_slope_is_the_least_squares_slope(gain):
    rng = np.random.default_rng(0)
    values = np.stack([np.linspace(-1.0, 3.0, 7), np.linspace(0.0, 0.5, 7)])  # [codes 2, S 7]
    offsets = rng.normal(size=(4, 2, 1))  # each image reads back from its own level
    read_back = gain * values[None] + offsets
    np.testing.assert_allclose(latent_codes.readback_slope(values, read_back), [gain, gain],
                               atol=1e-12)
    noisy = read_back + rng.normal(scale=0.1, size=read_back.shape)
    by_hand = [np.polyfit(np.tile(values[i], 4), (noisy[:, i] - noisy[:, i].mean(-1,
               keepdims=True)).ravel(), 1)[0] for i in range(2)]
    np.testing.assert_allclose(latent_codes.readback_slope(values, noisy), by_hand, rtol=1e-9)


def test_zero_resistance_breakdown_by_hand():
    resistance = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [1.0, 1.0]])
    label, recon_label, y = [1, 2, 3, 4], [5, 2, 6, 7], [1, 0, 3, 4]
    got = latent_codes.zero_resistance_breakdown(resistance, label, recon_label, y)
    assert got == {"images": 4, "zero_code": 0.5, "recon_label_differs": 0.75,
                   "zero_code_and_recon_label_differs": 0.5,
                   "zero_code_given_recon_differs": 2 / 3, "recon_differs_given_zero_code": 1.0,
                   "classifier_error": 0.25, "classifier_error_given_zero_code": 0.0}
    none = latent_codes.zero_resistance_breakdown(np.ones((2, 3)), [0, 1], [0, 1], [0, 1])
    assert none["zero_code_given_recon_differs"] is None
    assert none["recon_differs_given_zero_code"] is None


def _ranged_defense():
    """(combo, classifier, FMDefense with 4 codes x 3 morphs and normal ranges [-2, 2])."""
    from fmd_tf.defense import FMDefense

    combo, clf = _models()
    fmd = FMDefense(clf, combo, num_morphs=3, candidates_per_step=2, max_steps=4, chunk_size=16,
                    morph_dtype="float32")
    fmd.build((None, 28, 28, 1))
    fmd.code_low.assign(np.full(4, -2.0, np.float32))
    fmd.code_high.assign(np.full(4, 2.0, np.float32))
    return combo, clf, fmd


def _decoded_by_hand(fmd, x):
    """(reconstruction [n, H, W, C], decoded morphs [n, m, N, H, W, C]) in NumPy, decoding
    each of `fmd.morph_latents` one by one."""
    combo = fmd.combo_vae
    mean, _, zu = combo.encode(x)
    recon = combo.decode(mean, zu).numpy()
    latents = fmd.morph_latents(mean, zu).numpy()  # [n, m, N, d_s + K]
    d_s = mean.shape[-1]
    flat = latents.reshape(-1, latents.shape[-1])
    decoded = combo.decode(flat[:, :d_s], flat[:, d_s:]).numpy()
    return recon, decoded.reshape(*latents.shape[:3], *x.shape[1:])


def test_morph_pixel_change_against_decoded_morphs():
    combo, clf, fmd = _ranged_defense()
    fmd.search_table.assign(fmd.search_table.numpy() * 8.0)  # morphs far enough to show
    x = tiny_images(5, seed=2)
    report = latent_codes.morph_pixel_change(fmd, x, batch_size=2)
    assert report["images"] == 5 and report["codes"] == [0, 1, 2, 3]
    change = np.array(report["morph_pixel_change"])
    assert change[0] < 1e-6 and np.all(change[1:] > 1e-3)  # code 0 is ignored by the decoder
    # By hand for every image: decode each morph latent and compare with the reconstruction.
    recon, decoded = _decoded_by_hand(fmd, x)  # [5, 28, 28, 1], [5, 4, 3, 28, 28, 1]
    expected = np.abs(decoded - recon[:, None, None]).mean(axis=(2, 3, 4, 5)).mean(axis=0)
    np.testing.assert_allclose(change, expected, rtol=1e-4, atol=1e-6)
    labels = np.argmax(clf(decoded.reshape(-1, 28, 28, 1)).numpy(), -1).reshape(5, 4, 3)
    recon_label = np.argmax(clf(recon).numpy(), -1)
    np.testing.assert_allclose(report["morph_label_kept"],
                               (labels == recon_label[:, None, None]).mean(axis=(0, 2)),
                               atol=1e-6)


def test_input_morph_resistance_by_hand_and_identity_morphs():
    combo, clf, fmd = _ranged_defense()
    table = fmd.search_table.numpy()
    x = tiny_images(5, seed=4)
    # Zero offsets: every morph is z itself, so the moved input is x and keeps its label.
    fmd.search_table.assign(np.zeros_like(table))
    np.testing.assert_array_equal(latent_codes.input_morph_resistance(fmd, x, batch_size=2),
                                  np.ones((5, 4), np.float32))
    # Far morphs, by hand: x + decoder(z') - decoder(z), clipped, labelled against x's label.
    fmd.search_table.assign(table * 8.0)
    got = latent_codes.input_morph_resistance(fmd, x, batch_size=2)
    recon, decoded = _decoded_by_hand(fmd, x)  # [5, 28, 28, 1], [5, 4, 3, 28, 28, 1]
    moved = np.clip(x[:, None, None] + decoded - recon[:, None, None], 0.0, 1.0)
    labels = np.argmax(clf(moved.reshape(-1, 28, 28, 1)).numpy(), -1).reshape(5, 4, 3)
    label = np.argmax(clf(x).numpy(), -1)
    np.testing.assert_allclose(got, (labels == label[:, None, None]).mean(axis=-1), atol=1e-6)
    assert got.shape == (5, 4) and np.all(got[:, 0] == 1.0)  # code 0: the decoder ignores it
    rows = latent_codes.morph_strength_sweep(fmd, x, {"same": x}, [1.0], bases=MORPH_BASES)
    assert [r["base"] for r in rows] == list(MORPH_BASES)
    assert rows[1]["clean_zero_share"] == float((got.min(axis=1) == 0).mean())
    assert rows[1]["auc_min_same"] == 0.5  # identical sets are not separated
    with pytest.raises(ValueError, match="bases"):
        latent_codes.morph_strength_sweep(fmd, x, {}, [1.0], bases=("decoded",))

"""Feature-map class-shared latent (ComboVAEConfig.latent = "feature_map", the paper's CelebA
model): layers, code values and morphs, losses, FMDefense, and served answers."""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import TINY_COMBO_CONFIG, FmdTestCase, tiny_images, toy_batch, toy_classifier

import fmd_tf
from fmd_tf import losses, pipeline
from fmd_tf.config import ComboVAEConfig, get_config
from fmd_tf.defense import FMDefense, morphs
from fmd_tf.models import (
    FeatureMapDecoder,
    FeatureMapEncoder,
    SharedEncoder,
    build_combo_vae,
)

TINY_FEATURE_MAP = dataclasses.replace(
    TINY_COMBO_CONFIG, latent="feature_map", gamma=0.0, feature_map_size=4,
    feature_map_encoder_filters=(8,), feature_map_decoder_filters=(8,))


def coloured_shapes(n, seed=0, size=32):
    """float32 [n, size, size, 3] in [0, 1], labels int64 [n]: the class is the shape (0 a
    filled square, 1 a disc, 2 a cross) on a dim noisy background; its colour, position and
    size vary."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.uniform(0.0, 0.15, (n, size, size, 3)).astype(np.float32)
    rows, cols = np.mgrid[:size, :size]
    for i in range(n):
        r = rng.integers(size // 6, size // 3)
        cy, cx = rng.integers(r, size - r, 2)
        dy, dx = np.abs(rows - cy), np.abs(cols - cx)
        if y[i] == 0:
            mask = (dy <= r) & (dx <= r)
        elif y[i] == 1:
            mask = dy ** 2 + dx ** 2 <= r ** 2
        else:
            mask = ((dy <= r) & (dx <= r // 3)) | ((dx <= r) & (dy <= r // 3))
        x[i][mask] = rng.uniform(0.5, 1.0, 3)
    return x, y.astype(np.int64)


# --------------------------------------------------------------------------- layers


class FeatureMapLayersTest(FmdTestCase):
    def test_encoder_shapes_flattened_channel_last_and_round_trips(self):
        for shape in ((32, 32, 3), (28, 28, 1)):
            encoder = FeatureMapEncoder(channels=5, map_size=4, filters=(8, 6))
            x = tiny_images(2, shape)
            mean, log_var = encoder(x)
            self.assertEqual(tuple(mean.shape), (2, 4 * 4 * 5))
            self.assertEqual(tuple(log_var.shape), (2, 80))
            self.assertEqual((encoder.latent_dim, encoder.num_codes), (80, 5))
            # Channel-last flattening: the head's [B, 4, 4, 2C] output, mean = first C channels.
            h = x
            for conv_a, conv_b, skip in encoder.blocks:
                h = keras.ops.relu(conv_b(conv_a(h)) + skip(h))
            maps = encoder.head(h).numpy()
            np.testing.assert_allclose(mean.numpy(), maps[..., :5].reshape(2, -1), rtol=1e-6)
            np.testing.assert_allclose(log_var.numpy(), maps[..., 5:].reshape(2, -1), rtol=1e-6)
            self.run_serialization_test(encoder)
            self.run_keras_saving_test(encoder, x)

    def test_decoder_shapes_and_round_trips(self):
        for shape in ((32, 32, 3), (28, 28, 1)):
            decoder = FeatureMapDecoder(shape, channels=5, map_size=4, filters=(8,))
            codes = np.random.default_rng(0).normal(size=(3, 80 + 2)).astype(np.float32)
            out = decoder(codes)
            self.assertEqual(tuple(out.shape), (3, *shape))
            self.assertTrue(np.all((out.numpy() > 0) & (out.numpy() < 1)))
            self.run_serialization_test(decoder)
            self.run_keras_saving_test(decoder, codes)

    def test_map_size_that_images_do_not_halve_to_is_refused(self):
        with pytest.raises(ValueError, match="choose one of"):
            FeatureMapDecoder((32, 32, 3), channels=2, map_size=5)
        with pytest.raises(ValueError, match="choose one of"):
            FeatureMapEncoder(2, map_size=3).build((None, 32, 32, 3))


# --------------------------------------------------------------------------- code values


def _numpy_morph(latents, channels, code, value):
    maps = latents.reshape(len(latents), -1, channels).copy()
    maps[:, :, code] += value[:, None] - maps[:, :, code].mean(axis=1, keepdims=True)
    return maps.reshape(len(latents), -1)


def test_feature_map_code_values_and_morphs_against_numpy():
    rng = np.random.default_rng(0)
    channels, positions = 3, 4
    mean = rng.normal(size=(2, positions * channels)).astype(np.float32)
    encoder = FeatureMapEncoder(channels=channels, map_size=2)
    values = encoder.code_values(tf.constant(mean)).numpy()
    np.testing.assert_allclose(values, mean.reshape(2, positions, channels).mean(axis=1),
                               rtol=1e-6)
    selected = np.array([2, 0], np.int32)
    morph_values = rng.normal(size=(2, 2, 5)).astype(np.float32)
    out = encoder.with_code_values(tf.constant(mean), selected, morph_values).numpy()
    assert out.shape == (2, 2, 5, positions * channels)
    for i, code in enumerate(selected):
        for j in range(5):
            want = _numpy_morph(mean, channels, code, morph_values[:, i, j])
            np.testing.assert_allclose(out[:, i, j], want, rtol=1e-5, atol=1e-6)
            # Only channel `code` moves, by one constant over its positions, to mean v.
            diff = (out[:, i, j] - mean).reshape(2, positions, channels)
            others = [c for c in range(channels) if c != code]
            np.testing.assert_array_equal(diff[:, :, others], 0.0)
            np.testing.assert_allclose(diff[:, :, code], diff[:, :1, code].repeat(positions, 1),
                                       atol=1e-6)
            np.testing.assert_allclose(
                out[:, i, j].reshape(2, positions, channels)[:, :, code].mean(axis=1),
                morph_values[:, i, j], rtol=1e-5, atol=1e-6)
    masks = encoder.code_masks(selected).numpy()
    np.testing.assert_array_equal(masks.reshape(2, positions, channels)[0, :, 2], 1.0)
    assert masks.sum() == 2 * positions


def test_vector_codes_are_todays_morph_latents_exactly():
    rng = np.random.default_rng(1)
    mean = tf.constant(rng.normal(size=(3, 6)).astype(np.float32))
    selected = tf.constant([4, 1], tf.int32)
    values = tf.constant(rng.normal(size=(3, 2, 7)).astype(np.float32))
    encoder = SharedEncoder(latent_dim=6)
    assert encoder.num_codes == 6 and encoder.code_values(mean) is mean
    np.testing.assert_array_equal(encoder.with_code_values(mean, selected, values).numpy(),
                                  morphs.morph_latents(mean, selected, values).numpy())
    np.testing.assert_array_equal(encoder.code_masks(selected).numpy(),
                                  tf.one_hot(selected, 6).numpy())


# --------------------------------------------------------------------------- losses


def test_free_bits_kl_per_channel_closed_form_and_gradient():
    # Two channels over two positions, flattened channel-last: dims (p0c0, p0c1, p1c0, p1c1).
    # Per-dim KL 0.5 mean^2 (log_var 0): image 0 has mean 1 on both positions of channel 0,
    # image 1 mean 2 on p0 of channel 1. Batch-mean KL: channel 0 (0.5 + 0.5) / 2 = 0.5,
    # channel 1 2 / 2 = 1.
    mean = tf.Variable([[1.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    log_var = tf.zeros([2, 4])
    np.testing.assert_allclose(losses.code_kl(mean, log_var, 2).numpy(),
                               [[1.0, 0.0], [0.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(losses.free_bits_kl(mean, log_var, 0.0, 2).numpy(), 1.5)
    with tf.GradientTape() as tape:
        out = losses.free_bits_kl(mean, log_var, 0.7, 2)
    np.testing.assert_allclose(out.numpy(), 0.7 + 1.0, rtol=1e-6)
    grad = tape.gradient(out, mean).numpy()
    np.testing.assert_allclose(grad[:, [0, 2]], 0.0)  # channel 0 is under the floor
    np.testing.assert_allclose(grad[:, [1, 3]], [[0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    # The per-dimension floor would charge 4 dims; the per-code one charges 2 codes.
    np.testing.assert_allclose(losses.free_bits_kl(mean, log_var, 5.0, 2).numpy(), 10.0)
    # One code per dimension (the default): batch-mean KLs 0.25, 1, 0.25, 0 -> 0.3 + 1 + 0.3 + 0.3.
    np.testing.assert_allclose(losses.free_bits_kl(mean, log_var, 0.3).numpy(), 1.9, rtol=1e-6)
    assert math.isclose(float(losses.code_kl(mean, log_var, 4).numpy().sum()), 3.0)


def test_feature_map_combo_vae_trains_with_tc_term_and_free_bits_then_copies_exactly():
    from fmd_tf.training import inference_copy

    keras.utils.set_random_seed(0)
    cfg = dataclasses.replace(TINY_FEATURE_MAP, gamma=5.0, free_bits=0.5)
    combo = build_combo_vae(cfg, (32, 32, 3), 3, seed=0)
    combo.compile(keras.optimizers.Adam(1e-3))
    x = tiny_images(16, (32, 32, 3))
    history = combo.fit(x, epochs=1, batch_size=8, verbose=0).history
    assert all(np.isfinite(v[-1]) for v in history.values())
    assert history["tc"][-1] != 0.0  # the discriminator sees the flattened map
    copy = inference_copy(combo)
    for key, value in combo(x[:4]).items():
        np.testing.assert_array_equal(copy(x[:4])[key].numpy(), value.numpy(), err_msg=key)


# --------------------------------------------------------------------------- config


def test_config_latent_option_flags_and_pipeline_defaults():
    from fmd_tf.options import OptionError, validate

    assert ComboVAEConfig().latent == "vector"
    with pytest.raises(OptionError):
        validate(ComboVAEConfig(latent="grid"))
    cfg = pipeline.experiment_config((32, 32, 3), 3, "fast", latent="feature_map")
    assert (cfg.combo.latent, cfg.combo.gamma, cfg.combo.feature_map_size) == \
        ("feature_map", 0.0, 4)
    assert pipeline.experiment_config((64, 64, 3), 3, latent="feature_map").combo \
        .feature_map_size == 8
    assert fmd_tf.config.to_dict(cfg)["combo"]["latent"] == "feature_map"
    assert pipeline.experiment_config((28, 28, 1), 10) == pipeline.experiment_config(
        (28, 28, 1), 10, latent=None)
    assert get_config("fmnist").combo.latent == "vector"


def test_train_script_flags_derived_from_the_options():
    from test_case import script_module

    train = script_module("scripts/train.py")
    args = train.parse_args(["--latent", "feature_map", "--feature-map-size", "4",
                             "--feature-map-encoder-filters", "8,8", "--out", "/tmp/unused"])
    cfg = train._config(args, (32, 32, 3), 3, 1000, 1000)
    assert cfg.combo.latent == "feature_map" and cfg.combo.gamma == 0.0
    assert cfg.combo.feature_map_encoder_filters == (8, 8)
    args = train.parse_args(["--latent", "feature_map", "--gamma", "5", "--out", "/tmp/unused"])
    assert train._config(args, (32, 32, 3), 3, 1000, 1000).combo.gamma == 5.0


# --------------------------------------------------------------------------- defense


@pytest.fixture(scope="module")
def tiny_defense():
    classifier, x, y = toy_classifier(epochs=10)
    combo = build_combo_vae(TINY_FEATURE_MAP, (28, 28, 1), 10, seed=0)
    for model in (combo.decoder, combo.shared_encoder):  # varied morphs
        for w in model.weights:
            if "kernel" in w.path:
                w.assign(w.numpy() * 5.0)
    fmd = FMDefense(classifier, combo, num_morphs=4, candidates_per_step=2, max_steps=4,
                    chunk_size=64, rho=0.9, min_suspicious=2, morph_dtype="float32", name="fmd")
    report = fmd.calibrate(x[:24])
    return fmd, report, np.concatenate([x[24:], tiny_images(4)])


def test_feature_map_defense_calibrates_over_code_values(tiny_defense):
    fmd, report, images = tiny_defense
    combo = fmd.combo_vae
    assert (combo.num_codes, combo.shared_dim) == (4, 64)
    assert fmd.selected_codes == (0, 1, 2, 3) and fmd.code_low.shape == (4,)
    values = combo.code_values(combo.shared_encoder(toy_batch(per_class=4)[0][:24])[0])
    low, high = morphs.normal_ranges(values.numpy(), fmd.range_percentiles)
    np.testing.assert_allclose(report["code_low"], low)
    np.testing.assert_allclose(report["code_high"], high)
    assert report["val_resistance"].shape == (24, 4)


def test_feature_map_defense_output_contract_and_reload(tiny_defense, tmp_path):
    fmd, _, images = tiny_defense
    out = fmd.defend(images)
    n = len(images)
    assert out["label"].shape == (n,) and out["label"].dtype == np.int64
    assert out["verdict"].dtype == np.int32 and set(out["verdict"]) <= {0, 1, 2}
    assert out["resistance"].shape == (n, 4) and out["distance"].shape == (n,)
    assert out["purified"].shape == (n, 28, 28, 1) and out["recon_error"].shape == (n,)
    np.testing.assert_array_equal(out["label"][out["verdict"] == 2], -1)
    assert fmd.morph_images(images[:2], 1, 3).shape == (2, 3, 28, 28, 1)
    path = tmp_path / "fmd.keras"
    fmd.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.combo_vae.shared_encoder) is FeatureMapEncoder
    again = loaded.defend(images)
    for key in out:
        np.testing.assert_array_equal(again[key], out[key], err_msg=key)


def test_feature_map_adaptive_budget_with_all_codes_refined_is_the_full_budget(tiny_defense):
    fmd, _, images = tiny_defense
    adaptive = fmd.copy_with(adaptive_budget=True, adaptive_round=2,
                             adaptive_refine_codes=fmd.num_codes)
    np.testing.assert_array_equal(adaptive.resistance(images), fmd.resistance(images))


def test_feature_map_morphs_in_bfloat16(tiny_defense):
    fmd, _, images = tiny_defense
    reduced = fmd.copy_with(morph_dtype="bfloat16", morph_check_margin=0.0)
    r = reduced.resistance(images)
    assert r.shape == (len(images), 4) and np.all((r >= 0) & (r <= 1))


def test_adaptive_attack_surrogate_morphs_whole_channels(tiny_defense):
    from fmd_tf.attacks.adaptive import adaptive_pgd, soft_resistance

    fmd, _, images = tiny_defense
    sharp = soft_resistance(fmd, images, morph_source="defense", temperature=0.001)
    np.testing.assert_allclose(sharp, fmd.resistance(images), atol=0.02)
    x, y = images[:4], fmd.classifier(images[:4]).numpy().argmax(-1)
    x_adv = adaptive_pgd(fmd, x, y, eps=0.1, nb_iter=2, eot_samples=2)
    assert x_adv.shape == x.shape and np.max(np.abs(x_adv - x)) <= 0.1 + 1e-6


def test_code_activity_sums_kl_over_a_channel(tiny_defense):
    from fmd_tf.evaluation.latent_codes import code_activity

    fmd, _, images = tiny_defense
    report = code_activity(fmd.combo_vae, fmd.classifier, images, fmd.code_low.numpy(),
                           fmd.code_high.numpy(), steps=3)
    assert report["num_codes"] == 4 and len(report["sweep_pixel_change"]) == 4
    assert len(report["sweep_readback_slope"]) == 4  # a channel's mean read back
    assert np.all(np.isfinite(report["sweep_readback_slope"]))
    mean, log_var, _ = fmd.combo_vae.encode(images)
    per_dim = losses.gaussian_kl_per_dim(mean, log_var).numpy().reshape(len(images), -1, 4)
    np.testing.assert_allclose(report["kl_nats"], per_dim.sum(axis=1).mean(axis=0), rtol=1e-5)


# --------------------------------------------------------------------------- done when


def test_fast_feature_map_model_served_answers_equal_the_defense(tmp_path):
    """Train the feature-map model with the fast preset on coloured shapes, calibrate, export,
    serve with the in-test PredictionService and compare serving_default with the defense."""
    from fmd_tf.export import export_serving
    from fmd_tf.serving import client
    from fmd_tf.serving.local_server import ServingServer

    started = time.time()
    x_train, y_train = coloured_shapes(256, seed=0)
    x_val, y_val = coloured_shapes(64, seed=1)
    keras.utils.set_random_seed(1)
    clf = keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(3)])
    clf.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clf.fit(x_train, y_train, epochs=3, verbose=0)
    cfg = pipeline.experiment_config((32, 32, 3), 3, "fast", latent="feature_map")
    cfg = dataclasses.replace(
        cfg, splits=dataclasses.replace(cfg.splits, train_size=256),
        combo=dataclasses.replace(
            cfg.combo, shared_dim=4, unique_dim=3, encoder_filters=(8, 8), encoder_dense=16,
            feature_map_encoder_filters=(8,), feature_map_decoder_filters=(8,),
            discriminator_units=(16,), dgmm_train_size=256, consistency_weight=0.0,
            latent_cycle_weight=1.0, code_use_weight=1.0),
        defense=dataclasses.replace(cfg.defense, num_morphs=4, candidates_per_step=2,
                                    max_steps=4))
    fmd = fmd_tf.fit_defense(clf, (x_train, y_train), (x_val, y_val), config=cfg,
                             operating_point="paper", verbose=0)
    assert fmd.is_calibrated and fmd.combo_vae.num_codes == 4
    assert fmd.combo_vae.shared_dim == 4 * 4 * 4 and fmd.combo_vae.gamma == 0.0
    images = x_val[:8]
    expected = {k: v.numpy() for k, v in fmd(tf.constant(images)).items()}
    path = export_serving(fmd, tmp_path / "serving", version=1)
    with ServingServer(path, model_name="fmd", version=1) as server:
        served = client.predict_grpc(server.target, "fmd", images, timeout=60)
    for key, value in expected.items():
        if value.dtype.kind in "iu":
            np.testing.assert_array_equal(served[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(served[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    print(f"feature-map CI model: {time.time() - started:.1f} s")

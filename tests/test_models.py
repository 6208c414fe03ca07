"""Tests for fmd_tf.models: serialization, `.keras` saving, DGMM maths, training steps."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import TINY_COMBO_CONFIG, FmdTestCase, tiny_images

from fmd_tf import losses
from fmd_tf.models import (
    DGMM,
    Classifier,
    ComboVAE,
    Decoder,
    SharedEncoder,
    TCDiscriminator,
    build_combo_vae,
)
from fmd_tf.models.dgmm import LOG_VAR_BOUNDS
from fmd_tf.models.layer_stack import apply_layers, build_layers

IMAGE_SHAPE = (28, 28, 1)
LOG_2PI = math.log(2.0 * math.pi)
COMBO_METRICS = {"loss", "recon_loss", "kl_loss", "tc", "disc_loss", "consistency",
                 "latent_cycle", "code_use"}
DGMM_METRICS = {"loss", "cls_loss", "lkd_loss", "accuracy"}


@pytest.fixture(autouse=True)
def _seeded():
    """Same initial weights in every run: each test starts from a fixed global seed."""
    keras.utils.set_random_seed(0)


def _small_dgmm(num_classes=10, latent_dim=3, lambda_lkd=0.1, name="dgmm"):
    model = DGMM(
        num_classes=num_classes, latent_dim=latent_dim, filters=(8, 8), dense_units=16,
        lambda_lkd=lambda_lkd, name=name,
    )
    model.build((None, *IMAGE_SHAPE))
    return model


def _small_combo(seed=0, **options):
    return build_combo_vae(dataclasses.replace(TINY_COMBO_CONFIG, **options), IMAGE_SHAPE, 10,
                           seed=seed)


def _compile_combo(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        discriminator_optimizer=keras.optimizers.Adam(1e-4),
    )
    return model


def _np_gm_log_prob(zu, means, log_vars):
    """[B, C] log N(zu_b; mu_c, diag exp(log_var_c)), float64."""
    zu = np.asarray(zu, np.float64)[:, None, :]
    mu = np.asarray(means, np.float64)[None]
    lv = np.asarray(log_vars, np.float64)[None]
    return (-0.5 * (LOG_2PI + lv + (zu - mu) ** 2 / np.exp(lv))).sum(-1)


def _np_dgmm_reference(model, x):
    """(zu, clipped log_vars, class logits) of `model` on `x`, from its weights, in numpy."""
    zu = model(x).numpy()
    log_vars = np.clip(model.class_log_vars.numpy(), *LOG_VAR_BOUNDS)
    logits = _np_gm_log_prob(zu, model.class_means.numpy(), log_vars) - np.log(model.num_classes)
    return zu, log_vars, logits


def _weights(model):
    return [w.numpy().copy() for w in model.weights]


def _assert_finite_nonzero(history, names):
    assert set(history) == names
    for name in names:
        assert len(history[name]) == 1, name
        value = history[name][0]
        assert np.isfinite(value) and value != 0.0, (name, value)


# =========================================================================== serialization / saving


class ClassifierTest(FmdTestCase):
    def test_serialization_and_saving(self):
        model = Classifier(
            num_classes=7, conv_filters=(4, 4, 8, 8), dense_units=(16,), dropout=0.5, name="clf"
        )
        model.build((None, *IMAGE_SHAPE))
        self.assertEqual(tuple(model(tiny_images()).shape), (4, 7))
        revived = self.run_serialization_test(model)
        self.assertEqual(revived.conv_filters, (4, 4, 8, 8))
        self.assertEqual(revived.dense_units, (16,))
        loaded = self.run_keras_saving_test(model, tiny_images())
        self.assertEqual(loaded.num_classes, 7)

    def test_dropout_only_in_training(self):
        model = Classifier(conv_filters=(4, 4), dense_units=(32,), dropout=0.5)
        x = tiny_images()
        self.assertAllEqual(model(x), model(x, training=False))
        self.assertNotAllClose(model(x, training=True), model(x, training=False))


class SharedEncoderTest(FmdTestCase):
    def test_serialization_and_saving(self):
        model = SharedEncoder(latent_dim=5, filters=(8, 8, 16), dense_units=16, name="es")
        model.build((None, *IMAGE_SHAPE))
        mean, log_var = model(tiny_images())
        self.assertEqual(tuple(mean.shape), (4, 5))
        self.assertEqual(tuple(log_var.shape), (4, 5))
        self.run_serialization_test(model)
        self.run_keras_saving_test(model, tiny_images())


class TCDiscriminatorTest(FmdTestCase):
    def test_serialization_and_saving(self):
        model = TCDiscriminator(units=(16, 8), name="dtc")
        codes = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
        model.build((None, 5))
        self.assertEqual(tuple(model(codes).shape), (6,))
        self.run_serialization_test(model)
        self.run_keras_saving_test(model, codes)


class DecoderTest(FmdTestCase):
    def test_serialization_and_saving(self):
        model = Decoder(image_shape=IMAGE_SHAPE, dense_units=16, filters=(8, 4), name="dec")
        codes = np.random.default_rng(2).normal(size=(3, 7)).astype(np.float32)
        model.build((None, 7))
        images = model(codes).numpy()
        self.assertEqual(images.shape, (3, *IMAGE_SHAPE))
        self.assertTrue(np.all((images > 0.0) & (images < 1.0)))
        self.run_serialization_test(model)
        self.run_keras_saving_test(model, codes)

    def test_crops_to_an_indivisible_image_shape(self):
        model = Decoder(image_shape=(30, 26, 3), filters=(8, 4))
        self.assertEqual(model.seed_shape, (8, 7, 8))  # ceil(30 / 4), ceil(26 / 4)
        images = model(np.zeros((2, 6), np.float32)).numpy()
        self.assertEqual(images.shape, (2, 30, 26, 3))
        self.run_serialization_test(model)
        with self.assertRaisesRegex(ValueError, "must be positive"):
            Decoder(image_shape=(0, 28, 1))


class DGMMTest(FmdTestCase):
    def test_serialization_and_saving(self):
        model = _small_dgmm(num_classes=4, latent_dim=3, lambda_lkd=0.25)
        revived = self.run_serialization_test(model)
        self.assertEqual(revived.lambda_lkd, 0.25)
        loaded = self.run_keras_saving_test(model, tiny_images())
        # The prior lives in weights, so class_logits must survive saving too.
        zu = model(tiny_images())
        self.assertAllClose(model.class_logits(zu), loaded.class_logits(zu), atol=1e-6)


class ComboVAETest(FmdTestCase):
    def test_serialization_and_saving(self):
        model = _small_combo(seed=5, free_bits=0.5)
        out = model(tiny_images())
        self.assertEqual(sorted(out), ["log_var", "mean", "reconstruction", "zu"])
        self.assertEqual(tuple(out["mean"].shape), (4, TINY_COMBO_CONFIG.shared_dim))
        self.assertEqual(tuple(out["zu"].shape), (4, TINY_COMBO_CONFIG.unique_dim))
        self.assertEqual(tuple(out["reconstruction"].shape), (4, *IMAGE_SHAPE))

        revived = self.run_serialization_test(model)
        self.assertEqual((revived.gamma, revived.beta, revived.seed, revived.free_bits),
                         (40.0, 1.0, 5, 0.5))
        self.assertIsInstance(revived.dgmm, DGMM)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = self.run_keras_saving_test(model, tiny_images())
        build_warnings = [str(w.message) for w in caught if "built" in str(w.message)]
        self.assertEqual(build_warnings, [])
        self.assertEqual(loaded.seed, 5)
        self.assertEqual(loaded.shared_dim, TINY_COMBO_CONFIG.shared_dim)
        self.assertEqual(loaded.unique_dim, TINY_COMBO_CONFIG.unique_dim)


# =========================================================================== DGMM maths


def test_layer_stack_builds_in_order_and_applies_like_a_sequential():
    """build_layers creates every weight from the input shape alone and returns the output
    shape; apply_layers gives what keras.Sequential gives on the same layers."""
    stack = [keras.layers.Conv2D(4, 3, name="c"), keras.layers.Flatten(name="f"),
             keras.layers.Dense(3, name="d"), keras.layers.Dropout(0.5, name="drop")]
    assert build_layers(stack, (None, 8, 8, 1)) == (None, 3)
    assert [tuple(w.shape) for w in stack[0].weights] == [(3, 3, 1, 4), (4,)]
    assert [tuple(w.shape) for w in stack[2].weights] == [(144, 3), (3,)]
    x = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype("float32")
    expected = keras.Sequential(stack)(x, training=False)
    np.testing.assert_allclose(apply_layers(stack, x, training=False), expected, atol=1e-6)
    dropped = np.asarray(apply_layers(stack, x, training=True))
    assert (dropped == 0).any()  # training reaches the Dropout layer


def test_dgmm_class_logits_match_numpy_reference(tiny_images):
    model = _small_dgmm(num_classes=5, latent_dim=3)
    rng = np.random.default_rng(3)
    log_vars = rng.uniform(-1.0, 1.0, size=(5, 3)).astype(np.float32)
    log_vars[0, 0], log_vars[1, 2] = -9.0, 7.0  # outside LOG_VAR_BOUNDS: must be clipped
    model.class_log_vars.assign(log_vars)
    # Means close to the codes, so that several classes win somewhere.
    zu0 = model(tiny_images).numpy()
    model.class_means.assign(
        (zu0[rng.integers(0, 4, 5)] + rng.normal(0, 0.05, (5, 3))).astype(np.float32)
    )

    zu, clipped, ref = _np_dgmm_reference(model, tiny_images)
    assert clipped[0, 0] == LOG_VAR_BOUNDS[0] and clipped[1, 2] == LOG_VAR_BOUNDS[1]
    logits = model.class_logits(tf.constant(zu)).numpy()
    assert logits.shape == (4, 5)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-4)
    pred = np.argmax(logits, axis=-1)
    np.testing.assert_array_equal(pred, np.argmax(ref, axis=-1))
    np.testing.assert_array_equal(
        model.class_mean(tf.constant(zu)).numpy(), model.class_means.numpy()[pred]
    )


def test_dgmm_prior_params_clip_log_vars():
    model = _small_dgmm(num_classes=2, latent_dim=2)
    model.class_log_vars.assign([[-100.0, 0.5], [100.0, -5.9]])
    _, log_vars = model.prior_params()
    np.testing.assert_array_equal(
        log_vars.numpy(),
        np.array([[LOG_VAR_BOUNDS[0], 0.5], [LOG_VAR_BOUNDS[1], -5.9]], np.float32),
    )


def test_dgmm_evaluate_matches_eq_10_to_12(toy_batch):
    x, y = toy_batch
    model = _small_dgmm(lambda_lkd=0.1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    logs = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    assert set(logs) == DGMM_METRICS

    zu, log_vars, logits = _np_dgmm_reference(model, x)
    top = logits.max(1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    cls = -np.mean(log_softmax[np.arange(len(y)), y])
    own = _np_gm_log_prob(zu, model.class_means.numpy(), log_vars)[np.arange(len(y)), y]
    lkd = -np.mean(own)
    np.testing.assert_allclose(logs["cls_loss"], cls, rtol=1e-5)
    np.testing.assert_allclose(logs["lkd_loss"], lkd, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], cls + 0.1 * lkd, rtol=1e-5)
    np.testing.assert_allclose(logs["accuracy"], np.mean(np.argmax(logits, 1) == y), atol=1e-7)


def test_dgmm_fit_logs_metrics_and_lowers_loss(toy_batch):
    x, y = toy_batch
    model = _small_dgmm(lambda_lkd=0.1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)["loss"]
    history = model.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0).history
    _assert_finite_nonzero(history, DGMM_METRICS)
    # Epoch means of per-batch values: the identity L_GM = L_cls + lambda * L_lkd still holds.
    np.testing.assert_allclose(
        history["loss"][0], history["cls_loss"][0] + 0.1 * history["lkd_loss"][0], rtol=1e-5
    )
    assert 0.0 <= history["accuracy"][0] <= 1.0
    assert int(model.optimizer.iterations.numpy()) == 2
    model.fit(x, y, batch_size=len(x), epochs=3, verbose=0)
    after = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)["loss"]
    assert after < before, (before, after)


def test_training_stages_trace_their_step_once(toy_batch, monkeypatch):
    """`training._fit` builds the optimizer first: a step that creates variables is traced twice."""
    from fmd_tf.training import _fit

    x, y = toy_batch
    model = _small_dgmm()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    traces = []
    step = model.train_step
    monkeypatch.setattr(model, "train_step", lambda data: traces.append(1) or step(data))
    _fit(model, x, y, batch_size=8, epochs=2, verbose=0, callbacks=[])  # a partial last batch
    assert len(traces) == 1 and int(model.optimizer.iterations.numpy()) == 6


def test_dgmm_train_on_batch(toy_batch):
    x, y = toy_batch
    model = _small_dgmm()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = model.test_on_batch(x, y, return_dict=True)["loss"]
    for _ in range(5):
        model.train_on_batch(x, y)
    after = model.test_on_batch(x, y, return_dict=True)["loss"]
    assert after < before, (before, after)


def test_dgmm_learning_rate_schedules():
    from fmd_tf.config import ComboVAEConfig
    from fmd_tf.training import dgmm_learning_rate

    cosine = dgmm_learning_rate(ComboVAEConfig(learning_rate=1e-3, dgmm_lr_schedule="cosine"), 100)
    # Cosine decay to alpha = 1 %: lr(t) = 1e-3 * (0.01 + 0.99 * (1 + cos(pi t / 100)) / 2),
    # so 1e-3 at t = 0, 1e-3 * (0.01 + 0.495) = 5.05e-4 at t = 50, 1e-5 from t = 100 on.
    np.testing.assert_allclose(
        [float(cosine(t)) for t in (0, 50, 100, 150)], [1e-3, 5.05e-4, 1e-5, 1e-5], rtol=1e-5
    )
    constant = ComboVAEConfig(learning_rate=2e-3, dgmm_lr_schedule="constant")
    assert dgmm_learning_rate(constant, 100) == 2e-3
    with pytest.raises(ValueError, match="dgmm_lr_schedule must be one of"):
        dgmm_learning_rate(ComboVAEConfig(dgmm_lr_schedule="linear"), 100)


def test_vae_training_images_follow_vae_data():
    from fmd_tf.config import ComboVAEConfig
    from fmd_tf.training import vae_training_images

    split = np.zeros((3, 2, 2, 1), np.float32)
    full = np.ones((7, 2, 2, 1), np.float32)
    assert vae_training_images(ComboVAEConfig(vae_data="train"), split, full) is split
    assert vae_training_images(ComboVAEConfig(vae_data="full"), split, full) is full
    with pytest.raises(ValueError, match="vae_data must be one of"):
        vae_training_images(ComboVAEConfig(vae_data="test"), split, full)


def test_dgmm_training_data_follows_dgmm_train_size():
    from fmd_tf.config import ComboVAEConfig
    from fmd_tf.training import dgmm_training_data

    split = (np.zeros((5, 2, 2, 1), np.float32), np.arange(5))
    full = (np.ones((9, 2, 2, 1), np.float32), np.arange(9))
    assert dgmm_training_data(ComboVAEConfig(dgmm_train_size=None), split, full) is full
    x, y = dgmm_training_data(ComboVAEConfig(dgmm_train_size=3), split, full)
    assert x.shape == (3, 2, 2, 1) and not x.any() and y.tolist() == [0, 1, 2]


def test_train_dgmm_decays_learning_rate_over_its_steps(toy_batch):
    from fmd_tf.config import ExperimentConfig
    from fmd_tf.training import new_combo_vae, train_dgmm

    x, y = toy_batch
    combo_cfg = dataclasses.replace(
        TINY_COMBO_CONFIG, dgmm_epochs=2, batch_size=len(x), dgmm_lr_schedule="cosine"
    )
    cfg = ExperimentConfig(image_shape=tuple(x.shape[1:]), num_classes=int(y.max()) + 1,
                           combo=combo_cfg)
    combo = new_combo_vae(cfg, tf.distribute.get_strategy(), seed=0)
    dgmm = train_dgmm(cfg, combo, x, y, verbose=0)
    # 2 epochs x 1 batch = 2 steps: the schedule ends at 1 % of the initial rate.
    assert int(dgmm.optimizer.iterations.numpy()) == 2
    np.testing.assert_allclose(
        float(dgmm.optimizer.learning_rate.numpy()), 0.01 * combo_cfg.learning_rate, rtol=1e-5
    )


# =========================================================================== combo-VAE


def test_combo_vae_compile_default_discriminator_optimizer():
    model = _small_combo()
    model.compile(optimizer="adam")
    opt = model.discriminator_optimizer
    assert isinstance(opt, keras.optimizers.Adam)
    assert (float(opt.learning_rate), opt.beta_1, opt.beta_2) == pytest.approx((1e-4, 0.5, 0.9))


def test_combo_vae_test_step_matches_eq_8(toy_batch):
    x, _ = toy_batch
    model = _compile_combo(_small_combo(seed=3))
    logs = model.evaluate(x, batch_size=len(x), verbose=0, return_dict=True)
    assert set(logs) == COMBO_METRICS

    # Reference with the same noise: test_step uses the stateless seed [seed, 0].
    mean, log_var = (t.numpy() for t in model.shared_encoder(x))
    eps = tf.random.stateless_normal(mean.shape, seed=[3, 0]).numpy()
    zs = mean + np.exp(0.5 * log_var) * eps
    zu = model.dgmm(x).numpy()
    x_hat = model.decoder(np.concatenate([zs, zu], -1).astype(np.float32)).numpy()
    recon = np.mean(np.sum((x - x_hat) ** 2, axis=(1, 2, 3)))
    kl = np.mean(0.5 * np.sum(mean**2 + np.exp(log_var) - log_var - 1.0, axis=-1))
    logit_real = model.discriminator(zs.astype(np.float32)).numpy()
    permuted = losses.permute_dims(zs.astype(np.float32), tf.constant([3, 1]))
    logit_perm = model.discriminator(permuted).numpy()
    disc = 0.5 * (np.mean(np.logaddexp(0.0, -logit_real)) + np.mean(np.logaddexp(0.0, logit_perm)))
    tc = np.mean(logit_real)

    np.testing.assert_allclose(logs["recon_loss"], recon, rtol=1e-4)
    np.testing.assert_allclose(logs["kl_loss"], kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(logs["tc"], tc, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logs["disc_loss"], disc, rtol=1e-4)
    # Eq. 8 with the configured weights: w·L_R + β·L_KL + γ·L_TC (w = 10, β = 1, γ = 40).
    assert (model.recon_weight, model.beta, model.gamma) == (10.0, 1.0, 40.0)
    np.testing.assert_allclose(logs["loss"], 10.0 * recon + kl + 40.0 * tc, rtol=1e-4, atol=1e-4)


def test_combo_vae_train_steps_lower_loss_and_freeze_dgmm(toy_batch):
    x, _ = toy_batch
    model = _compile_combo(_small_combo())
    before = model.test_on_batch(x, return_dict=True)
    dgmm_w = _weights(model.dgmm)
    parts = {"encoder": model.shared_encoder, "decoder": model.decoder,
             "discriminator": model.discriminator}
    part_w = {k: _weights(m) for k, m in parts.items()}

    assert not model.dgmm.trainable  # compile freezes it for stage 2
    assert model.dgmm.trainable_weights == []
    steps = 8
    for _ in range(steps):
        model.train_on_batch(x)
    after = model.test_on_batch(x, return_dict=True)

    assert after["loss"] < before["loss"], (before, after)
    assert after["recon_loss"] < before["recon_loss"], (before, after)
    for w0, w in zip(dgmm_w, model.dgmm.weights, strict=True):
        np.testing.assert_array_equal(w0, w.numpy(), err_msg=f"frozen DGMM changed: {w.path}")
    for key, m in parts.items():
        for w0, w in zip(part_w[key], m.trainable_weights, strict=True):
            assert not np.array_equal(w0, w.numpy()), f"{key} weight {w.path} did not change"
    assert int(model.optimizer.iterations.numpy()) == steps
    assert int(model.discriminator_optimizer.iterations.numpy()) == steps


def test_combo_vae_fit_logs_named_metrics(toy_batch):
    x, _ = toy_batch
    model = _compile_combo(_small_combo())
    history = model.fit(x, batch_size=10, epochs=1, shuffle=False, verbose=0).history
    assert history.pop("consistency") == [0.0]  # consistency_weight 0: the term is off
    assert history.pop("latent_cycle") == [0.0]  # latent_cycle_weight 0: off
    assert history.pop("code_use") == [0.0]  # code_use_weight 0: off
    _assert_finite_nonzero(history, COMBO_METRICS - {"consistency", "latent_cycle", "code_use"})
    h = {k: v[0] for k, v in history.items()}
    np.testing.assert_allclose(
        h["loss"], 10.0 * h["recon_loss"] + h["kl_loss"] + 40.0 * h["tc"], rtol=1e-5, atol=1e-4
    )
    assert int(model.optimizer.iterations.numpy()) == 2


def _consistency_combo(weight, seed=0):
    cfg = dataclasses.replace(TINY_COMBO_CONFIG, consistency_weight=weight)
    return build_combo_vae(cfg, IMAGE_SHAPE, 10, seed=seed)


def _tiny_classifier():
    clf = Classifier(num_classes=10, conv_filters=(4, 4), dense_units=(8,))
    clf.build((None, *IMAGE_SHAPE))
    return clf


def _test_step_codes(model, x, seed):
    """The class-shared codes test_step samples for images x (noise seed [seed, 0])."""
    mean, log_var = (t.numpy() for t in model.shared_encoder(x))
    return mean + np.exp(0.5 * log_var) * tf.random.stateless_normal(mean.shape,
                                                                      seed=[seed, 0]).numpy()


def _assert_total_loss(logs, term, atol=1e-4):
    """logs["loss"] = L_R·10 + L_KL + L_TC·40 (the tiny config's weights) + `term`."""
    np.testing.assert_allclose(
        logs["loss"], 10.0 * logs["recon_loss"] + logs["kl_loss"] + 40.0 * logs["tc"] + term,
        rtol=1e-4, atol=atol)


def test_combo_vae_consistency_term_in_loss(toy_batch):
    x, _ = toy_batch
    clf = _tiny_classifier()
    model = _compile_combo(_consistency_combo(2.5, seed=3))
    with pytest.raises(ValueError, match="set_consistency_classifier"):
        model.evaluate(x, batch_size=len(x), verbose=0)
    model.set_consistency_classifier(clf)
    logs = model.evaluate(x, batch_size=len(x), verbose=0, return_dict=True)
    assert set(logs) == COMBO_METRICS
    x_hat = model.decode(_test_step_codes(model, x, 3), model.dgmm(x))
    expected = np.mean(losses.label_consistency_loss(clf(x), clf(x_hat)).numpy())
    assert expected > 1e-6  # a random classifier disagrees somewhat
    np.testing.assert_allclose(logs["consistency"], expected, rtol=1e-4, atol=1e-7)
    _assert_total_loss(logs, 2.5 * expected)
    # The classifier is a training-time helper: not in the config, not in the weights.
    assert model.get_config()["consistency_weight"] == 2.5
    assert len(model.weights) == len(_consistency_combo(0.0).weights)


def _assert_decoder_only_change(without, with_term, term):
    """(encoder weights, decoder weights) after one step without and with a decoder-only loss
    term: the encoder's update is the same, the decoder's is not."""
    for a, b in zip(without[0], with_term[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # encoder: no gradient from it
    assert any(
        not np.allclose(a, b, atol=1e-6) for a, b in zip(without[1], with_term[1], strict=True)
    ), f"the {term} term did not change the decoder's update"


def test_combo_vae_consistency_gradient_reaches_decoder_only(toy_batch):
    x, _ = toy_batch
    clf = _tiny_classifier()
    trained = {}
    start = _consistency_combo(0.0, seed=1).get_weights()
    for weight in (0.0, 50.0):
        model = _compile_combo(_consistency_combo(weight, seed=1))
        model.set_weights(start)
        if weight:
            model.set_consistency_classifier(clf)
        clf_before = _weights(clf)
        model.train_on_batch(x)
        for w0, w in zip(clf_before, clf.weights, strict=True):
            np.testing.assert_array_equal(w0, w.numpy())
        trained[weight] = (_weights(model.shared_encoder), _weights(model.decoder))
    _assert_decoder_only_change(trained[0.0], trained[50.0], "consistency")


def _cycle_combo(weight, seed=0):
    cfg = dataclasses.replace(TINY_COMBO_CONFIG, latent_cycle_weight=weight)
    return build_combo_vae(cfg, IMAGE_SHAPE, 10, seed=seed)


def test_combo_vae_latent_cycle_term_in_loss(toy_batch):
    x, _ = toy_batch
    model = _compile_combo(_cycle_combo(3.0, seed=4))
    logs = model.evaluate(x, batch_size=len(x), verbose=0, return_dict=True)
    # test_step's sampled codes, read back from their decoding.
    zs = _test_step_codes(model, x, 4)
    recovered, _ = model.shared_encoder(model.decode(zs, model.dgmm(x)))
    expected = np.mean(np.sum((recovered.numpy() - zs) ** 2, axis=-1))
    assert expected > 1e-4
    np.testing.assert_allclose(logs["latent_cycle"], expected, rtol=1e-4, atol=1e-6)
    _assert_total_loss(logs, 3.0 * expected)
    assert model.get_config()["latent_cycle_weight"] == 3.0
    assert len(model.weights) == len(_cycle_combo(0.0).weights)


@pytest.mark.parametrize("option", ["latent_cycle_weight", "code_use_weight"])
def test_combo_vae_decoder_term_gradient_reaches_decoder_only(toy_batch, option):
    x, _ = toy_batch
    trained = {}
    start = _small_combo(seed=1).get_weights()
    for weight in (0.0, 50.0):
        model = _compile_combo(_small_combo(seed=1, **{option: weight}))
        model.set_weights(start)
        model.train_on_batch(x)
        trained[weight] = (_weights(model.shared_encoder), _weights(model.decoder))
    _assert_decoder_only_change(trained[0.0], trained[50.0], option)


def _code_use_combo(weight, seed=0, margin=0.04):
    cfg = dataclasses.replace(TINY_COMBO_CONFIG, code_use_weight=weight, code_use_margin=margin)
    return build_combo_vae(cfg, IMAGE_SHAPE, 10, seed=seed)


def test_combo_vae_code_use_term_in_loss(toy_batch):
    x, _ = toy_batch
    model = _compile_combo(_code_use_combo(3.0, seed=5, margin=0.05))
    logs = model.evaluate(x, batch_size=len(x), verbose=0, return_dict=True)
    # test_step's sampled codes; the shifted code and sign of each image drawn as documented,
    # from seeds [5, 2] and [5, 3].
    zs = _test_step_codes(model, x, 5)
    code = tf.random.stateless_uniform([len(x)], [5, 2], maxval=model.num_codes,
                                       dtype=tf.int32).numpy()
    sign = np.where(tf.random.stateless_uniform([len(x)], [5, 3]).numpy() < 0.5, -1.0, 1.0)
    shifted = zs.copy()
    shifted[np.arange(len(x)), code] += losses.CODE_USE_SHIFT * sign
    zu = model.dgmm(x)
    change = np.abs(model.decode(shifted, zu).numpy() - model.decode(zs, zu).numpy())
    per_image = change.reshape(len(x), -1)
    expected = np.mean(per_image.shape[1] * np.maximum(
        0.05 - per_image.mean(axis=1), 0.0))
    assert expected > 1e-3  # an untrained decoder barely reacts to one code
    np.testing.assert_allclose(logs["code_use"], expected, rtol=1e-3, atol=1e-5)
    _assert_total_loss(logs, 3.0 * expected, atol=1e-3)
    assert model.get_config()["code_use_weight"] == 3.0
    assert model.get_config()["code_use_margin"] == 0.05
    assert len(model.weights) == len(_code_use_combo(0.0).weights)
    # Off, the config is the one models had before the term existed (the cache's key).
    off = _code_use_combo(0.0).get_config()
    assert "code_use_weight" not in off and "code_use_margin" not in off
    assert ComboVAE.from_config(off).code_use_weight == 0.0


def test_combo_vae_code_use_term_makes_an_ignored_code_move_the_image(toy_batch):
    # A decoder whose weights from code 0 are zero ignores it. Trained on the code-use term
    # alone (every other weight 0), code 0 comes to move the decoded image; without the term
    # it stays ignored.
    x, _ = toy_batch
    effects = {}
    for weight in (0.0, 1.0):
        model = _code_use_combo(weight, seed=6)
        model.recon_weight = model.beta = model.gamma = 0.0
        first = model.decoder.trainable_weights[0]  # [d_s + K, units]: the input layer
        first.assign(tf.tensor_scatter_nd_update(first, [[0]], tf.zeros([1, first.shape[1]])))
        mean, _, zu = model.encode(x[:8])
        step = np.zeros(mean.shape, np.float32)
        step[:, 0] = losses.CODE_USE_SHIFT

        def effect(model=model, mean=mean, zu=zu, step=step):
            return float(np.mean(np.abs(model.decode(mean + step, zu)
                                        - model.decode(mean, zu))))

        assert effect() < 1e-7
        model = _compile_combo(model)
        for _ in range(10):
            model.train_on_batch(x)
        effects[weight] = effect()
    assert effects[0.0] < 1e-7
    assert effects[1.0] > 1e-4, effects


def test_combo_vae_precomputed_codes_and_logits_give_the_same_update(toy_batch):
    x, _ = toy_batch
    clf = _tiny_classifier()
    start = _consistency_combo(0.0, seed=2).get_weights()
    updated = []
    model = _consistency_combo(5.0, seed=2)
    model.set_weights(start)
    zu = model.dgmm(x).numpy()
    uniform = np.zeros((len(x), 10), np.float32)  # other targets: another loss (they are used)
    for data in ((x,), (x, {"zu": zu, "logits": clf(x).numpy()}), (x, {"logits": uniform})):
        model = _compile_combo(_consistency_combo(5.0, seed=2))
        model.set_weights(start)
        model.set_consistency_classifier(clf)
        logs = model.train_on_batch(*data, return_dict=True)
        updated.append((logs, _weights(model.shared_encoder) + _weights(model.decoder)))
    (logs_a, w_a), (logs_b, w_b), (logs_u, _) = updated
    assert logs_a["consistency"] > 1e-6
    assert abs(logs_u["consistency"] - logs_a["consistency"]) > 1e-4
    for key in logs_a:
        np.testing.assert_allclose(logs_a[key], logs_b[key], rtol=1e-5, atol=1e-7)
    for a, b in zip(w_a, w_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(np.abs(a - b).max()))


def test_combo_vae_accepts_trained_dgmm(toy_batch):
    x, y = toy_batch
    dgmm = _small_dgmm()  # stage 1: a DGMM trained on its own
    dgmm.compile(optimizer=keras.optimizers.Adam(1e-3))
    dgmm.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    trained = _weights(dgmm)
    zu = dgmm(x).numpy()
    model = ComboVAE(
        shared_encoder=SharedEncoder(4, (8, 8), 16),
        dgmm=dgmm,
        decoder=Decoder(IMAGE_SHAPE, 16, (8, 4)),
        discriminator=TCDiscriminator((16,)),
    )
    model.build((None, *IMAGE_SHAPE))  # must not rebuild (or re-initialise) the DGMM
    assert model.dgmm is dgmm
    for w0, w in zip(trained, dgmm.weights, strict=True):
        np.testing.assert_array_equal(w0, w.numpy())
    np.testing.assert_array_equal(model(x)["zu"].numpy(), zu)
    assert model.shared_encoder.built and model.decoder.built and model.discriminator.built


# =========================================================================== tf.distribute

_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np

    sys.path.insert(0, sys.argv[1])
    from test_case import TINY_COMBO_CONFIG

    from fmd_tf.models import DGMM, Classifier, build_combo_vae

    def small_dgmm(optimizer):
        d = DGMM(latent_dim=3, filters=(8, 8), dense_units=16)
        d.build((None, 28, 28, 1))
        d.compile(optimizer=optimizer)
        return d

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(128, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 128)
    reference = small_dgmm(keras.optimizers.SGD(0.5))  # single device
    # As in scripts/train.py: the consistency classifier is built outside the strategy scope.
    clf = Classifier(num_classes=10, conv_filters=(4, 4), dense_units=(8,))
    clf.build((None, 28, 28, 1))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        cfg = dataclasses.replace(TINY_COMBO_CONFIG, consistency_weight=1.0)
        combo = build_combo_vae(cfg, (28, 28, 1), 10)
        combo.set_consistency_classifier(clf)
        combo.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            discriminator_optimizer=keras.optimizers.Adam(1e-4),
        )
        dgmm = small_dgmm(keras.optimizers.Adam(1e-3))
        mirrored_sgd = small_dgmm(keras.optimizers.SGD(0.5))
        mirrored_sgd.set_weights(reference.get_weights())
    combo_h = combo.fit(x, batch_size=32, epochs=1, verbose=0).history
    dgmm_h = dgmm.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    # One SGD step on the same global batch must give the same weights as on one device
    # (checks the 1/num_replicas loss scaling; Adam's first step is scale-invariant).
    reference.fit(x[:32], y[:32], batch_size=32, epochs=1, shuffle=False, verbose=0)
    mirrored_sgd.fit(x[:32], y[:32], batch_size=32, epochs=1, shuffle=False, verbose=0)
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(reference.get_weights(), mirrored_sgd.get_weights())
    )
    print(json.dumps({
        "logical_cpus": len(tf.config.list_logical_devices("CPU")),
        "replicas": strategy.num_replicas_in_sync,
        "combo": combo_h,
        "dgmm": dgmm_h,
        "combo_iterations": int(combo.optimizer.iterations.numpy()),
        "disc_iterations": int(combo.discriminator_optimizer.iterations.numpy()),
        "dgmm_iterations": int(dgmm.optimizer.iterations.numpy()),
        "sgd_step_max_diff": diff,
    }))
    """
)


def test_mirrored_strategy_two_logical_cpus():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, tests_dir],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["logical_cpus"] == 2
    assert result["replicas"] == 2
    assert set(result["combo"]) == COMBO_METRICS
    assert set(result["dgmm"]) == DGMM_METRICS
    for name, values in [*result["combo"].items(), *result["dgmm"].items()]:
        assert len(values) == 1 and np.isfinite(values[0]), (name, values)
    assert result["combo"]["consistency"][0] > 0
    assert result["combo_iterations"] == result["disc_iterations"] == 4  # 128 / 32
    assert result["dgmm_iterations"] == 4
    assert result["sgd_step_max_diff"] < 1e-6


def test_classifier_trains_in_mixed_bfloat16_and_is_saved_in_float32(toy_batch):
    from fmd_tf import training
    from fmd_tf.config import get_config, quick_config

    x, y = toy_batch
    cfg = quick_config(get_config("fmnist"))
    cfg = dataclasses.replace(cfg, classifier=dataclasses.replace(
        cfg.classifier, precision="mixed_bfloat16", conv_filters=(4, 4), dense_units=(8,)))
    model = training.train_classifier(cfg, x, y, training.get_strategy("default"), verbose=0)
    assert model.logits_layer.compute_dtype == "bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # restored after construction
    copy = training.inference_copy(model)
    assert {w.dtype for w in copy.weights} == {"float32"}
    assert copy.logits_layer.compute_dtype == "float32" and copy(x).dtype == "float32"
    np.testing.assert_allclose(copy(x).numpy(), np.asarray(model(x), np.float32), atol=0.05)
    assert training.training_precision("float32") == "float32"
    assert training.training_precision("auto") in ("float32", "mixed_bfloat16")
    with pytest.raises(ValueError, match="precision"):
        training.training_precision("float16")


def test_epoch_batches_are_one_permutation_per_epoch_with_targets_aligned():
    from fmd_tf import training

    keras.utils.set_random_seed(0)
    n, batch = 10, 4
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    targets = {"a": np.arange(n) * 10, "b": np.arange(n) * 100.0}
    dataset, steps = training.epoch_batches(x, targets, batch)
    assert steps == 3
    batches = list(dataset.take(2 * steps).as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [4, 4, 2, 4, 4, 2]
    epochs = [np.concatenate([b[0][:, 0] for b in batches[k * steps:(k + 1) * steps]])
              for k in range(2)]
    for order in epochs:
        assert sorted(order.astype(int).tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
    for xb, tb in batches:
        np.testing.assert_array_equal(tb["a"], xb[:, 0] * 10)
        np.testing.assert_array_equal(tb["b"], xb[:, 0] * 100.0)
    only_x, _ = training.epoch_batches(x, None, batch)
    assert next(iter(only_x)).shape == (4, 1)


def test_combo_vae_trains_in_mixed_bfloat16_and_is_saved_in_float32(toy_batch):
    from fmd_tf import training
    from fmd_tf.config import get_config, quick_config

    x, _ = toy_batch
    cfg = quick_config(get_config("fmnist"))
    cfg = dataclasses.replace(cfg, combo=dataclasses.replace(
        cfg.combo, vae_precision="mixed_bfloat16", consistency_weight=0.0, batch_size=10))
    combo = training.new_combo_vae(cfg, training.get_strategy("default"), seed=0)
    assert combo.decoder.stack[-1].compute_dtype == "bfloat16"
    assert combo.shared_encoder.compute_dtype == "bfloat16"
    assert combo.dgmm.compute_dtype == "float32"  # stage 1 trains in float32
    assert keras.config.dtype_policy().name == "float32"  # restored after construction
    training.train_vae(cfg, combo, x, verbose=0)
    logs = {name: float(m.result()) for name, m in combo.trackers.items()}
    assert all(np.isfinite(v) for v in logs.values()), logs
    copy = training.inference_copy(combo)
    layers = [copy, *copy._flatten_layers(include_self=False, recursive=True)]
    assert {layer.compute_dtype for layer in layers} == {"float32"}
    assert {w.dtype for w in copy.weights} == {"float32"}
    out = copy(x)
    assert out["reconstruction"].dtype == "float32"
    np.testing.assert_allclose(out["reconstruction"].numpy(),
                               np.asarray(combo(x)["reconstruction"], np.float32), atol=0.05)
    assert training._float32_config({"dtype": {"class_name": "DTypePolicy",
                                               "config": {"name": "mixed_bfloat16"}}}) == \
        {"dtype": "float32"}

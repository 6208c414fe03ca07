"""Tests of the Defense-GAN baseline (fmd_tf.baselines.defense_gan) and its wiring into
fmd_tf.evaluation.baselines / scripts/train_baselines.py."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import (
    FmdTestCase,
    check_measure_then_decide,
    run_script,
    tiny_images,
    toy_batch,
)

from fmd_tf.baselines import WGANGP, DefenseGAN, WGANCritic, WGANGenerator
from fmd_tf.baselines.defense_gan import gradient_penalty, latent_search, squared_distance
from fmd_tf.defense import NotCalibratedError
from fmd_tf.models import Classifier

SHAPES = ((28, 28, 1), (8, 8, 1), (32, 32, 3))
FPR = 0.05


def tiny_classifier(seed=0):
    keras.utils.set_random_seed(seed)
    model = Classifier(10, conv_filters=(4,), dense_units=(8,), dropout=0.0)
    model.build((None, 28, 28, 1))
    return model


def toy_images(n, seed):
    """`toy_batch`-like images (one bright block per class on a dark, noisy background)."""
    return np.array(toy_batch(per_class=n // 10, seed=seed)[0])


# ----------------------------------------------------------------------------- Keras models
class WGANModelsTest(FmdTestCase):
    def test_shapes_and_range(self):
        for shape in SHAPES:
            gen = WGANGenerator(shape, latent_dim=16)
            images = gen(tf.random.normal([3, 16], seed=1))
            self.assertEqual(tuple(images.shape), (3, *shape))
            self.assertTrue(np.all((images.numpy() >= 0) & (images.numpy() <= 1)))
            critic = WGANCritic(shape)
            self.assertEqual(tuple(critic(images).shape), (3, 1))
        gen = WGANGenerator((28, 28, 1))  # dense to 7 x 7 x 64, then 32 filters, then C
        self.assertEqual(gen.gen_layers[0].units, 7 * 7 * 64)
        self.assertEqual([la.filters for la in gen.gen_layers[2:]], [32, 1])

    def test_generator_rows_are_independent(self):
        gen = WGANGenerator((8, 8, 1), latent_dim=4)
        z = tf.random.normal([5, 4], seed=2)
        self.assertAllClose(gen(z)[:2], gen(z[:2]), atol=1e-6)  # no batch statistics

    def test_serialization_and_keras_saving(self):
        z = tf.random.normal([2, 8], seed=3)
        for shape in ((28, 28, 1), (32, 32, 3)):
            gen = WGANGenerator(shape, latent_dim=8, filters=(6, 4), name="g")
            gen.build((None, 8))
            revived = self.run_serialization_test(gen)
            self.assertEqual((revived.image_shape, revived.latent_dim, revived.filters),
                             (shape, 8, (6, 4)))
            self.run_keras_saving_test(gen, z)
            critic = WGANCritic(shape, filters=(4, 8), name="c")
            critic.build((None, *shape))
            self.assertEqual(self.run_serialization_test(critic).filters, (4, 8))
            self.run_keras_saving_test(critic, tiny_images(2, shape))
        trainer = WGANGP(WGANGenerator((8, 8, 1), 4), WGANCritic((8, 8, 1)), n_critic=3,
                         gp_weight=5.0, seed=7)
        revived = self.run_serialization_test(trainer)
        self.assertEqual((revived.n_critic, revived.gp_weight, revived.seed), (3, 5.0, 7))
        self.assertIsInstance(revived.generator, WGANGenerator)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "H, W >= 8"):
            WGANGenerator((4, 28, 1))
        with self.assertRaisesRegex(ValueError, "H, W >= 8"):
            WGANCritic((28, 28))
        with self.assertRaisesRegex(ValueError, "filters"):
            WGANGenerator(filters=(64,))
        with self.assertRaisesRegex(ValueError, r"\[B, 64\]"):
            WGANGenerator(latent_dim=64).build((None, 32))
        with self.assertRaisesRegex(ValueError, "input shape"):
            WGANCritic((28, 28, 1)).build((None, 28, 28, 3))
        with self.assertRaisesRegex(ValueError, "n_critic"):
            WGANGP(WGANGenerator(), WGANCritic(), n_critic=0)


# ----------------------------------------------------------------------------- maths
@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_gradient_penalty_of_a_linear_critic_is_closed_form(scale):
    """D(x) = <w, x> has ∇D = w everywhere: the penalty is exactly λ(||w|| - 1)²."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8, 1)).astype(np.float32)
    w *= scale / np.linalg.norm(w)
    x_hat = rng.uniform(size=(6, 8, 8, 1)).astype(np.float32)
    critic = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                               keras.layers.Dense(1)])
    critic.layers[-1].set_weights([w.reshape(-1, 1), np.array([0.3], np.float32)])
    for weight in (10.0, 2.0):
        expected = weight * (scale - 1.0) ** 2
        assert float(gradient_penalty(critic, x_hat, weight)) == pytest.approx(
            expected, rel=1e-4, abs=1e-6)


def test_gradient_penalty_is_per_example():
    """A critic whose slope differs per example: the penalty averages the per-row terms."""
    x_hat = tf.constant([[1.0, 0.0], [0.0, 1.0]])

    def critic(x):  # D(x) = 2·x0² + x1: ∇ = (4·x0, 1) -> norms 4 and 1
        return 2.0 * x[:, :1] ** 2 + x[:, 1:]

    expected = 10.0 * ((np.sqrt(17.0) - 1.0) ** 2 + (1.0 - 1.0) ** 2) / 2
    assert float(gradient_penalty(critic, x_hat)) == pytest.approx(expected, rel=1e-5)


def test_latent_search_solves_a_least_squares_problem():
    """G(z) = z·Q with orthonormal rows Q: ||G(z) - x||² = ||z - Q x||² + ||x - QᵀQ x||², so
    z* = Q x and the distance is the residual; momentum GD at the reference rate converges."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(64, 5)))
    q = tf.constant(q.T, tf.float32)  # [5, 64], orthonormal rows

    def generator(z):
        return tf.reshape(z @ q, [-1, 8, 8, 1])

    x = tf.constant(rng.uniform(size=(4, 8, 8, 1)), tf.float32)
    z_true = tf.reshape(x, [4, 64]) @ tf.transpose(q)
    residual = squared_distance(generator(z_true), x)
    z0 = tf.constant(rng.normal(size=(4, 3, 5)), tf.float32)
    z_star, distance, distances = latent_search(generator, x, z0, iters=60)
    np.testing.assert_allclose(z_star.numpy(), z_true.numpy(), atol=1e-3)
    np.testing.assert_allclose(distance.numpy(), residual.numpy(), rtol=1e-4, atol=1e-5)
    assert distances.shape == (4, 3)
    # Without steps the best start is kept.
    _, d0, all0 = latent_search(generator, x, z0, iters=0)
    np.testing.assert_allclose(d0.numpy(), all0.numpy().min(axis=1))
    assert np.all(d0.numpy() > residual.numpy() + 1.0)


# ----------------------------------------------------------------------------- trained defense
@pytest.fixture(scope="module")
def trained():
    """Defense-GAN on 320 toy images (5 epochs, B = 16: 20 generator steps; a larger learning
    rate than WGAN-GP's 1e-4 so that a few steps learn the toy images), calibrated on 100
    others at FPR, with a short latent search (L = 30, R = 3)."""
    dgan = DefenseGAN(tiny_classifier(), epochs=5, batch_size=16, learning_rate=1e-3,
                      rec_iters=30, rec_restarts=3, seed=0)
    report = dgan.fit(toy_images(320, seed=1), toy_images(100, seed=2), fpr=FPR)
    return dgan, report


def test_training_lowers_the_reconstruction_distance(trained):
    dgan, report = trained
    history = report["history"]
    assert history["generator_steps"] == 5 * (320 // (5 * 16))
    for key in ("critic_loss", "wasserstein", "gradient_penalty", "generator_loss"):
        assert len(history[key]) == 5 and np.all(np.isfinite(history[key]))
    untrained = DefenseGAN(None, rec_iters=30, rec_restarts=3, seed=0)
    x = toy_images(40, seed=1)  # training images
    assert np.median(dgan.score(x)) < 0.5 * np.median(untrained.score(x))


def test_training_is_reproducible():
    """The same seed gives the same generator; another seed another one."""
    x = tiny_images(32, (8, 8, 1), seed=3)
    weights = []
    for seed in (4, 4, 5):
        dgan = DefenseGAN(None, (8, 8, 1), latent_dim=8, epochs=1, batch_size=8, n_critic=2,
                          learning_rate=1e-3, seed=seed)
        history = dgan.train(x)
        assert history["generator_steps"] == 2 and history["batch_size"] == 8
        weights.append(dgan.generator.get_weights())
    for a, b in zip(weights[0], weights[1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(weights[0][0], weights[2][0], atol=1e-3)
    with pytest.raises(ValueError, match="n_critic"):
        dgan.train(x[:1])


def test_generated_images_are_recovered(trained):
    dgan, _ = trained
    z_true = tf.random.stateless_normal([10, dgan.latent_dim], [5, 5])
    x_gen = dgan.generator(z_true).numpy()
    d_gen = dgan.score(x_gen)
    d_real = dgan.score(toy_images(10, seed=6))
    assert np.median(d_gen) < 0.2 * np.median(d_real)
    # The search, not the starts, finds them: without steps they are far.
    no_steps = DefenseGAN(None, rec_iters=0, rec_restarts=3, generator=dgan.generator)
    assert np.median(d_gen) < 0.5 * np.median(no_steps.score(x_gen))


def test_restarts_keep_the_best_end_point(trained):
    dgan, _ = trained

    def generator(z):
        return dgan.generator(z, training=False)

    x = tf.constant(np.concatenate([toy_images(10, seed=7)[:4], tiny_images(2, seed=7)]))
    z0 = tf.random.stateless_normal([6, 3, dgan.latent_dim], [7, 7])
    z_star, distance, distances = latent_search(generator, x, z0, iters=20)
    alone = np.stack([latent_search(generator, x, z0[:, r : r + 1], iters=20)[1].numpy()
                      for r in range(3)], axis=1)  # each restart run on its own
    np.testing.assert_allclose(distances.numpy(), alone, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(distance.numpy(), alone.min(axis=1), rtol=1e-3, atol=1e-3)
    assert np.all(distance.numpy() <= alone[:, 0] + 1e-3)  # never worse than one restart
    np.testing.assert_allclose(squared_distance(generator(z_star), x).numpy(),
                               distance.numpy(), rtol=1e-4, atol=1e-4)


def test_calibration_meets_the_target_fpr(trained):
    dgan, report = trained
    assert report["num_val"] == 100 and report["fpr_target"] == FPR
    assert report["val_false_positive_rate"] <= FPR
    assert report["val_false_positive_rate"] == pytest.approx(FPR)  # 5 of 100: tight
    scores, flagged = dgan.detect(toy_images(100, seed=2))
    assert flagged.mean() == pytest.approx(FPR)
    np.testing.assert_array_equal(flagged, scores > dgan.threshold)


def test_defend_contract(trained):
    dgan, _ = trained
    x = np.concatenate([toy_images(10, seed=8), tiny_images(5, seed=8)])  # clean, then noise
    out = dgan.defend(x)
    assert set(out) == {"label", "verdict", "score", "classifier_label", "purified"}
    assert out["label"].dtype == np.int64 and out["verdict"].dtype == np.int32
    assert out["score"].dtype == np.float32 and out["classifier_label"].dtype == np.int64
    assert out["purified"].shape == x.shape and out["purified"].dtype == np.float32
    rejected = out["verdict"] == 2
    assert set(np.unique(out["verdict"])) <= {0, 2}
    np.testing.assert_array_equal(out["label"] == -1, rejected)
    np.testing.assert_array_equal(rejected, out["score"] > dgan.threshold)
    assert rejected[10:].all()  # uniform noise is far from the generator's range
    assert rejected[:10].mean() <= 0.2
    purified_label = np.argmax(dgan.classifier(out["purified"]).numpy(), axis=-1)
    np.testing.assert_array_equal(out["label"][~rejected], purified_label[~rejected])
    np.testing.assert_array_equal(out["classifier_label"],
                                  np.argmax(dgan.classifier(x).numpy(), axis=-1))
    np.testing.assert_allclose(out["score"], squared_distance(out["purified"], x).numpy(),
                               rtol=1e-4, atol=1e-4)
    again = dgan.defend(x)  # seeded starts: the same result
    np.testing.assert_allclose(again["score"], out["score"], rtol=1e-5, atol=1e-5)


def test_defend_progress_bar_changes_nothing(trained, capsys):
    dgan, _ = trained
    x = toy_images(10, seed=8)
    quiet = dgan.defend(x, batch_size=4)  # batches at offsets 0, 4, 8
    capsys.readouterr()
    shown = dgan.defend(x, batch_size=4, verbose=1)
    assert "10/10" in capsys.readouterr().out
    for key in quiet:
        np.testing.assert_array_equal(shown[key], quiet[key], err_msg=key)
    # The batch at offset 4 is searched from the starts seeded by (seed, 4), as documented.
    z, _ = dgan._searcher()(tf.constant(x[4:8]), tf.constant([dgan.seed, 4], tf.int32))
    np.testing.assert_array_equal(dgan.reconstruct(x, batch_size=4)["z"][4:8], z.numpy())


def test_save_load_gives_identical_outputs(trained, tmp_path):
    dgan, _ = trained
    directory = str(tmp_path / "defense_gan")
    dgan.save(directory)
    assert sorted(os.listdir(directory)) == ["defense_gan.json", "generator.keras"]
    loaded = DefenseGAN.load(directory, classifier=dgan.classifier)
    assert loaded.threshold == pytest.approx(dgan.threshold) and loaded.fpr == dgan.fpr
    assert loaded._settings() == dgan._settings() and loaded.report == dgan.report
    x = np.concatenate([toy_images(10, seed=9), tiny_images(3, seed=9)])
    a, b = dgan.defend(x), loaded.defend(x)
    for key in ("label", "verdict", "classifier_label"):
        np.testing.assert_array_equal(a[key], b[key])
    for key in ("score", "purified"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="defense_gan.json"):
        DefenseGAN.load(str(tmp_path))
    assert loaded.measurement_fingerprint() == dgan.measurement_fingerprint()


def test_measures_without_its_threshold(trained):
    dgan, _ = trained
    x = np.concatenate([toy_images(8, seed=12), tiny_images(2, seed=12)])
    check_measure_then_decide(dgan, x, toy_images(20, seed=13))
    other = DefenseGAN(dgan.classifier, generator=dgan.generator, seed=dgan.seed,
                       rec_iters=dgan.rec_iters + 1, rec_restarts=dgan.rec_restarts)
    assert other.measurement_fingerprint() != dgan.measurement_fingerprint()


def test_adaptive_surface_is_bpda_and_differentiable(trained):
    dgan, _ = trained
    x = np.concatenate([toy_images(10, seed=5)[:6], tiny_images(2, seed=5)])
    out = dgan.defend(x)
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        logits, ratio = dgan.adaptive_surface(xt)
        margin = tf.reduce_sum(logits[:, 0])
        total = tf.reduce_sum(ratio)
    np.testing.assert_allclose(ratio.numpy(), out["score"] / dgan.threshold, rtol=1e-4)
    passed = out["verdict"] == 0
    np.testing.assert_array_equal(np.argmax(logits.numpy(), -1)[passed], out["label"][passed])
    for value in (margin, total):
        grad = tape.gradient(value, xt).numpy()
        assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    # d ratio / dx = 2 (x - G(z*)) / threshold: z* is held fixed.
    np.testing.assert_allclose(tape.gradient(total, xt).numpy(),
                               2 * (x - out["purified"]) / dgan.threshold, rtol=1e-3, atol=1e-3)


def test_adaptive_detector_pgd_runs_on_defense_gan(trained):
    from fmd_tf.attacks import adaptive_detector_pgd

    dgan, _ = trained
    x = toy_images(10, seed=4)[:4]
    x_adv = adaptive_detector_pgd(dgan, x, eps=0.1, nb_iter=2, seed=1)
    assert np.all(np.isfinite(x_adv)) and np.abs(x_adv - x).max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_not_calibrated_and_argument_checks():
    dgan = DefenseGAN(None, rec_iters=2, rec_restarts=1)
    for method in (dgan.detect, dgan.defend, dgan.adaptive_surface):
        with pytest.raises(NotCalibratedError, match="calibrate"):
            method(tiny_images(2))
    with pytest.raises(NotCalibratedError, match="calibrate"):
        dgan.decide({"score": np.zeros(2)})
    with pytest.raises(ValueError, match=r"measure \(and defend\) needs a classifier"):
        dgan.measure(tiny_images(2))
    dgan.calibrate(tiny_images(10), fpr=0.1)
    with pytest.raises(ValueError, match="classifier"):
        dgan.defend(tiny_images(2))
    with pytest.raises(ValueError, match="fpr"):
        dgan.calibrate(tiny_images(4), fpr=1.5)
    with pytest.raises(TypeError, match="float32"):
        dgan.score(np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match=r"\[batch, 28, 28, 1\]"):
        dgan.score(np.zeros((2, 28, 28, 3), np.float32))
    with pytest.raises(ValueError, match="rec_restarts"):
        DefenseGAN(rec_restarts=0)
    with pytest.raises(ValueError, match="epochs"):
        DefenseGAN(epochs=0)
    with pytest.raises(ValueError, match="latent_dim 8"):
        DefenseGAN(latent_dim=8, generator=WGANGenerator(latent_dim=16))
    with pytest.raises(ValueError, match="H, W >= 8"):
        DefenseGAN(image_shape=(6, 6, 1))


# ----------------------------------------------------------------------------- wiring
FM_CARD = {"calibration": {"val_false_positive_rate": 0.08},
           "operating_point": {"attacks": {"names": ["fgsm"], "n": 16, "seed": 0}}}


def test_load_baselines_finds_a_saved_defense_gan(trained, tmp_path):
    from fmd_tf.evaluation import baselines

    dgan, _ = trained
    assert "defense_gan" in baselines.OUTPUTS
    dgan.save(str(tmp_path / "baselines" / "defense_gan"))
    loaded, notes = baselines.load_baselines(str(tmp_path), dgan.classifier)
    assert set(loaded) == {"defense_gan"} and loaded["defense_gan"].is_calibrated
    assert len(notes) == 2 and not any("Defense-GAN" in n for n in notes)
    x = toy_images(10, seed=3)
    np.testing.assert_array_equal(loaded["defense_gan"].defend(x)["verdict"],
                                  dgan.defend(x)["verdict"])
    loaded, notes = baselines.load_baselines(str(tmp_path / "elsewhere"), None)
    assert loaded == {} and any("Defense-GAN not found" in n for n in notes)


@pytest.mark.slow  # 15-35 s, mostly MagNet and Feature Squeezing; test_baselines'
# test_script_quick_end_to_end runs the same --quick training in the default suite.
def test_train_baselines_quick_writes_and_loads_defense_gan(tmp_path):
    from fmd_tf.data import DataNotAvailableError
    from fmd_tf.evaluation import baselines

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny_classifier().save(str(model_dir / "classifier.keras"))
    (model_dir / "model_card.json").write_text(json.dumps(FM_CARD))
    lines = []
    try:
        reports = baselines.train_baselines(str(model_dir), quick=True, rec_restarts=3,
                                            log=lines.append)
    except DataNotAvailableError as e:
        pytest.skip(f"Fashion-MNIST is not available: {e}")
    assert any(line.startswith("Defense-GAN: VAL FPR") for line in lines), lines
    assert "defense_gan" in os.listdir(model_dir / "baselines")
    with open(model_dir / "baselines" / "defense_gan" / "defense_gan.json") as f:
        state = json.load(f)
    quick = baselines.QUICK_DEFENSE_GAN
    assert state["settings"]["epochs"] == quick["gan_epochs"]
    assert state["settings"]["rec_iters"] == quick["rec_iters"]
    assert state["settings"]["rec_restarts"] == 3  # given, not the quick default
    assert state["fpr"] == pytest.approx(0.08)
    assert state["report"]["val_false_positive_rate"] <= 0.08
    assert state["report"]["num_train"] == 512 and "cle_accuracy" in state["report"]
    assert reports["defense_gan"]["threshold"] == pytest.approx(state["threshold"])
    loaded, notes = baselines.load_baselines(str(model_dir), tiny_classifier())
    assert set(loaded) == {"magnet", "feature_squeezing", "defense_gan"} and notes == []
    assert isinstance(loaded["defense_gan"], DefenseGAN) and loaded["defense_gan"].is_calibrated
    with pytest.raises(ValueError, match="rec_restarts >= 1"):
        baselines.train_baselines(str(model_dir), quick=True, overwrite=True, rec_restarts=0)


@pytest.mark.parametrize("flag, value", [("--gan-epochs", "0"), ("--rec-iters", "-1"),
                                         ("--rec-restarts", "0")])
def test_script_refuses_bad_defense_gan_flags(tmp_path, flag, value):
    proc = run_script("scripts/train_baselines.py", "--quick", "--model", str(tmp_path),
                      flag, value)
    assert proc.returncode == 2 and flag in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

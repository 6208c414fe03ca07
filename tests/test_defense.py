"""FM-Defense: natural morphs, calibration, verdicts and the FMDefense model (issue 4)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import TINY_COMBO_CONFIG, FmdTestCase, tiny_images

import fmd_tf  # noqa: F401
from fmd_tf.config import DefenseConfig
from fmd_tf.defense import FMDefense, NotCalibratedError, calibration, morphs
from fmd_tf.defense.fm_defense import decide, final_label, reconstruction_error
from fmd_tf.models import Classifier, build_combo_vae

# ----------------------------------------------------------------------------- morphs


def _reference_morphs(codes, low, high, offsets, n):
    """Plain-Python §III-C search: walk the candidates in order, keep the first n in range."""
    out = np.zeros((*codes.shape, n), np.float32)
    for b in range(codes.shape[0]):
        for i in range(codes.shape[1]):
            cand = codes[b, i] + offsets[i] * (high[i] - low[i])
            inside = [c for c in cand if low[i] <= c <= high[i]]
            outside = [c for c in cand if not low[i] <= c <= high[i]]
            out[b, i] = np.clip((inside + outside)[:n], low[i], high[i])
    return out


def test_search_offsets_radius_grows_by_delta_r():
    table = morphs.search_offsets(3, steps=5, candidates_per_step=4, radius_step=0.1, seed=1)
    assert table.shape == (3, 20) and table.dtype == np.float32
    radius = np.abs(table).reshape(3, 5, 4).max(axis=(0, 2))
    # step t draws in [-0.1 t, 0.1 t]: every step stays within its radius ...
    assert np.all(radius <= 0.1 * np.arange(1, 6) + 1e-7)
    # ... and later steps reach beyond the first step's radius.
    assert radius[-1] > 0.1
    np.testing.assert_array_equal(table, morphs.search_offsets(3, 5, 4, 0.1, seed=1))
    assert not np.array_equal(table, morphs.search_offsets(3, 5, 4, 0.1, seed=2))


def test_natural_morphs_inside_range_exactly_n_and_in_search_order():
    rng = np.random.default_rng(0)
    low = np.array([-1.0, 0.0, -2.0], np.float32)
    high = np.array([1.0, 0.5, 2.0], np.float32)
    codes = rng.uniform(-1.5, 1.5, size=(6, 3)).astype(np.float32)
    codes[0, 1] = 5.0  # far outside its range: the search must still give N values in range
    offsets = morphs.search_offsets(3, steps=6, candidates_per_step=5, radius_step=0.1, seed=0)
    got = morphs.natural_morph_codes(codes, low, high, offsets, num_morphs=12).numpy()
    assert got.shape == (6, 3, 12)
    assert np.all(got >= low[None, :, None]) and np.all(got <= high[None, :, None])
    np.testing.assert_allclose(got, _reference_morphs(codes, low, high, offsets, 12), atol=1e-6)
    # Far outside the range, every candidate is clipped to the nearest bound.
    np.testing.assert_allclose(got[0, 1], np.full(12, 0.5))


def test_morph_latents_change_only_the_selected_code():
    mean = tf.constant(np.arange(8, dtype=np.float32).reshape(2, 4))
    values = tf.constant(np.full((2, 2, 3), -7.0, np.float32))
    z = morphs.morph_latents(mean, tf.constant([1, 3]), values).numpy()
    assert z.shape == (2, 2, 3, 4)
    expected = np.broadcast_to(mean.numpy()[:, None, None, :], z.shape).copy()
    expected[:, 0, :, 1] = -7.0
    expected[:, 1, :, 3] = -7.0
    np.testing.assert_array_equal(z, expected)


def test_normal_ranges_percentiles_and_bad_rule():
    means = np.stack([np.arange(101.0), -np.arange(101.0)], axis=1)
    low, high = morphs.normal_ranges(means, (1.0, 99.0))
    np.testing.assert_allclose(low, [1.0, -99.0])
    np.testing.assert_allclose(high, [99.0, -1.0])
    with pytest.raises(ValueError, match="range_percentiles"):
        morphs.normal_ranges(means, (50.0, 10.0))


# ----------------------------------------------------------------------------- calibration


def test_unified_threshold_hand_example():
    # N = 10 morphs; sorted min resistances of the 10 clean images: 0.1, 0.3, 0.5, 0.7, ...;
    # rho = 0.8 allows 2 false positives: flag below the third, theta = 0.5 - 0.5/10 = 0.45.
    r = np.array([[0.1, 0.9], [0.3, 1.0], [0.5, 0.6], [0.7, 0.8], [0.9, 0.9],
                  [1.0, 1.0], [1.0, 0.9], [0.8, 1.0], [0.9, 0.7], [1.0, 1.0]])
    theta = calibration.resistance_thresholds(r, rho=0.8, mode="unified", num_morphs=10)
    np.testing.assert_allclose(theta, [0.45, 0.45])
    assert calibration.false_positive_rate(r, theta) == pytest.approx(0.2)


def test_per_code_threshold_hand_example():
    # Per-code budget alpha = 1/4 flags exactly the lowest image of each code; those are two
    # different images -> joint FPR 2/4 = 0.5 <= 1 - rho = 0.5. alpha = 2/4 would flag 3 or 4.
    r = np.array([[0.2, 1.0], [1.0, 0.4], [0.6, 0.8], [0.8, 0.6]])
    theta = calibration.resistance_thresholds(r, rho=0.5, mode="per_code", num_morphs=10)
    np.testing.assert_allclose(theta, [0.55, 0.55])
    assert calibration.false_positive_rate(r, theta) == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ["per_code", "unified"])
@pytest.mark.parametrize("rho", [0.999, 0.99, 0.9])
def test_calibration_reaches_requested_fpr_on_synthetic_data(mode, rho):
    rng = np.random.default_rng(7)
    n_morphs = 100
    r = rng.binomial(n_morphs, rng.beta(8, 1, size=(4000, 1)), size=(4000, 6)) / n_morphs
    theta = calibration.resistance_thresholds(r, rho, mode, n_morphs)
    fpr = calibration.false_positive_rate(r, theta)
    assert fpr <= 1 - rho + 1e-12
    # Tight: one more grid step on every code would break the budget.
    assert calibration.false_positive_rate(r, theta + 1.0 / n_morphs) > 1 - rho
    # Held-out clean data from the same distribution stays near the budget.
    r_new = rng.binomial(n_morphs, rng.beta(8, 1, size=(4000, 1)), size=(4000, 6)) / n_morphs
    assert calibration.false_positive_rate(r_new, theta) < 3 * (1 - rho) + 0.005


def test_calibration_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        calibration.resistance_thresholds(np.ones((3, 2)), rho=0.0)
    with pytest.raises(ValueError, match="threshold_mode"):
        calibration.resistance_thresholds(np.ones((3, 2)), rho=0.9, mode="max")
    with pytest.raises(ValueError, match="non-empty"):
        calibration.resistance_thresholds(np.ones((0, 2)), rho=0.9)


def test_distance_eq5_and_theta_d_rules():
    theta = np.array([0.5, 0.5, 0.5])
    r = np.array([[0.9, 0.9, 0.9], [0.4, 0.9, 0.2], [0.0, 0.0, 0.0]])
    # Dis = sum of shortfalls below the thresholds: 0; 0.1 + 0.3; 3 * 0.5.
    np.testing.assert_allclose(calibration.distance(r, theta), [0.0, 0.4, 1.5])
    # Enough suspicious rows: eta-quantile of their distances (0.4, 1.5) -> 0.4 + 0.5 * 1.1.
    theta_d, info = calibration.distance_threshold(r, theta, eta=0.5, min_suspicious=2)
    assert theta_d == pytest.approx(0.95)
    assert info == {"num_suspicious_val": 2, "rule": "suspicious_val"}
    # Too few: the reference thresholds at reference_rho are used instead.
    theta_d, info = calibration.distance_threshold(
        r, theta, eta=1.0, min_suspicious=3, num_morphs=10, reference_rho=0.3
    )
    assert info["rule"] == "reference_rho"
    ref = calibration.resistance_thresholds(r, 0.3, "per_code", 10)
    flagged = calibration.is_suspicious(r, ref)
    assert theta_d == pytest.approx(calibration.distance(r[flagged], ref).max())


def test_select_codes_keeps_highest_clean_resistance():
    r = np.array([[0.1, 0.9, 0.5, 0.8], [0.3, 0.7, 0.5, 0.9]])
    np.testing.assert_array_equal(calibration.select_codes(r, 2), [1, 3])
    with pytest.raises(ValueError, match="num_codes"):
        calibration.select_codes(r, 5)


# ----------------------------------------------------------------------------- verdicts


def test_verdicts_on_hand_made_resistance_vectors():
    theta_r = [0.5, 0.3]
    resistance = [
        [0.9, 0.9],  # all above: passed, Dis 0
        [0.45, 0.9],  # code 0 below by 0.05: suspicious, Dis 0.05 <= 0.1: purified
        [0.5, 0.9],  # equal is not above: suspicious, Dis 0: purified
        [0.2, 0.1],  # Dis 0.3 + 0.2 = 0.5 > 0.1: rejected
    ]
    verdict, dist = decide(resistance, theta_r, 0.1)
    np.testing.assert_array_equal(verdict.numpy(), [0, 1, 1, 2])
    np.testing.assert_allclose(dist.numpy(), [0.0, 0.05, 0.0, 0.5], atol=1e-6)
    labels = final_label(verdict, tf.constant([3, 3, 3, 3]), tf.constant([7, 7, 7, 7]))
    np.testing.assert_array_equal(labels.numpy(), [3, 7, 7, -1])


def test_recon_threshold_hand_example_and_off():
    errors = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 1.0, 0.4, 0.8, 0.6])
    # fpr 0.2 of 10 images: at most 2 may exceed θe -> θe = third largest = 0.8.
    assert calibration.recon_threshold(errors, 0.2) == 0.8
    assert np.sum(errors > 0.8) == 2
    # fpr 0.05: 0 allowed -> θe = max, nothing exceeds it.
    assert calibration.recon_threshold(errors, 0.05) == 1.0
    assert calibration.recon_threshold(errors, 0.0) == np.inf  # gate off
    with pytest.raises(ValueError, match="recon_fpr"):
        calibration.recon_threshold(errors, 1.0)


def test_recon_gate_rejects_whatever_the_resistance():
    resistance = [[0.9, 0.9], [0.9, 0.9], [0.45, 0.9]]
    verdict, _ = decide(resistance, [0.5, 0.3], 0.1, tf.constant([0.01, 0.2, 0.01]), 0.05)
    np.testing.assert_array_equal(verdict.numpy(), [0, 2, 1])
    verdict, _ = decide(resistance, [0.5, 0.3], 0.1, tf.constant([0.01, 0.2, 0.01]), np.inf)
    np.testing.assert_array_equal(verdict.numpy(), [0, 0, 1])


def test_reconstruction_error_metrics_hand_example():
    x = np.zeros((2, 2, 2, 1), np.float32)
    recon = np.array([[0.0, 0.0, 0.0, 0.8], [0.2, 0.2, 0.2, 0.2]], np.float32)
    recon = recon.reshape(2, 2, 2, 1)
    # Image 0, one pixel off by 0.8: mae 0.8/4 = 0.2, mse 0.64/4 = 0.16.
    # Image 1, four pixels off by 0.2: mae 0.2, mse 0.04. The same L1 error, but the squared
    # error ranks the one large error far above the spread-out small ones.
    np.testing.assert_allclose(reconstruction_error(x, recon, "mae").numpy(), [0.2, 0.2],
                               rtol=1e-6)
    np.testing.assert_allclose(reconstruction_error(x, recon, "mse").numpy(), [0.16, 0.04],
                               rtol=1e-6)
    # pixel_share with τ = 0.5: image 0 has 1 of 4 pixels off by more than 0.5, image 1 none;
    # with τ = 0.1 image 1's four pixels (0.2 > 0.1) all count: 4/4.
    np.testing.assert_allclose(reconstruction_error(x, recon, "pixel_share", 0.5).numpy(),
                               [0.25, 0.0])
    np.testing.assert_allclose(reconstruction_error(x, recon, "pixel_share", 0.1).numpy(),
                               [0.25, 1.0])
    # Strictly greater: a pixel off by exactly τ does not count.
    np.testing.assert_allclose(reconstruction_error(x, recon, "pixel_share", 0.8).numpy(),
                               [0.0, 0.0])
    with pytest.raises(ValueError, match="metric must be one of"):
        reconstruction_error(x, recon, "l3")


# ----------------------------------------------------------------------------- model


@keras.saving.register_keras_serializable(package="fmd_tf_tests")
class ConstantClassifier(keras.Model):
    """Ignores its input: always class 4."""

    def call(self, images):
        batch = tf.shape(images)[0]
        return tf.one_hot(tf.fill([batch], 4), 10) * 5.0


def _tiny_defense(classifier=None, **kwargs):
    keras.utils.set_random_seed(0)
    classifier = classifier or Classifier(conv_filters=(4, 4), dense_units=(8,), name="clf")
    combo = build_combo_vae(TINY_COMBO_CONFIG, (28, 28, 1), 10)
    args = dict(num_morphs=4, candidates_per_step=2, max_steps=4, chunk_size=16, rho=0.9,
                morph_dtype="float32")
    args.update(kwargs)
    fmd = FMDefense(classifier, combo, **args)
    fmd.build((None, 28, 28, 1))
    return fmd


@pytest.fixture(scope="module")
def calibrated():
    fmd = _tiny_defense()
    report = fmd.calibrate(tiny_images(24, seed=3))
    return fmd, report


class FMDefenseTest(FmdTestCase):
    def test_constant_classifier_gives_resistance_one(self):
        fmd = _tiny_defense(classifier=ConstantClassifier())
        report = fmd.calibrate(tiny_images(8, seed=1))
        out = fmd.defend(tiny_images(5, seed=2))
        np.testing.assert_array_equal(out["resistance"], np.ones((5, 4), np.float32))
        np.testing.assert_array_equal(out["verdict"], np.zeros(5))
        np.testing.assert_array_equal(out["label"], np.full(5, 4))
        assert report["val_false_positive_rate"] == 0.0

    def test_output_contract(self):
        fmd = _tiny_defense()
        fmd.calibrate(tiny_images(8, seed=1))
        x = tiny_images(3, seed=5)
        out = fmd(x)
        shapes = {"label": (3,), "verdict": (3,), "classifier_label": (3,),
                  "resistance": (3, 4), "distance": (3,), "purified": (3, 28, 28, 1),
                  "recon_error": (3,)}
        dtypes = {"label": tf.int64, "verdict": tf.int32, "classifier_label": tf.int64,
                  "resistance": tf.float32, "distance": tf.float32, "purified": tf.float32,
                  "recon_error": tf.float32}
        self.assertEqual(set(out), set(shapes))
        for key in shapes:
            self.assertEqual(tuple(out[key].shape), shapes[key], key)
            self.assertEqual(out[key].dtype, dtypes[key], key)
        r = out["resistance"].numpy()
        np.testing.assert_array_equal(r * 4, np.round(r * 4))  # multiples of 1/N
        # Batch-invariance: one image alone gives the same outputs as inside the batch.
        alone = fmd(x[1:2])
        for key in ("resistance", "verdict", "label"):
            np.testing.assert_array_equal(alone[key].numpy()[0], out[key].numpy()[1])

    def test_chunk_size_does_not_change_results(self):
        a = _tiny_defense(chunk_size=5)
        b = _tiny_defense(chunk_size=1000)
        a.calibrate(tiny_images(8, seed=1))
        b.set_weights(a.get_weights())
        x = tiny_images(3, seed=4)
        np.testing.assert_array_equal(a(x)["resistance"].numpy(), b(x)["resistance"].numpy())

    def test_keras_round_trip_identical(self):
        fmd = _tiny_defense(threshold_mode="unified", purify_zu="class_mean",
                            purify_label="corroborated")
        fmd.calibrate(tiny_images(8, seed=1))
        self.run_serialization_test(fmd)
        loaded = self.run_keras_saving_test(fmd, tiny_images(3, seed=6), atol=0, rtol=0)
        self.assertTrue(loaded.is_calibrated)
        self.assertEqual(loaded.config, fmd.config)
        self.assertEqual(loaded.threshold_mode, "unified")
        self.assertEqual(loaded.purify_label, "corroborated")

    def test_recon_gate_calibration(self):
        x_val = tiny_images(20, seed=1)
        off = _tiny_defense()
        report_off = off.calibrate(x_val)
        self.assertEqual(off.theta_e.numpy(), np.inf)
        self.assertIsNone(report_off["theta_e"])
        gated = _tiny_defense(recon_fpr=0.1)
        gated.set_weights(off.get_weights())
        report = gated.calibrate(x_val)
        e_val = gated.reconstruction_error(x_val)
        # At most floor(0.1 * 20) = 2 VAL images above θe; the largest two are.
        self.assertEqual(int(np.sum(e_val > report["theta_e"])), 2)
        self.assertAlmostEqual(report["val_recon_rejected_rate"], 0.1)
        x = np.concatenate([x_val[:4], np.clip(x_val[:4] + 0.4, 0, 1)])
        out, base = gated.defend(x), off.defend(x)
        np.testing.assert_allclose(out["recon_error"], gated.reconstruction_error(x), rtol=1e-5)
        above = out["recon_error"] > report["theta_e"]
        self.assertTrue(above[4:].any())  # brightened images leave the manifold
        np.testing.assert_array_equal(out["verdict"][above], 2)
        np.testing.assert_array_equal(out["label"][above], -1)
        np.testing.assert_array_equal(out["verdict"][~above], base["verdict"][~above])

    def test_recon_metric_gate_and_legacy_files(self):
        x = tiny_images(6, seed=2)
        mae = _tiny_defense(recon_fpr=0.1)
        self.assertEqual(mae.recon_metric, "mae")  # the default
        mse = mae.copy_with(recon_metric="mse")
        mean, _, zu = mae.combo_vae.encode(tf.constant(x))
        diff = x - mae.combo_vae.decode(mean, zu).numpy()
        np.testing.assert_allclose(mae.reconstruction_error(x), np.abs(diff).mean(axis=(1, 2, 3)),
                                   rtol=1e-5)
        np.testing.assert_allclose(mse.reconstruction_error(x), (diff**2).mean(axis=(1, 2, 3)),
                                   rtol=1e-5)
        self.assertEqual(mse.get_config()["recon_metric"], "mse")
        # A file saved before the option existed calibrated θe on the squared error.
        legacy = mae.get_config()
        del legacy["recon_metric"]
        self.assertEqual(FMDefense.from_config(legacy).recon_metric, "mse")

    def test_pixel_share_gate_round_trip(self):
        x_val, x = tiny_images(20, seed=1), tiny_images(6, seed=2)
        share = _tiny_defense(recon_fpr=0.1, recon_metric="pixel_share", recon_pixel_tol=0.05)
        mean, _, zu = share.combo_vae.encode(tf.constant(x))
        off = np.abs(x - share.combo_vae.decode(mean, zu).numpy()) > 0.05
        np.testing.assert_allclose(share.reconstruction_error(x), off.mean(axis=(1, 2, 3)),
                                   rtol=1e-6)
        report = share.calibrate(x_val)
        self.assertLessEqual(report["val_recon_rejected_rate"], 0.1)  # ties only lower it
        config = share.get_config()
        self.assertEqual((config["recon_metric"], config["recon_pixel_tol"]),
                         ("pixel_share", 0.05))
        path = os.path.join(self.get_temp_dir(), "share.keras")
        share.save(path)
        loaded = keras.models.load_model(path)
        self.assertEqual(loaded.recon_pixel_tol, 0.05)
        a, b = share.defend(x), loaded.defend(x)
        for key in ("verdict", "recon_error", "label"):
            np.testing.assert_array_equal(a[key], b[key])

    def test_purify_label_corroborated(self):
        paper = _tiny_defense(rho=0.5, purify_label="reconstruction")
        paper.calibrate(tiny_images(20, seed=1))
        paper.theta_d.assign(10.0)  # purify every suspicious input
        corroborated = paper.copy_with(purify_label="corroborated")
        x = tiny_images(40, seed=7)
        a, b = paper.defend(x), corroborated.defend(x)
        np.testing.assert_array_equal(a["verdict"], b["verdict"])  # verdicts do not change
        mean, _, zu = paper.combo_vae.encode(tf.constant(x))
        dgmm_label = np.argmax(paper.combo_vae.dgmm.class_logits(zu).numpy(), axis=-1)
        self.assertTrue(np.any(a["verdict"] == 1))
        keep = (a["verdict"] == 1) & (dgmm_label == a["classifier_label"])
        np.testing.assert_array_equal(b["label"], np.where(keep, a["classifier_label"], a["label"]))
        # The rule on both branches: an input label equal to the DGMM's class is kept, any
        # other label gives the purified image's label (the paper's rule).
        _, paper_label = paper._purify_codes(mean, zu, dgmm_label)
        _, kept = corroborated._purify_codes(mean, zu, dgmm_label)
        _, other = corroborated._purify_codes(mean, zu, (dgmm_label + 1) % 10)
        self.assertTrue(np.any(paper_label.numpy() != dgmm_label))
        np.testing.assert_array_equal(kept.numpy(), dgmm_label)
        np.testing.assert_array_equal(other.numpy(), paper_label.numpy())

    def test_suspicious_reject_rejects_what_purify_purifies(self):
        purify = _tiny_defense(rho=0.5)
        purify.calibrate(tiny_images(20, seed=1))
        purify.theta_d.assign(10.0)  # purify every suspicious input
        reject = purify.copy_with(suspicious="reject")
        self.assertEqual((purify.suspicious, reject.suspicious), ("purify", "reject"))
        x = tiny_images(40, seed=7)
        a, b = purify.defend(x), reject.defend(x)
        self.assertTrue(np.any(a["verdict"] == 1) and np.any(a["verdict"] == 0))
        np.testing.assert_array_equal(b["verdict"], np.where(a["verdict"] == 1, 2, a["verdict"]))
        np.testing.assert_array_equal(b["label"], np.where(a["verdict"] == 0, a["label"], -1))
        np.testing.assert_array_equal(b["resistance"], a["resistance"])
        loaded = self.run_keras_saving_test(reject, x[:3], atol=0, rtol=0)
        self.assertEqual(loaded.suspicious, "reject")
        # The operating-point tables decide the same way (θd = -inf: nothing is purified).
        from fmd_tf.evaluation import harness

        r, e = a["resistance"], a["recon_error"]
        own = (purify.threshold_mode, purify.rho, 0.0)
        theta_r, theta_d, theta_e = harness.operating_point_thresholds(purify, r, e, *own)
        self.assertTrue(np.isfinite(theta_d))
        reject_thresholds = harness.operating_point_thresholds(reject, r, e, *own)
        np.testing.assert_array_equal(reject_thresholds[0], theta_r)
        self.assertEqual(reject_thresholds[1], -np.inf)
        # ... and their rows give θd as None: nothing is purified.
        self.assertIsNone(harness.theta_d_entry(reject_thresholds[1]))
        self.assertEqual(harness.theta_d_entry(theta_d), float(theta_d))
        out = {**a, "purified_label": a["label"]}
        kept = harness.reverdict(out, theta_r, 10.0, theta_e)["verdict"]  # θd as set above
        self.assertTrue(np.any(kept == 1))
        np.testing.assert_array_equal(harness.reverdict(out, *reject_thresholds)["verdict"],
                                      np.where(kept == 1, 2, kept))
        with self.assertRaisesRegex(ValueError, "suspicious"):
            purify.copy_with(suspicious="ignore")

    def test_options_come_from_one_defense_config(self):
        fmd = _tiny_defense(recon_metric="pixel_share", recon_pixel_tol=0.05)
        cfg = fmd.config
        self.assertIsInstance(cfg, DefenseConfig)
        self.assertEqual((cfg.num_morphs, cfg.rho, cfg.recon_pixel_tol), (4, 0.9, 0.05))
        self.assertEqual(cfg.selected_codes, (0, 1, 2, 3))  # None resolved to all d_s codes
        for f in dataclasses.fields(DefenseConfig):
            self.assertEqual(getattr(fmd, f.name), getattr(cfg, f.name), f.name)
        with self.assertRaises(AttributeError):
            fmd.rho = 0.5  # read-only: copy_with makes a defense with other options
        # A config plus keyword overrides; from_config_dataclass is the same constructor.
        base = dataclasses.replace(cfg, rho=0.8, selected_codes=(2, 0))
        a = FMDefense(fmd.classifier, fmd.combo_vae, base, purify_label="corroborated")
        self.assertEqual(a.config, dataclasses.replace(base, purify_label="corroborated"))
        b = FMDefense.from_config_dataclass(fmd.classifier, fmd.combo_vae, a.config, name="b")
        self.assertEqual((b.config, b.name), (a.config, "b"))
        copy = fmd.copy_with(rho=0.5, name="copy")
        self.assertEqual((copy.config, copy.name), (dataclasses.replace(cfg, rho=0.5), "copy"))
        # The same flat keys as every saved file, tuples as lists.
        config = fmd.get_config()
        self.assertEqual(set(config) - {"name", "trainable", "dtype"}, SAVED_KEYS)
        self.assertEqual((config["selected_codes"], config["range_percentiles"]),
                         ([0, 1, 2, 3], [1.0, 99.0]))
        json.dumps(config)
        with self.assertRaisesRegex(TypeError, "'rhoo' \\(did you mean 'rho'\\?\\)"):
            FMDefense(fmd.classifier, fmd.combo_vae, rhoo=0.9)
        with self.assertRaisesRegex(TypeError, "config must be a DefenseConfig"):
            FMDefense(fmd.classifier, fmd.combo_vae, 100)  # the old positional num_morphs
        with self.assertRaisesRegex(ValueError, "^adaptive_refine_codes: must be in \\[0, 2\\]"):
            FMDefense(fmd.classifier, fmd.combo_vae, base, adaptive_refine_codes=3)

    def test_files_saved_before_newer_options_load_with_defaults(self):
        fmd = _tiny_defense(rho=0.95, recon_fpr=0.01)
        # The keys of the first shipped fmd.keras (before the gate's metric, the pixel
        # tolerance, the purified label rule, the adaptive draw order and refinement, and the
        # treatment of suspicious inputs).
        config = {k: v for k, v in fmd.get_config().items()
                  if k not in ("recon_metric", "recon_pixel_tol", "purify_label",
                               "adaptive_order", "adaptive_refine_codes", "suspicious")}
        old = FMDefense.from_config({**config, "jit_compile": False})
        self.assertEqual(old.config, dataclasses.replace(fmd.config, recon_metric="mse",
                                                         purify_label="reconstruction"))
        self.assertIs(old.jit_compile, False)
        with self.assertRaisesRegex(TypeError, "'gate'"):
            FMDefense.from_config({**config, "gate": "mae"})

    def test_not_calibrated_raises(self):
        fmd = _tiny_defense()
        with self.assertRaisesRegex(NotCalibratedError, "calibrate"):
            fmd.detect(tiny_images(2))

    def test_constructor_checks(self):
        cases = [
            (dict(num_morphs=0), "num_morphs"),
            (dict(num_morphs=50), "fewer than num_morphs"),
            (dict(selected_codes=(0, 9)), "selected_codes"),
            (dict(selected_codes=(1, 1)), "distinct"),
            (dict(threshold_mode="max"), "threshold_mode"),
            (dict(rho=1.5), "rho"),
            (dict(eta=-0.1), "eta"),
            (dict(purify_zu="x"), "purify_zu"),
            (dict(purify_label="dgmm"), "purify_label"),
            (dict(suspicious="drop"), "suspicious"),
            (dict(radius_step=0.0), "radius_step"),
            (dict(range_percentiles=(99, 1)), "range_percentiles"),
            (dict(chunk_size=0), "chunk_size"),
            (dict(recon_fpr=1.0), "recon_fpr"),
            (dict(recon_metric="l2"), "recon_metric"),
            (dict(recon_pixel_tol=0.0), "recon_pixel_tol"),
            (dict(recon_pixel_tol=1.0), "recon_pixel_tol"),
        ]
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                _tiny_defense(**kwargs)


# The FMDefense config keys of every saved .keras file (besides keras' name, trainable, dtype).
SAVED_KEYS = {
    "classifier", "combo_vae", "jit_compile", "num_morphs", "candidates_per_step",
    "radius_step", "max_steps", "range_percentiles", "selected_codes", "threshold_mode", "rho",
    "eta", "min_suspicious", "eta_reference_rho", "purify_zu", "purify_label", "chunk_size",
    "seed", "adaptive_budget", "adaptive_round", "adaptive_alpha", "adaptive_refine_codes",
    "adaptive_order", "morph_dtype", "morph_check_margin", "recon_fpr", "recon_metric",
    "recon_pixel_tol", "suspicious", "margin_fpr",
    "fmd_tf_format", "fmd_tf_version",  # which fmd_tf wrote the file (fmd_tf.loading)
}


def test_jit_compile_none_stays_auto_when_a_gpu_is_visible(monkeypatch):
    """keras.Model resolves jit_compile=None to True once a GPU is visible; the defense keeps
    None, so that its own rule leaves XLA off for the adaptive budget."""
    real = tf.config.list_physical_devices
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda device_type=None: (
        [*real(device_type), gpu] if device_type in (None, "GPU") else real(device_type)))
    fmd = _tiny_defense(adaptive_budget=True)  # raised "jit_compile must be None or False"
    assert keras.Model.jit_compile.fget(fmd) is True  # what keras.Model would have used
    assert fmd.jit_compile is None and fmd.get_config()["jit_compile"] is None
    assert fmd.copy_with(adaptive_budget=False).jit_compile is None


def test_calibration_report_and_detect(calibrated):
    fmd, report = calibrated
    assert report["num_val"] == 24
    assert report["val_false_positive_rate"] <= 0.1 + 1e-9
    assert np.all(np.array(report["code_high"]) >= np.array(report["code_low"]))
    out, is_adv = fmd.detect(tiny_images(70, seed=8), batch_size=32)
    assert is_adv.shape == (70,) and is_adv.dtype == bool
    np.testing.assert_array_equal(is_adv, out["verdict"] != 0)
    np.testing.assert_array_equal(out["label"][out["verdict"] == 2], -1)


BAD_INPUTS = [
    (np.zeros((2, 28, 28), np.float32), ValueError, "rank 4"),
    (np.zeros((2, 27, 28, 1), np.float32), ValueError, r"\[batch, 28, 28, 1\]"),
    (np.zeros((0, 28, 28, 1), np.float32), ValueError, "empty batch"),
    (np.full((1, 28, 28, 1), np.nan, np.float32), ValueError, "NaN or Inf"),
    (np.full((1, 28, 28, 1), np.inf, np.float32), ValueError, "NaN or Inf"),
    (np.full((1, 28, 28, 1), 1.5, np.float32), ValueError, r"\[0, 1\]"),
    (np.full((1, 28, 28, 1), -0.5, np.float32), ValueError, r"\[0, 1\]"),
    (np.zeros((1, 28, 28, 1), np.uint8), TypeError, "uint8"),
]


@pytest.mark.parametrize("x,error,message", BAD_INPUTS)
def test_bad_input_numpy_api(calibrated, x, error, message):
    fmd, _ = calibrated
    for method in (fmd.detect, fmd.calibrate, fmd.defend, fmd):
        with pytest.raises(error, match=message) as caught:
            method(x)
        assert re.search(message, str(caught.value).splitlines()[0])  # named on line one
    assert fmd.is_calibrated  # a failed calibrate leaves the old state


@pytest.mark.parametrize(
    "x,message",
    [
        (np.full((1, 28, 28, 1), np.nan, np.float32), "NaN or Inf"),
        (np.full((1, 28, 28, 1), 2.0, np.float32), "found a value > 1"),
        (np.full((1, 28, 28, 1), -1.0, np.float32), "found a value < 0"),
    ],
)
def test_bad_input_in_graph(calibrated, x, message):
    fmd, _ = calibrated
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        fmd(tf.constant(x))
    with pytest.raises((ValueError, TypeError), match="rank 4|dtype"):
        fmd(tf.zeros((28, 28, 1)))
    with pytest.raises(TypeError, match="int32"):
        fmd(tf.zeros((1, 28, 28, 1), tf.int32))


_CHILD = """
import json, sys, numpy as np, keras
import fmd_tf
fmd = keras.models.load_model(sys.argv[1])
x = np.load(sys.argv[2])
out = fmd.defend(x)
print(json.dumps({k: np.asarray(v).tolist() for k, v in out.items() if k != "purified"}))
"""


def test_deterministic_across_processes(calibrated):
    fmd, _ = calibrated
    x = tiny_images(6, seed=11)
    expected = {k: v.tolist() for k, v in fmd.defend(x).items() if k != "purified"}
    with tempfile.TemporaryDirectory() as tmp:
        model_path, x_path = os.path.join(tmp, "fmd.keras"), os.path.join(tmp, "x.npy")
        fmd.save(model_path)
        np.save(x_path, x)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        child = json.loads(subprocess.run(
            [sys.executable, "-c", _CHILD, model_path, x_path], check=True,
            capture_output=True, text=True, env=env,
        ).stdout.strip().splitlines()[-1])
    assert child == expected  # a new process, the saved file: the same answers


@pytest.mark.parametrize("purify_label", ["reconstruction", "corroborated"])
def test_harness_reverdict_reproduces_the_defense(purify_label):
    from fmd_tf.evaluation import harness

    fmd = _tiny_defense(rho=0.5, purify_label=purify_label)
    fmd.calibrate(tiny_images(20, seed=1))
    fmd.theta_d.assign(10.0)  # purify every suspicious input
    x = tiny_images(40, seed=7)
    out = fmd.defend(x)
    assert np.any(out["verdict"] == 1)
    stored = {**out, "purified_label": harness.purified_labels(fmd, x, batch_size=16)}
    again = harness.reverdict(stored, fmd.theta_r.numpy(), float(fmd.theta_d.numpy()),
                              float(fmd.theta_e.numpy()))
    np.testing.assert_array_equal(again["verdict"], out["verdict"])
    np.testing.assert_array_equal(again["label"], out["label"])


def test_long_numpy_calls_show_progress(capsys):
    fmd = _tiny_defense(rho=0.9)
    x = tiny_images(6, seed=3)
    report = fmd.calibrate(x, batch_size=4, verbose=1)
    assert "6/6" in capsys.readouterr().out  # the VAL pass of the calibration
    quiet = fmd.defend(x, batch_size=4)
    assert capsys.readouterr().out == ""
    loud = fmd.defend(x, batch_size=4, verbose=1)
    assert "6/6" in capsys.readouterr().out
    np.testing.assert_array_equal(quiet["verdict"], loud["verdict"])
    np.testing.assert_array_equal(fmd.resistance(x, batch_size=4), report["val_resistance"])


def test_stored_val_resistance_is_checked_unless_told_not_to(calibrated, monkeypatch):
    """`calibrate(val_resistance=)` recomputes its first `verify_rows` rows and refuses
    resistances of another model; the operating-point step, which gets the resistances the
    same model has just computed, does not recompute them."""
    from fmd_tf import operating_point

    fmd, report = calibrated
    x, r_val = tiny_images(24, seed=3), report["val_resistance"]
    with pytest.raises(ValueError, match="does not match this model's resistances"):
        fmd.copy_with(rho=0.8).calibrate(x, val_resistance=1.0 - r_val, verify_rows=4)
    again = fmd.copy_with(rho=0.8).calibrate(x, val_resistance=r_val, verify_rows=4)
    np.testing.assert_array_equal(again["val_resistance"], r_val)

    def no_morphs(*args, **kwargs):
        raise AssertionError("resistances recomputed")

    monkeypatch.setattr(FMDefense, "resistance", no_morphs)
    point, chosen, entry = operating_point.select_operating_point(fmd, x, None, r_val, "paper")
    assert entry["rule"] == "paper" and point.rho == operating_point.PAPER_POINT["rho"]
    expected = calibration.resistance_thresholds(r_val, point.rho, point.threshold_mode,
                                                 point.num_morphs)
    np.testing.assert_allclose(point.theta_r.numpy(), expected)
    with pytest.raises(AssertionError, match="recomputed"):
        fmd.copy_with(rho=0.8).calibrate(x, val_resistance=r_val)  # the default checks

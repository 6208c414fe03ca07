"""Tests of the baseline defenses (fmd_tf.baselines) and scripts/train_baselines.py."""

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

from fmd_tf.baselines import (
    SQUEEZER_CANDIDATES,
    FeatureSqueezing,
    MagNet,
    MagNetAutoencoder,
    calibrate_thresholds,
    choose_squeezers,
    median_filter,
    reduce_bit_depth,
)
from fmd_tf.defense import NotCalibratedError
from fmd_tf.models import Classifier


def tiny_classifier(seed=0, num_classes=10):
    keras.utils.set_random_seed(seed)
    model = Classifier(num_classes, conv_filters=(4,), dense_units=(8,), dropout=0.0)
    model.build((None, 28, 28, 1))
    return model


def toy_images(n, seed):
    """`toy_batch`-like images (one bright block per class on a dark, noisy background)."""
    return np.array(toy_batch(per_class=n // 10, seed=seed)[0])


# ----------------------------------------------------------------------------- autoencoder
class MagNetAutoencoderTest(FmdTestCase):
    def test_shapes_layers_and_range(self):
        x = tiny_images(3)
        for variant, convs in (("I", 5), ("II", 3)):
            ae = MagNetAutoencoder(variant=variant)
            y = ae(x)
            self.assertEqual(tuple(y.shape), x.shape)
            self.assertTrue(np.all((y.numpy() >= 0) & (y.numpy() <= 1)))
            conv_layers = [la for la in ae.ae_layers if isinstance(la, keras.layers.Conv2D)]
            self.assertEqual([la.filters for la in conv_layers], [3] * (convs - 1) + [1])
            self.assertTrue(all(la.activity_regularizer is not None for la in conv_layers))

    def test_serialization_and_keras_saving(self):
        for variant in ("I", "II"):
            ae = MagNetAutoencoder(variant=variant, filters=2, reg_strength=1e-9, name="ae")
            ae.build((None, 28, 28, 1))
            revived = self.run_serialization_test(ae)
            self.assertEqual(revived.variant, variant)
            self.run_keras_saving_test(ae, tiny_images(2))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "variant"):
            MagNetAutoencoder(variant="III")
        with self.assertRaisesRegex(ValueError, "filters"):
            MagNetAutoencoder(filters=0)
        with self.assertRaisesRegex(ValueError, "even"):
            MagNetAutoencoder(variant="I").build((None, 27, 28, 1))
        with self.assertRaisesRegex(ValueError, "channels"):
            MagNetAutoencoder(channels=1).build((None, 28, 28, 3))


# ----------------------------------------------------------------------------- squeezers
def _median_reference(x, k):
    """Numpy loop: window offsets -(k//2)..k-1-k//2, edge-repeating padding, upper median."""
    before, after = k // 2, k - 1 - k // 2
    padded = np.pad(x, [(0, 0), (before, after), (before, after), (0, 0)], mode="symmetric")
    out = np.empty_like(x)
    b, h, w, c = x.shape
    for i in range(h):
        for j in range(w):
            window = padded[:, i : i + k, j : j + k, :].reshape(b, k * k, c)
            out[:, i, j, :] = np.sort(window, axis=1)[:, (k * k) // 2, :]
    return out


def test_median_filter_matches_numpy_reference():
    rng = np.random.default_rng(0)
    for shape in [(2, 5, 6, 1), (1, 4, 3, 3)]:
        for x in (rng.uniform(size=shape), rng.integers(0, 4, size=shape) / 3.0):  # with ties
            x = x.astype(np.float32)
            for k in (2, 3):
                np.testing.assert_array_equal(median_filter(x, k).numpy(), _median_reference(x, k))


def test_median_filter_2x2_by_hand_and_like_scipy():
    x = np.array([[8, 6, 5], [3, 0, 0], [1, 8, 6]], np.float32)[None, :, :, None]
    # out[i, j] = upper median of x[i-1:i+1, j-1:j+1], the edge row / column repeated.
    expected = np.array([[8, 8, 6], [8, 6, 5], [3, 3, 6]], np.float32)
    np.testing.assert_array_equal(median_filter(x, 2).numpy()[0, :, :, 0], expected)
    try:
        from scipy import ndimage
    except ImportError:
        return
    y = np.random.default_rng(1).uniform(size=(2, 7, 5, 2)).astype(np.float32)
    np.testing.assert_array_equal(
        median_filter(y, 2).numpy(), ndimage.median_filter(y, size=(1, 2, 2, 1), mode="reflect")
    )


def test_bit_depth_exact_values():
    x = np.array([0.0, 0.25, 0.5, 0.5001, 0.75, 1.0], np.float32)
    np.testing.assert_array_equal(reduce_bit_depth(x, 1).numpy(), [0, 0, 0, 1, 1, 1])
    x2 = np.array([0.0, 1 / 6 - 1e-3, 1 / 6 + 1e-3, 0.5, 0.9, 1.0], np.float32)
    np.testing.assert_allclose(
        reduce_bit_depth(x2, 2).numpy(), [0, 0, 1 / 3, 2 / 3, 1, 1], atol=1e-7
    )
    with pytest.raises(ValueError, match="bits"):
        reduce_bit_depth(x, 0)


# ----------------------------------------------------------------------------- calibration
def test_calibrate_thresholds_tight_single_and_union():
    rng = np.random.default_rng(0)
    for n, fpr in [(2000, 0.001), (2000, 0.05), (128, 0.05), (999, 0.01)]:
        budget = int(np.floor(fpr * n + 1e-9))
        s = rng.normal(size=n)
        t = calibrate_thresholds({"a": s}, fpr)["a"]
        assert np.sum(s > t) == budget
        scores = {"I": rng.normal(size=n), "II": rng.exponential(size=n)}
        th = calibrate_thresholds(scores, fpr)
        flagged = (scores["I"] > th["I"]) | (scores["II"] > th["II"])
        assert flagged.sum() == budget, (n, fpr, flagged.sum())  # <= target and tight
        assert all(np.sum(scores[k] > th[k]) >= 1 for k in scores)  # the budget is shared
    # fpr below 1/n: nothing on VAL is flagged; all-equal scores cannot be split.
    s = rng.normal(size=100)
    assert np.sum(s > calibrate_thresholds({"a": s}, 0.005)["a"]) == 0
    assert np.sum(np.ones(50) > calibrate_thresholds({"a": np.ones(50)}, 0.1)["a"]) == 0
    with pytest.raises(ValueError, match="fpr"):
        calibrate_thresholds({"a": s}, 1.0)


# ----------------------------------------------------------------------------- feature squeezing
def _constant_classifier():
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(3, kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant([0.3, -1.0, 2.0])),
    ])
    return model


def _mean_intensity_classifier():
    """Two logits +-20 * (mean pixel - 0.3): class 0 for bright images, class 1 for dark ones."""
    def classify(images):
        m = tf.reduce_mean(images, axis=[1, 2, 3]) - 0.3
        return tf.stack([20.0 * m, -20.0 * m], axis=-1)

    return classify


def test_feature_squeezing_score_zero_for_constant_classifier():
    fs = FeatureSqueezing(_constant_classifier())
    np.testing.assert_array_equal(fs.score(tiny_images(5)), np.zeros(5, np.float32))


def test_feature_squeezing_score_grows_when_squeezing_changes_the_prediction():
    fs = FeatureSqueezing(_mean_intensity_classifier())
    x = np.stack([
        np.zeros((28, 28, 1)),  # squeezing changes nothing
        np.ones((28, 28, 1)),  # squeezing changes nothing
        np.full((28, 28, 1), 0.35),  # 1 bit -> all 0: from class 0 (weakly) to class 1
        np.full((28, 28, 1), 0.45),  # same, more confident before squeezing
    ]).astype(np.float32)
    score = fs.score(x)
    assert score[0] == pytest.approx(0.0, abs=1e-6)
    assert score[1] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < score[2] < score[3] <= 2.0
    # by hand: |softmax(p) - softmax(q)|_1 = 2 |sigmoid(40 m) - sigmoid(40 m')|, m' = -0.3
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    assert score[3] == pytest.approx(2 * abs(sig(40 * 0.15) - sig(-40 * 0.3)), rel=1e-5)


def test_feature_squeezing_calibrate_detect_defend():
    fs = FeatureSqueezing(tiny_classifier())
    x_val = tiny_images(400, seed=3)
    report = fs.calibrate(x_val, fpr=0.02)
    assert report["val_false_positive_rate"] == pytest.approx(8 / 400)  # <= 0.02 and tight
    scores, flagged = fs.detect(x_val)
    assert flagged.mean() == pytest.approx(0.02)
    out = fs.defend(x_val)
    assert set(out) >= {"label", "verdict", "score", "classifier_label",
                        "score_bit_depth_1", "score_median_2x2"}
    np.testing.assert_array_equal(out["verdict"] == 2, flagged)
    np.testing.assert_array_equal(out["label"][flagged], -1)
    np.testing.assert_array_equal(out["label"][~flagged], out["classifier_label"][~flagged])
    np.testing.assert_allclose(out["score"], np.maximum(out["score_bit_depth_1"],
                                                        out["score_median_2x2"]))


def test_feature_squeezing_not_calibrated_and_bad_arguments():
    fs = FeatureSqueezing(_constant_classifier())
    for method in (fs.detect, fs.defend):
        with pytest.raises(NotCalibratedError, match="calibrate"):
            method(tiny_images(2))
    with pytest.raises(ValueError, match="squeezer"):
        FeatureSqueezing(_constant_classifier(), bit_depth=None, median_size=None)
    with pytest.raises(ValueError, match="median_size"):
        FeatureSqueezing(_constant_classifier(), median_size=1)
    with pytest.raises(ValueError, match="callable"):
        FeatureSqueezing(None)
    with pytest.raises(ValueError, match="fpr"):
        fs.calibrate(tiny_images(4), fpr=-0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fs.score(tiny_images(2) * 2)


def test_choose_squeezers_picks_the_best_worst_case_on_val():
    classifier = _mean_intensity_classifier()
    rng = np.random.default_rng(0)
    x_val = np.concatenate([rng.uniform(0.0, 0.05, (20, 28, 28, 1)),
                            rng.uniform(0.95, 1.0, (20, 28, 28, 1))]).astype(np.float32)
    y_val = np.repeat([1, 0], 20)  # dark, then bright
    # Dark images (class 1) the classifier calls bright: 1 bit turns them black, the label
    # flips and they are rejected; a median filter leaves a constant image as it is.
    x_adv, y_adv = np.full((10, 28, 28, 1), 0.35, np.float32), np.ones(10, np.int64)
    candidates = [(None, 2), (None, 3), (1, None), (1, 2)]
    index, rows = choose_squeezers(classifier, x_val, y_val, {"a": (x_adv, y_adv),
                                                              "b": (x_adv[:4], y_adv[:4])},
                                   0.0, candidates)
    assert [(r["bit_depth"], r["median_size"]) for r in rows] == candidates
    assert [r["val_a_defended_accuracy"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert [r["val_b_defended_accuracy"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert index == 2  # the first of the two best
    assert all(r["val_false_positive_rate"] == 0.0 for r in rows)
    assert all(r["val_clean_defended_accuracy"] == 1.0 for r in rows)
    direct = FeatureSqueezing(classifier, bit_depth=1, median_size=None)
    direct.calibrate(x_val, 0.0)
    assert rows[2]["threshold"] == direct.threshold
    # Bright images (class 0) of isolated white pixels on black, mean 0.25, that the classifier
    # calls dark: bit-depth reduction leaves a 0/1 image as it is (passed, wrong), a 2x2 median
    # erases the pixels and the softmax moves (rejected). Each squeezer alone misses one attack.
    x_b = np.zeros((10, 28, 28, 1), np.float32)
    x_b[:, ::2, ::2] = 1.0
    y_b = np.zeros(10, np.int64)
    candidates = [(1, None), (None, 2), (1, 2)]
    index, rows = choose_squeezers(classifier, x_val, y_val,
                                   {"a": (x_adv, y_adv), "b": (x_b, y_b)}, 0.0, candidates)
    assert [r["val_a_defended_accuracy"] for r in rows] == [1.0, 0.0, 1.0]
    assert [r["val_b_defended_accuracy"] for r in rows] == [0.0, 1.0, 1.0]
    assert index == 2
    with pytest.raises(ValueError, match="attacked VAL"):
        choose_squeezers(classifier, x_val, y_val, {}, 0.0)


def test_choose_squeezers_rows_equal_each_candidate_run_on_its_own():
    """Every squeezer runs once per image set and each candidate reads its own: the rows equal
    those of calibrating and running one `FeatureSqueezing` per candidate."""
    from fmd_tf.baselines.feature_squeezing import SQUEEZER_CANDIDATES, _EverySqueezer
    from fmd_tf.evaluation.metrics import defended_accuracy

    classifier = tiny_classifier()
    x_val, x_adv = tiny_images(60, seed=5), tiny_images(24, seed=6)
    y_val = np.argmax(classifier(x_val).numpy(), axis=-1)
    y_adv = (np.argmax(classifier(x_adv).numpy(), axis=-1) + 1) % 10
    index, rows = choose_squeezers(classifier, x_val, y_val, {"a": (x_adv, y_adv)}, 0.1)
    assert len(rows) == len(SQUEEZER_CANDIDATES)
    for (bits, median), row in zip(SQUEEZER_CANDIDATES, rows, strict=True):
        fs = FeatureSqueezing(classifier, bit_depth=bits, median_size=median)
        report = fs.calibrate(x_val, 0.1)
        clean, adv = fs.defend(x_val), fs.defend(x_adv)
        assert row == {
            "bit_depth": bits, "median_size": median, "threshold": report["threshold"],
            "val_false_positive_rate": report["val_false_positive_rate"],
            "val_clean_defended_accuracy": defended_accuracy(clean["label"], clean["verdict"],
                                                             y_val, False),
            "val_a_defended_accuracy": defended_accuracy(adv["label"], adv["verdict"], y_adv,
                                                         True)}, (bits, median)
    assert len({r["val_a_defended_accuracy"] for r in rows}) > 1  # the candidates differ
    every = _EverySqueezer(classifier, SQUEEZER_CANDIDATES, from_logits=True)
    assert len(every.squeezer_names) == 7  # bit depths 1-5, medians 2x2 and 3x3
    assert set(every._run(x_val[:4], 500)[1]) == set(every.squeezer_names)


def test_feature_squeezing_save_load_round_trip(tmp_path):
    classifier = tiny_classifier(seed=1)
    fs = FeatureSqueezing(classifier)
    fs.calibrate(tiny_images(100, seed=4), fpr=0.05)
    path = str(tmp_path / "fs.json")
    fs.save(path)
    loaded = FeatureSqueezing.load(path, classifier)
    assert loaded.threshold == fs.threshold and loaded.fpr == fs.fpr
    x = tiny_images(30, seed=5)
    a, b = fs.defend(x), loaded.defend(x)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(FileNotFoundError, match="not a saved FeatureSqueezing"):
        FeatureSqueezing.load(str(tmp_path / "missing.json"), classifier)
    uncalibrated = str(tmp_path / "uncalibrated.json")
    FeatureSqueezing(classifier).save(uncalibrated)
    assert not FeatureSqueezing.load(uncalibrated, classifier).is_calibrated


# ----------------------------------------------------------------------------- MagNet
FPR = 0.02


@pytest.fixture(scope="module")
def fitted_magnet():
    """MagNet trained for 5 epochs on 300 toy images and calibrated on 200 others at FPR.

    (A larger learning rate than MagNet's 1e-3 so that 100 steps learn the toy images.)
    """
    magnet = MagNet(tiny_classifier(), epochs=5, batch_size=16, learning_rate=1e-2, seed=0)
    report = magnet.fit(toy_images(300, seed=1), toy_images(200, seed=2), fpr=FPR)
    return magnet, report


def test_magnet_calibration_reaches_target_fpr(fitted_magnet):
    magnet, report = fitted_magnet
    assert report["num_val"] == 200
    assert report["val_false_positive_rate"] == pytest.approx(FPR)  # 4 of 200: <= target, tight
    assert set(report["thresholds"]) == {"I", "II"}
    assert report["detector_norms"] == {"I": "L2", "II": "L1"}
    assert set(report["history"]) == {"I", "II"} and len(report["history"]["I"]["loss"]) == 5
    _, flagged = magnet.detect(toy_images(200, seed=2))
    assert flagged.mean() == pytest.approx(FPR)


def test_magnet_flags_noise_and_passes_clean(fitted_magnet):
    magnet, _ = fitted_magnet
    scores, flagged = magnet.detect(tiny_images(20, seed=9))  # uniform noise
    assert flagged.all()
    clean_scores, clean_flagged = magnet.detect(toy_images(200, seed=3))  # unseen clean images
    assert clean_flagged.mean() <= 0.1
    for name in ("I", "II"):  # each detector alone separates noise from clean images
        assert scores[name].min() > 2 * clean_scores[name].max()


def test_magnet_scores_are_reconstruction_errors(fitted_magnet):
    magnet, _ = fitted_magnet
    x = toy_images(10, seed=4)
    scores = magnet.scores(x)
    r1 = magnet.autoencoders["I"](x).numpy()
    r2 = magnet.autoencoders["II"](x).numpy()
    np.testing.assert_allclose(scores["I"], ((x - r1) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(scores["II"], np.abs(x - r2).mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(magnet.reform(x), r1, rtol=1e-6)


def test_magnet_defend_convention(fitted_magnet):
    magnet, _ = fitted_magnet
    x = np.concatenate([toy_images(10, seed=5), tiny_images(5, seed=6)])
    out = magnet.defend(x)
    rejected = out["verdict"] == 2
    np.testing.assert_array_equal(rejected, np.arange(15) >= 10)
    assert set(np.unique(out["verdict"])) <= {0, 2}
    np.testing.assert_array_equal(out["label"][rejected], -1)
    reformed = np.argmax(magnet.classifier(magnet.reform(x)).numpy(), axis=-1)
    np.testing.assert_array_equal(out["label"][~rejected], reformed[~rejected])
    np.testing.assert_array_equal(rejected, out["score"] > 1.0)
    assert out["label"].dtype == np.int64 and out["verdict"].dtype == np.int32


def _assert_same_outputs(a: dict, b: dict):
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)
        assert a[key].dtype == b[key].dtype, key


def test_magnet_defend_in_batches_with_progress_bar(fitted_magnet, capsys):
    magnet, _ = fitted_magnet
    x = np.concatenate([toy_images(10, seed=5), tiny_images(5, seed=6)])
    whole = magnet.defend(x)
    capsys.readouterr()
    _assert_same_outputs(magnet.defend(x, batch_size=4, verbose=1), whole)  # 4 + 4 + 4 + 3
    assert "15/15" in capsys.readouterr().out
    magnet.defend(x, batch_size=4)
    assert capsys.readouterr().out == ""


def test_feature_squeezing_defend_in_batches_with_progress_bar(capsys):
    fs = FeatureSqueezing(tiny_classifier())
    fs.calibrate(tiny_images(100, seed=3), fpr=0.05)
    x = tiny_images(11, seed=4)
    whole = fs.defend(x)
    capsys.readouterr()
    _assert_same_outputs(fs.defend(x, batch_size=3, verbose=1), whole)
    assert "11/11" in capsys.readouterr().out


def test_magnet_save_load_identical_decisions(fitted_magnet, tmp_path):
    magnet, _ = fitted_magnet
    magnet.save(str(tmp_path / "magnet"))
    assert sorted(os.listdir(tmp_path / "magnet")) == [
        "detector_I.keras", "detector_II.keras", "magnet.json"]
    loaded = MagNet.load(str(tmp_path / "magnet"), classifier=magnet.classifier)
    assert loaded.thresholds == magnet.thresholds and loaded.epochs == 5
    x = np.concatenate([toy_images(20, seed=7), tiny_images(5, seed=8)])
    a, b = magnet.defend(x), loaded.defend(x)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(FileNotFoundError, match="magnet.json"):
        MagNet.load(str(tmp_path))
    assert loaded.measurement_fingerprint() == magnet.measurement_fingerprint()


def test_magnet_measures_without_its_thresholds(fitted_magnet):
    magnet, _ = fitted_magnet
    x = np.concatenate([toy_images(20, seed=10), tiny_images(5, seed=10)])
    check_measure_then_decide(magnet, x, toy_images(100, seed=11))
    other = MagNet(magnet.classifier, seed=1)  # other weights: another measurement
    assert other.measurement_fingerprint() != magnet.measurement_fingerprint()


def test_feature_squeezing_measures_without_its_threshold():
    fs = FeatureSqueezing(tiny_classifier())
    fs.calibrate(tiny_images(100, seed=3), fpr=0.02)
    check_measure_then_decide(fs, tiny_images(30, seed=4), tiny_images(100, seed=5))
    assert fs.measurement_fingerprint() != FeatureSqueezing(
        fs.classifier, bit_depth=2).measurement_fingerprint()


def test_magnet_from_keeps_the_command_that_trained_the_autoencoders(fitted_magnet, tmp_path):
    from types import SimpleNamespace

    from fmd_tf.evaluation.baselines import _fit_magnet

    magnet, _ = fitted_magnet
    trained = MagNet.load(str(_saved(magnet, tmp_path / "trained")), magnet.classifier)
    trained.report["command"] = "train.py (trains the autoencoders)"
    trained.save(str(tmp_path / "trained"))
    splits = SimpleNamespace(x_val=toy_images(200, seed=2))
    source = str(tmp_path / "trained")
    for step in ("first", "second"):  # a reuse of a reuse
        reused, report = _fit_magnet(magnet.classifier, splits, None, FPR, None, 0, source, 0)
        assert report["autoencoders_from"] == source
        assert report["autoencoders_command"] == "train.py (trains the autoencoders)"
        assert reused.thresholds == pytest.approx(magnet.thresholds)
        reused.report["command"] = f"train_baselines.py --magnet-from ({step} reuse)"
        source = _saved(reused, tmp_path / step)


def _saved(magnet, path):
    magnet.save(str(path))
    return str(path)


def test_magnet_not_calibrated_and_argument_checks():
    magnet = MagNet(None, epochs=1)
    for method in (magnet.detect, magnet.defend):
        with pytest.raises(NotCalibratedError, match="calibrate"):
            method(tiny_images(2))
    with pytest.raises(NotCalibratedError, match="calibrate"):
        magnet.decide({"score_I": np.zeros(2), "score_II": np.zeros(2)})
    with pytest.raises(ValueError, match="measure and defend need a classifier"):
        magnet.measure(tiny_images(2))
    magnet.calibrate(tiny_images(20), fpr=0.1)
    with pytest.raises(ValueError, match="classifier"):
        magnet.defend(tiny_images(2))
    with pytest.raises(ValueError, match="epochs"):
        MagNet(epochs=0)
    with pytest.raises(ValueError, match="even"):
        MagNet(image_shape=(27, 27, 1))
    with pytest.raises(ValueError, match="fpr"):
        magnet.calibrate(tiny_images(4), fpr=1.5)
    with pytest.raises(ValueError, match="variant 'II'"):
        MagNet(detector_ii=MagNetAutoencoder(variant="I"))
    with pytest.raises(TypeError, match="float32"):
        magnet.scores(np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match=r"\[batch, 28, 28, 1\]"):
        magnet.scores(np.zeros((2, 28, 28, 3), np.float32))


# ----------------------------------------------------------------------------- script
def _run_script(*args):
    return run_script("scripts/train_baselines.py", *args)


def test_script_refuses_missing_classifier_and_overwrite(tmp_path):
    proc = _run_script("--quick", "--model", str(tmp_path / "none"))
    assert proc.returncode == 2 and "classifier.keras not found" in proc.stderr
    model_dir = tmp_path / "m"
    (model_dir / "baselines" / "magnet").mkdir(parents=True)
    (model_dir / "classifier.keras").write_bytes(b"placeholder")
    marker = model_dir / "baselines" / "magnet" / "keep.txt"
    marker.write_text("old")
    before = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*"))
    proc = _run_script("--quick", "--model", str(model_dir))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr, proc.stderr
    assert sorted(p.relative_to(model_dir) for p in model_dir.rglob("*")) == before
    assert marker.read_text() == "old"
    proc = _run_script("--quick", "--model", str(model_dir), "--fpr", "1.5")
    assert proc.returncode == 2 and "--fpr" in proc.stderr
    proc = _run_script("--quick", "--model", str(model_dir), "--magnet-from", str(tmp_path))
    assert proc.returncode == 2 and "no magnet.json" in proc.stderr
    (tmp_path / "magnet.json").write_text("{}")
    proc = _run_script("--quick", "--model", str(model_dir), "--magnet-from", str(tmp_path),
                       "--epochs", "3")
    assert proc.returncode == 2 and "--magnet-from" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.relative_to(model_dir) for p in model_dir.rglob("*")) == before


# What the baselines are matched to: the FM-Defense's VAL FPR and its operating point's attacks.
FM_CARD = {"calibration": {"val_false_positive_rate": 0.08},
           "operating_point": {"attacks": {"names": ["fgsm"], "n": 16, "seed": 0}}}


def test_script_quick_end_to_end(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny_classifier().save(str(model_dir / "classifier.keras"))
    (model_dir / "model_card.json").write_text(json.dumps(FM_CARD))
    proc = _run_script("--quick", "--model", str(model_dir))
    if proc.returncode == 2 and "not available" in proc.stderr.lower():
        pytest.skip(f"Fashion-MNIST is not available: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MagNet: VAL FPR" in proc.stdout and "Feature Squeezing" in proc.stdout
    assert "Defense-GAN: VAL FPR" in proc.stdout
    out_dir = model_dir / "baselines"
    assert sorted(os.listdir(out_dir)) == ["defense_gan", "feature_squeezing.json", "magnet"]
    assert sorted(os.listdir(model_dir)) == [  # no temp dir left
        "baselines", "classifier.keras", "model_card.json"]
    with open(out_dir / "magnet" / "magnet.json") as f:
        state = json.load(f)
    assert state["fpr"] == pytest.approx(0.08)  # the FM-Defense's VAL FPR in the card
    assert state["report"]["fpr_source"].startswith("FM-Defense")
    assert state["report"]["val_false_positive_rate"] <= 0.08
    assert state["settings"]["epochs"] == 1 and state["report"]["num_train"] == 512
    with open(out_dir / "feature_squeezing.json") as f:
        fs_state = json.load(f)
    assert fs_state["fpr"] == pytest.approx(0.08)
    assert fs_state["report"]["val_false_positive_rate"] <= 0.08
    selection = fs_state["report"]["selection"]  # chosen on VAL with the card's attacks
    assert (selection["attacks"], selection["n"]) == (["fgsm"], 16)
    assert len(selection["rows"]) == len(SQUEEZER_CANDIDATES)
    chosen = selection["rows"][selection["chosen"]]
    names = ([f"bit_depth_{chosen['bit_depth']}"] if chosen["bit_depth"] else []) + (
        [f"median_{chosen['median_size']}x{chosen['median_size']}"] if chosen["median_size"]
        else [])
    assert fs_state["squeezers"] == names
    assert fs_state["threshold"] == pytest.approx(chosen["threshold"])
    magnet = MagNet.load(str(out_dir / "magnet"))
    assert magnet.is_calibrated
    proc = _run_script("--quick", "--model", str(model_dir))  # a second run refuses
    assert proc.returncode == 2 and "--overwrite" in proc.stderr

    # A new classifier next to the same images: --magnet-from keeps the autoencoders.
    other = tmp_path / "other"
    other.mkdir()
    tiny_classifier(seed=1).save(str(other / "classifier.keras"))
    (other / "model_card.json").write_text(json.dumps(FM_CARD))
    proc = _run_script("--quick", "--model", str(other), "--magnet-from",
                       str(out_dir / "magnet"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(reused)" in proc.stdout
    reused = MagNet.load(str(other / "baselines" / "magnet"))
    for name in ("I", "II"):
        for a, b in zip(magnet.autoencoders[name].get_weights(),
                        reused.autoencoders[name].get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    # Same images, same VAL split and budget: the re-calibrated thresholds are the same.
    assert reused.thresholds == pytest.approx(magnet.thresholds)
    assert reused.report["autoencoders_from"] == str(out_dir / "magnet")
    assert reused.report["autoencoders_command"] == state["report"]["command"]
    assert reused.report["epochs"] == 1 and "--magnet-from" in reused.report["command"]


@pytest.mark.slow
def test_script_overwrite_replaces_outputs(tmp_path):
    model_dir = tmp_path / "model"
    (model_dir / "baselines" / "magnet").mkdir(parents=True)
    (model_dir / "baselines" / "magnet" / "stale.txt").write_text("old")
    (model_dir / "baselines" / "other.txt").write_text("not ours")
    tiny_classifier().save(str(model_dir / "classifier.keras"))
    proc = _run_script("--quick", "--model", str(model_dir), "--overwrite", "--fpr", "0.1",
                       "--epochs", "2")
    if proc.returncode == 2 and "not available" in proc.stderr.lower():
        pytest.skip(f"Fashion-MNIST is not available: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(os.listdir(model_dir / "baselines" / "magnet")) == [
        "detector_I.keras", "detector_II.keras", "magnet.json"]
    assert (model_dir / "baselines" / "other.txt").read_text() == "not ours"
    with open(model_dir / "baselines" / "feature_squeezing.json") as f:
        assert json.load(f)["fpr"] == pytest.approx(0.1)
    assert MagNet.load(str(model_dir / "baselines" / "magnet")).epochs == 2


# ----------------------------------------------------------------------------- adaptive attacks
def test_magnet_adaptive_surface_matches_defend(fitted_magnet):
    magnet, _ = fitted_magnet
    x = np.concatenate([toy_images(10, seed=5), tiny_images(5, seed=6)])
    logits, ratio = magnet.adaptive_surface(tf.constant(x))
    out = magnet.defend(x)
    np.testing.assert_allclose(ratio.numpy(), out["score"], rtol=1e-5)
    passed = out["verdict"] == 0
    np.testing.assert_array_equal(np.argmax(logits.numpy(), -1)[passed], out["label"][passed])


def test_feature_squeezing_adaptive_surface_matches_score():
    fs = FeatureSqueezing(tiny_classifier())
    fs.calibrate(tiny_images(50, seed=3), fpr=0.1)
    x = tiny_images(6, seed=4)
    logits, ratio = fs.adaptive_surface(tf.constant(x))
    np.testing.assert_allclose(ratio.numpy(), fs.score(x) / fs.threshold, rtol=1e-5)
    np.testing.assert_array_equal(np.argmax(logits.numpy(), -1), fs.defend(x)["classifier_label"])
    # BPDA: the bit-depth squeezer passes the identity gradient, so the ratio has a gradient.
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        r = tf.reduce_sum(fs.adaptive_surface(xt)[1])
    assert np.any(tape.gradient(r, xt).numpy() != 0)


def test_adaptive_detector_pgd_keeps_magnet_scores_down(fitted_magnet):
    from fmd_tf.attacks import adaptive_detector_pgd

    magnet, _ = fitted_magnet
    x = toy_images(20, seed=7)
    y = magnet.defend(x)["label"]
    args = dict(eps=0.3, nb_iter=20, seed=1)
    plain = adaptive_detector_pgd(magnet, x, y, detection_weight=0.0, **args)
    aware = adaptive_detector_pgd(magnet, x, y, detection_weight=50.0, **args)
    for x_adv in (plain, aware):
        assert np.abs(x_adv - x).max() <= 0.3 + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    np.testing.assert_array_equal(aware, adaptive_detector_pgd(magnet, x, y,
                                                               detection_weight=50.0, **args))
    plain_ratio = magnet.defend(plain)["score"]
    aware_ratio = magnet.defend(aware)["score"]
    # Ignoring the detector, PGD at eps 0.3 leaves the clean manifold: rejected.
    assert np.mean(plain_ratio > 1) >= 0.9
    # The detector-aware attack keeps the scores far lower.
    assert np.median(aware_ratio) < 0.5 * np.median(plain_ratio)
    with pytest.raises(TypeError, match="adaptive_surface"):
        adaptive_detector_pgd(object(), x, y)
    with pytest.raises(ValueError, match="norm"):
        adaptive_detector_pgd(magnet, x, y, norm="l1")

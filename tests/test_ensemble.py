"""The randomized FMDefenseEnsemble (issue 8): member draw, outputs, saving, serving."""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import TINY_COMBO_CONFIG, FmdTestCase, tiny_images

import fmd_tf  # noqa: F401
from fmd_tf.defense import FMDefense, FMDefenseEnsemble, NotCalibratedError, select_members
from fmd_tf.models import Classifier, build_combo_vae

ARGS = dict(num_morphs=4, candidates_per_step=2, max_steps=4, chunk_size=16, rho=0.9,
            morph_dtype="float32")


def _classifier():
    keras.utils.set_random_seed(0)
    clf = Classifier(conv_filters=(4, 4), dense_units=(8,), name="clf")
    clf.build((None, 28, 28, 1))
    return clf


def _member(classifier, seed, calibrate=True, **kwargs):
    keras.utils.set_random_seed(100 + seed)
    combo = build_combo_vae(TINY_COMBO_CONFIG, (28, 28, 1), 10)
    fmd = FMDefense(classifier, combo, seed=seed, **{**ARGS, **kwargs})
    fmd.build((None, 28, 28, 1))
    if calibrate:
        fmd.calibrate(tiny_images(16, seed=1))
    return fmd


@pytest.fixture(scope="module")
def ensemble():
    clf = _classifier()
    return FMDefenseEnsemble([_member(clf, k) for k in range(2)], selection_key=(7, 11))


def test_select_members_is_keyed_deterministic_and_spread():
    x = tiny_images(300, seed=4)
    a = select_members(x, 3, (7, 11)).numpy()
    np.testing.assert_array_equal(a, select_members(x, 3, (7, 11)).numpy())
    # Row-wise: an image's member does not depend on the rest of the batch.
    np.testing.assert_array_equal(select_members(x[5:6], 3, (7, 11)).numpy(), a[5:6])
    assert a.dtype == np.int32 and set(a) == {0, 1, 2}
    # Uniform draw: with 300 images every member gets 100 +- 3 sigma (sigma ~ 8.2).
    assert np.all(np.abs(np.bincount(a, minlength=3) - 100) < 25)
    # Another key gives another assignment (about 2/3 of the rows change).
    b = select_members(x, 3, (8, 11)).numpy()
    assert 0.5 < np.mean(a != b) < 0.85
    # A change of one pixel by 1/255 redraws the member with probability 2/3.
    bumped = np.array(x)
    bumped[:, 0, 0, 0] = np.where(bumped[:, 0, 0, 0] > 0.5, bumped[:, 0, 0, 0] - 1 / 255,
                                  bumped[:, 0, 0, 0] + 1 / 255)
    assert 0.5 < np.mean(select_members(bumped, 3, (7, 11)).numpy() != a) < 0.85


def test_each_row_is_its_members_answer(ensemble):
    x = tiny_images(12, seed=6)
    out = ensemble.defend(x, batch_size=5)
    member = out["member"]
    assert set(out) == set(FMDefenseEnsemble.output_keys)
    assert len(set(member)) > 1
    for k, m in enumerate(ensemble.members):
        rows = np.flatnonzero(member == k)
        if not len(rows):
            continue
        own = m.defend(x[rows])
        for key in ("label", "verdict", "classifier_label", "resistance", "distance"):
            np.testing.assert_array_equal(out[key][rows], own[key], err_msg=key)
        for key in ("recon_error", "purified"):  # float: other batch sizes, other rounding
            np.testing.assert_allclose(out[key][rows], own[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ensemble.theta_r_rows(member),
                                  np.stack([m.theta_r.numpy() for m in ensemble.members])[member])
    np.testing.assert_allclose(ensemble.reconstruction_error(x), out["recon_error"], rtol=1e-5)


def test_one_member_batch_and_batch_of_one(ensemble):
    x = tiny_images(40, seed=9)
    member = select_members(x, 2, (7, 11)).numpy()
    rows = np.flatnonzero(member == 1)[:4]  # a batch where member 0 gets no rows
    out = ensemble(x[rows])
    np.testing.assert_array_equal(out["member"].numpy(), 1)
    np.testing.assert_array_equal(out["resistance"].numpy(),
                                  ensemble.members[1](x[rows])["resistance"].numpy())
    one = ensemble(x[rows[:1]])
    assert tuple(one["purified"].shape) == (1, 28, 28, 1)


def test_the_graph_holds_each_members_defense_once(ensemble, monkeypatch):
    """One call of the ensemble runs each member's defense once, not once per output key."""
    calls = []
    for k, m in enumerate(ensemble.members):
        monkeypatch.setattr(m, "_defend_valid", lambda part, *a, k=k, own=m._defend_valid:
                            calls.append(k) or own(part, *a))
    spec = tf.TensorSpec([None, 28, 28, 1], tf.float32)
    tf.function(ensemble._defend, autograph=False).get_concrete_function(spec)
    assert sorted(calls) == [0, 1]


class EnsembleSavingTest(FmdTestCase):
    def test_keras_round_trip_identical_and_one_classifier(self):
        clf = _classifier()
        ens = FMDefenseEnsemble([_member(clf, k) for k in range(2)], selection_key=(3, 5))
        self.run_serialization_test(ens)
        loaded = self.run_keras_saving_test(ens, tiny_images(6, seed=2), atol=0, rtol=0)
        self.assertEqual(loaded.selection_key, (3, 5))
        self.assertTrue(all(m.classifier is loaded.classifier for m in loaded.members))
        for a, b in zip(ens.members, loaded.members, strict=True):
            np.testing.assert_array_equal(a.theta_r.numpy(), b.theta_r.numpy())
            np.testing.assert_array_equal(a.search_table.numpy(), b.search_table.numpy())

    def test_members_saved_before_recon_metric_load_as_mse(self):
        clf = _classifier()
        ens = FMDefenseEnsemble([_member(clf, k, calibrate=False) for k in range(2)])
        config = ens.get_config()
        self.assertEqual([m["recon_metric"] for m in config["members"]], ["mae", "mae"])
        del config["members"][0]["recon_metric"]
        loaded = FMDefenseEnsemble.from_config(config)
        self.assertEqual([m.recon_metric for m in loaded.members], ["mse", "mae"])

    def test_members_loaded_separately_share_one_classifier(self):
        clf = _classifier()
        members = [_member(clf, k) for k in range(2)]
        with tempfile.TemporaryDirectory() as tmp:
            paths = [os.path.join(tmp, f"m{k}.keras") for k in range(2)]
            for m, p in zip(members, paths, strict=True):
                m.save(p)
            loaded = [keras.models.load_model(p) for p in paths]
        assert loaded[0].classifier is not loaded[1].classifier
        ens = FMDefenseEnsemble(loaded, selection_key=(1, 2))
        self.assertTrue(all(m.classifier is ens.classifier for m in ens.members))
        x = tiny_images(5, seed=3)
        ref = FMDefenseEnsemble(members, selection_key=(1, 2))(x)
        self.assertNestedAllClose(ens(x), ref, atol=0, rtol=0)

    def test_constructor_checks(self):
        clf = _classifier()
        good = _member(clf, 0)
        with self.assertRaisesRegex(ValueError, "at least one"):
            FMDefenseEnsemble([])
        with self.assertRaisesRegex(TypeError, "FMDefense"):
            FMDefenseEnsemble([good, clf])
        with self.assertRaisesRegex(ValueError, "selection_key"):
            FMDefenseEnsemble([good], selection_key=(1, -2))
        with self.assertRaisesRegex(ValueError, "codes"):
            FMDefenseEnsemble([good, _member(clf, 1, selected_codes=(0, 1))])
        keras.utils.set_random_seed(5)
        other = Classifier(conv_filters=(4, 4), dense_units=(8,), name="clf")
        other.build((None, 28, 28, 1))
        with self.assertRaisesRegex(ValueError, "another classifier"):
            FMDefenseEnsemble([good, _member(other, 1)])
        uncalibrated = FMDefenseEnsemble([good, _member(clf, 1, calibrate=False)])
        with self.assertRaisesRegex(NotCalibratedError, "FMDefenseEnsemble is not calibrated"):
            uncalibrated.detect(tiny_images(2))


def test_bad_input(ensemble):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ensemble.defend(tiny_images(2) + 2.0)
    with pytest.raises(ValueError, match="empty batch"):
        ensemble.defend(np.zeros((0, 28, 28, 1), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        ensemble(tf.constant(np.full((2, 28, 28, 1), np.nan, np.float32)))


def test_savedmodel_export_matches_the_ensemble(ensemble, tmp_path):
    from fmd_tf.export import SIGNATURES, export_serving

    path = export_serving(ensemble, str(tmp_path / "serving"), version=1)
    loaded = tf.saved_model.load(path)
    x = tiny_images(9, seed=12)
    out = ensemble.defend(x)
    served = loaded.signatures["serving_default"](images=tf.constant(x))
    assert set(served) == set(SIGNATURES["serving_default"])
    for key in ("label", "verdict", "resistance", "distance"):
        np.testing.assert_array_equal(served[key].numpy(), out[key], err_msg=key)
    purified = loaded.signatures["purify"](images=tf.constant(x))
    for k, member in enumerate(ensemble.members):  # each image purified by its own member
        rows = np.flatnonzero(out["member"] == k)
        if len(rows):
            np.testing.assert_allclose(purified["purified"].numpy()[rows],
                                       member._purify_valid(tf.constant(x[rows]))["purified"],
                                       rtol=1e-5, atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 1\]"):
        loaded.signatures["detect"](images=tf.constant(x + 1.5))

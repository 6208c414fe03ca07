"""Adaptive white-box attacks on the whole FM-Defense (`fmd_tf.attacks.adaptive`).

A tiny FMDefense (as `_tiny_defense` in test_defense.py) whose classifier is first fitted to
`toy_batch` (one bright block per class; ~90 % after 40 full-batch epochs, ~3 s), calibrated on
the same 20 images. Its combo-VAE is untrained, so every decoded morph looks alike and the
classifier puts all of them in one class: a toy detector that passes exactly the inputs whose
label is that class. That makes the detector term of the attacks observable: a detector-aware
attack must steer to that class, a classifier-only one need not.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import TINY_COMBO_CONFIG, tiny_images

import fmd_tf  # noqa: F401
from fmd_tf.attacks import (
    adaptive_apgd,
    adaptive_pgd,
    adaptive_resistance,
    adaptive_success,
    cw_high_confidence_transfer,
    soft_resistance,
)
from fmd_tf.attacks.adaptive import soft_reconstruction_error, soft_resistance_tensor
from fmd_tf.defense import FMDefense, NotCalibratedError, fm_defense
from fmd_tf.evaluation.harness import ATTACKS
from fmd_tf.models import Classifier, build_combo_vae

FAST = dict(nb_iter=10, eot_samples=2)


class ConfidentConstant(keras.Model):
    """Ignores its input: class 4 with probability exactly 1.0 in float32."""

    def call(self, images):
        return tf.one_hot(tf.fill([tf.shape(images)[0]], 4), 10) * 100.0


def _defense(classifier, **kwargs):
    keras.utils.set_random_seed(0)
    combo = build_combo_vae(TINY_COMBO_CONFIG, (28, 28, 1), 10)
    args = dict(num_morphs=8, candidates_per_step=4, max_steps=4, radius_step=0.2,
                chunk_size=64, rho=0.9, morph_dtype="float32")
    args.update(kwargs)
    fmd = FMDefense(classifier, combo, **args)
    fmd.build((None, 28, 28, 1))
    return fmd


@pytest.fixture(scope="module")
def setup(toy_batch):
    """(fmd calibrated on toy_batch, x, y)."""
    x, y = toy_batch
    keras.utils.set_random_seed(0)
    clf = Classifier(conv_filters=(4, 4), dense_units=(8,), name="clf")
    clf.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clf.fit(x, y, epochs=40, batch_size=20, verbose=0)
    assert np.mean(_predict(clf, x) == y) >= 0.8, "toy classifier did not learn toy_batch"
    fmd = _defense(clf)
    fmd.calibrate(x)
    return fmd, x, y


@pytest.fixture(scope="module")
def strict(setup):
    """The same defense with θr = 0.5 and θd = 0: inputs whose morphs disagree are rejected."""
    fmd, x, y = setup
    strict = _defense(fmd.classifier)
    strict.set_weights(fmd.get_weights())
    strict.theta_r.assign(np.full(strict.num_codes, 0.5, np.float32))
    strict.theta_d.assign(0.0)
    return strict, x, y


def _predict(model, x):
    return np.argmax(model(tf.constant(x), training=False).numpy(), axis=1)


def _spearman(a, b):
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties get their average rank
            r[v == value] = r[v == value].mean()
        return r

    return float(np.corrcoef(ranks(np.ravel(a)), ranks(np.ravel(b)))[0, 1])


def _assert_in_ball(x_adv, x, eps, norm):
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert np.all(size <= eps * (1 + 1e-5) + 1e-6), size.max()


# ----------------------------------------------------------------------------- surrogate


def test_soft_pixel_share_matches_the_gate_and_has_gradients():
    x = tf.constant(tiny_images(3, seed=4))
    recon = tf.constant(tiny_images(3, seed=5))
    exact = fm_defense.reconstruction_error(x, recon, "pixel_share", 0.3).numpy()
    # T -> 0: the sigmoid weights become the step (no pixel sits within 1e-4 of τ here).
    assert np.min(np.abs(np.abs(x - recon) - 0.3)) > 1e-4
    np.testing.assert_allclose(
        soft_reconstruction_error(x, recon, "pixel_share", 0.3, temperature=1e-6), exact,
        atol=1e-6)
    # Other metrics are the gate's own error, which is differentiable already.
    np.testing.assert_allclose(soft_reconstruction_error(x, recon, "mae", 0.3),
                               fm_defense.reconstruction_error(x, recon, "mae"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        soft = soft_reconstruction_error(x, recon, "pixel_share", 0.3)
    grad = tape.gradient(soft, x).numpy()
    # Moving a pixel away from its reconstruction raises the share: the gradient has the sign
    # of x - x̂ wherever it is not ~0.
    sign = np.sign((x - recon).numpy())
    assert np.all(grad * sign >= 0) and np.mean(np.abs(grad) > 1e-6) > 0.5


def test_soft_resistance_is_one_for_a_constant_classifier():
    fmd = _defense(ConfidentConstant())
    fmd.calibrate(tiny_images(8, seed=1))
    x = tiny_images(3, seed=2)
    np.testing.assert_array_equal(fmd.resistance(x), np.ones((3, fmd.num_codes)))
    for source, eot in (("defense", None), ("fresh", 3)):
        r = soft_resistance(fmd, x, eot_samples=eot, morph_source=source)
        # A softmax output: 1 up to float32 rounding, which differs between CPUs.
        np.testing.assert_allclose(r, np.ones((3, fmd.num_codes), np.float32), atol=1e-5)


def test_soft_resistance_tracks_real_resistance(setup):
    fmd, x, _ = setup
    real = fmd.resistance(x)
    # The defense's own morphs at a low temperature: the surrogate is the real share.
    sharp = soft_resistance(fmd, x, morph_source="defense", temperature=0.01)
    np.testing.assert_allclose(sharp, real, atol=0.02)
    # EOT over fresh morphs at T = 1: ranks agree.
    soft = soft_resistance(fmd, x, morph_source="fresh", eot_samples=4, seed=3)
    assert soft.shape == real.shape and soft.dtype == np.float32
    assert np.all((soft >= 0) & (soft <= 1))
    assert _spearman(soft, real) > 0.5


def test_eot_morphs_are_random_per_seed_and_the_defense_table_is_not(setup):
    fmd, x, y = setup
    xb, w = tf.constant(x[:3]), tf.one_hot(y[:3], 10)
    fresh = [soft_resistance_tensor(fmd, xb, w, [0, s], eot_samples=2).numpy() for s in (1, 2)]
    assert not np.array_equal(fresh[0], fresh[1])
    np.testing.assert_array_equal(
        fresh[0], soft_resistance_tensor(fmd, xb, w, [0, 1], eot_samples=2).numpy())
    table = [soft_resistance_tensor(fmd, xb, w, [0, s], morph_source="defense").numpy()
             for s in (1, 2)]
    np.testing.assert_array_equal(table[0], table[1])


def test_gradients_reach_input_through_encoder_dgmm_and_decoder(setup):
    fmd, x, y = setup
    xb = tf.constant(x[:4])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xb)
        loss = tf.reduce_sum(
            soft_resistance_tensor(fmd, xb, tf.one_hot(y[:4], 10), [0, 1], eot_samples=2))
    grad = tape.gradient(loss, xb).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    combo = fmd.combo_vae
    for part in (combo.shared_encoder, combo.dgmm, combo.decoder):
        grads = [g for g in tape.gradient(loss, part.trainable_weights + part.non_trainable_weights)
                 if g is not None]
        assert grads, f"no gradient path through {part.name}"
        assert all(np.all(np.isfinite(g.numpy())) for g in grads)
        assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) > 0, part.name


# ----------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
@pytest.mark.parametrize("attack", [adaptive_pgd, adaptive_resistance, adaptive_apgd])
def test_outputs_in_ball_and_input_unchanged(setup, attack, norm, eps):
    fmd, x, y = setup
    xb = np.array(x[:3])
    before = xb.copy()
    x_adv = attack(fmd, xb, y[:3], eps=eps, norm=norm, batch_size=2, **FAST)
    _assert_in_ball(x_adv, xb, eps, norm)
    np.testing.assert_array_equal(xb, before)
    assert not np.array_equal(x_adv, xb)


def test_deterministic_for_a_seed(setup):
    fmd, x, y = setup
    runs = [adaptive_pgd(fmd, x[:3], y[:3], eps=0.1, seed=s, **FAST) for s in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    a = adaptive_resistance(fmd, x[:3], y[:3], eps=0.1, seed=5, **FAST)
    np.testing.assert_array_equal(a, adaptive_resistance(fmd, x[:3], y[:3], eps=0.1, seed=5,
                                                         **FAST))


def test_classifier_only_objective_breaks_the_classifier(setup):
    fmd, x, y = setup
    x_adv = adaptive_pgd(fmd, x, y, eps=0.3, nb_iter=20, resistance_weight=0.0)
    _assert_in_ball(x_adv, x, 0.3, "linf")
    assert np.mean(_predict(fmd.classifier, x_adv) == y) <= 0.1


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_on_the_defense_breaks_the_classifier_and_checks_its_arguments(setup, loss):
    fmd, x, y = setup
    x_adv = adaptive_apgd(fmd, x, y, eps=0.3, nb_iter=50, resistance_weight=0.0, loss=loss,
                          eot_samples=2)
    _assert_in_ball(x_adv, x, 0.3, "linf")
    # DLR is weaker on this toy classifier: APGD-DLR on the classifier alone
    # (`fmd_tf.attacks.apgd`) also leaves 5 of its 20 images right.
    assert np.mean(_predict(fmd.classifier, x_adv) == y) <= {"ce": 0.1, "dlr": 0.3}[loss]
    with pytest.raises(ValueError, match="loss"):
        adaptive_apgd(fmd, x[:2], y[:2], loss="hinge")
    with pytest.raises(ValueError, match="restarts"):
        adaptive_apgd(fmd, x[:2], y[:2], restarts=0)


def test_detector_term_steers_to_labels_the_morphs_agree_with(strict):
    fmd, x, y = strict
    clean = fmd.defend(x)
    assert np.mean(clean["verdict"] == 2) >= 0.5  # the toy detector rejects most clean inputs
    blind = adaptive_success(fmd, adaptive_pgd(fmd, x, y, eps=0.3, nb_iter=20,
                                               resistance_weight=0.0), y)
    aware = adaptive_success(fmd, adaptive_pgd(fmd, x, y, eps=0.3, nb_iter=20), y)
    assert aware["success"].mean() >= blind["success"].mean() + 0.15
    assert np.mean(aware["verdict"] == 2) < np.mean(blind["verdict"] == 2)


def test_check_every_keeps_real_successes(strict):
    fmd, x, y = strict
    last = adaptive_pgd(fmd, x, y, eps=0.3, nb_iter=12, eot_samples=2)
    kept = adaptive_pgd(fmd, x, y, eps=0.3, nb_iter=12, eot_samples=2, check_every=4)
    _assert_in_ball(kept, x, 0.3, "linf")
    ok_last = adaptive_success(fmd, last, y)["success"]
    ok_kept = adaptive_success(fmd, kept, y)["success"]
    assert np.all(ok_kept[ok_last])  # same trajectory: a final success is never lost


def test_cw_high_confidence_margins(setup):
    fmd, x, y = setup
    kappa = 5.0
    params = dict(kappa=kappa, max_iterations=50, binary_search_steps=3)
    x_adv = cw_high_confidence_transfer(fmd, x[:6], y[:6], **params)
    _assert_in_ball(x_adv, x[:6], np.inf, "l2")
    logits = fmd.classifier(tf.constant(x_adv), training=False).numpy()
    rows = np.arange(6)
    real = logits[rows, y[:6]]
    logits[rows, y[:6]] = -np.inf
    changed = np.any(x_adv != x[:6], axis=(1, 2, 3))
    assert changed.mean() >= 0.5
    assert np.all(logits.max(axis=1)[changed] - real[changed] >= kappa - 1e-4)
    # Same attack on the bare classifier (the harness passes the classifier), then a budget.
    np.testing.assert_array_equal(
        x_adv, cw_high_confidence_transfer(fmd.classifier, x[:6], y[:6], **params))
    clipped = cw_high_confidence_transfer(fmd, x[:6], y[:6], eps=0.5, **params)
    _assert_in_ball(clipped, x[:6], 0.5, "l2")
    assert ATTACKS["cw_hiconf"].function == "cw_high_confidence_transfer"


def test_argument_checks(setup):
    fmd, x, y = setup
    with pytest.raises(ValueError, match="norm"):
        adaptive_pgd(fmd, x[:1], y[:1], eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="eps"):
        adaptive_resistance(fmd, x[:1], y[:1], eps=0.0)
    with pytest.raises(ValueError, match="morph_source"):
        adaptive_pgd(fmd, x[:1], y[:1], eps=0.1, morph_source="table")
    with pytest.raises(ValueError, match="labels"):
        adaptive_pgd(fmd, x[:2], y[:1], eps=0.1)
    with pytest.raises(NotCalibratedError):
        adaptive_pgd(_defense(fmd.classifier), x[:1], y[:1], eps=0.1)


def test_expand_budgets_names_and_params():
    from fmd_tf.evaluation.harness import expand_budgets

    runs = expand_budgets(["fgsm", "adaptive_pgd", "cw_hiconf"], [0.05, 0.1], [1.5])
    assert runs == [
        ("fgsm", "fgsm", {}),
        ("adaptive_pgd_linf_0.05", "adaptive_pgd", {"eps": 0.05, "norm": "linf"}),
        ("adaptive_pgd_linf_0.1", "adaptive_pgd", {"eps": 0.1, "norm": "linf"}),
        ("adaptive_pgd_l2_1.5", "adaptive_pgd", {"eps": 1.5, "norm": "l2"}),
        ("adaptive_cw_hiconf_linf_0.05", "cw_hiconf", {"eps": 0.05, "norm": "linf"}),
        ("adaptive_cw_hiconf_linf_0.1", "cw_hiconf", {"eps": 0.1, "norm": "linf"}),
        ("adaptive_cw_hiconf_l2_1.5", "cw_hiconf", {"eps": 1.5, "norm": "l2"}),
    ]
    assert expand_budgets(["adaptive_resistance", "apgd_ce"]) == [
        ("adaptive_resistance", "adaptive_resistance", {}), ("adaptive_apgd_ce", "apgd_ce", {})]
    assert expand_budgets(["apgd_dlr"], [0.2]) == [
        ("adaptive_apgd_dlr_linf_0.2", "apgd_dlr", {"eps": 0.2, "norm": "linf"})]
    with pytest.raises(ValueError, match="unknown attack"):
        expand_budgets(["nope"])


def test_expand_budgets_runs_a_pinned_budget_there_only():
    from fmd_tf.evaluation.harness import expand_budgets, known_attack, pinned_budget

    assert pinned_budget("apgd_ce_linf_0.1") == ("apgd_ce", "linf", 0.1)
    assert pinned_budget("adaptive_apgd_ce_linf_0.1") == ("apgd_ce", "linf", 0.1)
    assert pinned_budget("adaptive_pgd_l2_1.5") == ("adaptive_pgd", "l2", 1.5)
    assert pinned_budget("api_hopskipjump_l2_.5") == ("api_hopskipjump", "l2", 0.5)
    for name in ("fgsm_linf_0.1", "api_rays_l2_1.5", "apgd_ce_linf_0", "apgd_ce_linf_",
                 "apgd_ce_linf_0.1x", "apgd_ce", "nope_linf_0.1"):
        assert pinned_budget(name) is None, name
    assert known_attack("apgd_ce") and known_attack("apgd_dlr_linf_0.2")
    assert not known_attack("fgsm_linf_0.1")
    runs = expand_budgets(["adaptive_pgd", "apgd_ce_linf_0.1", "adaptive_apgd_dlr_linf_0.1",
                           "adaptive_pgd_linf_0.1", "apgd_ce_linf_0.1"], [0.1, 0.2], [1.5])
    assert runs == [
        ("adaptive_pgd_linf_0.1", "adaptive_pgd", {"eps": 0.1, "norm": "linf"}),
        ("adaptive_pgd_linf_0.2", "adaptive_pgd", {"eps": 0.2, "norm": "linf"}),
        ("adaptive_pgd_l2_1.5", "adaptive_pgd", {"eps": 1.5, "norm": "l2"}),
        ("adaptive_apgd_ce_linf_0.1", "apgd_ce", {"eps": 0.1, "norm": "linf"}),
        ("adaptive_apgd_dlr_linf_0.1", "apgd_dlr", {"eps": 0.1, "norm": "linf"}),
    ]  # a run named twice (pinned and in the grid, or pinned twice) runs once
    assert expand_budgets(["apgd_ce_l2_3"]) == [
        ("adaptive_apgd_ce_l2_3", "apgd_ce", {"eps": 3.0, "norm": "l2"})]
    with pytest.raises(ValueError, match="NAME_linf_EPS"):
        expand_budgets(["fgsm_linf_0.1"])


def test_harness_defense_aware_cache_covers_the_defense(setup, tmp_path):
    from fmd_tf.evaluation.harness import adversarial_set

    fmd, x, y = setup
    params = dict(eps=0.1, nb_iter=2, eot_samples=2, check_every=None, batch_size=8)
    with pytest.raises(ValueError, match="needs the defense"):
        adversarial_set("adaptive_pgd", fmd.classifier, x[:4], y[:4], None, params=params)
    first, info = adversarial_set("adaptive_pgd", fmd.classifier, x[:4], y[:4], str(tmp_path),
                                  params=params, defense=fmd)
    assert not info["cached"]
    # The harness ran adaptive_pgd on the defense with these parameters (sign steps on
    # near-zero gradients may flip with threaded float sums, hence "almost all pixels").
    assert np.mean(first == adaptive_pgd(fmd, x[:4], y[:4], **params)) > 0.98
    again, info = adversarial_set("adaptive_pgd", fmd.classifier, x[:4], y[:4], str(tmp_path),
                                  params=params, defense=fmd)
    assert info["cached"]
    np.testing.assert_array_equal(again, first)
    # Same classifier, other thresholds: a different defense, so a cache miss.
    other = _defense(fmd.classifier)
    other.set_weights(fmd.get_weights())
    other.theta_r.assign(fmd.theta_r.numpy() + 0.25)
    _, info = adversarial_set("adaptive_pgd", fmd.classifier, x[:4], y[:4], str(tmp_path),
                              params=params, defense=other)
    assert not info["cached"]


def test_ensemble_eot_of_identical_members_equals_the_member(strict):
    """EOT over an ensemble averages the members' terms: two copies of one defense (same
    weights, deterministic morphs) must give that defense's own attack and verdicts."""
    from fmd_tf.defense import FMDefenseEnsemble

    fmd, x, y = strict
    twin = _defense(fmd.classifier)
    twin.set_weights(fmd.get_weights())
    ensemble = FMDefenseEnsemble([fmd, twin], selection_key=(1, 2))
    kwargs = dict(eps=0.3, nb_iter=8, eot_samples=None, morph_source="defense")
    single = adaptive_pgd(fmd, x[:8], y[:8], **kwargs)
    both = adaptive_pgd(ensemble, x[:8], y[:8], **kwargs)
    _assert_in_ball(both, x[:8], 0.3, "linf")
    assert np.mean(single == both) > 0.99
    np.testing.assert_array_equal(adaptive_success(ensemble, both, y[:8])["verdict"],
                                  adaptive_success(fmd, both, y[:8])["verdict"])

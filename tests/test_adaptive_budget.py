"""Adaptive morph budget (sequential test), reduced-precision morphs and `scripts/bench.py`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import TINY_COMBO_CONFIG, script_module, tiny_images
from test_defense import ConstantClassifier, _tiny_defense

import fmd_tf  # noqa: F401
from fmd_tf.config import DefenseConfig
from fmd_tf.defense import FMDefense, precision
from fmd_tf.defense import adaptive_budget as ab
from fmd_tf.models import build_combo_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- the test itself


def test_look_alpha_is_bonferroni_over_interim_looks():
    assert ab.look_alpha(0.01, 100, 10) == pytest.approx(0.01 / 9)
    assert ab.look_alpha(0.01, 8, 3) == pytest.approx(0.01 / 2)
    assert ab.look_alpha(0.01, 10, 10) == pytest.approx(0.01)  # no interim look


def test_stop_decision_exact_binomial_and_curtailment():
    # N = 100, theta = 0.5, alpha' = 0.01 / 9: 10/10 is clear (0.5^10 ~ 1e-3 <= 1.1e-3),
    # 9/10 is not (P(X >= 9) ~ 0.011); 0/10 clearly below; 5/10 undecided.
    k = tf.constant([10, 9, 0, 5, 51, 40])
    n = tf.constant([10, 10, 10, 10, 60, 90])
    theta = tf.constant([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    above, below = ab.stop_decision(k, n, theta, 100, ab.look_alpha(0.01, 100, 10))
    # 51 > 50: surely above (curtailment); 40 + 10 <= 50: surely below.
    np.testing.assert_array_equal(above.numpy(), [1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(below.numpy(), [0, 0, 1, 0, 0, 1])
    # Thresholds outside [0, 1] are settled by curtailment at once.
    above, below = ab.stop_decision(
        tf.constant([0, 10]), tf.constant([10, 10]), tf.constant([-0.05, 1.05]), 100, 0.001
    )
    np.testing.assert_array_equal(above.numpy(), [1, 0])
    np.testing.assert_array_equal(below.numpy(), [0, 1])


def test_sequential_test_on_bernoulli_streams():
    rng = np.random.default_rng(0)
    n = 100
    p = np.array([0.99, 0.01, 0.98, 0.02, 0.5, 0.52, 0.48])
    theta = np.array([0.5, 0.5, 0.6, 0.4, 0.5, 0.5, 0.5], np.float32)
    streams = rng.random((len(p), n)) < p[:, None]
    r, drawn = ab.sequential_test_on_streams(streams, theta, round_size=10, alpha=0.01)
    r, drawn = r.numpy(), drawn.numpy()
    full = streams.mean(axis=1)
    # Clear cases stop early, on the right side of theta.
    assert np.all(drawn[:4] <= 20)
    np.testing.assert_array_equal(r[:4] > theta[:4], full[:4] > theta[:4])
    np.testing.assert_array_equal(r[:4] > theta[:4], [True, False, True, False])
    # Borderline cases run (almost) to N: only curtailment, which is exact, may save the last
    # round(s); their side of theta is the full-budget one, and at N the resistance is too.
    assert np.all(drawn[4:] >= 80)
    np.testing.assert_array_equal(r[4:] > theta[4:], full[4:] > theta[4:])
    at_n = drawn == n
    np.testing.assert_allclose(r[at_n], full[at_n], atol=1e-6)
    # Whole rounds only.
    assert np.all((drawn % 10 == 0) | (drawn == n))
    # A stream sitting exactly on theta never becomes clear: it draws all N.
    alternating = (np.arange(n) % 2 == 0)[None, :]
    r, drawn = ab.sequential_test_on_streams(alternating, np.array([0.5], np.float32), 10, 0.01)
    assert drawn.numpy()[0] == n and r.numpy()[0] == pytest.approx(0.5)


def test_sequential_test_error_rate_is_bounded():
    # p on one side of theta: the share of pairs stopped on the wrong side stays below alpha.
    rng = np.random.default_rng(1)
    pairs, n, alpha = 2000, 100, 0.05
    theta = np.full(pairs, 0.7, np.float32)
    p = np.where(np.arange(pairs) % 2 == 0, 0.75, 0.65)
    streams = rng.random((pairs, n)) < p[:, None]
    r, drawn = ab.sequential_test_on_streams(streams, theta, round_size=10, alpha=alpha)
    early = drawn.numpy() < n
    wrong = early & ((r.numpy() > theta) != (p > theta))
    assert early.mean() > 0.05  # it does stop early sometimes ...
    assert wrong.mean() <= alpha  # ... and rarely on the wrong side


def test_chunked_labels_matches_one_pass():
    latents = tf.constant(np.arange(23 * 3, dtype=np.float32).reshape(23, 3))

    def label_fn(z):
        return tf.argmax(z * tf.constant([1.0, -1.0, 0.5]), axis=-1)

    fn = tf.function(lambda z: ab.chunked_labels(label_fn, z, 5))
    np.testing.assert_array_equal(fn(latents).numpy(), label_fn(latents).numpy())
    assert fn(latents[:0]).shape == (0,)


def test_draw_order_is_a_seeded_permutation():
    order = ab.draw_order("shuffled", 100, seed=0)
    assert order.dtype == np.int32 and sorted(order.tolist()) == list(range(100))
    np.testing.assert_array_equal(order, ab.draw_order("shuffled", 100, seed=0))
    assert not np.array_equal(order, ab.draw_order("shuffled", 100, seed=1))
    assert not np.array_equal(order, np.arange(100))
    assert ab.draw_order("search", 100, seed=0) is None
    with pytest.raises(ValueError, match="draw order"):
        ab.draw_order("random", 100, seed=0)


@pytest.mark.parametrize("kind", ["search", "shuffled"])
def test_adaptive_resistance_draws_morphs_in_the_given_order(kind):
    """Each pair's k/n is the share of label-keeping morphs among the first n of the order."""
    batch, m, n_morphs = 3, 2, 40
    rng = np.random.default_rng(5)
    # The label of a morph is 1 iff its morphed code (code 0 or 1 of d_s = 2) is above 0.
    values = rng.uniform(-1.0, 1.0, size=(batch, m, n_morphs)).astype(np.float32)
    values[0, 0] = np.abs(values[0, 0])  # pair (0, 0) always keeps label 1: stops early
    # Pair (1, 1): the first half of its morphs (search order) keep the label, the rest not.
    values[1, 1] = np.abs(values[1, 1]) * np.where(np.arange(n_morphs) < n_morphs // 2, 1, -1)
    mean = np.full((batch, 2), 0.5, np.float32)
    zu = np.zeros((batch, 1), np.float32)
    label = np.ones(batch, np.int64)

    def label_fn(z):
        morphed = tf.reduce_min(z[:, :2], axis=1)  # the unchanged code stays at 0.5
        return tf.cast(morphed > 0.0, tf.int64)

    order = ab.draw_order(kind, n_morphs, seed=2)
    r, used = ab.adaptive_resistance(
        tf.constant(mean), tf.constant(zu), tf.constant(label), tf.constant([0, 1], tf.int32),
        tf.constant(values), tf.constant([0.5, 0.5]), label_fn, round_size=10, alpha=0.05,
        chunk_size=7, order=order)
    r, used = r.numpy(), used.numpy()
    outcomes = values > 0.0
    ordered = outcomes if order is None else outcomes[..., order]
    assert used[0, 0] == 10 and r[0, 0] == 1.0
    if kind == "search":  # ten label-keeping morphs in a row: stopped above θ = 0.5
        assert used[1, 1] == 10 and r[1, 1] == 1.0
    else:  # the first round samples both halves (5 + 5 for seed 2): no early stop at 1.0
        assert np.sum(order[:10] < n_morphs // 2) == 5
        assert used[1, 1] > 10 and abs(r[1, 1] - 0.5) <= 0.2
    for b in range(batch):
        for i in range(m):
            expected = ordered[b, i, : used[b, i]].mean()
            np.testing.assert_allclose(r[b, i], expected, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- FMDefense


def _sensitive(fmd):
    """Make the tiny (untrained) decoder react to its codes, so that morphs change labels."""
    for layer in fmd.combo_vae.decoder.stack[:2]:
        layer.kernel.assign(layer.kernel * 20.0)
    return fmd


def _state(fmd, theta_r, theta_d=0.05):
    fmd.calibrate(tiny_images(8, seed=1))
    m = fmd.num_codes
    fmd.code_low.assign(np.full(m, -3.0, np.float32))  # wide ranges: morphs differ
    fmd.code_high.assign(np.full(m, 3.0, np.float32))
    fmd.theta_r.assign(np.asarray(theta_r, np.float32))
    fmd.theta_d.assign(theta_d)


MORPHS = dict(num_morphs=40, candidates_per_step=10, max_steps=4)


@pytest.fixture(scope="module")
def full_and_adaptive():
    full = _sensitive(_tiny_defense(**MORPHS))
    # Code 0 and 3 far above their threshold, 1 and 2 near it (half-grid values of N = 40).
    _state(full, [0.5, 0.9125, 0.8875, 0.5])
    adaptive = _sensitive(_tiny_defense(adaptive_budget=True, adaptive_round=10, **MORPHS))
    adaptive.set_weights(full.get_weights())
    x = tiny_images(12, seed=2)
    return full, adaptive, full.defend_with_stats(x), adaptive.defend_with_stats(x)


def test_adaptive_equals_full_budget_where_it_ran_to_n(full_and_adaptive):
    full, adaptive, out_full, out_ada = full_and_adaptive
    used = out_ada["morphs_used"]
    assert used.shape == (12, 4) and used.dtype == np.int32
    np.testing.assert_array_equal(out_full["morphs_used"], np.full((12, 4), 40))
    assert np.all((used % 10 == 0) & (used >= 10) & (used <= 40))
    ran = used == 40
    assert ran.any() and (~ran).any()
    np.testing.assert_array_equal(out_ada["resistance"][ran], out_full["resistance"][ran])
    assert used.sum() < 0.8 * out_full["morphs_used"].sum()
    # Early stops land on the same side of the thresholds; same verdicts on this batch.
    theta = full.theta_r.numpy()
    np.testing.assert_array_equal(out_ada["resistance"] > theta, out_full["resistance"] > theta)
    np.testing.assert_array_equal(out_ada["verdict"], out_full["verdict"])
    assert set(out_full["verdict"].tolist()) >= {0, 2}  # both sides are exercised
    # The numpy APIs agree with each other; `defend` keeps the fixed output keys.
    plain = adaptive.defend(tiny_images(12, seed=2))
    assert set(plain) == set(fmd_tf.defense.OUTPUT_KEYS)
    np.testing.assert_array_equal(plain["resistance"], out_ada["resistance"])


@pytest.mark.parametrize("refine", [0, 2])
def test_replay_on_full_budget_outcomes_equals_the_adaptive_path(full_and_adaptive, refine):
    full, adaptive, out_full, _ = full_and_adaptive
    x = tiny_images(12, seed=2)
    model = adaptive.copy_with(adaptive_refine_codes=refine)
    recorded = model.defend_with_stats(x, outcomes=True)  # full budget whatever the model's
    outcomes = recorded["morph_outcomes"]
    assert outcomes.shape == (12, 4, 40) and outcomes.dtype == bool
    np.testing.assert_array_equal(outcomes.mean(axis=-1).astype(np.float32),
                                  out_full["resistance"])
    np.testing.assert_array_equal(recorded["verdict"], out_full["verdict"])
    replayed, used = model.adaptive_resistance_on_outcomes(outcomes)
    real = model.defend_with_stats(x)
    assert (used < 40).any()  # some pairs stopped early
    np.testing.assert_array_equal(used, real["morphs_used"])
    np.testing.assert_array_equal(replayed, real["resistance"])


def test_budget_row_replays_the_candidate_budget(full_and_adaptive):
    from fmd_tf import operating_point as op

    full, adaptive, out_full, out_ada = full_and_adaptive
    x = tiny_images(12, seed=2)
    outcomes = full.defend_with_stats(x, outcomes=True)["morph_outcomes"]
    sets = {"clean": (outcomes[:6], full.reconstruction_error(x[:6])),
            "fgsm": (outcomes[6:], full.reconstruction_error(x[6:]))}
    row = op.budget_row(full, {"adaptive_budget": True, "adaptive_round": 10}, sets)
    assert row["morphs_per_image"] == out_ada["morphs_used"].sum(axis=1).mean()
    assert row["verdict_agreement"] == np.mean(out_ada["verdict"] == out_full["verdict"])
    assert row["full_morphs_per_image"] == 4 * 40 and set(row["auc_change"]) == {"fgsm"}
    assert "auc_change_interval" not in row and row["auc_change_bound"] == row[
        "max_abs_auc_change"]
    bounded = op.budget_row(full, {"adaptive_budget": True, "adaptive_round": 10}, sets, 0.9)
    low, high = bounded["auc_change_interval"]["fgsm"]
    assert low <= high and bounded["auc_change_level"] == 0.9
    assert bounded["auc_change_bound"] == max(abs(low), abs(high), row["max_abs_auc_change"])
    same = op.budget_row(full, {"adaptive_budget": False}, sets, 0.9)
    assert same["verdict_agreement"] == 1.0 and same["max_abs_auc_change"] == 0.0
    assert same["auc_change_interval"]["fgsm"] == [0.0, 0.0] and same["auc_change_bound"] == 0.0
    assert same["morphs_per_image"] == 4 * 40
    with pytest.raises(ValueError, match="member"):
        _ensemble_like(full).defend_with_stats(x, outcomes=True)


def _ensemble_like(fmd):
    from fmd_tf.defense import FMDefenseEnsemble

    return FMDefenseEnsemble([fmd, fmd.copy_with(seed=fmd.seed + 1)])


def test_finish_pairs_draws_only_the_missing_morphs():
    rng = np.random.default_rng(0)
    outcomes = tf.constant(rng.uniform(size=(5, 40)) < 0.6)
    def count_fn(index, start, size):
        block = tf.gather(tf.cast(outcomes, tf.int32), index)[:, start : start + size]
        return tf.reduce_sum(block, axis=1)

    drawn = tf.constant([10, 20, 40, 10, 30], tf.int32)
    full_prefix = np.cumsum(outcomes.numpy(), axis=1)
    successes = tf.constant([full_prefix[p, d - 1] for p, d in enumerate(drawn.numpy())],
                            tf.int32)
    selected = tf.constant([True, True, True, False, True])
    k, n = ab.finish_pairs(count_fn, successes, drawn, selected, 40, 10)
    np.testing.assert_array_equal(n.numpy(), [40, 40, 40, 10, 40])
    np.testing.assert_array_equal(k.numpy()[[0, 1, 2, 4]], full_prefix[[0, 1, 2, 4], -1])
    assert k.numpy()[3] == successes.numpy()[3]  # not selected: unchanged


@pytest.mark.parametrize("k", [1, 2])
def test_refine_finishes_each_images_deciding_codes(full_and_adaptive, k):
    full, adaptive, out_full, out_ada = full_and_adaptive
    refined = adaptive.copy_with(adaptive_refine_codes=k)
    assert refined.adaptive_refine_codes == k and refined.combo_vae is adaptive.combo_vae
    out = refined.defend_with_stats(tiny_images(12, seed=2))
    theta = full.theta_r.numpy()
    # The k lowest early estimates of r - θr (stable: ties go to the lower code).
    deciding = np.argsort(out_ada["resistance"] - theta, axis=1, kind="stable")[:, :k]
    chosen = np.zeros((12, 4), bool)
    chosen[np.arange(12)[:, None], deciding] = True
    finished = chosen & (out["morphs_used"] == 40)
    np.testing.assert_array_equal(out["resistance"][finished], out_full["resistance"][finished])
    np.testing.assert_array_equal(out["resistance"][~chosen], out_ada["resistance"][~chosen])
    np.testing.assert_array_equal(out["morphs_used"][~chosen], out_ada["morphs_used"][~chosen])
    # The score is that of finishing every chosen pair: the code that sets it has drawn all N.
    finish_all = np.where(chosen, out_full["resistance"], out_ada["resistance"])
    np.testing.assert_array_equal(_score(out["resistance"], theta), _score(finish_all, theta))
    setting = np.argmax(theta - out["resistance"], axis=1)
    assert finished[np.arange(12), setting].all()
    extra = out["morphs_used"].sum() - out_ada["morphs_used"].sum()
    assert 0 <= extra <= 12 * k * (40 - 10)
    with pytest.raises(ValueError, match="adaptive_refine_codes"):
        adaptive.copy_with(adaptive_refine_codes=5)


def _score(resistance, theta):
    return np.max(np.asarray(theta, np.float32) - np.asarray(resistance, np.float32), axis=-1)


def _finish_to_n(outcomes, theta_r, round_size, alpha, refine):
    """The refinement without the dominance stop: the chosen pairs draw all N morphs."""
    batch, m, num_morphs = outcomes.shape
    streams = outcomes.reshape(batch * m, num_morphs)
    theta = np.tile(np.asarray(theta_r, np.float32), batch)
    r, drawn = ab.sequential_test_on_streams(streams, theta, round_size, alpha)
    margin = (r.numpy() - theta).reshape(batch, m)
    lowest = np.argsort(margin, axis=1, kind="stable")[:, :refine]
    chosen = np.zeros((batch, m), bool)
    chosen[np.arange(batch)[:, None], lowest] = True
    r = np.where(chosen.ravel(), streams.mean(axis=1, dtype=np.float32), r.numpy())
    used = np.where(chosen.ravel(), num_morphs, drawn.numpy())
    return r.reshape(batch, m), used.reshape(batch, m)


@pytest.mark.parametrize("seed", range(4))
def test_dominance_stop_keeps_the_score_of_finishing_all_refined_pairs(seed):
    """Random streams: clean-like images (every code near r = 1), attacked-like ones (one or
    more codes near 0) and mixed; thresholds inside and outside [0, 1]."""
    rng = np.random.default_rng(seed)
    batch, m, num_morphs = 64, 5, 40
    p = rng.choice([0.0, 0.03, 0.2, 0.5, 0.9, 0.97, 1.0], size=(batch, m))
    outcomes = rng.random((batch, m, num_morphs)) < p[..., None]
    theta_r = rng.choice([-0.0125, 0.0375, 0.4875], size=m).astype(np.float32)
    for refine in (1, 2, 3):
        r, used = ab.adaptive_resistance_on_outcomes(outcomes, theta_r, 5, 0.01, refine)
        r, used = r.numpy(), used.numpy()
        r_all, used_all = _finish_to_n(outcomes, theta_r, 5, 0.01, refine)
        np.testing.assert_array_equal(_score(r, theta_r), _score(r_all, theta_r))
        np.testing.assert_array_equal(r > theta_r, r_all > theta_r)  # same sides
        assert np.all(used <= used_all) and np.all(used % 5 == 0)
        stopped = used < used_all
        assert stopped.any()  # the stop saves morphs on these streams
        # A stopped pair reports k/n of its first n morphs in draw order.
        prefix = np.array([outcomes[b, i, : used[b, i]].mean()
                           for b, i in zip(*np.nonzero(stopped), strict=True)])
        np.testing.assert_allclose(r[stopped], prefix, rtol=0, atol=1e-6)


def test_dominated_pairs_cannot_set_the_score():
    # One image of 4 pairs, N = 10, θ = -0.05: pair 0 finished with r = 0 (θ - r = -0.05, the
    # most any pair can reach); pair 1, refining with 3 of 5 kept so far, is dominated; so is
    # pair 2 with 0 of 5 (it can at best tie); pair 3 is not refining.
    k = tf.constant([0, 3, 0, 5])
    n = tf.constant([10, 5, 5, 5])
    theta = tf.constant([-0.05, -0.05, -0.05, -0.05])
    refining = tf.constant([True, True, True, False])
    np.testing.assert_array_equal(ab.dominated(k, n, theta, refining, 10, 4).numpy(),
                                  [False, True, True, False])
    # Pair 0 half drawn (3 of 5 kept): no pair's end is known well enough yet.
    k = tf.constant([3, 3, 0, 5])
    n_half = tf.constant([5, 5, 5, 5])
    np.testing.assert_array_equal(ab.dominated(k, n_half, theta, refining, 10, 4).numpy(),
                                  [False, False, False, False])
    # θ = 0.45 for pairs 0 and 1: pair 1 (3 of 5) cannot reach pair 0's 0.45 but its side of θ
    # is still open (3 <= 4.5 < 3 + 5), so it keeps drawing.
    theta = tf.constant([0.45, 0.45, -0.05, -0.05])
    k = tf.constant([0, 3, 0, 5])
    np.testing.assert_array_equal(ab.dominated(k, n, theta, refining, 10, 4).numpy(),
                                  [False, False, True, False])


def test_adaptive_constant_classifier_stops_after_first_round():
    fmd = _tiny_defense(classifier=ConstantClassifier(), adaptive_budget=True, adaptive_round=10,
                        **MORPHS)
    report = fmd.calibrate(tiny_images(8, seed=1))
    # Calibration used the full budget: theta = 1 - 1/(2N), where "above" needs all N morphs.
    np.testing.assert_allclose(report["theta_r"], np.full(4, 1 - 0.5 / 40))
    x = tiny_images(5, seed=2)
    np.testing.assert_array_equal(fmd.defend_with_stats(x)["morphs_used"], 40)
    fmd.theta_r.assign(np.full(4, 0.3, np.float32))
    out = fmd.defend_with_stats(x)
    np.testing.assert_array_equal(out["resistance"], np.ones((5, 4), np.float32))
    np.testing.assert_array_equal(out["morphs_used"], np.full((5, 4), 10))
    np.testing.assert_array_equal(out["verdict"], np.zeros(5))
    np.testing.assert_array_equal(out["label"], np.full(5, 4))


def test_recalibration_uses_full_budget(full_and_adaptive):
    _, adaptive, _, _ = full_and_adaptive
    fresh = _sensitive(_tiny_defense(adaptive_budget=True, **MORPHS))
    fresh.set_weights(adaptive.get_weights())
    ref = _sensitive(_tiny_defense(**MORPHS))
    ref.set_weights(adaptive.get_weights())
    x_val = tiny_images(8, seed=3)
    report = fresh.calibrate(x_val)  # calibrated before: must still draw all N
    expected = ref.calibrate(x_val)
    np.testing.assert_array_equal(report["val_resistance"], expected["val_resistance"])
    np.testing.assert_array_equal(report["theta_r"], expected["theta_r"])


def test_new_arguments_round_trip_and_checks():
    fmd = _tiny_defense(adaptive_budget=True, adaptive_round=3, adaptive_alpha=0.05,
                        morph_dtype="bfloat16")
    config = fmd.get_config()
    assert (config["adaptive_budget"], config["adaptive_round"], config["adaptive_alpha"],
            config["morph_dtype"]) == (True, 3, 0.05, "bfloat16")
    clone = FMDefense.from_config(config)
    assert (clone.adaptive_budget, clone.adaptive_round, clone.adaptive_alpha,
            clone.morph_dtype) == (True, 3, 0.05, "bfloat16")
    # A config written before these options existed loads with the defaults.
    assert config["adaptive_order"] == "shuffled"
    for key in ("adaptive_budget", "adaptive_round", "adaptive_alpha", "morph_dtype",
                "adaptive_order"):
        config.pop(key)
    old = FMDefense.from_config(config)
    assert (old.adaptive_budget, old.adaptive_round, old.adaptive_alpha, old.morph_dtype) == (
        False, 10, 0.01, "float32")
    assert old.adaptive_order == "shuffled"
    assert FMDefense.from_config({**config, "adaptive_order": "search"}).adaptive_order == "search"
    cases = [
        (dict(adaptive_order="radius"), "adaptive_order"),
        (dict(adaptive_round=0), "adaptive_round"),
        (dict(adaptive_alpha=0.0), "adaptive_alpha"),
        (dict(adaptive_alpha=0.5), "adaptive_alpha"),
        (dict(adaptive_budget=True, jit_compile=True), "jit_compile"),
        (dict(morph_dtype="int8"), "morph_dtype"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            _tiny_defense(**kwargs)


def test_from_config_dataclass_passes_new_fields():
    cfg = dataclasses.replace(
        DefenseConfig(), num_morphs=8, candidates_per_step=4, max_steps=4, chunk_size=64,
        adaptive_budget=True, adaptive_round=4, adaptive_alpha=0.02, morph_dtype="float16",
        adaptive_order="search",
    )
    assert DefenseConfig().adaptive_budget is False and DefenseConfig().morph_dtype == "auto"
    combo = build_combo_vae(TINY_COMBO_CONFIG, (28, 28, 1), 10)
    fmd = FMDefense.from_config_dataclass(ConstantClassifier(), combo, cfg)
    assert (fmd.adaptive_budget, fmd.adaptive_round, fmd.adaptive_alpha, fmd.morph_dtype,
            fmd.adaptive_order) == (True, 4, 0.02, "float16", "search")


def test_adaptive_keras_round_trip(full_and_adaptive, tmp_path):
    _, adaptive, _, out = full_and_adaptive
    path = str(tmp_path / "fmd.keras")
    adaptive.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.adaptive_budget and loaded.adaptive_round == 10
    again = loaded.defend_with_stats(tiny_images(12, seed=2))
    for key in ("resistance", "morphs_used", "verdict"):
        np.testing.assert_array_equal(again[key], out[key])


def test_adaptive_savedmodel_export_matches(full_and_adaptive, tmp_path):
    from fmd_tf.export import export_serving

    _, adaptive, _, out = full_and_adaptive
    path = export_serving(adaptive, str(tmp_path / "serving"), version=1)
    fn = tf.saved_model.load(path).signatures["serving_default"]
    served = fn(images=tf.constant(tiny_images(12, seed=2)))
    for key in ("resistance", "verdict", "label"):
        np.testing.assert_array_equal(served[key].numpy(), out[key])
    with pytest.raises(ValueError, match="fixed shapes"):  # XLA needs fixed shapes
        export_serving(adaptive, str(tmp_path / "xla"), version=1, jit_compile=True)
    assert not (tmp_path / "xla" / "1").exists()


def _bf16_ops(fmd):
    graph = fmd._compiled().get_concrete_function(
        tf.TensorSpec([None, 28, 28, 1], tf.float32)).graph.as_graph_def()
    nodes = [n for f in graph.library.function for n in f.node_def] + list(graph.node)
    return {n.op for n in nodes
            if n.op in ("Conv2D", "MatMul", "Conv2DBackpropInput")
            and n.attr["T"].type == tf.bfloat16.as_datatype_enum}


@pytest.mark.parametrize("adaptive", [False, True])
def test_bfloat16_morphs_agree_with_float32(full_and_adaptive, adaptive):
    full = full_and_adaptive[0]
    ref = full_and_adaptive[1 if adaptive else 0]
    bf16 = _sensitive(_tiny_defense(morph_dtype="bfloat16", adaptive_budget=adaptive, **MORPHS))
    bf16.set_weights(full.get_weights())
    x = tiny_images(12, seed=2)
    out, expected = bf16.defend_with_stats(x), ref.defend_with_stats(x)
    assert out["resistance"].dtype == np.float32
    assert np.mean(np.abs(out["resistance"] - expected["resistance"])) < 0.05
    assert np.mean(out["verdict"] == expected["verdict"]) >= 0.75
    # The image's own label and the purifier stay float32: identical.
    np.testing.assert_array_equal(out["classifier_label"], expected["classifier_label"])
    np.testing.assert_array_equal(out["purified"], expected["purified"])
    # The decoder and classifier really ran in bfloat16 (conv, transposed conv, dense), and the
    # models' own policies are back to float32 afterwards.
    assert _bf16_ops(bf16) == {"Conv2D", "MatMul", "Conv2DBackpropInput"}
    assert bf16.classifier.dtype_policy.name == "float32"
    assert bf16.combo_vae.decoder.stack[0].dtype_policy.name == "float32"


def _labels_with(fmd, latents, dtype, margin):
    return precision.morph_labels(fmd.classifier, fmd.combo_vae.decoder, tf.constant(latents),
                                  dtype, margin).numpy()


def test_checked_morph_labels_are_float32_where_the_margin_is_small():
    """Rows whose bfloat16 top-two margin is below the check margin get float32's label, the
    others keep bfloat16's; margin 0 is plain bfloat16, a huge margin is float32 throughout."""
    fmd = _sensitive(_tiny_defense())
    logits = fmd.classifier.logits_layer  # larger logits: margins of all sizes
    logits.kernel.assign(logits.kernel * 30.0)
    latents = np.random.default_rng(0).normal(0.0, 3.0, (400, 7)).astype(np.float32)
    f32 = _labels_with(fmd, latents, "float32", 0.0)
    with precision.mixed_policy((fmd.combo_vae.decoder, fmd.classifier), "bfloat16"):
        outputs = tf.cast(fmd.classifier(fmd.combo_vae.decoder(latents)), tf.float32).numpy()
    top2 = np.sort(outputs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    bf16 = outputs.argmax(axis=1)
    assert (bf16 != f32).any(), "the test needs rows where bfloat16 and float32 differ"
    tau = float(np.median(margin))
    np.testing.assert_array_equal(_labels_with(fmd, latents, "bfloat16", tau),
                                  np.where(margin < tau, f32, bf16))
    np.testing.assert_array_equal(_labels_with(fmd, latents, "bfloat16", 0.0), bf16)
    np.testing.assert_array_equal(_labels_with(fmd, latents, "bfloat16", 1e9), f32)


def test_checked_morph_labels_without_close_calls_skip_the_float32_pass():
    """No row below the margin: the float32 pass is skipped (oneDNN's convolution fails on an
    empty batch), the labels are bfloat16's."""
    fmd = _tiny_defense(ConstantClassifier(), morph_dtype="bfloat16")
    latents = np.zeros((6, 7), np.float32)
    np.testing.assert_array_equal(_labels_with(fmd, latents, "bfloat16", 1.0), np.full(6, 4))


def test_output_margin_is_in_logits_for_logits_and_for_softmax_outputs():
    logits = tf.constant([[2.0, -1.0, 0.5], [0.0, 3.0, 2.9]])
    np.testing.assert_allclose(precision.output_margin(logits), [1.5, 0.1], atol=1e-6)
    np.testing.assert_allclose(precision.output_margin(tf.nn.softmax(logits)), [1.5, 0.1],
                               atol=1e-5)


def test_auto_morph_dtype_follows_the_machine(monkeypatch):
    monkeypatch.setattr(precision, "bfloat16_is_fast", lambda: True)
    assert precision.resolve_dtype("auto") == "bfloat16"
    fmd = _tiny_defense(morph_dtype="auto")
    assert not fmd._xla_compatible()  # checked morphs: data-dependent shapes
    with pytest.raises(ValueError, match="morph_check_margin"):
        _tiny_defense(morph_dtype="auto", jit_compile=True)
    assert _tiny_defense(morph_dtype="auto", morph_check_margin=0.0, jit_compile=True)
    assert fmd.copy_with(**FMDefense.XLA_OPTIONS)._xla_compatible()
    monkeypatch.setattr(precision, "bfloat16_is_fast", lambda: False)
    assert precision.resolve_dtype("auto") == "float32"
    assert _tiny_defense(morph_dtype="auto", jit_compile=True)._xla_compatible()
    assert precision.resolve_dtype("float16") == "float16"
    with pytest.raises(ValueError, match="compute dtype"):
        precision.resolve_dtype("int8")


# ----------------------------------------------------------------------------- bench script

BENCH_KEYS = {
    "device", "settings", "speedup_vs_naive", "roofline_share", "attack_speedup_vs_art",
    "serving_latency", "default_inference", "bfloat16_vs_float32", "xla_on_off", "demo_wall",
    "test_suite",
    "training", "feature_map_celeba_size",
    "peak_rss_mib",
}


def test_bench_missing_model_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--model", str(tmp_path / "none"),
         "--out", str(tmp_path / "bench.json")],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 2
    assert "fmd.keras" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bench.json").exists()


def _bench_module():
    return script_module("scripts/bench.py")


def test_bench_keeps_earlier_sections_only_of_the_same_model_file(tmp_path):
    bench = _bench_module()
    fmd_file = tmp_path / "fmd.keras"
    fmd_file.write_bytes(b"model r2")
    # SHA-256 of the 8 bytes above (hashlib.sha256(b"model r2").hexdigest()).
    sha = bench._file_sha256(fmd_file)
    assert sha == "9433b0f90b6d4a732fee8f723a5e5dcf60b4bd2e451bce57a64154e12588c50a"
    out = tmp_path / "bench.json"
    settings = {"model": "m", "n": 256, "attack_n": 100, "quick": False, "fmd_sha256": sha}
    out.write_text(json.dumps({"settings": settings, "roofline_share": {"value": 0.6}}))
    args = dataclasses.make_dataclass("Args", ["out", "model", "n", "attack_n", "quick",
                                               "fmd_sha256"])
    same = args(str(out), "m", 256, 100, False, sha)
    assert bench._earlier_sections(same, ["roofline_share"]) == {"roofline_share": {"value": 0.6}}
    fmd_file.write_bytes(b"model r3")  # retrained in place: same path, other bytes
    retrained = args(str(out), "m", 256, 100, False, bench._file_sha256(fmd_file))
    with pytest.raises(bench.UsageError, match="fmd_sha256 differs.*sections that run it "
                                               r"\(roofline\)"):
        bench._earlier_sections(retrained, ["roofline_share"])
    # Sections that do not run fmd.keras (the test suite) are kept for the new file.
    out.write_text(json.dumps({"settings": settings, "test_suite": {"seconds": 300.0}}))
    assert bench._earlier_sections(retrained, ["test_suite", "roofline_share"]) == {
        "test_suite": {"seconds": 300.0}}
    # A bench written before the fingerprint existed is not carried over either.
    del settings["fmd_sha256"]
    out.write_text(json.dumps({"settings": settings, "roofline_share": {"value": 0.6}}))
    with pytest.raises(bench.UsageError, match="fmd_sha256 differs"):
        bench._earlier_sections(same, ["roofline_share"])


def test_bench_xla_section_times_both_settings(quick_model, tmp_path):
    from fmd_tf.evaluation import bench

    cfg = bench.BenchConfig(model=str(quick_model), out=str(tmp_path / "bench.json"), n=4,
                            naive_n=1, attack_n=4, default_n=4, batch_size=2,
                            latency_reps=(2, 1), matmul_size=256, sections=("xla",))
    ctx = bench.prepare(cfg)
    xla = bench.section_xla(ctx)
    assert xla["gpu"] == bool(tf.config.list_physical_devices("GPU")) and xla["images"] == 4
    assert (xla["xla_off"]["jit_compile"], xla["xla_on"]["jit_compile"]) == (False, True)
    for name in ("xla_off", "xla_on", "default"):
        assert xla[name]["images_per_s"] > 0 and xla[name]["first_call_seconds"] > 0
        assert xla[name]["batch_1"]["reps"] == 2 and xla[name]["batch_1"]["p50_ms"] > 0
    assert xla["xla_throughput_ratio"] == pytest.approx(
        xla["xla_on"]["images_per_s"] / xla["xla_off"]["images_per_s"])
    assert xla["xla_batch_1_p50_ratio"] == pytest.approx(
        xla["xla_off"]["batch_1"]["p50_ms"] / xla["xla_on"]["batch_1"]["p50_ms"])
    # The same maths with and without XLA (a near-tie morph may flip: not a verdict of 4).
    assert xla["xla_verdict_agreement"] >= 0.75
    table = bench.format_table({**ctx["report"], "xla_on_off": xla, "peak_rss_mib": 1.0})
    assert "xla_throughput_ratio" in table


@pytest.mark.slow
def test_bench_quick_end_to_end(quick_model, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--model", str(quick_model),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert BENCH_KEYS <= set(report)
    assert report["settings"]["quick"] is True
    assert report["speedup_vs_naive"]["value"] > 0
    # Same maths as the naive loop (a near-tie label may flip between kernels: allow 2 of N).
    n_morphs = report["settings"]["num_morphs"]
    assert report["speedup_vs_naive"]["naive_max_abs_resistance_diff"] <= 2 / n_morphs + 1e-6
    assert 0 < report["roofline_share"]["value"] < 1.5
    serving = report["serving_latency"]
    for budget in ("full_budget", "default"):
        for key in ("in_process_batch_1", "grpc_batch_1", "in_process_batch_64", "grpc_batch_64"):
            lat = serving[budget][key]
            assert 0 < lat["p50_ms"] <= lat["p99_ms"]
    assert set(serving["ratios"]) == set(serving["default"])
    default = report["default_inference"]
    assert 0 < default["mean_morphs_per_image"]["default"] <= \
        default["mean_morphs_per_image"]["full_budget"] == report["settings"]["num_morphs"] * \
        report["settings"]["num_codes"]
    assert 0.0 <= default["verdict_agreement"] <= 1.0 and default["profile_top_ops"]["default"]
    assert default["images"] == {"clean": 16, "fgsm": 16}
    fm = report["feature_map_celeba_size"]  # the CelebA-size feature-map model
    assert fm["image_shape"] == [64, 64, 3] and fm["latent"] == "feature_map"
    assert fm["classifier_step_ms"] > 0 and all(v > 0 for v in fm["vae_step_ms"].values())
    assert fm["defense"]["images"] == 2 and fm["defense"]["images_per_s"] > 0
    for section, parts in (("demo_wall", ("default", "full_budget")), ("test_suite", (None,))):
        peaks = report[section]["matmul_peak_flops"]  # measured right before and after it
        assert peaks["before"] > 0 and peaks["after"] > 0
        for name in parts:
            part = report[section][name] if name else report[section]
            assert part["seconds"] > 0
            assert part["seconds_at_reference_peak"] == pytest.approx(
                part["seconds"] * (peaks["before"] + peaks["after"]) / 2 / 220e9)
    bf16 = report["bfloat16_vs_float32"]
    assert 0.0 <= bf16["verdict_agreement"] <= 1.0
    checked = bf16["checked"]
    assert 0 <= checked["morph_outcomes_differing"] <= checked["morph_outcomes"] == \
        2 * 16 * report["settings"]["num_morphs"] * report["settings"]["num_codes"]
    assert checked["throughput_ratio"] > 0 and checked["morph_check_margin"] > 0
    train = report["training"]
    assert train["classifier_step_ms"]["float32"] > 0 and train["vae_step_ms"]["in_loss"] > 0
    assert train["vae_step_ms"]["code_use_cost"] > 0 and train["vae_step_ms"]["code_use_weight"] > 0
    assert train["budget_trial"]["replay_identical_to_model"] is True
    assert report["peak_rss_mib"] > 0
    attacks = report["attack_speedup_vs_art"]
    assert attacks.get("skipped") or {"deepfool", "carlini_wagner_l2"} <= set(attacks)
    assert "| " in proc.stdout  # the printed table


def test_fm_scores_ties_values_equal_in_exact_arithmetic():
    from fmd_tf.evaluation.harness import fm_scores
    from fmd_tf.evaluation.metrics import roc_auc

    theta = np.array([-0.005, 0.025], np.float32)
    # Both rows score -0.945 exactly (0.025 - 0.97 = -0.005 - 0.94), not in float32.
    r = np.array([[0.94, 1.0], [1.0, 0.97]], np.float32)
    assert np.max(theta - r[0]) != np.max(theta - r[1])
    scores = fm_scores({"resistance": r}, theta)
    assert scores[0] == scores[1] == -0.945
    assert roc_auc(scores[:1], scores[1:]) == 0.5  # a tie, whichever side each row is on
    np.testing.assert_array_equal(fm_scores({"resistance": r}, np.stack([theta, theta])), scores)

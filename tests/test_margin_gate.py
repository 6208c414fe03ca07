"""The classifier-margin gate (`margin_fpr`, θm): calibration, verdicts, files saved before it,
cache keys, stored-output re-verdicts and the adaptive attacks' surrogate of it."""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import tiny_images
from test_defense import _tiny_defense

from fmd_tf.defense import calibration
from fmd_tf.defense.fm_defense import decide
from fmd_tf.evaluation import harness


def test_logit_margin_is_top1_minus_top2():
    logits = [[1.0, 5.0, 2.0], [3.0, 3.0, -1.0], [-2.0, -7.0, -4.0]]
    np.testing.assert_allclose(calibration.logit_margin(logits).numpy(), [3.0, 0.0, 2.0])


def test_margin_threshold_hand_example_and_off():
    margins = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 1.0, 0.4, 0.8, 0.6])
    # fpr 0.2 of 10 images: at most 2 may be below θm -> θm = third smallest = 0.3.
    assert calibration.margin_threshold(margins, 0.2) == 0.3
    assert np.sum(margins < 0.3) == 2
    # fpr 0.05: none may be below -> θm = the smallest margin, which is not below it.
    assert calibration.margin_threshold(margins, 0.05) == 0.1
    assert calibration.margin_threshold(margins, 0.0) == -np.inf  # gate off
    with pytest.raises(ValueError, match="margin_fpr"):
        calibration.margin_threshold(margins, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        calibration.margin_threshold([], 0.1)


def test_margin_gate_rejects_whatever_the_resistance():
    resistance = [[0.9, 0.9], [0.9, 0.9], [0.45, 0.9]]
    margin = tf.constant([2.0, 0.2, 0.1])
    verdict, _ = decide(resistance, [0.5, 0.3], 0.1, None, None, margin, 0.5)
    np.testing.assert_array_equal(verdict.numpy(), [0, 2, 2])
    verdict, _ = decide(resistance, [0.5, 0.3], 0.1, None, None, margin, -np.inf)
    np.testing.assert_array_equal(verdict.numpy(), [0, 0, 1])


@pytest.fixture(scope="module")
def gated():
    fmd = _tiny_defense(margin_fpr=0.25)
    x_val = tiny_images(24, seed=3)
    return fmd, fmd.calibrate(x_val), x_val


def test_calibrate_sets_theta_m_at_the_clean_quantile(gated):
    fmd, report, x_val = gated
    margins = fmd.logit_margins(x_val)
    theta_m = float(fmd.theta_m.numpy())
    assert report["theta_m"] == pytest.approx(theta_m)
    assert theta_m == pytest.approx(calibration.margin_threshold(margins, 0.25))
    assert report["val_margin_rejected_rate"] == pytest.approx(np.mean(margins < theta_m))
    assert 0.0 < report["val_margin_rejected_rate"] <= 0.25
    # Every VAL image under θm is rejected by the defense itself.
    out = fmd.defend(x_val)
    low = margins < theta_m
    assert np.all(out["verdict"][low] == 2) and np.all(out["label"][low] == -1)
    assert report["val_false_positive_rate"] == pytest.approx(np.mean(out["verdict"] != 0))


def test_gate_off_sets_no_threshold_and_keeps_the_old_fingerprint():
    fmd = _tiny_defense()
    report = fmd.calibrate(tiny_images(24, seed=3))
    assert report["theta_m"] is None and float(fmd.theta_m.numpy()) == -np.inf
    assert report["val_margin_rejected_rate"] == 0.0
    # The fingerprint a defense had before the gate existed: its weights without θm and its
    # config without margin_fpr.
    weights = [w.numpy() for w in fmd.weights if not w.path.endswith("theta_m")]
    config = {k: v for k, v in fmd.get_config().items() if k != "margin_fpr"}
    h = __import__("hashlib").sha256(harness.classifier_fingerprint(fmd, weights).encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    assert harness.defense_fingerprint(fmd) == h.hexdigest()[:16]
    # A gate that is on is part of the key.
    on = fmd.copy_with(margin_fpr=0.25)
    on.theta_m.assign(0.1)
    assert harness.defense_fingerprint(on) != harness.defense_fingerprint(fmd)


def test_a_file_saved_before_the_gate_loads_with_it_off(gated, tmp_path):
    fmd, _, x_val = gated
    assert np.isfinite(fmd.theta_m.numpy())
    off = fmd.copy_with(margin_fpr=0.0)
    off.theta_m.assign(-np.inf)
    path = tmp_path / "new.keras"
    off.save(path)
    # The same file as one written before θm existed: its last state weight removed.
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "model.weights.h5":
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "a") as h5:
                    assert "vars/7" in h5 and "vars/8" not in h5
                    del h5["vars/7"]
                data = buffer.getvalue()
            if name == "config.json":
                config = json.loads(data)
                del config["config"]["margin_fpr"]
                data = json.dumps(config).encode()
            dst.writestr(name, data)
    loaded = keras.models.load_model(old)
    assert float(loaded.theta_m.numpy()) == -np.inf and loaded.margin_fpr == 0.0
    np.testing.assert_array_equal(loaded.theta_r.numpy(), off.theta_r.numpy())
    np.testing.assert_array_equal(loaded.search_table.numpy(), off.search_table.numpy())
    for key in ("verdict", "label"):
        np.testing.assert_array_equal(loaded.defend(x_val)[key], off.defend(x_val)[key])
    # A file with θm keeps it.
    path_on = tmp_path / "on.keras"
    fmd.save(path_on)
    assert float(keras.models.load_model(path_on).theta_m.numpy()) == pytest.approx(
        float(fmd.theta_m.numpy()))


def test_reverdict_applies_the_margin_gate(gated):
    fmd, _, _ = gated
    x = tiny_images(30, seed=9)
    out = fmd.defend(x)
    stored = {**out, "purified_label": harness.purified_labels(fmd, x, batch_size=16),
              "margin": fmd.logit_margins(x)}
    thresholds = (fmd.theta_r.numpy(), float(fmd.purify_threshold().numpy()),
                  float(fmd.theta_e.numpy()))
    again = harness.reverdict(stored, *thresholds, float(fmd.theta_m.numpy()))
    np.testing.assert_array_equal(again["verdict"], out["verdict"])
    np.testing.assert_array_equal(again["label"], out["label"])
    assert np.any(stored["margin"] < fmd.theta_m.numpy())
    without = harness.reverdict(stored, *thresholds)
    assert np.sum(without["verdict"] == 2) < np.sum(again["verdict"] == 2)


class _Gate:
    def __init__(self, theta_m):
        self.theta_m = tf.constant(theta_m, tf.float32)


def test_adaptive_margin_penalty_only_on_misclassified_low_margin_rows():
    from fmd_tf.attacks.adaptive import _margin_gate_penalty

    y = tf.one_hot([0, 0, 0], 3)
    logits = tf.constant([[4.0, 1.0, 0.0],    # right: no penalty whatever the margin
                          [0.0, 1.0, 0.9],    # wrong by 0.1 < θm 1: penalised
                          [0.0, 5.0, 0.0]])   # wrong by 5 > θm 1: ~0
    pen = _margin_gate_penalty(_Gate(1.0), logits, y, 0.05, 0.05).numpy()
    assert pen[0] == 0.0
    np.testing.assert_allclose(pen[1], 1.0 + 0.05 - 0.1, atol=1e-3)  # hinge: θm + δ - m
    assert pen[2] < 1e-6
    off = _margin_gate_penalty(_Gate(-np.inf), logits, y, 0.05, 0.05).numpy()
    np.testing.assert_array_equal(off, [0.0, 0.0, 0.0])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = tf.reduce_sum(_margin_gate_penalty(_Gate(-np.inf), logits, y, 0.05, 0.05))
    assert np.all(np.isfinite(tape.gradient(value, logits).numpy()))


def test_adaptive_apgd_runs_on_a_gated_defense(gated):
    from fmd_tf.attacks.apgd import adaptive_apgd

    fmd, _, _ = gated
    x = tiny_images(6, seed=11)
    y = np.argmax(fmd.classifier(x).numpy(), axis=-1)
    x_adv = adaptive_apgd(fmd, x, y, eps=0.1, nb_iter=3, eot_samples=2, batch_size=6)
    assert x_adv.shape == x.shape and np.all(np.isfinite(x_adv))
    assert np.max(np.abs(x_adv - x)) <= 0.1 + 1e-6


def test_wrong_margin_loss_hand_example():
    from fmd_tf.attacks.apgd import wrong_margin_loss

    y = tf.one_hot([0, 0, 0], 3)
    logits = [[4.0, 1.0, 0.0],    # right: best wrong (1) minus the true class: -3
              [0.0, 1.0, 0.9],    # wrong: class 1 leads class 2 by 0.1
              [2.0, 5.0, 0.0]]    # wrong: class 1 leads the true class by 3
    np.testing.assert_allclose(wrong_margin_loss(logits, y).numpy(), [-3.0, 0.1, 3.0],
                               atol=1e-6)


def test_margin_apgd_reaches_confident_wrong_labels_the_gate_lets_through(gated):
    """On the classifier alone, APGD with the wrong-class margin loss ends where more of the
    misclassified images pass a margin gate than APGD-CE's (which stops at the boundary)."""
    from fmd_tf.attacks.apgd import apgd, wrong_margin_loss

    fmd, _, _ = gated
    x = tiny_images(16, seed=12)
    y = np.argmax(fmd.classifier(x).numpy(), axis=-1)
    onehot = tf.one_hot(y, 10)
    margins = {loss: wrong_margin_loss(fmd.classifier(apgd(fmd.classifier, x, y, eps=0.3,
                                                           loss=loss, nb_iter=20)),
                                       onehot).numpy()
               for loss in ("ce", "margin")}
    assert np.mean(margins["margin"] > 0) >= 0.8  # misclassified
    assert np.median(margins["margin"]) > np.median(margins["ce"])


def test_operating_point_table_thresholds_the_margin_gate_on_val(gated, tmp_path):
    from fmd_tf.operating_point import OperatingPointConfig, operating_point_table

    fmd, report, x_val = gated
    y_val = np.argmax(fmd.classifier(x_val).numpy(), axis=-1)
    y_val[:4] = (y_val[:4] + 1) % 10  # a few clean errors
    cfg = OperatingPointConfig(attacks=("fgsm",), n_attack=8, modes=("per_code",),
                               rhos=(0.9,), gate_metrics=(("mae", None),),
                               gate_budgets=(0.0,), margin_budgets=(0.0, 0.25))
    table = operating_point_table(fmd, x_val, y_val, report["val_resistance"], cfg,
                                  str(tmp_path / "cache"))
    off, on = table["rows"]
    assert (off["margin_fpr"], off["theta_m"]) == (0.0, None)
    margins = fmd.logit_margins(x_val)
    assert on["margin_fpr"] == 0.25
    assert on["theta_m"] == pytest.approx(calibration.margin_threshold(margins, 0.25))
    # The gate only adds rejections: more clean VAL flagged, no attacked image less defended.
    assert on["val_clean_flagged"] > off["val_clean_flagged"]
    assert on["val_fgsm_defended_accuracy"] >= off["val_fgsm_defended_accuracy"]
    # The row at the defense's own point (margin 0.25) is what its calibration gives.
    assert on["val_clean_flagged"] == pytest.approx(report["val_false_positive_rate"])


def test_a_detector_that_cannot_flag_is_left_out_of_the_adaptive_objective():
    """θr all below 0 flags nothing: the objective no longer depends on the EOT morph draw
    (the seed); with a θr >= 0 it does."""
    from fmd_tf.attacks import adaptive

    fmd = _tiny_defense()
    fmd.calibrate(tiny_images(24, seed=3))
    x = tf.constant(tiny_images(4, seed=5))
    y = tf.one_hot(np.argmax(fmd.classifier(x).numpy(), axis=-1), 10)
    params = adaptive._params(kappa=5.0, resistance_weight=10.0, resistance_margin=0.05,
                              tau=0.05, temperature=1.0, purified_weight=0.0)
    objective = adaptive._objective(fmd, "defense", 1, "fresh", False)

    def values(theta_r):
        fmd.theta_r.assign(np.full(fmd.num_codes, theta_r, np.float32))
        return [objective(x, y, y, tf.constant([s, 0]), params).numpy() for s in (1, 2)]

    never = values(-0.1)
    np.testing.assert_array_equal(never[0], never[1])
    can = values(0.9)
    assert not np.array_equal(can[0], can[1])
    assert np.all(can[0] < never[0])  # a detector that flags costs the attacker


def test_the_served_saved_model_applies_the_margin_gate(gated, tmp_path):
    from fmd_tf.export import export_serving

    fmd, _, _ = gated
    x = tiny_images(12, seed=13)
    reference = fmd.defend(x)
    assert np.any((fmd.logit_margins(x) < fmd.theta_m.numpy()) & (reference["verdict"] == 2))
    path = export_serving(fmd, tmp_path)
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_array_equal(out["verdict"].numpy(), reference["verdict"])
    np.testing.assert_array_equal(out["label"].numpy(), reference["label"])


def test_robust_operating_point_is_chosen_with_apgd_and_the_margin_gate(gated, tmp_path):
    """`operating_point="robust"`: the table rule on the robust grid (APGD-CE/-DLR/-margin made
    on VAL at the classifier's radius, the margin gate's budgets, a 1-point clean budget),
    applied to the defense."""
    import json

    from fmd_tf.operating_point import choose_row, grid, select_operating_point

    fmd, report, x_val = gated
    y_val = np.argmax(fmd.classifier(x_val).numpy(), axis=-1)
    y_val[:3] = (y_val[:3] + 1) % 10
    cfg = grid("robust", fast=True, robust_eps=0.05)
    point, _, entry = select_operating_point(fmd, x_val, y_val, report["val_resistance"],
                                             "robust", cfg=cfg, cache_dir=str(tmp_path))
    attacks = ["classifier_apgd_ce", "classifier_apgd_dlr", "classifier_apgd_margin"]
    assert entry["rule"].startswith("robust:") and entry["attacks"]["names"] == attacks
    assert "at L∞ 0.05," in entry["rule"] and entry["settings"]["attack_eps"] == 0.05
    made = sorted(tmp_path.glob("classifier_apgd_*.npz"))
    assert len(made) == 3
    for path in made:  # each VAL attack was made at the classifier's radius, not the table's
        key = json.loads(np.load(path)["key"].item())
        assert key["params"]["eps"] == 0.05 and key["params"]["norm"] == "linf"
        x_adv = np.load(path)["x_adv"]
        assert np.max(np.abs(x_adv - x_val[: len(x_adv)])) <= 0.05 + 1e-5
    assert cfg.clean_cost == 0.01 and entry["settings"]["clean_cost"] == 0.01
    rows = entry["rows"]
    assert {row["margin_fpr"] for row in rows} == {0.0, 0.005, 0.01, 0.02, 0.03, 0.05}
    assert entry["chosen_row"] == choose_row(rows, attacks, entry["classifier_val_accuracy"],
                                             0.01)
    chosen = rows[entry["chosen_row"]]
    assert (point.margin_fpr, point.rho, point.recon_fpr) == (
        chosen["margin_fpr"], chosen["rho"], chosen["recon_fpr"])
    assert point.suspicious == fmd.suspicious  # only the operating point moves

"""The shipped Fashion-MNIST model: it loads with this code, and its card describes it."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest

import fmd_tf  # noqa: F401  (registers the Keras classes)

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "saved_models", "fmnist")


@pytest.fixture(scope="module")
def shipped():
    with open(os.path.join(MODEL, "model_card.json")) as f:
        card = json.load(f)
    return keras.models.load_model(os.path.join(MODEL, "fmd.keras")), card


def test_shipped_model_loads_and_its_card_says_how_it_was_built(shipped):
    """The combo-VAE and the defense were trained by train.py with the package's defaults on
    the classifier kept in this directory (trained earlier by `train.py --dataset fmnist`);
    the card records that classifier's checksum, and every class-shared code is in use."""
    fmd, card = shipped
    assert fmd.is_calibrated and fmd._image_shape == (28, 28, 1)
    runs = card["runs"]
    assert runs[0]["command"].startswith("python scripts/train.py --dataset fmnist --classifier "
                                         "saved_models/fmnist/classifier.keras ")
    assert runs[0]["stages"] == ["dgmm", "vae", "defense"]
    for run in runs[1:]:  # later runs only recalibrated the defense
        assert run["stages"] == ["defense"], run
    assert card["command"] == runs[-1]["command"]
    assert card["classifier_path"] == "saved_models/fmnist/classifier.keras"
    assert "classifier.keras" in card["artifacts"]
    codes = card["latent_codes"]
    assert codes["num_active"] == codes["num_codes"] == fmd.combo_vae.shared_dim
    assert min(codes["sweep_pixel_change"]) >= codes["active_pixel_change"]
    assert os.path.isfile(os.path.join(MODEL, "serving", "1", "saved_model.pb"))


def test_shipped_operating_point_is_the_cards(shipped):
    fmd, card = shipped
    point = card["operating_point"]
    assert point["rule"].startswith("auto")
    for key, value in point["options"].items():
        assert getattr(fmd, key) == pytest.approx(value) if isinstance(value, float) \
            else getattr(fmd, key) == value, key
    row = point["rows"][point["chosen_row"]]
    # The rule's clean budget: within 2 points of the classifier on VAL.
    assert row["val_clean_defended_accuracy"] >= point["classifier_val_accuracy"] - 0.02 - 1e-9
    assert card["calibration"]["theta_r"] == pytest.approx(fmd.theta_r.numpy().tolist())
    budget = point["budget"]  # the default inference path, chosen on VAL
    assert budget["options"], "the shipped model should use a reduced morph budget"
    for key, value in budget["options"].items():
        assert getattr(fmd, key) == value, key
    chosen = next(row for row in budget["rows"] if row["options"] == budget["options"])
    assert chosen["verdict_agreement"] >= 0.995 and chosen["auc_change_bound"] <= 0.005


def test_shipped_files_are_the_ones_the_card_describes():
    from fmd_tf.loading import load_defense, verify_artifacts

    checked = verify_artifacts(MODEL)
    assert {"classifier.keras", "combo_vae.keras", "fmd.keras", "serving/1"} <= set(checked)
    assert load_defense(MODEL).is_calibrated


def test_shipped_robust_model_is_a_trades_classifier_under_its_own_combo_vae_copy():
    """saved_models/fmnist_robust (README "Security caveat"): a TRADES classifier, FM-Defense
    calibrated on top with the combo-VAE shipped before the current one (train.py --combo-vae;
    a copy in fmnist_robust/combo_vae.keras), rejecting suspicious inputs (an attacker who
    knows the defense steers the purifier's label)."""
    from fmd_tf.evaluation.robustness import CHECK_IMAGES, CHECK_STEPS
    from fmd_tf.loading import load_defense, verify_artifacts

    robust = os.path.join(os.path.dirname(MODEL), "fmnist_robust")
    with open(os.path.join(robust, "model_card.json")) as f:
        card = json.load(f)
    assert card["hyperparameters"]["classifier"]["training"] == "trades"
    check = card["classifier_val_robustness"]  # scripts/train.py's APGD check on VAL
    assert (check["n"], check["nb_iter"]) == (CHECK_IMAGES, CHECK_STEPS)
    assert not check["masking_suspected"]
    assert check["eps"] == card["hyperparameters"]["classifier"]["adversarial_eps"]
    assert card["hyperparameters"]["defense"]["suspicious"] == "reject"
    assert [run["stages"] for run in card["runs"]] == [["classifier"], ["defense"], ["defense"]]
    assert all("--combo-vae saved_models/fmnist/combo_vae.keras" in run["command"]
               for run in card["runs"][1:])
    assert card["combo_vae_source"]["sha256"] == card["artifacts"]["combo_vae.keras"]["sha256"]
    assert {"classifier.keras", "combo_vae.keras", "fmd.keras", "serving/1"} <= \
        set(verify_artifacts(robust))
    fmd = load_defense(robust)
    assert fmd.is_calibrated and fmd.suspicious == "reject"
    # The operating point was chosen on VAL with scripts/operating_points.py (docs/results.md)
    # and set with --operating-point config: a classifier-margin gate, served with the adaptive
    # morph budget (no θr can flag, so no verdict depends on the budget).
    assert card["operating_point"]["rule"] == "config"
    assert fmd.margin_fpr > 0 and np.isfinite(fmd.theta_m.numpy()) and fmd.adaptive_budget
    assert all(t < 0 for t in card["calibration"]["theta_r"])

"""`fmd_tf.fit_defense` end to end on data the package did not design for, its input checks,
the operating-point rule and the shape-following architecture."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import fmd_tf
from fmd_tf import operating_point as op
from fmd_tf import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sequential(shape, k, seed=0):
    """A plain Keras classifier built outside the package (logits)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input(shape), keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(k)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def coloured_squares(n, seed=0, size=32):
    """float32 [n, size, size, 3] in [0, 1]: a square on a dim noisy background whose colour
    channel is the class (3 classes), with random position and side; labels int64 [n]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.uniform(0.0, 0.2, (n, size, size, 3)).astype(np.float32)
    for i in range(n):
        side = rng.integers(size // 4, size // 2)
        r, c = rng.integers(0, size - side, 2)
        x[i, r : r + side, c : c + side, y[i]] = rng.uniform(0.7, 1.0)
    return x, y.astype(np.int64)


def _fresh_process(code, *args, lines=1):
    """The JSON of the last `lines` lines `python -c code args` prints (one: the object)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.strip().splitlines()[-lines:]]
    return out[0] if lines == 1 else out


SERVE = (
    "import sys, json, numpy as np, tensorflow as tf\n"
    "m = tf.saved_model.load(sys.argv[1]); x = np.load(sys.argv[2])\n"
    "out = m.signatures['serving_default'](images=tf.constant(x))\n"
    "print(json.dumps({k: out[k].numpy().tolist() for k in ('verdict', 'label')}))\n"
)


def test_fit_defense_on_digits_with_a_sequential_classifier(tmp_path):
    import tensorflow as tf

    from fmd_tf.data import load_dataset

    (x_train, y_train), (x_test, y_test) = load_dataset("digits")
    assert x_train.shape[1:] == (8, 8, 1)
    clf = _sequential((8, 8, 1), 10)
    clf.fit(x_train, y_train, epochs=3, verbose=0)
    half = len(x_test) // 2
    fmd = fmd_tf.fit_defense(clf, (x_train, y_train), (x_test[:half], y_test[:half]),
                             preset="fast", out_dir=str(tmp_path / "def"), verbose=0)
    assert fmd.is_calibrated and fmd._image_shape == (8, 8, 1)
    card = json.loads((tmp_path / "def" / "model_card.json").read_text())
    point = card["operating_point"]
    assert point["rule"].startswith("auto") and point["rows"]
    chosen = point["rows"][point["chosen_row"]]
    assert fmd.rho == chosen["rho"] and fmd.recon_fpr == chosen["recon_fpr"]
    budget = point["budget"]  # the inference budget, chosen on the same VAL images
    assert budget["rows"] and fmd.adaptive_budget == bool(budget["options"])
    for row in budget["rows"]:
        assert 0 < row["morphs_per_image"] <= row["full_morphs_per_image"]
        assert row["full_morphs_per_image"] == fmd.num_codes * fmd.num_morphs
        assert 0.0 <= row["verdict_agreement"] <= 1.0 and set(row["auc_change"]) == {"fgsm", "pgd"}
    for key, value in budget["options"].items():
        assert getattr(fmd, key) == value
    assert card["image_shape"] == [8, 8, 1] and card["num_classes"] == 10
    x = x_test[half : half + 12]
    out = fmd.defend(x)
    assert set(out["verdict"].tolist()) <= {0, 1, 2}
    fmd_tf.export_saved_model(fmd, str(tmp_path / "serving" / "1"))
    # Loaded here; the RGB test below serves its SavedModel from a process without fmd_tf.
    served = tf.saved_model.load(str(tmp_path / "serving" / "1")).signatures["serving_default"](
        images=tf.constant(x))
    assert served["verdict"].numpy().tolist() == out["verdict"].tolist()
    assert served["label"].numpy().tolist() == out["label"].tolist()
    with pytest.raises(FileExistsError, match="already holds"):
        fmd_tf.fit_defense(clf, (x_train, y_train), (x_test[:half], y_test[:half]),
                           preset="fast", out_dir=str(tmp_path / "def"), verbose=0)


def test_fit_defense_on_rgb_images_from_a_dataset(tmp_path):
    import tensorflow as tf

    x_train, y_train = coloured_squares(384, seed=0)
    x_val, y_val = coloured_squares(96, seed=1)
    clf = _sequential((32, 32, 3), 3, seed=1)
    clf.fit(x_train, y_train, epochs=2, verbose=0)
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(64)
    fmd = fmd_tf.fit_defense(clf, train, (x_val, y_val), preset="fast",
                             operating_point="paper", out_dir=str(tmp_path / "rgb"), verbose=0)
    assert fmd.rho == 0.999 and fmd.recon_fpr == 0.0 and fmd._image_shape == (32, 32, 3)
    x = x_val[:6]
    out = fmd.defend(x)
    assert out["purified"].shape == (6, 32, 32, 3)
    np.save(tmp_path / "x.npy", x)
    fmd_tf.export_saved_model(fmd, str(tmp_path / "serving" / "3"))
    # One new process: the .keras file through Keras, then the SavedModel (SERVE's argv).
    code = ("import sys, json, keras, numpy as np, fmd_tf\n"
            "m = keras.models.load_model(sys.argv.pop(1)); out = m.defend(np.load(sys.argv[2]))\n"
            "print(json.dumps({'verdict': out['verdict'].tolist(), 'rho': m.rho}))\n" + SERVE)
    loaded, served = _fresh_process(code, str(tmp_path / "rgb" / "fmd.keras"),
                                    str(tmp_path / "serving" / "3"), str(tmp_path / "x.npy"),
                                    lines=2)
    assert loaded["verdict"] == out["verdict"].tolist() and loaded["rho"] == 0.999
    assert served["verdict"] == out["verdict"].tolist()
    assert served["label"] == out["label"].tolist()
    with pytest.raises(ValueError, match="version directory"):
        fmd_tf.export_saved_model(fmd, str(tmp_path / "serving" / "latest"))


@pytest.fixture(scope="module")
def small_problem():
    x, y = coloured_squares(160, seed=3, size=16)
    return _sequential((16, 16, 3), 3), (x[:100], y[:100]), (x[100:], y[100:])


@pytest.mark.parametrize("change, message", [
    (lambda t, v: ((t[0] * 255, t[1]), v), "in \\[0, 1\\]"),
    (lambda t, v: ((t[0], t[1] + 5), v), "labels must be in \\[0, 3\\)"),
    (lambda t, v: (t, (v[0][:10], v[1][:10])), f"at least {pipeline.MIN_VAL_IMAGES}"),
    (lambda t, v: (t, (t[0][:60], t[1][:60])), "overlaps"),
    (lambda t, v: ((t[0][..., :1], t[1]), (v[0][..., :1], v[1])), "classifier"),
    (lambda t, v: ((t[0][:, :6, :6], t[1]), v), "H, W >= 8"),
    (lambda t, v: ((t[0].astype(np.uint8), t[1]), v), "float in \\[0, 1\\]"),
])
def test_fit_defense_refuses_bad_input_before_training(small_problem, change, message):
    clf, train, val = small_problem
    train, val = change(train, val)
    with pytest.raises(ValueError, match=message):
        fmd_tf.fit_defense(clf, train, val, preset="fast", verbose=0)


def test_fit_defense_refuses_unknown_choices(small_problem):
    clf, train, val = small_problem
    with pytest.raises(ValueError, match="operating_point"):
        fmd_tf.fit_defense(clf, train, val, operating_point="best", verbose=0)
    with pytest.raises(ValueError, match="preset"):
        fmd_tf.fit_defense(clf, train, val, preset="medium", verbose=0)


def _row(clean, fgsm, pgd, **extra):
    return {"val_clean_defended_accuracy": clean, "val_fgsm_defended_accuracy": fgsm,
            "val_pgd_defended_accuracy": pgd, **extra}


def test_operating_point_rule_is_the_best_worst_case_within_the_clean_budget():
    rows = [_row(0.95, 0.10, 0.05), _row(0.93, 0.96, 0.90), _row(0.90, 0.99, 0.99),
            _row(0.935, 0.97, 0.90)]
    attacks = ("fgsm", "pgd")
    # Row 2's worst case (0.90) ties rows 1 and 3; row 2 costs 5 clean points: excluded.
    assert op.max_min_row(rows, attacks) == 1  # first of the ties without the budget
    assert op.choose_row(rows, attacks, classifier_accuracy=0.95, clean_cost=0.02) == 1
    assert op.choose_row(rows, attacks, classifier_accuracy=0.95, clean_cost=0.10) == 1
    rows[3]["val_pgd_defended_accuracy"] = 0.92
    assert op.choose_row(rows, attacks, classifier_accuracy=0.95, clean_cost=0.02) == 3
    # No row within the budget: the best clean row.
    assert op.choose_row(rows, attacks, classifier_accuracy=0.99, clean_cost=0.01) == 0


def test_budget_rule_takes_the_first_candidate_that_keeps_the_verdicts(monkeypatch):
    figures = {0: (0.990, 0.001), 1: (0.999, 0.006), 2: (0.996, 0.004), 3: (1.0, 0.0)}

    def fake_row(fmd, options, sets, auc_level):
        assert auc_level == 0.95  # the config's default
        agreement, change = figures[options["k"]]
        return {"options": dict(options), "verdict_agreement": agreement,
                "auc_change_bound": change}

    class Model:
        def __init__(self, theta_r=(0.2, -1.0)):
            self.theta_r = np.float32(theta_r)

        def copy_with(self, **options):
            return ("copy", options)

    monkeypatch.setattr(op, "budget_row", fake_row)
    cfg = op.OperatingPointConfig(budgets=tuple({"k": k} for k in range(4)))
    model, entry = op.select_budget(Model(), {}, cfg)
    assert model == ("copy", {"k": 2}) and entry["options"] == {"k": 2}
    assert [row["options"]["k"] for row in entry["rows"]] == [0, 1, 2]  # stops at the first
    assert "AUC" in entry["rule"] and "not applied" not in entry["rule"]
    # θr = 0 still flags r = 0: the AUC condition stays.
    assert op.select_budget(Model((0.0, -1.0)), {}, cfg)[1]["options"] == {"k": 2}
    # No threshold can flag: agreement alone decides (candidate 1 despite its AUC change).
    model, entry = op.select_budget(Model((-0.01, -1.0)), {}, cfg)
    assert model == ("copy", {"k": 1}) and "not applied" in entry["rule"]
    cfg = op.OperatingPointConfig(budgets=({"k": 0}, {"k": 1}))
    original = Model()
    model, entry = op.select_budget(original, {}, cfg)
    assert model is original and entry["options"] == {} and len(entry["rows"]) == 2


def test_each_table_point_has_its_grid():
    """ "auto" chooses against FGSM / PGD, "robust" against APGD at L∞ 0.1 (or the given
    radius) with the margin gate; the fast preset attacks fewer VAL images; the other points
    use no table."""
    auto, robust = (pipeline.operating_point_config("full", p) for p in ("auto", "robust"))
    assert auto == op.OperatingPointConfig() and auto.attacks == ("fgsm", "pgd")
    assert robust.attacks == ("classifier_apgd_ce", "classifier_apgd_dlr",
                              "classifier_apgd_margin")
    assert robust.clean_cost == 0.01 and max(robust.margin_budgets) > 0.0
    fast = pipeline.operating_point_config("fast", "robust")
    assert fast.attacks == robust.attacks and fast.n_attack == op.FAST_OPERATING_POINT.n_attack
    assert pipeline.operating_point_config("fast") == op.FAST_OPERATING_POINT
    assert robust.attack_eps is None and auto.attack_eps is None
    at = pipeline.operating_point_config("fast", "robust", robust_eps=0.2)
    assert at == dataclasses.replace(fast, attack_eps=0.2)
    assert pipeline.operating_point_config("full", "auto", robust_eps=0.2) == auto
    assert pipeline.operating_point_config("full", "paper") is None
    assert pipeline.operating_point_config("full", "config") is None
    with pytest.raises(ValueError, match="chosen from a table"):
        op.grid("paper")


def test_operating_point_config_checks():
    with pytest.raises(ValueError, match="classifier attacks"):
        op.operating_point_table(None, np.zeros((2, 8, 8, 1)), np.zeros(2), None,
                                 op.OperatingPointConfig(attacks=("adaptive_pgd",)))
    with pytest.raises(ValueError, match=r"\['cw'\] are not"):  # a radius for attacks without one
        op.operating_point_table(None, np.zeros((2, 8, 8, 1)), np.zeros(2), None,
                                 op.OperatingPointConfig(attacks=("pgd", "cw"), attack_eps=0.1))
    with pytest.raises(ValueError, match=r"\['pgd_l2'\] are not"):
        op.operating_point_table(None, np.zeros((2, 8, 8, 1)), np.zeros(2), None,
                                 op.OperatingPointConfig(attacks=("pgd_l2",), attack_eps=0.1))
    with pytest.raises(ValueError, match="attack_eps"):
        op.OperatingPointConfig(attack_eps=0.0)
    with pytest.raises(ValueError, match="n_attack"):
        op.OperatingPointConfig(n_attack=0)
    with pytest.raises(ValueError, match="rhos"):
        op.OperatingPointConfig(rhos=(0.95, 1.5))
    with pytest.raises(ValueError, match="min_budget_agreement"):
        op.OperatingPointConfig(min_budget_agreement=1.5)
    with pytest.raises(ValueError, match="max_budget_auc_change"):
        op.OperatingPointConfig(max_budget_auc_change=-0.1)
    with pytest.raises(ValueError, match="budget_auc_level"):
        op.OperatingPointConfig(budget_auc_level=1.0)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (30, 26, 3), (64, 64, 3)])
def test_architecture_follows_the_image_shape(shape):
    from fmd_tf.models.combo_vae import build_combo_vae

    cfg = pipeline.experiment_config(shape, 5, preset="fast")
    assert cfg.image_shape == shape and cfg.num_classes == 5
    if shape == (28, 28, 1):  # the paper's Table I
        assert cfg.combo.encoder_filters == (32, 32, 64, 64)
        assert cfg.combo.decoder_filters == (64, 32)
    if shape == (64, 64, 3):
        assert len(cfg.combo.decoder_filters) == 3
    combo = build_combo_vae(cfg.combo, shape, 5)
    x = np.random.default_rng(0).uniform(size=(2, *shape)).astype(np.float32)
    assert combo(x)["reconstruction"].shape == (2, *shape)
    from fmd_tf.models.classifier import Classifier

    clf = Classifier(5, cfg.classifier.conv_filters)
    assert clf(x).shape == (2, 5)

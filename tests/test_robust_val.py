"""VAL robustness of a classifier alone (fmd_tf.evaluation.robustness) and
scripts/robust_val.py, which compares classifiers with it."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from test_case import run_python, run_script

from fmd_tf.evaluation.robustness import (
    masking_suspected,
    robust_training_check,
    robustness_summary,
    val_robustness,
)


def _linear_classifier(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(4)])
    x = np.random.default_rng(seed).uniform(0, 1, (24, 8, 8, 1)).astype(np.float32)
    return model, x, np.argmax(np.asarray(model(x)), -1)


def test_val_robustness_counts_clean_attacked_and_worst_case():
    model, x, own = _linear_classifier()
    r = val_robustness(model, x, own, eps=0.5, nb_iter=10)
    assert r["n"] == 24 and r["clean_accuracy"] == 1.0  # its own labels
    # ε 0.5 on 64 inputs moves a random linear model's logits far: most labels flip.
    assert r["apgd_ce_accuracy"] < 0.5 and r["apgd_dlr_accuracy"] < 0.5
    assert r["worst_case_accuracy"] <= min(r["apgd_ce_accuracy"], r["apgd_dlr_accuracy"])
    wrong = val_robustness(model, x, (own + 1) % 4, eps=0.5, nb_iter=5, losses=("ce",))
    assert wrong["clean_accuracy"] == 0.0 and wrong["worst_case_accuracy"] == 0.0
    assert "apgd_dlr_accuracy" not in wrong
    tiny = val_robustness(model, x, own, eps=1e-6, nb_iter=5, losses=("ce",))
    # a budget of 1e-6 flips at most the labels within 1e-6 of a tie
    assert tiny["apgd_ce_accuracy"] >= 0.9


def test_masking_is_suspected_below_half_the_clean_accuracy():
    """The Fashion-MNIST TRADES classifiers of docs/results.md ("Robust mode"): dropout 0.5
    holds 77.2 of 85.4 % under APGD, dropout 0 12.2 of 89.2 %."""
    assert not masking_suspected({"clean_accuracy": 0.854, "worst_case_accuracy": 0.772})
    assert masking_suspected({"clean_accuracy": 0.892, "worst_case_accuracy": 0.122})
    assert not masking_suspected({"clean_accuracy": 0.8, "worst_case_accuracy": 0.4})
    assert masking_suspected({"clean_accuracy": 0.8, "worst_case_accuracy": 0.3999})


def test_robust_training_check_attacks_the_first_val_images_and_warns():
    model, x, own = _linear_classifier()
    flipped = robust_training_check(model, x, own, eps=0.5, n=10, nb_iter=10)
    assert flipped["n"] == 10 and flipped["eps"] == 0.5 and flipped["masking_suspected"]
    assert flipped == {**val_robustness(model, x[:10], own[:10], eps=0.5, nb_iter=10),
                       "masking_suspected": True}
    assert "WARNING: APGD leaves less than 50% of" in robustness_summary(flipped)
    held = robust_training_check(model, x, own, eps=1e-6, nb_iter=5)
    assert held["n"] == 24 and not held["masking_suspected"]
    assert "WARNING" not in robustness_summary(held)
    assert robustness_summary(held).startswith("classifier on 24 VAL images, APGD L∞ 1e-06")


def test_robust_val_script_compares_classifiers(quick_model, tmp_path):
    out = tmp_path / "val.json"
    clf = str(quick_model / "classifier.keras")
    proc = run_script("scripts/robust_val.py", "--classifiers", f"{clf},{clf}", "--split-model",
                      str(quick_model), "--n", "6", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"].startswith("python scripts/robust_val.py --classifiers")
    r = report["classifiers"][clf]
    assert r["n"] == 6 and r["eps"] == 0.1 and r["nb_iter"] == 100
    assert 0 <= r["worst_case_accuracy"] <= min(r["apgd_ce_accuracy"], r["apgd_dlr_accuracy"])
    assert f"| {clf} | {100 * r['clean_accuracy']:.1f} |" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--classifiers", "/nonexistent.keras"], "file not found: /nonexistent.keras"),
    (["--classifiers", "README.md", "--n", "0"], "--n must be >= 1"),
    (["--classifiers", "README.md", "--eps", "0"], "--eps must be > 0"),
    (["--classifiers", "README.md", "--out", "README.md"], "exists; pass --overwrite"),
])
def test_robust_val_bad_arguments(args, message):
    proc = run_python("scripts/robust_val.py", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr

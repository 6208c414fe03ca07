"""The pipeline pieces behind scripts/evaluate.py, bench.py, demo.py and train_baselines.py,
called directly (no subprocess, no trained model): fmd_tf.evaluation.report / bench / demo /
baselines and the shared runner fmd_tf.cli."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmd_tf.cli import UsageError, run_cli, usage_errors
from fmd_tf.evaluation import baselines, bench, demo, harness, metrics, report

# ----------------------------------------------------------------------------- fmd_tf.cli


def test_run_cli_prints_one_error_line_and_exits_2(capsys):
    def parse_args(argv):
        return argv

    def run(argv):
        with usage_errors():
            raise FileNotFoundError(f"{argv[0]} not found")

    assert run_cli(run, parse_args, ["model/fmd.keras"]) == 2
    assert capsys.readouterr().err == "error: model/fmd.keras not found\n"
    assert run_cli(lambda args: None, parse_args, []) == 0


def test_usage_errors_maps_only_the_named_errors():
    with pytest.raises(UsageError, match="bad"):
        with usage_errors(KeyError):
            raise KeyError("bad")
    with pytest.raises(TypeError):  # a bug, not a user error: propagates as it is
        with usage_errors():
            raise TypeError("bug")


# ----------------------------------------------------------------------------- η curves


def _fake_defense(**changes):
    """The attributes `eta_curve` / `operating_point_rows` read, as plain numbers."""
    return types.SimpleNamespace(**{
        "theta_r": np.array([0.5, 0.5]), "theta_e": np.inf, "theta_m": -np.inf,
        "threshold_mode": "per_code",
        "rho": 0.95, "recon_fpr": 0.01, "num_morphs": 10, "min_suspicious": 1,
        "eta_reference_rho": 0.9, "eta": 0.5, "suspicious": "purify",
        **changes})


def _outputs(resistance, classifier_label, purified_label):
    return {"resistance": np.array(resistance), "classifier_label": np.array(classifier_label),
            "purified_label": np.array(purified_label)}


def test_eta_curve_by_hand():
    # VAL: three suspicious rows at distances 0.1, 0.3, 0.5 from θr = [0.5, 0.5]: θd is 0.1
    # at η = 0 and 0.5 at η = 1.
    r_val = np.array([[0.4, 0.9], [0.2, 0.9], [0.0, 0.9], [0.9, 0.9]])
    y = np.array([3, 4])
    # Clean: one passed, one purified (distance 0.05) to the right label.
    clean = _outputs([[0.9, 0.9], [0.45, 0.9]], [3, 4], [3, 4])
    # FGSM: distances 0.2 and 0.5; the purifier gets the first right and the second wrong.
    adv = _outputs([[0.3, 0.9], [0.0, 0.9]], [0, 0], [3, 0])
    curve = report.eta_curve(_fake_defense(), r_val, clean, adv, y, etas=(0.0, 1.0))
    assert curve["eta"] == [0.0, 1.0]
    # η = 0: both adversarial images rejected (nothing purified); η = 1: both purified.
    assert curve["adversarial_recall"][0] is None
    assert curve["adversarial_recall"][1] == pytest.approx(0.5)
    assert curve["clean_recall"] == [pytest.approx(1.0), pytest.approx(1.0)]
    # (TP + TN + recovered) / 4: (2 + 1 + 1) / 4, then (0 + 1 + 2) / 4.
    assert curve["paper_final_accuracy"] == [pytest.approx(1.0), pytest.approx(0.75)]


def test_operating_point_rows_cover_the_grid():
    rng = np.random.default_rng(0)
    r_val = rng.integers(0, 11, size=(40, 2)) / 10.0
    e_val = rng.random(40)
    y = np.arange(6) % 3
    clean = {**_outputs(rng.integers(5, 11, size=(6, 2)) / 10.0, y, y),
             "recon_error": rng.random(6)}
    adv = {**_outputs(rng.integers(0, 6, size=(6, 2)) / 10.0, (y + 1) % 3, y),
           "recon_error": rng.random(6) + 0.5}
    val_out = {**_outputs(r_val, np.zeros(40, int), np.zeros(40, int)), "recon_error": e_val}
    rows = report.operating_point_rows(_fake_defense(), r_val, e_val, clean, {"fgsm": adv}, y,
                                       val_out, np.zeros(40, int))
    assert len(rows) == len(report.OPERATING_POINT_GRID) == 30  # the model's point is in it
    assert [(r["threshold_mode"], r["rho"], r["recon_fpr"]) for r in rows] == list(
        report.OPERATING_POINT_GRID)
    # A model point outside the grid is appended as the last row.
    odd = report.operating_point_rows(_fake_defense(rho=0.97, recon_fpr=0.02), r_val, e_val,
                                      clean, {"fgsm": adv}, y, grid=[("unified", 0.9, 0.0)])
    assert [(r["threshold_mode"], r["rho"], r["recon_fpr"]) for r in odd] == [
        ("unified", 0.9, 0.0), ("per_code", 0.97, 0.02)]
    for row in rows:
        for key in ("clean_defended_accuracy", "clean_flagged", "fgsm_defended_accuracy",
                    "val_clean_defended_accuracy", "val_clean_flagged"):
            assert 0.0 <= row[key] <= 1.0, key
    # Without VAL outputs the VAL columns are left out.
    rows = report.operating_point_rows(_fake_defense(threshold_mode="unified", rho=0.9,
                                                     recon_fpr=0.0), r_val, e_val, clean, {}, y,
                                       grid=[("unified", 0.9, 0.0)])
    assert len(rows) == 1 and "val_clean_flagged" not in rows[0]


# ----------------------------------------------------------------------------- report


def _defense_metrics(value):
    return {"detection_tpr": value, "detection_fpr": 0.01, "auc": 0.93456,
            "tpr_at_fpr_1pct": 0.25, "tpr_at_fpr_5pct": 0.625,
            "defended_accuracy": value, "purification_recall": None,
            "paper_final_accuracy": 0.9, "verdict_counts": [1, 2, 3]}


def _report():
    attack = {"method": "fgsm", "params": {"eps": 0.3}, "attack_seconds": 12.4,
              "attack_cached": True, "attack_success_rate": 0.8, "undefended_accuracy": 0.2,
              "fm_defense": _defense_metrics(0.951), "magnet": _defense_metrics(0.5)}
    adaptive = {"method": "adaptive_pgd", "params": {"eps": 0.05, "norm": "linf"},
                "attack_seconds": 3.0, "attack_cached": False, "attack_success_rate": 0.5,
                "undefended_accuracy": 0.1, "fm_defense": _defense_metrics(0.6),
                "magnet": _defense_metrics(0.4), "magnet_adaptive": _defense_metrics(0.3)}
    point = {"threshold_mode": "per_code", "rho": 0.99, "recon_fpr": 0.01, "theta_d": 1.23456,
             "clean_defended_accuracy": 0.9, "clean_flagged": 0.05,
             "fgsm_defended_accuracy": np.float64(0.875)}
    return {"dataset": "fmnist", "n": 12, "model": "m", "defense": "fmd.keras",
            "attack_defense": "fmd.keras", "purify_label": "reconstruction", "seed": 0,
            "command": "python scripts/evaluate.py --n 12",
            "clean": {"classifier_accuracy": 0.9, "defended_accuracy": 0.85,
                      "rejected_rate": 0.05, "purified_rate": None,
                      "magnet": {"defended_accuracy": 0.8}},
            "calibration": {"fm_defense": {"val_false_positive_rate": 0.05,
                                           "operating_point_attacks": ["pgd"]},
                            "magnet": {"fpr_target": 0.05, "val_false_positive_rate": 0.05},
                            "feature_squeezing": {"val_false_positive_rate": 0.04,
                                                  "squeezers": ["bit_depth_1"]}},
            "attacks": {"fgsm": attack, "adaptive_pgd_linf_0.05": adaptive},
            "notes": ["baselines skipped"], "attacks_eta_curves": {},
            "operating_points": [point], "figures": ["roc.png"], "seconds": 61.7}


def test_render_markdown_of_a_hand_made_report():
    md = report.render_markdown(_report())
    lines = md.splitlines()
    assert lines[0] == "# FM-Defense evaluation: fmnist, n = 12"
    assert "command: `python scripts/evaluate.py --n 12`; 62 s." in md
    assert "| 90.0 | 85.0 | 5.0 | n/a |" in lines  # clean; None is n/a
    # Table II: paper attacks only, paper MNIST numbers, missing defenses n/a.
    assert "| fgsm | 20.0 | 95.1 | 50.0 | n/a | n/a | 21.2 / 99.8 / 74.6 | held out |" in lines
    assert "| clean | 90.0 | 85.0 | 80.0 | n/a | n/a | n/a | chosen with (VAL) |" in lines
    assert ("thresholds: FM-Defense 5.00 %; magnet 5.00 %; feature_squeezing 4.00 % (squeezers "
            "bit_depth_1, chosen on VAL).") in md
    assert not any(line.startswith("| adaptive_pgd_linf") and "21.2" in line for line in lines)
    assert "## Security evaluation: adaptive attacks" in lines
    assert ("| adaptive_pgd | linf | 0.05 | 10.0 | 60.0 | 1/2/3 | 40.0 / 30.0 | n/a / n/a "
            "| n/a / n/a |" in lines)
    assert "| fgsm | magnet | 50.0 | 1.0 | 0.9346 | 25.0 | 62.5 | n/a | 90.0 |" in lines
    assert "| TPR at 1 % FPR | TPR at 5 % FPR |" in md
    assert '- fgsm {"eps": 0.3}: success 80.0 %, 12 s (cached)' in lines
    assert "| per_code | 0.99 | 0.01 | 1.235 | n/a | n/a | 5.0 | 90.0 | 87.5 |" in lines
    assert "| VAL clean defended |" in md and "| fgsm defended |" in md
    assert lines[-1] == "Figures: `roc.png`" and md.endswith("\n")
    assert "- baselines skipped" in lines


def test_results_table_names_attacks_and_puts_the_chosen_ones_first():
    r = _report()
    pgd = {**r["attacks"]["fgsm"], "method": "pgd", "undefended_accuracy": 0.0,
           "params": {"eps": 2.0, "norm": "l2", "eps_iter": 0.1, "nb_iter": 40}}
    r["attacks"] = {"fgsm": r["attacks"]["fgsm"], "pgd_l2": pgd, **r["attacks"]}
    r["calibration"]["fm_defense"]["operating_point_attacks"] = ["pgd_l2"]
    del r["operating_points"]  # its rows have no pgd_l2 column
    assert report.results_table(r) == [
        "| | no defense | FM-Defense | MagNet | Feature Squeezing | Defense-GAN |",
        "|---|---|---|---|---|---|",
        "| clean | 90.0 | 85.0 | 80.0 | n/a | n/a |",
        "| PGD L2 ε = 2 | 0.0 | 95.1 | 50.0 | n/a | n/a |",  # chosen with: first
        "| *held out:* FGSM L∞ ε = 0.3 | 20.0 | 95.1 | 50.0 | n/a | n/a |"]
    md = report.render_markdown(r).splitlines()
    assert md[md.index("## Summary: accuracy (%)") + 4:][:5] == report.results_table(r)


@pytest.mark.parametrize("name, params, label", [
    ("pgd_eps0.1", None, "PGD L∞ ε = 0.1"),
    ("pgd", {"eps": 0.05, "norm": "l2"}, "PGD L2 ε = 0.05"),
    ("cw", None, "CW-L2"),
    ("deepfool", None, "DeepFool L∞"),
    ("square", None, "Square L∞ ε = 0.2 (scores, 1,000 queries)"),
    ("hopskipjump", None, "HopSkipJump (labels only)"),
    ("transfer_mim", None, "MIM L∞ ε = 0.3 transferred from another classifier"),
    ("classifier_apgd_dlr", None, "APGD-DLR L∞ ε = 0.1"),
    ("adaptive_pgd", None, "adaptive_pgd"),
    ("no_such_attack", None, "no_such_attack"),
])
def test_attack_label(name, params, label):
    assert harness.attack_label(name, params) == label


def test_readme_results_table_is_the_one_of_the_shipped_report():
    """README's results table, its command and n are those of results/fmnist/report.json:
    regenerate the table (`report.results_table`, report.md's Summary) when the report
    changes."""
    from test_case import ROOT

    readme = open(f"{ROOT}/README.md", encoding="utf-8").read()
    with open(f"{ROOT}/results/fmnist/report.json") as f:
        shipped = json.load(f)
    block = readme.split("<!-- results-table -->\n")[1].split("<!-- /results-table -->")[0]
    assert block.splitlines() == report.results_table(shipped)
    flat = " ".join(readme.split())
    assert f"`{' '.join(shipped['command'].split())}`" in flat
    assert f"n = {shipped['n']:,} clean test images" in flat


def test_render_markdown_of_a_reject_mode_report():
    r = _report()  # a defense whose suspicious inputs are rejected has no θd
    r["operating_points"] = [{**r["operating_points"][0], "theta_d": None}]
    md = report.render_markdown(r)
    assert "| per_code | 0.99 | 0.01 | reject | n/a | n/a | 5.0 | 90.0 | 87.5 |" in md.splitlines()


def test_render_markdown_of_a_report_without_tpr_at_fpr():
    r = _report()  # written before the TPR-at-FPR columns existed
    for entry in r["attacks"].values():
        for d in ("fm_defense", "magnet"):
            del entry[d]["tpr_at_fpr_1pct"], entry[d]["tpr_at_fpr_5pct"]
    md = report.render_markdown(r)
    assert "| fgsm | magnet | 50.0 | 1.0 | 0.9346 | n/a | 90.0 |" in md.splitlines()
    assert "TPR at 1 %" not in md


def test_tpr_at_fpr_by_hand():
    neg = np.arange(100.0)  # 0..99
    # fpr 0.05: 5 negatives may score above t, so t = 94 (95..99 flagged); ">" not ">=".
    assert metrics.tpr_at_fpr(neg, [94.0, 94.5, 100.0], 0.05) == pytest.approx(2 / 3)
    assert metrics.tpr_at_fpr(neg, [94.0, 94.5, 100.0], 0.0) == pytest.approx(1 / 3)
    assert metrics.tpr_at_fpr(neg, [-5.0, 0.0], 1.0) == 1.0  # every negative may be flagged
    ties = np.r_[np.zeros(90), np.ones(10)]  # 10 % of the negatives tied at the top
    assert metrics.tpr_at_fpr(ties, [1.0, 2.0], 0.05) == 0.5  # the tie is not split: FPR 0
    assert metrics.tpr_at_fpr(ties, [1.0, 2.0], 0.1) == 1.0  # t = 0 flags the tie: FPR 0.1
    with pytest.raises(ValueError, match="fpr"):
        metrics.tpr_at_fpr(neg, [1.0], 1.5)
    with pytest.raises(ValueError, match="at least one"):
        metrics.tpr_at_fpr([], [1.0], 0.1)


def test_worst_case_counts_an_image_only_if_every_version_is_defended():
    from fmd_tf.evaluation.report import worst_case

    y = np.array([0, 1, 2, 3])
    clean = {"label": np.array([0, 1, 2, 0]), "verdict": np.zeros(4, int)}  # image 3 wrong
    adv = {"a_linf_0.1": {"label": np.array([5, 1, 2, 3]), "verdict": np.array([2, 0, 0, 0])},
           "b_linf_0.1": {"label": np.array([0, 5, 2, 3]), "verdict": np.array([0, 0, 0, 0])},
           "c_l2_1.5": {"label": np.array([0, 1, 5, 3]), "verdict": np.array([0, 0, 0, 0])}}
    # a: image 0 rejected (defended), all others right; b: image 1 fooled; c: image 2 fooled.
    assert metrics.worst_case_accuracy(clean, {"a": adv["a_linf_0.1"]}, y) == 0.75
    assert metrics.worst_case_accuracy(clean, adv, y) == 0.25  # only image 0
    worst = worst_case(clean, adv, y)
    assert worst["all"] == {"attacks": list(adv), "defended_accuracy": 0.25}
    assert worst["linf_0.1"] == {"attacks": ["a_linf_0.1", "b_linf_0.1"],
                                 "defended_accuracy": 0.5}
    assert worst["l2_1.5"]["defended_accuracy"] == 0.5
    assert worst_case(clean, {}, y) == {}
    # Attacks outside the grid join the group of their own budget (parameters), unbounded
    # ones only "all".
    named = {"classifier_apgd_ce": adv["b_linf_0.1"], "cw": adv["c_l2_1.5"],
             "a_linf_0.1": adv["a_linf_0.1"], "fgsm": adv["c_l2_1.5"]}
    params = {"classifier_apgd_ce": {"eps": 0.1, "norm": "linf", "nb_iter": 100},
              "cw": {"confidence": 0.0}, "a_linf_0.1": {"eps": 0.1, "norm": "linf"},
              "fgsm": {"eps": 0.3}}
    worst = worst_case(clean, named, y, params)
    assert set(worst) == {"all", "linf_0.1", "linf_0.3"}
    assert worst["linf_0.1"] == {"attacks": ["classifier_apgd_ce", "a_linf_0.1"],
                                 "defended_accuracy": 0.5}
    assert worst["linf_0.3"] == {"attacks": ["fgsm"], "defended_accuracy": 0.5}
    assert worst["all"]["defended_accuracy"] == 0.25


def test_worst_case_of_the_classifier_alone_beside_the_defense():
    from fmd_tf.evaluation.report import render_markdown, worst_case

    y = np.array([0, 1, 2, 3])
    # The classifier is right on all four clean images; a fools it on 0 and 1, b on 1 and 2.
    clean = {"label": np.array([0, 1, 2, 0]), "verdict": np.array([0, 0, 0, 2]),
             "classifier_label": np.array([0, 1, 2, 3])}
    adv = {"a_linf_0.1": {"label": np.array([5, 1, 2, 3]), "verdict": np.array([2, 0, 0, 0]),
                          "classifier_label": np.array([5, 5, 2, 3])},
           "b_linf_0.1": {"label": np.array([0, 5, 2, 3]), "verdict": np.array([0, 0, 0, 0]),
                          "classifier_label": np.array([0, 5, 5, 3])}}
    worst = worst_case(clean, adv, y)
    # classifier alone: only image 3 survives both; defense: image 0 (rejected under a)
    # and image 2, but image 3 is lost to the clean rejection.
    assert worst["all"] == {"attacks": list(adv), "defended_accuracy": 0.5,
                            "undefended_accuracy": 0.25}
    assert worst_case(clean, {"a_linf_0.1": adv["a_linf_0.1"]}, y)["all"][
        "undefended_accuracy"] == 0.5
    # Outputs without the classifier's labels: no undefended figure, shown as n/a.
    bare = {n: {k: v for k, v in o.items() if k != "classifier_label"} for n, o in adv.items()}
    assert "undefended_accuracy" not in worst_case(clean, bare, y)["all"]
    r = _report()
    r["worst_case"] = {"all": worst["all"], "linf_0.1": {"attacks": ["a"],
                                                         "defended_accuracy": 0.5}}
    lines = render_markdown(r).splitlines()
    assert "| all: a_linf_0.1, b_linf_0.1 | 25.0 | 50.0 |" in lines
    assert "| linf_0.1: a | n/a | 50.0 |" in lines


def test_attack_entry_summarises_a_query_attacks_record():
    y = np.array([0, 1, 2, 3])
    x = np.zeros((4, 2, 2, 1), np.float32)
    out = {"label": y.copy(), "classifier_label": y.copy(), "verdict": np.zeros(4, int),
           "score": np.array([0.1, 0.2, 0.3, 0.4]), "purified": x}
    adv = {**out, "label": np.array([0, 5, -1, 3]), "verdict": np.array([0, 0, 2, 0])}
    info = {"params": {"eps": 0.1, "max_queries": 1000}, "seconds": 1.0, "cached": True,
            "record": {"queries": np.array([1, 1000, 40, 7]),
                       "success": np.array([False, True, False, False])}}
    entry = report._attack_entry("api_rays", info, x, x + 0.1, y, out, adv)
    assert entry["queries"] == {"budget": 1000, "mean": 262.0, "median": 23.5, "max": 1000}
    assert entry["query_success_rate"] == 0.25
    assert entry["fm_defense"]["defended_accuracy"] == 0.75  # rejected counts as defended
    assert "monitor" not in entry
    info["record"]["monitor_flagged"] = np.array([0, 990, 30, 0])
    entry = report._attack_entry("api_rays_monitored", info, x, x + 0.1, y, out, adv)
    assert entry["monitor"] == {"flagged_share": 1020 / 1048, "images_flagged": 0.5}
    assert "corner_hits" not in entry
    info["record"]["corner"] = np.array([-1, 0, 5, 1])
    entry = report._attack_entry("api_corners", info, x, x + 0.1, y, out, adv)
    assert entry["corner_hits"] == {"plus_eps": 1, "minus_eps": 1, "random_signs": 1}
    del info["record"]
    assert "queries" not in report._attack_entry("fgsm", info, x, x + 0.1, y, out, adv)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=30),
       st.lists(st.integers(0, 6), min_size=1, max_size=30), st.floats(0.0, 1.0))
def test_tpr_at_fpr_is_the_best_tpr_within_the_fpr(neg, pos, fpr):
    """Brute force over every threshold of "score > t": the largest TPR whose FPR <= fpr."""
    neg, pos = np.asarray(neg, float), np.asarray(pos, float)
    best = max(np.mean(pos > t) for t in np.r_[neg, pos, -np.inf]
               if np.mean(neg > t) <= fpr + 1e-12)
    assert metrics.tpr_at_fpr(neg, pos, fpr) == pytest.approx(best)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=30),
       st.lists(st.integers(0, 6), min_size=1, max_size=30))
def test_roc_auc_is_the_share_of_pairs_ranked_right(neg, pos):
    """Brute force over every (negative, positive) pair: 1 if the positive scores higher, 1/2 on
    a tie (the Mann-Whitney U statistic)."""
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for n in neg for p in pos]
    assert metrics.roc_auc(neg, pos) == pytest.approx(np.mean(pairs))


def test_paired_auc_change_interval():
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=300), rng.normal(1.0, size=300)
    # b = a: every resample gives a change of exactly 0.
    assert metrics.paired_auc_change_interval(neg, pos, neg, pos) == (0.0, 0.0)
    # b = a plus noise on the positives: the interval holds the observed change, is narrow
    # and is reproducible for a seed.
    noisy = pos + rng.normal(0.0, 0.5, size=300)
    change = metrics.roc_auc(neg, noisy) - metrics.roc_auc(neg, pos)
    low, high = metrics.paired_auc_change_interval(neg, pos, neg, noisy, level=0.95)
    assert low < change < high < 0.0 and high - low < 0.06
    assert (low, high) == metrics.paired_auc_change_interval(neg, pos, neg, noisy, level=0.95)
    wider = metrics.paired_auc_change_interval(neg, pos, neg, noisy, level=0.99)
    assert wider[0] <= low and wider[1] >= high
    with pytest.raises(ValueError, match="same images"):
        metrics.paired_auc_change_interval(neg, pos, neg[:10], noisy)
    with pytest.raises(ValueError, match="level"):
        metrics.paired_auc_change_interval(neg, pos, neg, noisy, level=1.0)


def test_defense_metrics_read_every_score_at_the_same_fprs():
    rng = np.random.default_rng(0)
    clean = {"verdict": np.zeros(200, np.int32), "score": rng.normal(size=200),
             "label": np.zeros(200, np.int64)}
    adv = {"verdict": np.full(100, 2, np.int32), "score": rng.normal(1.0, size=100),
           "label": np.full(100, -1, np.int64)}
    m = harness.defense_metrics(clean, adv, np.zeros(200, int), np.zeros(100, int))
    for f in harness.DETECTION_FPRS:
        assert m[harness.tpr_key(f)] == metrics.tpr_at_fpr(clean["score"], adv["score"], f)
    assert harness.tpr_key(0.01) == "tpr_at_fpr_1pct" and harness.tpr_key(0.05) in m


def test_render_markdown_without_adaptive_attacks_or_operating_points():
    r = _report()
    del r["attacks"]["adaptive_pgd_linf_0.05"], r["operating_points"]
    r["notes"] = []
    md = report.render_markdown(r)
    assert "adaptive" not in md and "## Operating points" not in md and "## Notes" not in md


def test_write_report_writes_json_and_markdown(tmp_path):
    r = _report()
    report.write_report(r, str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(report.REPORT_FILES)
    loaded = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(loaded["attacks"]) == ["fgsm", "adaptive_pgd_linf_0.05"]  # order kept
    assert loaded["operating_points"][0]["fgsm_defended_accuracy"] == pytest.approx(0.875)
    assert (tmp_path / "out" / "report.md").read_text() == report.render_markdown(r)


def test_evaluate_refuses_bad_input_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown attack"):
        report.evaluate(str(tmp_path), attacks=["nope"], n=4)
    with pytest.raises(ValueError, match="budgets must be > 0"):
        report.evaluate(str(tmp_path), attacks=["adaptive_pgd"], linf_eps=[0.0], n=4)
    with pytest.raises(ValueError, match="n must be >= 2"):
        report.evaluate(str(tmp_path), attacks=["fgsm"], n=1)
    with pytest.raises(FileNotFoundError, match="fmd.keras"):
        report.evaluate(str(tmp_path), attacks=["fgsm"], n=4, out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bench


def _bench_report():
    return {
        "device": {"name": "cpu x"},  # no measured peak: times are not scaled
        "settings": {"num_codes": 10, "num_morphs": 8, "n": 16, "quick": True},
        "speedup_vs_naive": {"value": 123.456, "fmd_images_per_s": 50.0,
                             "naive_images_per_s": 0.405, "naive_images_timed": 1,
                             "speedup_vs_naive_per_code": 12.0},
        "attack_speedup_vs_art": {"skipped": "ART not importable"},
        "serving_latency": {
            "full_budget": {"grpc_batch_1": {"p50_ms": 20.0, "images_per_s": 50.0}},
            "default": {"grpc_batch_1": {"p50_ms": 4.0, "images_per_s": 250.0}},
            "ratios": {"grpc_batch_1": {"p50_speedup": 5.0, "throughput_ratio": 5.0}}},
        "demo_wall": {"default": {"seconds": 30.0, "seconds_at_reference_peak": 15.0},
                      "full_budget": {"seconds": 90.0, "seconds_at_reference_peak": 45.0},
                      "speedup": 3.0},
        "test_suite": {"seconds": 200.0, "seconds_at_reference_peak": 100.0},
        "training": {
            "classifier_step_ms": {"float32": 70.0, "mixed_bfloat16": 40.0, "speedup": 1.75},
            "vae_step_ms": {"in_loss": 180.0, "precomputed": 150.0, "speedup": 1.2,
                            "precomputed_mixed_bfloat16": 130.0,
                            "precomputed_mixed_bfloat16_without_code_use": 100.0,
                            "code_use_weight": 1.0, "code_use_cost": 1.3},
            "budget_trial": {"speedup": 50.0, "replay_identical_to_model": True},
            "full_training": {"seconds": 1800.0, "seconds_at_reference_peak": 1500.0,
                              "classifier_test_accuracy": 0.92, "dgmm_test_accuracy": 0.91,
                              "recon_label_agreement": 0.93}},
        "peak_rss_mib": 2048.0,
    }


def test_bench_format_table():
    lines = bench.format_table(_bench_report()).splitlines()
    assert lines[0] == "" and lines[1].startswith("| metric")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[3:-1]}
    assert rows == {"speedup_vs_naive": "123", "speedup_vs_naive_per_code": "12",
                    "attack_speedup_vs_art": "skipped", "serving_grpc_batch_1_p50_ms": "4",
                    "demo_seconds": "30", "test_suite_seconds": "200",
                    "classifier_bf16_step_speedup": "1.75", "vae_precomputed_step_speedup": "1.2",
                    "budget_trial_replay_speedup": "50", "vae_code_use_step_cost": "1.3",
                    "full_training_seconds": "1.8e+03",
                    "peak_rss_mib": "2.05e+03"}
    details = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in lines[3:-1]}
    assert details["demo_seconds"].startswith("15 s at 220 GFLOP/s; full budget 90 s (3x)")
    assert details["serving_grpc_batch_1_p50_ms"] == "4 ms at 220 GFLOP/s; full budget 20 ms: 5x"
    assert details["vae_code_use_step_cost"] == "130 vs 100 ms/step (code_use_weight 1 vs 0)"
    assert details["full_training_seconds"] == ("1500 s at 220 GFLOP/s; classifier 0.9200, DGMM "
                                                "0.9100, recon agreement 0.9300")
    assert lines[-1] == "(m=10, N=8, 16 images, QUICK smoke-test sizes)"


def test_bench_earlier_sections(tmp_path):
    out = tmp_path / "bench.json"
    settings = {"model": "m", "n": 16, "attack_n": 4, "quick": True, "fmd_sha256": "ab"}
    assert bench.earlier_sections(str(out), settings, ["roofline_share"]) == {}  # no file
    out.write_text(json.dumps({"settings": settings, "roofline_share": {"value": 0.5}}))
    assert bench.earlier_sections(str(out), settings, []) == {}
    assert bench.earlier_sections(str(out), {**settings, "naive_n": 9},
                                  ["roofline_share", "serving_latency"]) == {
        "roofline_share": {"value": 0.5}}
    with pytest.raises(ValueError, match="other settings"):
        bench.earlier_sections(str(out), {**settings, "n": 32}, ["roofline_share"])
    with pytest.raises(ValueError, match="fmd_sha256 differs"):
        bench.earlier_sections(str(out), {**settings, "fmd_sha256": "cd"}, ["roofline_share"])
    out.write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        bench.earlier_sections(str(out), settings, ["roofline_share"])


def test_bench_config_checks_and_quick_sizes():
    cfg = bench.BenchConfig()
    assert cfg.sections == bench.SECTIONS and set(bench.SECTION_KEYS) == set(bench.SECTIONS)
    quick = bench.BenchConfig(quick=True, **bench.quick_sizes(dataclasses.asdict(cfg)))
    assert (quick.n, quick.naive_n, quick.attack_n, quick.latency_reps) == (16, 1, 4, (5, 2))
    assert (quick.default_n, quick.demo_n) == (16, 8)
    with pytest.raises(ValueError, match="sections"):
        bench.BenchConfig(sections=("speed", "warp"))
    with pytest.raises(ValueError, match="art_attacks"):
        bench.BenchConfig(art_attacks=("fgsm",))
    with pytest.raises(ValueError, match="naive_n"):
        bench.BenchConfig(n=2, naive_n=3)
    with pytest.raises(ValueError, match="batch_size: must be >= 1"):
        bench.BenchConfig(batch_size=0)
    with pytest.raises(ValueError, match="latency_reps"):
        bench.BenchConfig(latency_reps=(5, 0))


def test_bench_file_sha256(tmp_path):
    path = tmp_path / "fmd.keras"
    path.write_bytes(b"model r2")
    assert bench.file_sha256(path) == (
        "9433b0f90b6d4a732fee8f723a5e5dcf60b4bd2e451bce57a64154e12588c50a")


def test_bench_graph_flops_counts_matmuls():
    import tensorflow as tf

    w = tf.constant(np.ones((3, 4), np.float32))
    v = tf.constant(np.ones((4, 5), np.float32))
    flops = bench.graph_flops(lambda x: tf.nn.relu(tf.matmul(tf.matmul(x, w), v)),
                              tf.TensorSpec([2, 3], tf.float32))
    assert flops == 2 * 2 * 3 * 4 + 2 * 2 * 4 * 5


# ----------------------------------------------------------------------------- demo, baselines


def test_demo_format_rows():
    rows = {"clean": {"passed": 0.75, "accuracy with FM-Defense": 0.9},
            "FGSM eps=0.3": {"passed": 0.125, "accuracy with FM-Defense": 0.5}}
    lines = demo.format_rows(rows, 8, "m").splitlines()
    assert lines[:2] == ["", "FM-Defense on 8 Fashion-MNIST CLE test images (m/fmd.keras)"]
    assert lines[2].split() == ["clean", "FGSM", "eps=0.3"]
    assert lines[3].split() == ["passed", "0.750", "0.125"]
    assert lines[4].split()[-2:] == ["0.900", "0.500"]
    assert lines[-1].startswith("(adversarial inputs count as defended")


def test_baseline_outputs_checks_and_missing_baselines(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier.keras not found"):
        baselines.check_outputs(str(tmp_path))
    (tmp_path / "classifier.keras").write_bytes(b"placeholder")
    assert baselines.check_outputs(str(tmp_path)) == (
        str(tmp_path / "classifier.keras"), str(tmp_path / "baselines"))
    (tmp_path / "baselines").mkdir()
    (tmp_path / "baselines" / "feature_squeezing.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        baselines.check_outputs(str(tmp_path))
    assert baselines.check_outputs(str(tmp_path), overwrite=True)[1] == str(tmp_path / "baselines")
    with pytest.raises(ValueError):
        baselines.baseline_config("no-such-dataset")
    loaded, notes = baselines.load_baselines(str(tmp_path / "elsewhere"), classifier=None)
    assert loaded == {} and len(notes) == 3 and "MagNet not found" in notes[0]
    assert "Defense-GAN not found" in notes[2]


def test_fm_defense_point_reads_the_card_or_falls_back(tmp_path):
    from fmd_tf.operating_point import FAST_OPERATING_POINT, OperatingPointConfig

    default = OperatingPointConfig()
    assert baselines.fm_defense_point(str(tmp_path)) == {
        "val_false_positive_rate": None, "chosen_with": None, "attacks": list(default.attacks),
        "n": default.n_attack, "seed": 0}
    assert baselines.fm_defense_point(str(tmp_path), quick=True)["n"] == \
        FAST_OPERATING_POINT.n_attack
    (tmp_path / "model_card.json").write_text(json.dumps({
        "calibration": {"val_false_positive_rate": 0.0435},
        "operating_point": {"attacks": {"names": ["fgsm"], "n": 32, "seed": 3}}}))
    assert baselines.fm_defense_point(str(tmp_path)) == {
        "val_false_positive_rate": 0.0435, "chosen_with": ["fgsm"], "attacks": ["fgsm"],
        "n": 32, "seed": 3}
    (tmp_path / "model_card.json").write_text(json.dumps({"operating_point": {"rule": "paper"}}))
    assert baselines.fm_defense_point(str(tmp_path))["attacks"] == list(default.attacks)
    assert baselines.fm_defense_point(str(tmp_path))["chosen_with"] is None


def test_bench_times_are_scaled_to_the_reference_peak():
    section = {"default": {"seconds": 30.0, "seconds_at_reference_peak": None},
               "full": {"seconds": 90.0, "seconds_at_reference_peak": None},
               "attack": {"seconds": 5.0}, "speedup": 3.0}
    bench._scale_times(section, peak=110e9)  # a machine at half the reference peak
    assert section["default"]["seconds_at_reference_peak"] == pytest.approx(15.0)
    assert section["full"]["seconds_at_reference_peak"] == pytest.approx(45.0)
    assert section["attack"] == {"seconds": 5.0}  # only the entries made by _seconds

"""End-to-end checks of scripts/evaluate.py and scripts/operating_points.py on the quick model
(the session fixture `quick_model`, trained once by conftest.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from test_case import run_python as _run
from test_case import run_script


def test_evaluate_report_schema(quick_model, tmp_path):
    out = tmp_path / "eval"
    surrogate = quick_model / "classifier.keras"  # not independent: only the plumbing is tested
    proc = run_script("scripts/evaluate.py", "--model", str(quick_model), "--attacks",
                      "fgsm,deepfool,transfer_pgd", "--n", "12", "--out", str(out), "--cache",
                      str(tmp_path / "cache"), "--no-baselines", "--surrogate", str(surrogate))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["surrogate"]["path"] == str(surrogate)
    assert report["attacks"]["transfer_pgd"]["params"]["eps"] == 0.3
    assert report["attacks"]["transfer_pgd"]["linf_median"] <= 0.3 + 1e-6
    assert {"dataset", "n", "model", "clean", "attacks"} <= set(report)
    assert report["purify_label"] == "corroborated"  # the config default
    assert set(report["clean"]) >= {"classifier_accuracy", "defended_accuracy",
                                     "rejected_rate", "purified_rate"}
    fgsm = report["attacks"]["fgsm"]
    assert {"params", "attack_success_rate", "undefended_accuracy", "fm_defense"} <= set(fgsm)
    assert set(fgsm["fm_defense"]) >= {"detection_tpr", "detection_fpr", "auc",
                                       "defended_accuracy", "purification_recall"}
    assert fgsm["params"] == {"eps": 0.3}
    assert fgsm["linf_median"] <= 0.3 + 1e-6
    # DeepFool takes no labels (it attacks the prediction): the harness must not pass y.
    assert report["attacks"]["deepfool"]["params"]["norm"] == "linf"
    assert (out / "report.md").is_file() and (out / "roc.png").is_file()
    # Operating points: the row of the model's own settings sees on VAL what calibration saw.
    card = json.loads((quick_model / "model_card.json").read_text())
    cal = card["calibration"]
    used = card["hyperparameters"]["defense"]  # the options of the saved defense
    own = [r for r in report["operating_points"] if (r["threshold_mode"], r["rho"],
           r["recon_fpr"]) == (used["threshold_mode"], used["rho"], cal["recon_fpr"])]
    assert len(own) == 1
    assert own[0]["val_clean_flagged"] == pytest.approx(cal["val_false_positive_rate"])
    assert 0.0 <= own[0]["val_clean_defended_accuracy"] <= 1.0
    assert "| VAL clean defended |" in (out / "report.md").read_text()
    # Second run uses the cached adversarial set and FM-Defense's stored outputs on the clean
    # and FGSM images: the same figures.
    stored = sorted((tmp_path / "cache").glob("outputs_fm_defense_12_*.npz"))
    assert len(stored) == 4  # clean + three attacks
    written = [p.stat().st_mtime_ns for p in stored]
    proc = run_script("scripts/evaluate.py", "--model", str(quick_model), "--attacks", "fgsm",
                      "--n", "12", "--out", str(out), "--cache", str(tmp_path / "cache"),
                      "--no-baselines")
    assert proc.returncode == 0
    again = json.loads((out / "report.json").read_text())
    assert again["attacks"]["fgsm"]["attack_cached"]
    assert again["attacks"]["fgsm"]["fm_defense"] == fgsm["fm_defense"]
    assert again["clean"] == report["clean"]
    assert sorted((tmp_path / "cache").glob("outputs_fm_defense_12_*.npz")) == stored
    assert [p.stat().st_mtime_ns for p in stored] == written  # read, not written again


def test_evaluate_adaptive_budget_grid(quick_model, tmp_path):
    out = tmp_path / "adaptive"
    proc = run_script("scripts/evaluate.py", "--model", str(quick_model), "--attacks",
                      "fgsm,adaptive_pgd,cw_hiconf_linf_0.05", "--linf-eps", "0.05", "--l2-eps",
                      "1.5", "--n", "4",
                      "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-baselines")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # cw_hiconf_linf_0.05 pins one budget: it runs there only, not over the whole grid.
    assert list(report["attacks"]) == ["fgsm", "adaptive_pgd_linf_0.05", "adaptive_pgd_l2_1.5",
                                       "adaptive_cw_hiconf_linf_0.05"]
    linf, l2 = report["attacks"]["adaptive_pgd_linf_0.05"], report["attacks"]["adaptive_pgd_l2_1.5"]
    assert linf["method"] == "adaptive_pgd" and linf["params"]["norm"] == "linf"
    assert linf["linf_median"] <= 0.05 + 1e-6 and l2["l2_median"] <= 1.5 + 1e-4
    assert "defended_accuracy" in linf["fm_defense"]
    worst = report["worst_case"]
    assert set(worst) == {"all", "linf_0.05", "l2_1.5", "linf_0.3"}  # FGSM: its own ε 0.3
    assert worst["linf_0.05"]["attacks"] == ["adaptive_pgd_linf_0.05",
                                             "adaptive_cw_hiconf_linf_0.05"]
    assert worst["linf_0.3"]["attacks"] == ["fgsm"]
    assert worst["all"]["defended_accuracy"] <= min(
        a["fm_defense"]["defended_accuracy"] for a in report["attacks"].values())
    md = (out / "report.md").read_text()
    assert "## Security evaluation: adaptive attacks" in md
    assert "| adaptive_pgd | l2 | 1.5 |" in md and "## Worst case per image" in md
    # The paper's figures and operating points cover only the paper's attacks.
    assert all("adaptive" not in k for row in report["operating_points"] for k in row)
    # Adaptive attacks alone: no paper figures, still a report. Evaluated with a deployment
    # option: suspicious inputs rejected, never purified.
    proc = run_script("scripts/evaluate.py", "--model", str(quick_model), "--attacks", "cw_hiconf",
                      "--linf-eps", "0.05", "--n", "4", "--out", str(out / "only"),
                      "--cache", str(tmp_path / "cache"), "--no-baselines",
                      "--suspicious", "reject")
    assert proc.returncode == 0, proc.stderr[-3000:]
    only = json.loads((out / "only" / "report.json").read_text())
    assert list(only["attacks"]) == ["adaptive_cw_hiconf_linf_0.05"]
    assert only["figures"] == ["fig1_resistance.png"] and "operating_points" not in only
    assert only["defense_options"] == {"suspicious": "reject"} and "defense_options" not in report
    assert only["clean"]["purified_rate"] == 0.0
    assert only["attacks"]["adaptive_cw_hiconf_linf_0.05"]["fm_defense"]["verdict_counts"][1] == 0


@pytest.mark.parametrize("flag,value,message", [
    ("--linf-eps", "abc", "not a list of numbers"),
    ("--l2-eps", "1.5,-1", "must be > 0"),
    ("--attacks", "adaptive_foo", "unknown"),
    ("--attacks", "fgsm_linf_0.1", "unknown"),  # not a budgeted attack: no budget to pin
    ("--attacks", "api_rays_l2_1.5", "unknown"),  # RayS is L∞ only
    ("--attacks", "transfer_pgd", "need --surrogate"),
    ("--suspicious", "drop", "invalid choice"),
])
def test_evaluate_bad_budget_arguments(quick_model, flag, value, message):
    proc = _run("scripts/evaluate.py", "--model", str(quick_model), flag, value)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_bad_model_card_split_sizes(quick_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(quick_model, model)
    card = json.loads((model / "model_card.json").read_text())
    card["hyperparameters"]["splits"] = {"val_size": 10, "bogus": 1}
    (model / "model_card.json").write_text(json.dumps(card))
    proc = run_script("scripts/evaluate.py", "--model", str(model), "--attacks", "fgsm", "--n", "4",
                      "--out", str(tmp_path / "out"), "--no-baselines")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hyperparameters.splits" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_refuses_another_seed_than_the_calibration_splits(quick_model, tmp_path):
    seed = json.loads((quick_model / "model_card.json").read_text())["seed"]
    proc = run_script("scripts/evaluate.py", "--model", str(quick_model), "--attacks", "fgsm",
                      "--n", "4", "--seed", str(seed + 1), "--out", str(tmp_path / "out"),
                      "--no-baselines")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"use --seed {seed}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_operating_points_on_clean_val(quick_model, tmp_path):
    out = tmp_path / "ops.json"
    card = json.loads((quick_model / "model_card.json").read_text())
    cal, rho = card["calibration"], card["hyperparameters"]["defense"]["rho"]
    own_metric = card["hyperparameters"]["defense"]["recon_metric"]
    rhos, gates = sorted({1.0, rho}), sorted({0.0, 0.01, cal["recon_fpr"]})
    proc = run_script("scripts/operating_points.py", "--model", str(quick_model), "--rho",
                      ",".join(map(str, rhos)), "--recon-fpr", ",".join(map(str, gates)),
                      "--modes", "per_code", "--recon-metric", "mae,mse,pixel_share",
                      "--recon-pixel-tol", "0.05,0.2", "--attacks", "fgsm",
                      "--n-attack", "6", "--cache", str(tmp_path / "cache"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["recon_metric"], r["rho"], r["recon_fpr"]): r for r in report["rows"]
            if r["recon_metric"] != "pixel_share"}
    shares = {(r["recon_pixel_tol"], r["rho"], r["recon_fpr"]): r for r in report["rows"]
              if r["recon_metric"] == "pixel_share"}
    assert len(rows) == len(shares) == 2 * len(rhos) * len(gates)
    assert len(report["rows"]) == 4 * len(rhos) * len(gates)
    assert {r["recon_pixel_tol"] for r in rows.values()} == {None}
    assert "| pixel_share>0.05 |" in proc.stdout and "| pixel_share>0.2 |" in proc.stdout
    assert report["attacks"] == {"names": ["fgsm"], "n": 6, "seed": 0, "eps": None}
    assert f"| per_code | 1.0 | 0.0 | {own_metric} |" in proc.stdout
    # The model's own setting: the same thresholds and flagged share as its calibration.
    own = rows[(own_metric, rho, cal["recon_fpr"])]
    assert own["val_clean_flagged"] == pytest.approx(cal["val_false_positive_rate"])
    assert own["theta_r_max"] == pytest.approx(max(cal["theta_r"]))
    assert own["detector_fires"] == (max(cal["theta_r"]) >= 0)
    for metric in ("mae", "mse"):
        # rho = 1 allows no clean false positive: every threshold is below 0, nothing is
        # flagged without the gate, and the defended accuracy is the classifier's.
        strict = rows[(metric, 1.0, 0.0)]
        assert not strict["detector_fires"] and strict["val_clean_flagged"] == 0.0
        assert strict["val_clean_defended_accuracy"] == pytest.approx(
            report["val_classifier_accuracy"])
        # Without gate and detector nothing is rejected: FGSM counts only where the classifier
        # still gets it right, and a gate can only add rejections (scores in sixths).
        fgsm = [rows[(metric, 1.0, g)]["val_fgsm_defended_accuracy"] for g in gates]
        assert fgsm == sorted(fgsm) and all(round(6 * v, 6) % 1 == 0 for v in fgsm)
    worst = [min(r["val_clean_defended_accuracy"], r["val_fgsm_defended_accuracy"])
             for r in report["rows"]]
    assert worst[report["max_min_row"]] == max(worst)
    assert "max-min row" in proc.stdout
    # The gate budget is a clean VAL budget whatever the metric: same flagged share at rho 1.
    # (pixel_share's discrete errors can tie at θe, which only lowers its share.)
    for g in gates:
        assert rows[("mae", 1.0, g)]["val_clean_flagged"] == pytest.approx(
            rows[("mse", 1.0, g)]["val_clean_flagged"])
        for tol in (0.05, 0.2):
            assert shares[(tol, 1.0, g)]["val_clean_flagged"] <= rows[("mae", 1.0, g)][
                "val_clean_flagged"] + 1e-9
    # With the gate off (budget 0) the metric changes nothing.
    assert shares[(0.2, 1.0, 0.0)]["val_clean_defended_accuracy"] == pytest.approx(
        rows[("mae", 1.0, 0.0)]["val_clean_defended_accuracy"])


def test_operating_points_grid_prints_the_table_train_chose_from(quick_model, tmp_path):
    """--grid auto reproduces the table and row scripts/train.py --operating-point auto chose
    (its card); --grid robust is the robust rule's table (APGD at the card's radius, margin
    gate, 1-point clean cost)."""
    import shutil

    from fmd_tf.operating_point import choose_row, grid

    model, cache = tmp_path / "model", str(tmp_path / "cache")
    shutil.copytree(quick_model, model)
    proc = run_script("scripts/train.py", "--quick", "--out", str(model), "--stages", "defense",
                      "--reuse-val-resistance", "--operating-point", "auto", "--cache", cache,
                      "--overwrite", "--verbose", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((model / "model_card.json").read_text())["operating_point"]
    out = tmp_path / "auto.json"
    # The card's preset (fast) sets the grid's number of VAL attack images too.
    proc = run_script("scripts/operating_points.py", "--model", str(model), "--grid", "auto",
                      "--cache", cache, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["attacks"]["n"] == card["attacks"]["n"] == grid("auto", fast=True).n_attack
    assert report["attacks"]["names"] == card["attacks"]["names"] == ["fgsm", "pgd"]
    assert report["clean_cost"] == card["settings"]["clean_cost"] == grid("auto").clean_cost
    assert len(report["rows"]) == len(card["rows"])
    for row, carded in zip(report["rows"], card["rows"], strict=True):
        assert {k: row[k] for k in carded} == pytest.approx(carded)
    assert report["max_min_row"] == card["chosen_row"]

    out = tmp_path / "robust.json"
    proc = run_script("scripts/operating_points.py", "--model", str(quick_model), "--grid",
                      "robust", "--n-attack", "6", "--rho", "0.99,0.9", "--cache", cache,
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    robust = grid("robust")
    assert report["attacks"]["names"] == list(robust.attacks)
    eps = json.loads((quick_model / "model_card.json").read_text())[
        "hyperparameters"]["classifier"]["adversarial_eps"]
    assert report["attacks"]["eps"] == eps and f"at L∞ {eps:g}" in proc.stdout
    rows = report["rows"]
    assert {r["rho"] for r in rows} == {0.99, 0.9}  # a flag changes one setting of the grid
    assert {r["margin_fpr"] for r in rows} == set(robust.margin_budgets)
    assert report["clean_cost"] == robust.clean_cost == 0.01
    assert report["max_min_row"] == choose_row(rows, robust.attacks,
                                                report["val_classifier_accuracy"], 0.01)
    assert "classifier - 0.01" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--rho", "1.5"], "--rho: values must lie in (0.0, 1.0]"),
    (["--recon-fpr", "x"], "--recon-fpr: expected comma-separated numbers"),
    (["--modes", "per_code,global"], "--modes: choose from per_code, unified"),
    (["--recon-metric", "l3"], "--recon-metric: choose from mae, mse, pixel_share"),
    (["--recon-pixel-tol", "0.1,1"], "--recon-pixel-tol values must be < 1"),
    (["--recon-pixel-tol", "0"], "--recon-pixel-tol: values must lie in (0.0, 1.0]"),
    (["--attacks", "adaptive_pgd"], "--attacks: choose from fgsm, pgd"),
    (["--n-attack", "0"], "--n-attack must be >= 1"),
    (["--margin-fpr", "0.6"], "--margin-fpr: values must lie in [0.0, 0.5]"),
    (["--clean-cost", "2"], "--clean-cost must be in [0, 1]"),
    (["--grid", "paper"], "--grid: invalid choice: 'paper'"),
    (["--model", "/nonexistent/model"], "/nonexistent/model/fmd.keras not found"),
])
def test_operating_points_bad_arguments(args, message):
    proc = _run("scripts/operating_points.py", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_operating_points_keeps_an_existing_out_file(tmp_path):
    out = tmp_path / "ops.json"
    out.write_text("earlier rows")
    proc = _run("scripts/operating_points.py", "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "exists; pass --overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "earlier rows"


def _model_with_feature_squeezing(quick_model, tmp_path):
    """(model dir, its classifier, FeatureSqueezing): a copy of the quick model with a 4-bit
    Feature Squeezing baseline calibrated on noise at FPR 0.1, saved in its baselines/."""
    import keras
    import numpy as np

    from fmd_tf.baselines import FeatureSqueezing

    model = tmp_path / "model"
    shutil.copytree(quick_model, model)
    classifier = keras.models.load_model(model / "classifier.keras", compile=False)
    fs = FeatureSqueezing(classifier, bit_depth=4, median_size=None)
    fs.calibrate(np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32), fpr=0.1)
    (model / "baselines").mkdir()
    fs.save(str(model / "baselines" / "feature_squeezing.json"))
    return model, classifier, fs


def test_evaluate_reads_each_baselines_stored_outputs(quick_model, tmp_path):
    """A baseline's threshold-free pass is stored per set (keyed by its settings and weights,
    the classifier and the images): a second evaluation reads it, so does one after the
    baseline was calibrated again (with the verdicts of its new threshold, as a run without
    the cache gives them); other squeezers are run again."""
    import numpy as np

    import fmd_tf  # noqa: F401
    from fmd_tf.baselines import FeatureSqueezing
    from fmd_tf.evaluation.report import evaluate

    model, classifier, fs = _model_with_feature_squeezing(quick_model, tmp_path)
    cache = tmp_path / "cache"

    def run(cache_dir=str(cache)):
        return evaluate(str(model), attacks=["fgsm"], n=8, cache_dir=cache_dir, verbose=0)

    def fs_rows(report):
        return report["clean"]["feature_squeezing"], report["attacks"]["fgsm"]["feature_squeezing"]

    first = run()
    stored = sorted(cache.glob("outputs_feature_squeezing_8_*.npz"))
    assert len(stored) == 2  # clean and FGSM
    written = [p.stat().st_mtime_ns for p in stored]
    again = run()
    assert [p.stat().st_mtime_ns for p in stored] == written  # read, not run again
    assert fs_rows(again) == fs_rows(first)
    fs.calibrate(np.random.default_rng(1).random((64, 28, 28, 1), dtype=np.float32), fpr=0.5)
    fs.threshold = -1.0  # below every score: every image is flagged
    fs.save(str(model / "baselines" / "feature_squeezing.json"))
    recalibrated = run()
    assert sorted(cache.glob("outputs_feature_squeezing_8_*.npz")) == stored
    assert [p.stat().st_mtime_ns for p in stored] == written
    assert recalibrated["clean"]["feature_squeezing"]["rejected_rate"] == 1.0
    assert fs_rows(recalibrated) == fs_rows(run(cache_dir=None))
    other = FeatureSqueezing(classifier, bit_depth=3, median_size=None)
    other.threshold, other.fpr = fs.threshold, fs.fpr
    other.save(str(model / "baselines" / "feature_squeezing.json"))
    run()
    assert len(list(cache.glob("outputs_feature_squeezing_8_*.npz"))) == 4


def test_evaluate_reads_each_baselines_adapted_set(quick_model, tmp_path, monkeypatch):
    """Adaptive PGD made against a baseline is stored per budget (keyed by the baseline's
    weights and thresholds): a second evaluation reads it, with the same figures; calibrated
    again, the baseline is attacked again."""
    import numpy as np

    import fmd_tf  # noqa: F401
    import fmd_tf.attacks
    from fmd_tf.evaluation.report import evaluate

    model, classifier, fs = _model_with_feature_squeezing(quick_model, tmp_path)
    attacked = []
    real = fmd_tf.attacks.adaptive_detector_pgd

    def counting(defense, *args, **kwargs):
        attacked.append(type(defense).__name__)
        return real(defense, *args, **kwargs)

    monkeypatch.setattr(fmd_tf.attacks, "adaptive_detector_pgd", counting)

    def run():
        return evaluate(str(model), attacks=["adaptive_pgd"], n=4, linf_eps=(0.05,),
                        cache_dir=str(tmp_path / "cache"), verbose=0)["attacks"]

    first = run()
    assert attacked == ["FeatureSqueezing"]
    again = run()
    assert attacked == ["FeatureSqueezing"]  # read from the cache
    row = "feature_squeezing_adaptive"
    assert again["adaptive_pgd_linf_0.05"][row] == first["adaptive_pgd_linf_0.05"][row]
    fs.calibrate(np.random.default_rng(1).random((64, 28, 28, 1), dtype=np.float32), fpr=0.5)
    fs.save(str(model / "baselines" / "feature_squeezing.json"))
    run()
    assert attacked == ["FeatureSqueezing", "FeatureSqueezing"]

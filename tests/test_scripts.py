"""End-to-end checks of the command-line entry points on the --quick config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=env or ENV,
    )


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "fmnist"
    # The config's own operating point (ρ 0.95, no gate): the scripts' figures below are checked
    # against known settings; the automatic choice is tested in test_train_cli / test_pipeline.
    proc = _run("scripts/train.py", "--quick", "--operating-point", "config", "--out", str(out),
                "--verbose", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_train_quick_writes_models_and_card(quick_model):
    for name in ("classifier.keras", "combo_vae.keras", "fmd.keras", "model_card.json",
                 "latent_traversals.png", "val_resistance.npy", "serving/1/saved_model.pb"):
        assert (quick_model / name).is_file(), name
    card = json.loads((quick_model / "model_card.json").read_text())
    for key in ("dataset", "seed", "command", "training_seconds", "classifier_test_accuracy",
                "dgmm_test_accuracy", "recon_mse", "recon_label_agreement", "latent_dims",
                "hyperparameters", "calibration"):
        assert key in card, key
    assert card["dataset"] == "fmnist" and card["quick"] is True
    assert card["command"].startswith("python scripts/train.py --quick")
    assert card["hyperparameters"]["combo"]["gamma"] == 40.0
    assert card["hyperparameters"]["combo"]["lambda_lkd"] == 0.1
    assert card["hyperparameters"]["combo"]["vae_data"] == "train"  # --quick: 512 TRAIN images
    assert card["latent_dims"] == {"shared": 10, "unique": 10}
    assert 0.0 <= card["classifier_test_accuracy"] <= 1.0
    r_val = np.load(quick_model / "val_resistance.npy")
    assert r_val.shape == (128, 10)
    assert card["calibration"]["val_false_positive_rate"] <= 1 - 0.95 + 1e-9


def test_train_refuses_to_overwrite(quick_model):
    before = {p.name: p.stat().st_mtime_ns for p in quick_model.iterdir()}
    proc = _run("scripts/train.py", "--quick", "--out", str(quick_model), "--stages",
                "classifier")
    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr and "classifier.keras" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in quick_model.iterdir()} == before


def test_train_bad_arguments():
    proc = _run("scripts/train.py", "--stages", "classifier,foo", "--out", "/nonexistent/x")
    assert proc.returncode == 2 and "unknown stage" in proc.stderr
    proc = _run("scripts/train.py", "--dataset", "cifar", "--out", "/nonexistent/x")
    assert proc.returncode == 2 and "cifar" in proc.stderr and "Traceback" not in proc.stderr
    for flag, value in (("--recon-fpr", "1.5"), ("--recon-pixel-tol", "1.0"),
                        ("--recon-metric", "l3"), ("--consistency-weight", "-1"),
                        ("--vae-epochs", "0"), ("--vae-data", "test"),
                        ("--purify-label", "dgmm"),
                        ("--ensemble", "0"), ("--ensemble-key", "1"),
                        ("--ensemble-key", "1,-2")):
        proc = _run("scripts/train.py", flag, value, "--out", "/nonexistent/x")
        assert proc.returncode == 2 and flag in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_train_ensemble_stage(quick_model, tmp_path):
    import shutil

    out = tmp_path / "fmnist"
    shutil.copytree(quick_model, out)
    proc = _run("scripts/train.py", "--quick", "--out", str(out), "--stages", "ensemble",
                "--verbose", "0")
    assert proc.returncode == 2 and "--ensemble K" in proc.stderr
    proc = _run("scripts/train.py", "--quick", "--out", str(out), "--stages", "ensemble",
                "--ensemble", "2", "--ensemble-key", "5,6", "--verbose", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("members/1/fmd.keras", "members/1/model_card.json", "fmd_ensemble.keras",
                 "serving_ensemble/1/saved_model.pb"):
        assert (out / name).is_file(), name
    card = json.loads((out / "model_card.json").read_text())
    assert card["ensemble"]["num_members"] == 2 and card["ensemble"]["selection_key"] == [5, 6]
    assert card["ensemble"]["reused_members"] == []
    member_card = json.loads((out / "members/1/model_card.json").read_text())
    assert member_card["member_index"] == 1 and "--member-index" not in member_card["command"]
    assert member_card["classifier_path"] == str(out / "classifier.keras")
    assert not (out / "members/1/classifier.keras").exists()  # the classifier is shared
    assert not (out / "members/1/serving").exists()  # served through serving_ensemble
    code = (
        "import sys, json, keras, numpy as np, fmd_tf; from fmd_tf.data import paper_splits\n"
        "ens = keras.models.load_model(sys.argv[1] + '/fmd_ensemble.keras')\n"
        "x = paper_splits('fmnist', 0).x_cle[:16]\n"
        "out = ens.defend(x)\n"
        "own = [m.defend(x[out['member'] == k])['verdict'].tolist() for k, m in "
        "enumerate(ens.members)]\n"
        "print(json.dumps({'k': ens.num_members, 'seeds': [m.seed for m in ens.members], "
        "'shared': all(m.classifier is ens.classifier for m in ens.members), "
        "'member': out['member'].tolist(), 'verdict': out['verdict'].tolist(), 'own': own}))"
    )
    proc = _run("-c", code, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["k"] == 2 and info["shared"] and info["seeds"][0] != info["seeds"][1]
    member, verdict = np.array(info["member"]), np.array(info["verdict"])
    for k in range(2):
        assert verdict[member == k].tolist() == info["own"][k]
    # A second run reuses member 1 (no --overwrite) and refuses to replace the ensemble file.
    proc = _run("scripts/train.py", "--quick", "--out", str(out), "--stages", "ensemble",
                "--ensemble", "2", "--verbose", "0")
    assert proc.returncode == 2 and "fmd_ensemble.keras" in proc.stderr
    # evaluate.py on the ensemble: EOT over its members, and transfer from member 0.
    for attacked, name in (("fmd_ensemble.keras", "eot"), ("fmd.keras", "transfer")):
        proc = _run("scripts/evaluate.py", "--model", str(out), "--defense", "fmd_ensemble.keras",
                    "--attack-defense", attacked, "--attacks", "adaptive_pgd", "--linf-eps",
                    "0.05", "--n", "4", "--out", str(tmp_path / name), "--cache",
                    str(tmp_path / "cache"), "--no-baselines")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["defense"] == "fmd_ensemble.keras"
        assert report["attack_defense"] == attacked
        assert "operating_points" not in report
        assert any("ensemble of 2 members" in note for note in report["notes"])
        entry = report["attacks"]["adaptive_pgd_linf_0.05"]
        assert entry["attack_cached"] is False  # EOT and member-0 attacks are different sets
        assert 0.0 <= entry["fm_defense"]["auc"] <= 1.0
    proc = _run("scripts/evaluate.py", "--model", str(out), "--defense", "nothing.keras")
    assert proc.returncode == 2 and "nothing.keras" in proc.stderr and "--ensemble" not in \
        proc.stderr


def test_train_missing_data_exits_2(tmp_path):
    env = dict(ENV, FMD_DATA_DIR=str(tmp_path / "empty"), HOME=str(tmp_path),
               FMD_NO_DOWNLOAD="1")
    code = ("import sys, runpy; import fmd_tf.data as d; d.DEBIAN_FMNIST_DIR = "
            "d.Path('/nonexistent'); sys.argv = ['train.py', '--quick', '--out', "
            f"{str(tmp_path / 'out')!r}]; runpy.run_path('scripts/train.py', run_name='__main__')")
    proc = _run("-c", code, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert "FMD_DATA_DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_runs_on_quick_model(quick_model, tmp_path):
    figure = tmp_path / "demo.png"
    proc = _run("scripts/demo.py", "--model", str(quick_model), "--n", "8", "--figure",
                str(figure))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy with FM-Defense" in proc.stdout and "FGSM eps=0.3" in proc.stdout
    assert figure.stat().st_size > 1000


def test_demo_missing_model_exits_2(tmp_path):
    proc = _run("scripts/demo.py", "--model", str(tmp_path))
    assert proc.returncode == 2 and "fmd.keras" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_report_schema(quick_model, tmp_path):
    out = tmp_path / "eval"
    proc = _run("scripts/evaluate.py", "--model", str(quick_model), "--attacks", "fgsm,deepfool",
                "--n", "12", "--out", str(out), "--cache", str(tmp_path / "cache"),
                "--no-baselines")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
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
    # Second run uses the cached adversarial set.
    proc = _run("scripts/evaluate.py", "--model", str(quick_model), "--attacks", "fgsm",
                "--n", "12", "--out", str(out), "--cache", str(tmp_path / "cache"),
                "--no-baselines")
    assert proc.returncode == 0
    assert json.loads((out / "report.json").read_text())["attacks"]["fgsm"]["attack_cached"]


def test_evaluate_adaptive_budget_grid(quick_model, tmp_path):
    out = tmp_path / "adaptive"
    proc = _run("scripts/evaluate.py", "--model", str(quick_model), "--attacks",
                "fgsm,adaptive_pgd", "--linf-eps", "0.05", "--l2-eps", "1.5", "--n", "4",
                "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-baselines")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["attacks"]) == ["fgsm", "adaptive_pgd_linf_0.05", "adaptive_pgd_l2_1.5"]
    linf, l2 = report["attacks"]["adaptive_pgd_linf_0.05"], report["attacks"]["adaptive_pgd_l2_1.5"]
    assert linf["method"] == "adaptive_pgd" and linf["params"]["norm"] == "linf"
    assert linf["linf_median"] <= 0.05 + 1e-6 and l2["l2_median"] <= 1.5 + 1e-4
    assert "defended_accuracy" in linf["fm_defense"]
    md = (out / "report.md").read_text()
    assert "## Security evaluation: adaptive attacks" in md
    assert "| adaptive_pgd | l2 | 1.5 |" in md
    # The paper's figures and operating points cover only the paper's attacks.
    assert all("adaptive" not in k for row in report["operating_points"] for k in row)
    # Adaptive attacks alone: no paper figures, still a report.
    proc = _run("scripts/evaluate.py", "--model", str(quick_model), "--attacks", "cw_hiconf",
                "--linf-eps", "0.05", "--n", "4", "--out", str(out / "only"),
                "--cache", str(tmp_path / "cache"), "--no-baselines")
    assert proc.returncode == 0, proc.stderr[-3000:]
    only = json.loads((out / "only" / "report.json").read_text())
    assert list(only["attacks"]) == ["adaptive_cw_hiconf_linf_0.05"]
    assert only["figures"] == ["fig1_resistance.png"] and "operating_points" not in only


@pytest.mark.parametrize("flag,value,message", [
    ("--linf-eps", "abc", "not a list of numbers"),
    ("--l2-eps", "1.5,-1", "must be > 0"),
    ("--attacks", "adaptive_foo", "unknown"),
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
    proc = _run("scripts/evaluate.py", "--model", str(model), "--attacks", "fgsm", "--n", "4",
                "--out", str(tmp_path / "out"), "--no-baselines")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hyperparameters.splits" in proc.stderr and "Traceback" not in proc.stderr


def test_operating_points_on_clean_val(quick_model, tmp_path):
    out = tmp_path / "ops.json"
    card = json.loads((quick_model / "model_card.json").read_text())
    cal, rho = card["calibration"], card["hyperparameters"]["defense"]["rho"]
    own_metric = card["hyperparameters"]["defense"]["recon_metric"]
    rhos, gates = sorted({1.0, rho}), sorted({0.0, 0.01, cal["recon_fpr"]})
    proc = _run("scripts/operating_points.py", "--model", str(quick_model), "--rho",
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
    assert report["attacks"] == {"names": ["fgsm"], "n": 6, "seed": 0}
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


@pytest.mark.parametrize("args,message", [
    (["--rho", "1.5"], "--rho: values must lie in (0.0, 1.0]"),
    (["--recon-fpr", "x"], "--recon-fpr: expected comma-separated numbers"),
    (["--modes", "per_code,global"], "--modes: choose from per_code, unified"),
    (["--recon-metric", "l3"], "--recon-metric: choose from mae, mse, pixel_share"),
    (["--recon-pixel-tol", "0.1,1"], "--recon-pixel-tol values must be < 1"),
    (["--recon-pixel-tol", "0"], "--recon-pixel-tol: values must lie in (0.0, 1.0]"),
    (["--attacks", "adaptive_pgd"], "--attacks: choose from fgsm, pgd"),
    (["--n-attack", "0"], "--n-attack must be >= 1"),
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


def test_run_cli_user_errors_exit_2_without_traceback(capsys):
    from fmd_tf.cli import UsageError, run_cli
    from fmd_tf.data import DataNotAvailableError

    def failing(error):
        def run(args):
            raise error
        return run

    assert run_cli(lambda args: None, lambda argv: argv, []) == 0
    assert run_cli(failing(UsageError("--n must be >= 1")), lambda argv: argv) == 2
    assert capsys.readouterr().err == "error: --n must be >= 1\n"
    assert run_cli(failing(DataNotAvailableError("no IDX files in /x")), lambda argv: argv) == 2
    assert capsys.readouterr().err == "error: no IDX files in /x\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not a usage error
        run_cli(failing(ZeroDivisionError()), lambda argv: argv)

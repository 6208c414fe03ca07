"""End-to-end checks of scripts/train.py and scripts/demo.py on the --quick config (the session
fixture `quick_model`, trained once by conftest.py), and of the scripts' error handling."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_case import run_python as _run


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


@pytest.fixture(scope="module")
def ensemble_model(quick_model, tmp_path_factory):
    """A copy of the quick model with `--stages ensemble --ensemble 2` trained into it."""
    out = tmp_path_factory.mktemp("ensemble") / "fmnist"
    shutil.copytree(quick_model, out)
    proc = _run("scripts/train.py", "--quick", "--out", str(out), "--stages", "ensemble",
                "--verbose", "0")
    assert proc.returncode == 2 and "--ensemble K" in proc.stderr
    proc = _run("scripts/train.py", "--quick", "--out", str(out), "--stages", "ensemble",
                "--ensemble", "2", "--ensemble-key", "5,6", "--verbose", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_train_ensemble_stage(ensemble_model, tmp_path):
    out = ensemble_model
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
    import keras

    import fmd_tf  # noqa: F401  (registers the Keras classes)
    from fmd_tf.data import paper_splits

    ens = keras.models.load_model(out / "fmd_ensemble.keras")
    x = paper_splits("fmnist", 0).x_cle[:16]
    result = ens.defend(x)
    assert ens.num_members == 2 and all(m.classifier is ens.classifier for m in ens.members)
    assert ens.members[0].seed != ens.members[1].seed
    for k, m in enumerate(ens.members):  # each row is its member's own answer
        rows = result["member"] == k
        assert result["verdict"][rows].tolist() == m.defend(x[rows])["verdict"].tolist()
    # A second run reuses member 1 (no --overwrite) and refuses to replace the ensemble file.
    proc = _run("scripts/train.py", "--quick", "--out", str(out), "--stages", "ensemble",
                "--ensemble", "2", "--verbose", "0")
    assert proc.returncode == 2 and "fmd_ensemble.keras" in proc.stderr
    _evaluate_ensemble(out, "fmd_ensemble.keras", tmp_path)  # EOT over its members
    proc = _run("scripts/evaluate.py", "--model", str(out), "--defense", "nothing.keras")
    assert proc.returncode == 2 and "nothing.keras" in proc.stderr and "--ensemble" not in \
        proc.stderr


@pytest.mark.slow
def test_evaluate_ensemble_with_a_transfer_attack_from_member_0(ensemble_model, tmp_path):
    _evaluate_ensemble(ensemble_model, "fmd.keras", tmp_path)


def _evaluate_ensemble(out, attacked, tmp_path):
    """scripts/evaluate.py on the ensemble with adaptive PGD made against `attacked`."""
    proc = _run("scripts/evaluate.py", "--model", str(out), "--defense", "fmd_ensemble.keras",
                "--attack-defense", attacked, "--attacks", "adaptive_pgd", "--linf-eps",
                "0.05", "--n", "4", "--out", str(tmp_path / "eval"), "--cache",
                str(tmp_path / "cache"), "--no-baselines")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["defense"] == "fmd_ensemble.keras"
    assert report["attack_defense"] == attacked
    assert "operating_points" not in report
    assert any("ensemble of 2 members" in note for note in report["notes"])
    entry = report["attacks"]["adaptive_pgd_linf_0.05"]
    assert entry["attack_cached"] is False  # a fresh cache: the attack ran
    assert 0.0 <= entry["fm_defense"]["auc"] <= 1.0


def test_train_missing_data_exits_2(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", FMD_DATA_DIR=str(tmp_path / "empty"),
               HOME=str(tmp_path), FMD_NO_DOWNLOAD="1")
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

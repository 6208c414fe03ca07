"""End-to-end checks of scripts/train.py and scripts/demo.py on the --quick config (the session
fixture `quick_model`, trained once by conftest.py), and of the scripts' error handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_case import run_python as _run
from test_case import run_script, script_module

from fmd_tf.cli import UsageError


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
    # --quick: the test figures on the first 1,024 test images, code activity on 128 / 4 VAL
    assert card["hyperparameters"]["splits"]["test_size"] == card["splits"]["test_figures"] \
        == 1024
    assert card["latent_codes"]["images"] == 32
    r_val = np.load(quick_model / "val_resistance.npy")
    assert r_val.shape == (128, 10)
    assert card["calibration"]["val_false_positive_rate"] <= 1 - 0.95 + 1e-9


def test_checked_in_quick_model_is_current_and_a_changed_config_is_not(tmp_path):
    import shutil

    import quick_model

    assert quick_model.is_current(quick_model.SHIPPED), \
        "tests/data/quick_model is stale or missing: run `make test-model`"
    copy = tmp_path / "fmnist"
    shutil.copytree(quick_model.SHIPPED, copy, ignore=shutil.ignore_patterns("*.keras", "serving"))
    (copy / "fmd.keras").touch()
    assert quick_model.is_current(copy)
    card = json.loads((copy / "model_card.json").read_text())
    card["hyperparameters"]["combo"]["vae_epochs"] += 1
    (copy / "model_card.json").write_text(json.dumps(card))
    assert not quick_model.is_current(copy)


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


def test_train_missing_data_exits_2(tmp_path, monkeypatch):
    import fmd_tf.data

    for name, value in (("FMD_DATA_DIR", tmp_path / "empty"), ("HOME", tmp_path),
                        ("FMD_NO_DOWNLOAD", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(fmd_tf.data, "DEBIAN_FMNIST_DIR", fmd_tf.data.Path("/nonexistent"))
    proc = run_script("scripts/train.py", "--quick", "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert "FMD_DATA_DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_runs_on_quick_model(quick_model, tmp_path):
    figure = tmp_path / "demo.png"
    proc = run_script("scripts/demo.py", "--model", str(quick_model), "--n", "8", "--figure",
                      str(figure))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy with FM-Defense" in proc.stdout and "FGSM eps=0.3" in proc.stdout
    assert figure.stat().st_size > 1000


def test_latent_codes_script_on_quick_model(quick_model, tmp_path):
    out = tmp_path / "codes" / "latent_codes.json"
    proc = run_script("scripts/latent_codes.py", "--model", str(quick_model), "--n", "16", "--out",
                      str(out), "--morph-scales", "1,8", "--morph-n", "6", "--cache",
                      str(tmp_path / "cache"), "--morph-bases", "reconstruction,input")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["num_codes"] == 10 and report["images"] == 16
    assert len(report["sweep_pixel_change"]) == len(report["kl_nats"]) == 10
    assert len(report["sweep_readback_slope"]) == 10
    assert report["num_active"] == sum(report["active"])
    assert "z9: KL" in proc.stdout
    zero = report["zero_resistance"]  # on all of the model's VAL images
    assert zero["images"] == len(np.load(quick_model / "val_resistance.npy"))
    assert 0.0 <= zero["zero_code_and_recon_label_differs"] <= zero["zero_code"] <= 1.0
    assert "reconstruction label differs on" in proc.stdout
    rows = report["morph_strength"]["rows"]  # one per scale and base, on 6 VAL images
    assert [(r["scale"], r["base"]) for r in rows] == [
        (1.0, "reconstruction"), (1.0, "input"), (8.0, "reconstruction"), (8.0, "input")]
    assert report["morph_strength"]["images"] == 6
    for row in rows:
        assert len(row["morph_pixel_change"]) == 10 and 0.0 <= row["clean_zero_share"] <= 1.0
        assert all(0.0 <= row[f"auc_min_{a}"] <= 1.0 for a in ("fgsm", "pgd"))
    # Larger offsets move the morphs further from the reconstruction.
    assert sum(rows[2]["morph_pixel_change"]) > sum(rows[0]["morph_pixel_change"])
    assert "morph scale 8, input base:" in proc.stdout
    for flag, value in (("--morph-scales", "1,x"), ("--morph-bases", "decoded"),
                        ("--morph-attacks", "adaptive_pgd")):
        bad = run_script("scripts/latent_codes.py", "--model", str(quick_model), flag, value)
        assert bad.returncode == 2 and flag in bad.stderr, (flag, bad.stderr[-500:])
    card = json.loads((quick_model / "model_card.json").read_text())
    assert card["latent_codes"]["num_codes"] == 10  # train.py writes the same figures
    proc = run_script("scripts/latent_codes.py", "--model", str(tmp_path))
    assert proc.returncode == 2 and "fmd.keras" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_missing_model_exits_2(tmp_path):
    proc = _run("scripts/demo.py", "--model", str(tmp_path))
    assert proc.returncode == 2 and "fmd.keras" in proc.stderr and "Traceback" not in proc.stderr


def test_import_fmd_tf_then_tensorflow_registers_its_keras_classes():
    # TensorFlow imports Keras inside its own import: the registration must wait for both.
    # (The other order, keras then fmd_tf, is what the test modules themselves do.)
    code = ("import fmd_tf, tensorflow\nimport keras\nnames = ['FMDefense', 'FMDefenseEnsemble', "
            "'ComboVAE', 'DGMM', 'Classifier']\nprint([n for n in names if keras.saving."
            "get_registered_object(f'fmd_tf>{n}') is None])")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


MODEL_SCRIPTS = ("demo", "evaluate", "latent_codes", "operating_points", "train_baselines")


@pytest.mark.parametrize("script", MODEL_SCRIPTS)
def test_seed_defaults_to_the_splits_in_the_model_card(script, tmp_path):
    """A model trained with --seed 3 is evaluated, calibrated against and shown on the splits of
    seed 3 unless another seed is given; a model without a card on those of seed 0."""
    parse_args = script_module(f"scripts/{script}.py").parse_args
    for name in ("fmd.keras", "val_resistance.npy", "classifier.keras"):
        (tmp_path / name).touch()
    model = ["--model", str(tmp_path)]
    assert parse_args(model).seed == 0
    (tmp_path / "model_card.json").write_text(json.dumps({"seed": 3}))
    assert parse_args(model).seed == 3
    assert parse_args([*model, "--seed", "1"]).seed == 1
    (tmp_path / "model_card.json").write_text("{")
    with pytest.raises(UsageError, match="not a JSON model card"):
        parse_args(model)


def test_train_seed_continues_the_model_in_out(tmp_path):
    """Later stages of a model (no classifier stage) use the seed of its card; a new model, or
    --seed, another."""
    parse_args = script_module("scripts/train.py").parse_args
    out = ["--out", str(tmp_path)]
    assert parse_args([*out, "--stages", "defense"]).seed == 0
    (tmp_path / "model_card.json").write_text(json.dumps({"seed": 2}))
    assert parse_args([*out, "--stages", "dgmm,vae,defense"]).seed == 2
    assert parse_args([*out, "--stages", "defense", "--seed", "0"]).seed == 0
    assert parse_args(out).seed == 0  # all stages: a new model
    assert parse_args([*out, "--stages", "defense", "--ensemble", "2"]).ensemble_key == (2, 2)


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

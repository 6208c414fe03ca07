"""scripts/train.py on the user's own data and classifier, and on the bundled 8x8 digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_case import run_python, run_script


def _train(*args):
    """scripts/train.py without an adversarial-set cache unless `args` name one."""
    cache = () if "--cache" in args else ("--cache", "none")
    return run_script("scripts/train.py", *args, *cache)


def _squares_npz(path, n_train=240, n_test=160, size=16):
    """A .npz in the documented layout: uint8 RGB squares whose colour is the class."""
    from test_pipeline import coloured_squares

    (x_tr, y_tr), (x_te, y_te) = (coloured_squares(n, seed=s, size=size)
                                  for n, s in ((n_train, 10), (n_test, 11)))
    np.savez(path, x_train=(x_tr * 255).astype(np.uint8), y_train=y_tr,
             x_test=(x_te * 255).astype(np.uint8), y_test=y_te)


def test_train_digits_fast_builds_a_defense_of_its_shape(tmp_path):
    out = tmp_path / "digits"
    proc = _train("--dataset", "digits", "--preset", "fast", "--out", str(out), "--verbose", "0",
                  "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any((tmp_path / "cache").iterdir())  # the VAL attacks of the operating point
    card = json.loads((out / "model_card.json").read_text())
    assert card["dataset"] == "digits" and card["preset"] == "fast"
    assert card["hyperparameters"]["image_shape"] == [8, 8, 1]
    assert card["operating_point"]["rule"].startswith("auto")
    assert (out / "serving/1/saved_model.pb").is_file()
    chosen = card["operating_point"]["rows"][card["operating_point"]["chosen_row"]]
    used = card["hyperparameters"]["defense"]  # the options of the saved defense
    assert (used["rho"], used["recon_fpr"], used["threshold_mode"], used["recon_metric"]) == (
        chosen["rho"], chosen["recon_fpr"], chosen["threshold_mode"], chosen["recon_metric"])
    assert card["calibration"]["recon_fpr"] == chosen["recon_fpr"]
    # Calibrated again on the saved combo-VAE, as for a retrained classifier: nothing trained.
    again = tmp_path / "again"
    proc = _train("--dataset", "digits", "--preset", "fast", "--out", str(again), "--verbose", "0",
                  "--classifier", str(out / "classifier.keras"), "--combo-vae",
                  str(out / "combo_vae.keras"), "--operating-point", "paper")
    assert proc.returncode == 0, proc.stderr[-3000:]
    card_again = json.loads((again / "model_card.json").read_text())
    assert card_again["stages_run"] == ["defense"] and not (again / "combo_vae.keras").exists()
    assert card_again["combo_vae_source"] == {"path": str(out / "combo_vae.keras"),
                                              **card["artifacts"]["combo_vae.keras"]}
    assert card_again["recon_label_agreement"] == pytest.approx(card["recon_label_agreement"])
    # Fine-tuning: the classifier stage starts from the trained classifier.
    tuned = tmp_path / "tuned"
    proc = _train("--dataset", "digits", "--preset", "fast", "--out", str(tuned), "--verbose",
                  "0", "--stages", "classifier", "--classifier-init",
                  str(out / "classifier.keras"), "--classifier-epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    card_tuned = json.loads((tuned / "model_card.json").read_text())
    assert card_tuned["classifier_init_source"] == {"path": str(out / "classifier.keras"),
                                                    **card["artifacts"]["classifier.keras"]}
    assert card_tuned["hyperparameters"]["classifier"]["init"] == str(out / "classifier.keras")
    assert card_tuned["classifier_test_accuracy"] > card["classifier_test_accuracy"] - 0.05
    # An adversarially trained classifier is checked with APGD on VAL; a standard one is not.
    assert "classifier_val_robustness" not in card
    robust = tmp_path / "robust"
    proc = _train("--dataset", "digits", "--preset", "fast", "--out", str(robust), "--verbose",
                  "0", "--stages", "classifier", "--classifier-training", "trades",
                  "--classifier-adversarial-steps", "1", "--classifier-epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from fmd_tf.evaluation.robustness import CHECK_IMAGES, CHECK_STEPS, masking_suspected

    robust_card = json.loads((robust / "model_card.json").read_text())
    check = robust_card["classifier_val_robustness"]
    assert check["eps"] == robust_card["hyperparameters"]["classifier"]["adversarial_eps"]
    assert check["nb_iter"] == CHECK_STEPS and 0 < check["n"] <= CHECK_IMAGES
    assert 0 <= check["worst_case_accuracy"] <= check["clean_accuracy"]
    assert check["masking_suspected"] == masking_suspected(check)
    assert f"worst case {check['worst_case_accuracy']:.3f}" in proc.stdout
    proc = _train("--dataset", "digits", "--preset", "fast", "--out", str(tmp_path / "bad"),
                  "--stages", "classifier", "--classifier-init", str(out / "classifier.keras"),
                  "--classifier-dense-units", "7")
    assert proc.returncode == 2 and "same architecture" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _users_rgb_model(tmp_path):
    """(the .npz, FM-Defense trained around a user's RGB classifier on it, at the fast preset)."""
    import keras

    data = tmp_path / "squares.npz"
    _squares_npz(data)
    with np.load(data) as f:
        x, y = f["x_train"] / 255.0, f["y_train"]
    keras.utils.set_random_seed(0)
    clf = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
    clf.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clf.fit(x, y, epochs=2, verbose=0)
    clf.save(tmp_path / "clf.keras")
    out = tmp_path / "mine"
    proc = _train("--data", str(data), "--classifier", str(tmp_path / "clf.keras"), "--preset",
                  "fast", "--operating-point", "paper", "--out", str(out), "--verbose", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, out


def test_train_protects_a_users_classifier_on_npz_data(tmp_path):
    data, out = _users_rgb_model(tmp_path)
    card = json.loads((out / "model_card.json").read_text())
    assert card["dataset"] == "squares" and card["stages_run"] == ["dgmm", "vae", "defense"]
    assert card["operating_point"] == {"rule": "paper", "options": {
        "threshold_mode": "per_code", "rho": 0.999, "recon_fpr": 0.0,
        "purify_label": "reconstruction"}}
    assert not (out / "classifier.keras").exists()  # the user's classifier stays where it is
    for name in ("fmd.keras", "combo_vae.keras", "serving/1/saved_model.pb"):
        assert (out / name).is_file(), name
    # The same classifier on images of another shape is refused before any training.
    _squares_npz(tmp_path / "big.npz", size=20)
    proc = _train("--data", str(tmp_path / "big.npz"), "--classifier",
                  str(tmp_path / "clf.keras"), "--preset", "fast", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "(16, 16, 3)" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "x" / "combo_vae.keras").exists()


@pytest.mark.slow
def test_baselines_and_evaluation_on_a_users_rgb_model(tmp_path):
    """RGB end to end past training: MagNet and Feature Squeezing around the user's classifier
    (named in the card), then attacks and the report with the baselines, on the user's .npz."""
    data, out = _users_rgb_model(tmp_path)
    proc = run_script("scripts/train_baselines.py", "--dataset", str(data), "--model", str(out),
                      "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    magnet = json.loads((out / "baselines" / "magnet" / "magnet.json").read_text())
    assert magnet["settings"]["image_shape"] == [16, 16, 3]
    proc = run_script("scripts/evaluate.py", "--dataset", str(data), "--model", str(out),
                      "--attacks", "fgsm,pgd", "--n", "20", "--out", str(tmp_path / "eval"),
                      "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    for attack in ("fgsm", "pgd"):
        assert set(report["attacks"][attack]) >= {"fm_defense", "magnet", "feature_squeezing"}
    assert report["calibration"]["magnet"]["fpr_source"].startswith("FM-Defense")


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/data.npz"], "--data /nonexistent/data.npz not found"),
    (["--rho", "0.9"], "--operating-point config"),
    (["--rho", "2", "--operating-point", "config"], "--rho: must be in (0, 1]"),
    (["--operating-point", "best"], "invalid choice: 'best'"),
    (["--preset", "tiny"], "invalid choice: 'tiny'"),
    (["--combo-vae", "/nonexistent/vae.keras"], "--combo-vae /nonexistent/vae.keras not found"),
    (["--combo-vae", "/nonexistent/vae.keras", "--stages", "vae,defense"],
     "--combo-vae names an existing model: drop the dgmm and vae stage(s)"),
    (["--classifier-init", "/nonexistent/c.keras"], "--classifier-init /nonexistent/c.keras: "
     "no such file"),
    (["--classifier-init", "/nonexistent/c.keras", "--stages", "defense"],
     "--classifier-init starts the classifier stage"),
])
def test_train_usage_errors_are_one_line_without_tensorflow_noise(args, message):
    proc = run_python("scripts/train.py", *args, "--out", "/nonexistent/out", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    if "invalid choice" not in message:  # argparse prints its usage first
        assert proc.stderr.startswith("error: "), proc.stderr[:500]


def test_train_refuses_a_malformed_npz(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 8, 8)), y_train=np.zeros(4))
    proc = _train("--data", str(bad), "--preset", "fast", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "x_test" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_mnist_from_official_idx_files(tmp_path, monkeypatch):
    """`--dataset mnist` end to end with the paper's MNIST settings (20 manipulated codes) at the
    fast preset's sizes, on the four IDX files in the official format (gzip, big-endian
    header) in $FMD_DATA_DIR/mnist: scikit-learn's 8x8 digits scaled to 28x28."""
    from sklearn.datasets import load_digits
    from test_data import IDX_FILES, _idx_bytes, _write_gz

    digits = load_digits()
    images = np.pad(np.kron(digits.images, np.ones((3, 3))), ((0, 0), (2, 2), (2, 2)))
    images = np.round(images * 255.0 / 16.0).astype(np.uint8)  # [1797, 28, 28]
    labels = digits.target.astype(np.uint8)
    arrays = {"x_train": images[:1200], "y_train": labels[:1200],
              "x_test": images[1200:], "y_test": labels[1200:]}
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    for key, name in IDX_FILES.items():
        _write_gz(tmp_path / "data" / "mnist" / name, _idx_bytes(arrays[key]))
    monkeypatch.setenv("FMD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FMD_NO_DOWNLOAD", "1")
    out = tmp_path / "mnist"
    proc = _train("--dataset", "mnist", "--preset", "fast", "--out", str(out), "--verbose", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "model_card.json").read_text())
    assert card["dataset"] == "mnist"
    assert card["hyperparameters"]["combo"]["shared_dim"] == 20
    assert card["hyperparameters"]["image_shape"] == [28, 28, 1]
    assert np.load(out / "val_resistance.npy").shape[1] == 20
    for name in ("classifier.keras", "fmd.keras", "serving/1/saved_model.pb"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_train_celeba_from_the_official_layout(tmp_path, monkeypatch):
    """`--dataset celeba` end to end at the fast preset's sizes on a generated tree in the
    official layout ($FMD_DATA_DIR/celeba: img_align_celeba/ JPEGs, identity_CelebA.txt), 10
    identities of 40 images: 64x64 RGB through training, calibration and the SavedModel."""
    from test_data import _fake_celeba

    _fake_celeba(tmp_path / "data" / "celeba", counts={k: 40 for k in range(1, 11)})
    monkeypatch.setenv("FMD_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "celeba"
    with pytest.warns(UserWarning, match="10 identities"):
        proc = _train("--dataset", "celeba", "--preset", "fast", "--out", str(out),
                      "--verbose", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "model_card.json").read_text())
    assert card["dataset"] == "celeba" and card["hyperparameters"]["num_classes"] == 10
    assert card["hyperparameters"]["image_shape"] == [64, 64, 3]
    for name in ("classifier.keras", "fmd.keras", "serving/1/saved_model.pb"):
        assert (out / name).is_file(), name


def test_card_keeps_the_hyperparameters_of_stages_not_rerun():
    from fmd_tf.training import card_hyperparameters

    old = {"classifier": {"epochs": 12}, "combo": {"beta": 6.0}, "defense": {"rho": 0.95},
           "splits": {"val_size": 2000}}
    new = {"classifier": {"epochs": 3, "precision": "auto"},
           "combo": {"beta": 2.0, "free_bits": 0.5}, "defense": {"rho": 0.9}, "splits": {}}
    # --stages defense: the classifier and the combo-VAE are the earlier run's, as described then.
    assert card_hyperparameters(new, old, ["defense"]) == {**new, "classifier": old["classifier"],
                                                           "combo": old["combo"]}
    # --stages vae retrains the combo-VAE (DGMM kept) and so describes it as configured now.
    assert card_hyperparameters(new, old, ["vae", "defense"]) == {
        **new, "classifier": old["classifier"]}
    assert card_hyperparameters(new, None, ["defense"]) == new  # a new model: all of it new
    assert card_hyperparameters(new, old, ["classifier", "dgmm", "vae", "defense"]) == new


def test_reuse_val_resistance_keeps_the_models_own_options(quick_model, tmp_path):
    """--stages defense --reuse-val-resistance re-thresholds OUT's defense: the options not
    given are OUT's (here those a first re-threshold set), not the defaults."""
    import shutil

    out = tmp_path / "model"
    shutil.copytree(quick_model, out)
    rerun = ("--quick", "--out", str(out), "--stages", "defense", "--reuse-val-resistance",
             "--operating-point", "config", "--overwrite", "--verbose", "0")
    proc = _train(*rerun, "--suspicious", "reject", "--eta", "0.85")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "model_card.json").read_text())["hyperparameters"]["defense"]
    assert (first["suspicious"], first["eta"], first["margin_fpr"]) == ("reject", 0.85, 0.0)
    proc = _train(*rerun, "--margin-fpr", "0.02")
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "model_card.json").read_text())
    assert card["hyperparameters"]["defense"] == {**first, "margin_fpr": 0.02}
    assert card["calibration"]["margin_fpr"] == 0.02

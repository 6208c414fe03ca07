"""scripts/train.py --stages ensemble on a copy of the quick model, and scripts/evaluate.py on the
ensemble it assembles (one file, so that pytest-xdist runs it beside the other script tests)."""

from __future__ import annotations

import json
import shutil

import pytest
from test_case import run_script as _run


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
    proc = _run("scripts/evaluate.py", "--model", str(out), "--defense", "fmd_ensemble.keras",
                "--suspicious", "reject", "--n", "4", "--out", str(tmp_path / "options"))
    assert proc.returncode == 2 and "suspicious" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "options" / "report.json").exists()
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

"""Model files that cannot lie and writes that cannot half-happen (fmd_tf.files, fmd_tf.loading):
atomic writes, SHA-256 records in the model card, `fmd_tf.load_defense`'s errors, and runs of
train / export / evaluate killed with SIGKILL."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from test_case import script_module

import fmd_tf
from fmd_tf import loading
from fmd_tf.cli import run_cli
from fmd_tf.files import StagedOutputs, atomic_path, sha256, write_json
from fmd_tf.loading import ModelFileError, load_defense, record_artifacts, verify_artifacts

ROOT = Path(__file__).resolve().parents[1]
MODEL_ARTIFACTS = ("classifier.keras", "combo_vae.keras", "fmd.keras", "val_resistance.npy",
                   "serving/1")


def _digests(directory: Path) -> dict:
    """{relative path: SHA-256} of every file under `directory` except logs/."""
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and "logs" not in p.relative_to(directory).parts}


@pytest.fixture()
def model_copy(quick_model, tmp_path) -> Path:
    """A writable copy of the quick model's directory (without its TensorBoard logs)."""
    target = tmp_path / "model"
    shutil.copytree(quick_model, target, ignore=shutil.ignore_patterns("logs"))
    return target


# --------------------------------------------------------------------------- fmd_tf.files


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        Path(tmp).write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]
    with atomic_path(target) as tmp:
        assert tmp.endswith(".json") and Path(tmp).parent == tmp_path
        Path(tmp).write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["report.json"]
    write_json(target, {"a": np.float32(0.5), "b": np.arange(2)})
    assert json.loads(target.read_text()) == {"a": 0.5, "b": [0, 1]}


def test_sha256_of_files_and_directories(tmp_path):
    (tmp_path / "a" / "variables").mkdir(parents=True)
    (tmp_path / "a" / "saved_model.pb").write_bytes(b"graph")
    (tmp_path / "a" / "variables" / "v").write_bytes(b"weights")
    assert sha256(tmp_path / "a" / "saved_model.pb") == hashlib.sha256(b"graph").hexdigest()
    first = sha256(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert sha256(tmp_path / "b") == first  # the content, not the location
    (tmp_path / "b" / "variables" / "v").write_bytes(b"weightz")
    assert sha256(tmp_path / "b") != first
    with pytest.raises(FileNotFoundError):
        sha256(tmp_path / "missing")


def test_staged_outputs_change_nothing_before_commit(tmp_path):
    out = tmp_path / "out"
    (out / "serving" / "1").mkdir(parents=True)
    (out / "serving" / "1" / "old_only").write_text("old")
    (out / "serving" / "2").mkdir()
    (out / "fmd.keras").write_text("old model")
    (out / "model_card.json").write_text("old card")
    before = _digests(out)
    stage = StagedOutputs(out)
    Path(stage.path("fmd.keras")).write_text("new model")
    os.makedirs(stage.path("serving/1"))
    Path(stage.path("serving/1/new_only")).write_text("new")
    Path(stage.path("model_card.json")).write_text("new card")
    assert stage.find("fmd.keras") == stage.path("fmd.keras")
    assert stage.find("classifier.keras") == str(out / "classifier.keras")
    assert stage.final(stage.path("serving/1")) == str(out / "serving" / "1")
    assert {k: v for k, v in _digests(out).items() if not k.startswith(".")} == before
    stage.commit(last="model_card.json")
    assert (out / "fmd.keras").read_text() == "new model"
    assert (out / "model_card.json").read_text() == "new card"
    # A version directory is swapped whole (no old file left in it); other versions stay.
    assert os.listdir(out / "serving" / "1") == ["new_only"]
    assert (out / "serving" / "2").is_dir()
    assert sorted(os.listdir(out)) == ["fmd.keras", "model_card.json", "serving"]
    # A staging directory left behind by a killed run is cleared by the next run.
    Path(StagedOutputs(out).path("half.keras")).write_text("half")
    StagedOutputs(out).discard()
    assert sorted(os.listdir(out)) == ["fmd.keras", "model_card.json", "serving"]


# --------------------------------------------------------------------------- load_defense


def test_card_records_every_artifact_and_they_verify(quick_model):
    with open(quick_model / "model_card.json") as f:
        card = json.load(f)
    assert set(MODEL_ARTIFACTS) <= set(card["artifacts"])
    for name in MODEL_ARTIFACTS:
        assert card["artifacts"][name]["sha256"] == sha256(quick_model / name)
    assert verify_artifacts(quick_model) == {name: "ok" for name in card["artifacts"]}
    assert not (quick_model / StagedOutputs.STAGING).exists()


def test_load_defense_loads_what_keras_loads(quick_model):
    fmd = fmd_tf.load_defense(quick_model)
    same = load_defense(quick_model / "fmd.keras")
    plain = keras.models.load_model(quick_model / "fmd.keras")  # keeps working
    x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    expected = plain.defend(x)
    for model in (fmd, same):
        out = model.defend(x)
        np.testing.assert_array_equal(out["verdict"], expected["verdict"])
        np.testing.assert_array_equal(out["label"], expected["label"])


def _first_line(excinfo) -> str:
    return str(excinfo.value).splitlines()[0]


def test_load_defense_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_defense(tmp_path)
    assert f"{tmp_path} holds no fmd.keras" in _first_line(e)
    with pytest.raises(FileNotFoundError) as e:
        load_defense(tmp_path / "fmd.keras")
    assert "no such file" in _first_line(e) and "scripts/train.py" in _first_line(e)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_load_defense_not_a_zip(model_copy, damage):
    path = model_copy / "fmd.keras"
    data = path.read_bytes()
    path.write_bytes(data[:300_000] if damage == "truncated" else b"garbage")
    with pytest.raises(ModelFileError) as e:
        load_defense(model_copy)
    line = _first_line(e)
    assert "is not a .keras archive" in line and "truncated" in line and str(path) in line


def test_load_defense_checksum_differs_from_the_card(model_copy):
    # A valid .keras file, but not the one the card describes: another defense saved over it.
    other = keras.models.load_model(model_copy / "fmd.keras")
    other.theta_d.assign(other.theta_d + 1.0)
    other.save(model_copy / "fmd.keras")
    with pytest.raises(ModelFileError) as e:
        load_defense(model_copy)
    line = _first_line(e)
    assert "is not the file" in line and "SHA-256" in line and "model_card.json" in line
    assert isinstance(load_defense(model_copy, verify=False), fmd_tf.FMDefense)
    record_artifacts(model_copy, ["fmd.keras"])  # accepted on purpose: the card follows
    assert load_defense(model_copy).theta_d.numpy() == pytest.approx(
        other.theta_d.numpy())


def test_load_defense_missing_artifact_the_card_describes(model_copy):
    shutil.rmtree(model_copy / "serving" / "1")
    with pytest.raises(FileNotFoundError) as e:
        verify_artifacts(model_copy)
    assert "serving/1 is missing" in _first_line(e)


def _rewrite_config(path: Path, change) -> None:
    """Rewrite config.json inside the .keras archive at `path` with `change(config)`."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    change(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_saved_config_records_the_format_and_a_newer_one_is_refused(model_copy):
    path = model_copy / "fmd.keras"
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))["config"]
    assert config["fmd_tf_format"] == loading.SAVE_FORMAT == 2
    assert config["fmd_tf_version"] == fmd_tf.__version__

    def newer(c):
        c["config"].update(fmd_tf_format=99, fmd_tf_version="9.0.0")

    _rewrite_config(path, newer)
    with pytest.raises(ModelFileError) as e:
        load_defense(model_copy, verify=False)
    line = _first_line(e)
    assert "fmd_tf 9.0.0" in line and "format 99" in line and "upgrade fmd_tf" in line
    with pytest.raises(ValueError, match="upgrade fmd_tf"):  # also without load_defense
        keras.models.load_model(path)


def test_load_defense_unknown_class_says_what_to_import(model_copy):
    def unknown(c):
        c["config"]["classifier"]["registered_name"] = "my_app>MyClassifier"
        c["config"]["classifier"]["class_name"] = "MyClassifier"

    _rewrite_config(model_copy / "fmd.keras", unknown)
    with pytest.raises(ModelFileError) as e:
        load_defense(model_copy, verify=False)
    line = _first_line(e)
    assert "not registered" in line and "import fmd_tf" in line and "MyClassifier" in line


def test_load_defense_refuses_a_model_that_is_not_a_defense(model_copy):
    with pytest.raises(ModelFileError, match="holds a .*, not an FMDefense"):
        load_defense(model_copy / "classifier.keras")


def test_export_script_refuses_a_changed_model_file(model_copy, capsys):
    script = script_module("scripts/export.py")
    assert script.main(["--model", str(model_copy / "fmd.keras"), "--out",
                        str(model_copy / "serving"), "--version", "2"]) == 0
    card = json.loads((model_copy / "model_card.json").read_text())
    assert card["artifacts"]["serving/2"]["sha256"] == sha256(model_copy / "serving" / "2")
    capsys.readouterr()
    with open(model_copy / "fmd.keras", "ab") as f:  # still a zip: trailing bytes are allowed
        f.write(b"\0")
    assert script.main(["--model", str(model_copy / "fmd.keras"), "--out",
                        str(model_copy / "serving"), "--version", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "SHA-256" in err and "Traceback" not in err
    assert not (model_copy / "serving" / "3").exists()


# --------------------------------------------------------------------------- SIGKILL


def _kill_at_random(command, seconds, seed, after=None):
    """Run `command` in a new process group and SIGKILL it a random time in `seconds` =
    (low, high) after it started, or after the path pattern `after` (a glob) first matched;
    returns True if it was killed, False if it finished first."""
    delay = random.Random(seed).uniform(*seconds)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        if after is not None:
            deadline = time.monotonic() + 300
            while not list(Path("/").glob(str(after).lstrip("/"))):
                assert proc.poll() is None, f"it finished before {after} appeared"
                assert time.monotonic() < deadline, f"{after} did not appear"
                time.sleep(0.05)
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _assert_intact(model_dir: Path, before: dict):
    after = {k: v for k, v in _digests(model_dir).items()
             if not k.startswith(StagedOutputs.STAGING)}
    assert after == before
    verify_artifacts(model_dir)
    fmd = load_defense(model_dir)
    assert fmd.is_calibrated


@pytest.mark.slow
def test_train_killed_at_a_random_point_leaves_the_previous_model(model_copy):
    before = _digests(model_copy)
    command = [sys.executable, "scripts/train.py", "--quick", "--operating-point", "config",
               "--stages", "defense", "--overwrite", "--verbose", "0", "--out",
               str(model_copy)]
    # Killed while it writes: from 0 to 2 s after the new fmd.keras is staged (the SavedModel
    # export and the card follow).
    staged = model_copy / StagedOutputs.STAGING / "fmd.keras"
    assert _kill_at_random(command, (0.0, 2.0), seed=int(time.time()), after=staged)
    _assert_intact(model_copy, before)


def test_export_killed_at_a_random_point_leaves_the_previous_version(model_copy):
    before = _digests(model_copy)
    command = [sys.executable, "scripts/export.py", "--model", str(model_copy / "fmd.keras"),
               "--out", str(model_copy / "serving"), "--version", "1", "--overwrite"]
    # Killed while the new version is written (its staging directory exists).
    assert _kill_at_random(command, (0.0, 1.5), seed=int(time.time()),
                           after=model_copy / "serving" / ".tmp-1-*")
    _assert_intact(model_copy, before)
    assert [d for d in os.listdir(model_copy / "serving") if not d.startswith(".")] == ["1"]


def test_truncated_cache_entry_is_recomputed(tmp_path):
    from fmd_tf.evaluation import harness

    classifier = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                   keras.layers.Dense(10)])
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    y = np.arange(4)
    first, info = harness.adversarial_set("fgsm", classifier, x, y, cache_dir=str(tmp_path))
    assert not info["cached"]
    (entry,) = tmp_path.glob("*.npz")
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])  # a write cut short (before atomic writes)
    again, info = harness.adversarial_set("fgsm", classifier, x, y, cache_dir=str(tmp_path))
    assert not info["cached"]
    np.testing.assert_allclose(again, first, atol=1e-6)
    _, info = harness.adversarial_set("fgsm", classifier, x, y, cache_dir=str(tmp_path))
    assert info["cached"]  # rewritten whole
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def test_chunked_attack_resumes_from_its_finished_pieces(tmp_path, monkeypatch):
    import fmd_tf.attacks as attacks
    from fmd_tf.evaluation import harness

    classifier = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                   keras.layers.Dense(10)])
    x = np.random.default_rng(0).random((7, 28, 28, 1), dtype=np.float32)
    y = np.arange(7) % 10
    monkeypatch.setitem(harness.ATTACKS, "fgsm_pieces",
                        harness.Attack("fgsm", {"eps": 0.3}, chunk=3))
    fgsm, made, stop_at = attacks.fgsm, [], []

    def counting(model, images, **params):
        if len(made) in stop_at:
            raise KeyboardInterrupt  # the run is stopped while making this piece
        made.append(len(images))
        return fgsm(model, images, **params)

    monkeypatch.setattr(attacks, "fgsm", counting)
    whole, _ = harness.adversarial_set("fgsm", classifier, x, y, None)
    assert made == [7]

    # Stopped while making the second piece of 3 + 3 + 1: the first stays cached.
    made.clear()
    stop_at.append(1)
    with pytest.raises(KeyboardInterrupt):
        harness.adversarial_set("fgsm_pieces", classifier, x, y, str(tmp_path))
    assert made == [3] and len(list(tmp_path.glob("fgsm_pieces_3_*.npz"))) == 1
    # The next run makes the other two pieces only, then caches the joined set.
    made.clear()
    stop_at.clear()
    x_adv, info = harness.adversarial_set("fgsm_pieces", classifier, x, y, str(tmp_path))
    assert made == [3, 1] and not info["cached"] and info["params"] == {"eps": 0.3}
    np.testing.assert_allclose(x_adv, whole, atol=1e-6)  # FGSM treats each image alone
    assert sorted(p.name.split("_")[2] for p in tmp_path.glob("fgsm_pieces_*.npz")) == \
        ["1", "3", "3", "7"]
    again, info = harness.adversarial_set("fgsm_pieces", classifier, x, y, str(tmp_path))
    assert made == [3, 1] and info["cached"]
    np.testing.assert_array_equal(again, x_adv)
    # A piece is the attack on its own images: the same cache entry as a run on them alone.
    _, info = harness.adversarial_set("fgsm_pieces", classifier, x[3:6], y[3:6], str(tmp_path))
    assert made == [3, 1] and info["cached"]
    # No more images than a piece: one run, cached under the plain key.
    _, info = harness.adversarial_set("fgsm_pieces", classifier, x[:2], y[:2], str(tmp_path))
    assert made == [3, 1, 2] and not info["cached"]


def test_defense_outputs_are_stored_per_defense_and_images(tmp_path):
    from fmd_tf.evaluation import harness

    calls = []

    def defend(x):  # a deterministic defense that counts its passes
        calls.append(len(x))
        return {"label": np.argmax(x.reshape(len(x), -1)[:, :3], axis=1),
                "verdict": np.zeros(len(x), np.int64), "purified": x * 0.5}

    x = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    first, cached = harness.defense_outputs("d", "fp1", defend, x, str(tmp_path))
    assert not cached and calls == [5]
    again, cached = harness.defense_outputs("d", "fp1", defend, x, str(tmp_path))
    assert cached and calls == [5]  # no second pass
    assert set(again) == set(first)
    for k in first:
        np.testing.assert_array_equal(again[k], first[k])
    # A truncated entry is computed again and rewritten whole.
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    assert not harness.defense_outputs("d", "fp1", defend, x, str(tmp_path))[1]
    assert harness.defense_outputs("d", "fp1", defend, x, str(tmp_path))[1]
    assert calls == [5, 5]
    # Another fingerprint (weights or settings), other images, another defense, no cache:
    # a new pass each.
    harness.defense_outputs("d", "fp2", defend, x, str(tmp_path))
    harness.defense_outputs("d", "fp1", defend, x[:4], str(tmp_path))
    harness.defense_outputs("e", "fp1", defend, x, str(tmp_path))
    assert not harness.defense_outputs("d", "fp1", defend, x, None)[1]
    assert calls == [5, 5, 5, 4, 5, 5]


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(4))
def test_train_killed_at_many_points_leaves_the_previous_model(model_copy, attempt):
    before = _digests(model_copy)
    command = [sys.executable, "scripts/train.py", "--quick", "--operating-point", "config",
               "--overwrite", "--verbose", "0", "--out", str(model_copy)]
    if not _kill_at_random(command, (5.0, 45.0), seed=attempt):  # it finished: all new
        before = _digests(model_copy)
    _assert_intact(model_copy, before)


@pytest.mark.slow
def test_evaluate_killed_at_a_random_point_leaves_whole_files(quick_model, tmp_path):
    out, cache = tmp_path / "eval", tmp_path / "cache"
    command = [sys.executable, "scripts/evaluate.py", "--model", str(quick_model), "--attacks",
               "fgsm,deepfool", "--n", "8", "--out", str(out), "--cache", str(cache),
               "--no-baselines"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    before = _digests(out)
    for attempt in range(3):
        _kill_at_random(command, (4.0, 30.0), seed=attempt)
        after = _digests(out)
        assert set(after) == set(before)  # no half-written file under a real name
        json.loads((out / "report.json").read_text())
        assert (out / "report.md").read_text().endswith("\n")
        for png in out.glob("*.png"):
            import matplotlib.image

            assert matplotlib.image.imread(png).size > 0
        for entry in cache.glob("*.npz"):
            with np.load(entry) as f:
                assert f["x_adv"].shape[0] == 8


def test_verify_model_script(model_copy, capsys):
    script = script_module("scripts/verify_model.py")
    main = lambda *a: run_cli(script.run, script.parse_args, list(a))  # noqa: E731
    assert main("--model", str(model_copy)) == 0
    out = capsys.readouterr().out
    assert "ok fmd.keras\n" in out and "ok serving/1\n" in out and "fmd.keras loads" in out
    np.save(model_copy / "val_resistance.npy", np.zeros(3))
    assert main("--model", str(model_copy)) == 2
    assert "val_resistance.npy is not the file" in capsys.readouterr().err
    assert main("--model", str(model_copy), "--record") == 0
    assert main("--model", str(model_copy)) == 0


@pytest.mark.parametrize("script", ["demo.py", "latent_codes.py", "evaluate.py",
                                    "operating_points.py"])
def test_scripts_refuse_a_changed_model_file(model_copy, script, capsys):
    module = script_module(f"scripts/{script}")
    with open(model_copy / "fmd.keras", "ab") as f:
        f.write(b"\0")
    extra = ["--n", "8"] if script == "evaluate.py" else []
    assert run_cli(module.run, module.parse_args, ["--model", str(model_copy), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not the file" in err and "SHA-256" in err

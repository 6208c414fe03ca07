"""Tests for the TF Serving path: fmd_tf.export, scripts/export.py and fmd_tf.serving.client.

No TF Serving binary is needed: `fmd_tf.serving.local_server.ServingServer` serves the exported
SavedModel over gRPC (PredictionService) and REST like TF Serving does. One tiny FMDefense
(untrained, tiny combo-VAE, classifier fitted on the toy batch, thresholds set so that the test
images get passed, purified and rejected verdicts) is built and exported once for the module; a
second one on 12x12x3 images (not the (Fashion-)MNIST shape) checks that the signatures and the
client take the image shape from the model (the client reads it from the server's metadata).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from test_case import TINY_COMBO_CONFIG, script_module, tiny_images, toy_classifier

import fmd_tf  # noqa: F401  (registers the Keras classes)
from fmd_tf.defense import FMDefense, NotCalibratedError
from fmd_tf.export import (
    SIGNATURES,
    VersionExistsError,
    describe_signatures,
    export_after_training,
    export_serving,
)
from fmd_tf.models import Classifier, build_combo_vae
from fmd_tf.serving import client
from fmd_tf.serving.local_server import ServingServer

REPO = Path(__file__).resolve().parents[1]
EXPORT_SCRIPT = REPO / "scripts" / "export.py"
INT_KEYS = {"label", "classifier_label", "verdict"}


# --------------------------------------------------------------------------- fixtures


def _tiny_defense():
    classifier, x, y = toy_classifier(epochs=15)
    combo = build_combo_vae(TINY_COMBO_CONFIG, (28, 28, 1), 10, seed=0)
    # Larger random weights: decoded morphs vary, so resistances are not all 0 or 1.
    for model in (combo.decoder, combo.shared_encoder):
        for w in model.weights:
            if "kernel" in w.path:
                w.assign(w.numpy() * 10.0)
    fmd = FMDefense(classifier, combo, num_morphs=4, candidates_per_step=2, max_steps=4,
                    chunk_size=64, rho=0.9, min_suspicious=2, name="fmd")
    fmd.calibrate(x[:24])
    images = np.concatenate([x[24:], tiny_images(8)])
    # Thresholds for a mix of verdicts (an untrained combo-VAE calibrates to "pass all").
    fmd.theta_r.assign(np.full(fmd.num_codes, 0.3, np.float32))
    distance = fmd.defend(images)["distance"]
    suspicious = np.unique(distance[distance > 0])
    theta_d = (suspicious[0] + suspicious[1]) / 2 if len(suspicious) > 1 else 0.0
    fmd.theta_d.assign(theta_d)
    return fmd, images


@pytest.fixture(scope="module")
def defense():
    """(fmd, images float32 [24, 28, 28, 1], reference outputs of fmd(images) as numpy)."""
    fmd, images = _tiny_defense()
    reference = {k: v.numpy() for k, v in fmd(images).items()}
    return fmd, images, reference


@pytest.fixture(scope="module")
def exported(defense, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    path = export_serving(defense[0], base, version=1)
    return Path(path)


@pytest.fixture(scope="module")
def server(exported):
    with ServingServer(exported, model_name="fmd", version=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def keras_file(defense, tmp_path_factory):
    path = tmp_path_factory.mktemp("keras") / "fmd.keras"
    defense[0].save(path)
    return path


def _assert_outputs_equal(expected, actual, keys=None):
    keys = sorted(expected) if keys is None else keys
    for key in keys:
        e, a = np.asarray(expected[key]), np.asarray(actual[key])
        assert e.shape == a.shape, key
        if key in INT_KEYS:
            np.testing.assert_array_equal(a, e, err_msg=key)
            assert a.dtype == e.dtype, key
        else:
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=key)


def _tree_digest(path) -> dict:
    """{relative path: (sha1, mtime_ns)} of every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            out[os.path.relpath(full, path)] = (digest, os.stat(full).st_mtime_ns)
    return out


def _raw_predict(target, array, signature="serving_default", model="fmd"):
    """A Predict call with no client-side checks (to send what the client would refuse)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(array))
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return stub.Predict(request, timeout=30)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_INPUTS = [
    ("nan", np.full((1, 28, 28, 1), np.nan, np.float32), "NaN or Inf"),
    ("above_one", np.full((1, 28, 28, 1), 2.0, np.float32), "found a value > 1"),
    ("below_zero", np.full((1, 28, 28, 1), -0.5, np.float32), "found a value < 0"),
    ("wrong_shape", np.zeros((1, 27, 27, 1), np.float32), "images must be [batch, 28, 28, 1]"),
    ("empty", np.zeros((0, 28, 28, 1), np.float32), "empty batch"),
]


# --------------------------------------------------------------------------- export


def test_fixture_covers_every_verdict(defense):
    verdicts = set(defense[2]["verdict"].tolist())
    assert {0, 2} <= verdicts, verdicts  # passed and rejected (label -1) at least
    distance = defense[2]["distance"]
    if len(np.unique(distance[distance > 0])) > 1:  # theta_d lies between two distances
        assert 1 in verdicts, verdicts
    assert (defense[2]["label"] != defense[2]["classifier_label"]).any()


def test_export_writes_four_signatures_with_documented_io(exported):
    assert exported.name == "1"
    assert sorted(os.listdir(exported.parent)) == ["1"]  # no temporary leftovers
    assert (exported / "saved_model.pb").is_file() and (exported / "variables").is_dir()
    sigs = describe_signatures(exported)
    assert set(sigs) == set(SIGNATURES)
    for name, keys in SIGNATURES.items():
        assert sigs[name]["inputs"] == {"images": ("float32", (-1, 28, 28, 1))}, name
        assert set(sigs[name]["outputs"]) == set(keys), name
    out = sigs["serving_default"]["outputs"]
    assert out["label"] == ("int64", (-1,)) and out["verdict"] == ("int32", (-1,))
    assert out["resistance"] == ("float32", (-1, 4))
    assert out["purified"] == ("float32", (-1, 28, 28, 1))
    assert sigs["classify"]["outputs"]["logits"] == ("float32", (-1, 10))


def test_signatures_equal_fmdefense_outputs(defense, server):
    fmd, images, reference = defense
    sigs = server.backend.signatures
    assert set(sigs) == set(SIGNATURES)
    x = tf.constant(images)
    full = sigs["serving_default"](images=x)
    _assert_outputs_equal(reference, full)
    _assert_outputs_equal(reference, sigs["detect"](images=x), list(SIGNATURES["detect"]))
    classify = sigs["classify"](images=x)
    logits = fmd.classifier(images).numpy()
    np.testing.assert_allclose(classify["logits"], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(classify["label"], reference["classifier_label"])
    purify = sigs["purify"](images=x)
    np.testing.assert_allclose(purify["purified"], reference["purified"], rtol=1e-5, atol=1e-6)
    purified_label = np.argmax(fmd.classifier(reference["purified"]).numpy(), axis=-1)
    if fmd.purify_label == "corroborated":  # the input's own label where the DGMM agrees
        dgmm = np.argmax(fmd.combo_vae.dgmm.class_logits(fmd.combo_vae.encode(x)[2]), axis=-1)
        own = reference["classifier_label"]
        purified_label = np.where(dgmm == own, own, purified_label)
    np.testing.assert_array_equal(purify["label"], purified_label)
    rows = reference["verdict"] == 1
    np.testing.assert_array_equal(purify["label"].numpy()[rows], reference["label"][rows])


@pytest.mark.parametrize("name,array,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_every_signature_validates_in_graph(server, name, array, message):
    for signature, fn in server.backend.signatures.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            fn(images=tf.constant(array))
        assert message in info.value.message, signature


def test_tf1_session_loader_runs_signatures_like_tf_serving(defense, exported):
    """TF Serving runs SavedModels in a Session by signature tensor names; do the same."""
    _, images, reference = defense
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(exported))
        for name in ("serving_default", "purify"):
            sig = meta.signature_def[name]
            fetches = {k: v.name for k, v in sig.outputs.items()}
            out = session.run(fetches, {sig.inputs["images"].name: images})
            if name == "serving_default":
                _assert_outputs_equal(reference, out)
            else:
                np.testing.assert_allclose(out["purified"], reference["purified"], rtol=1e-5,
                                           atol=1e-6)
        sig = meta.signature_def["detect"]
        with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
            session.run(sig.outputs["verdict"].name,
                        {sig.inputs["images"].name: np.full((1, 28, 28, 1), np.nan, np.float32)})


def test_saved_model_cli_show_lists_signatures(exported):
    cli = Path(sys.executable).parent / "saved_model_cli"
    result = subprocess.run([str(cli), "show", "--dir", str(exported), "--all"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in result.stdout
    assert "inputs['images']" in result.stdout
    assert "Method name is: tensorflow/serving/predict" in result.stdout


def test_export_refuses_existing_version_and_overwrites_atomically(defense, tmp_path):
    fmd = defense[0]
    first = export_after_training(fmd, tmp_path)  # the train.py hook: out_dir/serving/1
    assert first == str(tmp_path / "serving" / "1")
    before = _tree_digest(first)
    with pytest.raises(VersionExistsError, match="already exists"):
        export_serving(fmd, tmp_path / "serving", version=1)
    assert _tree_digest(first) == before
    assert export_after_training(fmd, tmp_path) == first  # the hook overwrites
    assert _tree_digest(first) != before
    assert sorted(os.listdir(tmp_path / "serving")) == ["1"]  # no temporary leftovers
    assert set(describe_signatures(first)) == set(SIGNATURES)
    with pytest.raises(ValueError, match="positive integer"):
        export_serving(fmd, tmp_path, version=0)


def test_export_refuses_uncalibrated_defense(defense, tmp_path):
    fmd = defense[0]
    fresh = FMDefense(fmd.classifier, fmd.combo_vae, num_morphs=4, candidates_per_step=2,
                      max_steps=4)
    fresh.build((None, 28, 28, 1))
    with pytest.raises(NotCalibratedError):
        export_serving(fresh, tmp_path)
    assert os.listdir(tmp_path) == []


def test_xla_export_records_jit_and_matches(defense, tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2

    fmd, images, reference = defense
    if not fmd._xla_compatible():  # checked bfloat16 morphs ("auto" on this machine)
        with pytest.raises(ValueError, match="fixed shapes"):
            export_serving(fmd, tmp_path / "refused", jit_compile=True)
        fmd = fmd.copy_with(**FMDefense.XLA_OPTIONS)
    path = export_serving(fmd, tmp_path, jit_compile=True)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    functions = proto.meta_graphs[0].graph_def.library.function
    assert any(f.attr["_XlaMustCompile"].b for f in functions if "_XlaMustCompile" in f.attr)
    out = tf.saved_model.load(path).signatures["detect"](images=tf.constant(images[:4]))
    _assert_outputs_equal({k: reference[k][:4] for k in SIGNATURES["detect"]}, out,
                          list(SIGNATURES["detect"]))


# --------------------------------------------------------------------------- scripts/export.py


def _run_export_script(*args):
    return subprocess.run([sys.executable, str(EXPORT_SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_export_script_refuses_existing_version(exported, keras_file):
    before = _tree_digest(exported.parent)
    result = _run_export_script("--model", keras_file, "--out", exported.parent)
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    assert _tree_digest(exported.parent) == before


@pytest.mark.parametrize("kind", ["missing", "not_zip", "wrong_extension"])
def test_export_script_bad_model_file(tmp_path, kind):
    model = tmp_path / ("fmd.keras" if kind != "wrong_extension" else "fmd.h5")
    if kind != "missing":
        model.write_text("not a model")
    result = _run_export_script("--model", model, "--out", tmp_path / "serving")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert str(model) in result.stderr
    assert not (tmp_path / "serving").exists()


def test_export_script_exports_and_prints_signatures(keras_file, tmp_path, capsys):
    script = script_module("scripts/export.py")
    assert script.main(["--model", str(keras_file), "--out", str(tmp_path), "--version",
                        "2"]) == 0
    out = capsys.readouterr().out
    for name in SIGNATURES:
        assert f"signature {name!r}" in out
    assert "images" in out and "float32" in out
    assert set(describe_signatures(tmp_path / "2")) == set(SIGNATURES)
    # A Keras file that is not an FMDefense.
    other = tmp_path / "classifier.keras"
    keras.models.load_model(keras_file).classifier.save(other)
    assert script.main(["--model", str(other), "--out", str(tmp_path), "--version", "5"]) == 2
    assert "not an FMDefense" in capsys.readouterr().err


def test_decision_exposure_serves_label_and_verdict_only(defense, keras_file, tmp_path):
    """`--exposure decision`: one signature, the full export's label and verdict, nothing an
    attacker could score (no logits, resistances or errors); the oracle of a decision-based
    attack reads it over gRPC, and a score-based attack is refused."""
    from fmd_tf.attacks import QueryOracle, api_rays, api_square

    fmd, images, reference = defense
    script = script_module("scripts/export.py")
    assert script.main(["--model", str(keras_file), "--out", str(tmp_path), "--version", "1",
                        "--exposure", "decision"]) == 0
    sigs = describe_signatures(tmp_path / "1")
    assert set(sigs) == {"serving_default"}
    assert set(sigs["serving_default"]["outputs"]) == {"label", "verdict"}
    assert script.main(["--model", str(keras_file), "--out", str(tmp_path), "--version", "2",
                        "--exposure", "scores"]) == 2
    with pytest.raises(ValueError, match="exposure must be one of full, decision"):
        export_serving(fmd, tmp_path, version=3, exposure="scores")
    assert not (tmp_path / "3").exists()
    with ServingServer(tmp_path / "1", model_name="fmd", version=1) as srv:
        grpc_client = client.GrpcClient(srv.target, timeout=30)
        out = grpc_client.predict("fmd", images)
        assert set(out) == {"label", "verdict"}
        _assert_outputs_equal(reference, out, keys=["label", "verdict"])
        with pytest.raises(client.ServingError):
            grpc_client.predict("fmd", images[:1], signature="classify")
        oracle = QueryOracle.from_client(grpc_client, exposure="decision")
        assert not oracle.has_logits
        y = reference["classifier_label"][:3]
        _, rec = api_rays(oracle, images[:3], y, eps=0.1, max_queries=4)
        assert rec["queries"].max() <= 4
        with pytest.raises(ValueError, match="logits"):
            api_square(oracle, images[:3], y, max_queries=4)
        grpc_client.close()


def _gates_only(fmd, images):
    """A copy of `fmd` whose resistance thresholds cannot flag (θr < 0, as on the robust mode)
    and whose reconstruction and margin gates each reject some of `images`."""
    gated = fmd.copy_with()
    gated.theta_r.assign(np.full(gated.num_codes, -0.1, np.float32))
    gated.theta_e.assign(np.median(gated.reconstruction_error(images)))
    gated.theta_m.assign(np.quantile(gated.logit_margins(images), 0.2))
    return gated


def test_decision_export_runs_only_the_gates_when_no_resistance_can_flag(defense, tmp_path,
                                                                         monkeypatch):
    """A decision export of a defense whose thresholds cannot flag (θr < 0, as on the robust
    mode) serves the gates' graph, never the morph search, with the full defense's label and
    verdict; one whose thresholds can flag serves the whole defense, never the gates alone."""
    fmd, images, _ = defense
    gated = _gates_only(fmd, images)
    reference = {name: {k: v.numpy() for k, v in model(images).items()}
                 for name, model in (("gated", gated), ("fmd", fmd))}
    assert set(np.unique(reference["gated"]["verdict"])) == {0, 2}  # both gates reject some

    def forbidden(*args, **kwargs):
        raise AssertionError("traced the wrong graph")

    for name, model, patched in (("gated", gated, "_defend"), ("fmd", fmd, "_gate_decisions")):
        with monkeypatch.context() as patch:
            patch.setattr(FMDefense, patched, forbidden)
            path = export_serving(model, tmp_path / name, version=1, exposure="decision")
        served = tf.saved_model.load(path).signatures["serving_default"]
        out = {k: v.numpy() for k, v in served(images=tf.constant(images)).items()}
        assert set(out) == {"label", "verdict"}
        _assert_outputs_equal(reference[name], out, keys=["label", "verdict"])


def test_bench_times_the_decision_export_of_a_model_that_cannot_flag(defense):
    """`scripts/bench.py --sections serving` times a model whose thresholds cannot flag also
    as its decision export (the gates only), with ratios to its default path and table rows;
    a model that can flag has no decision entry."""
    from fmd_tf.evaluation.bench import BenchConfig, _table_rows, section_serving

    fmd, images, _ = defense
    calls = {f"{where}_batch_{batch}" for where in ("in_process", "grpc") for batch in (1, 64)}
    for model, decision in ((_gates_only(fmd, images), True), (fmd, False)):
        ctx = {"cfg": BenchConfig(latency_reps=(1, 2)), "x": images[:4], "default": model,
               "fmd": model.copy_with(**model.FULL_BUDGET),
               "report": {"settings": {"default_budget": {}}}}
        result = section_serving(ctx)
        assert set(result["ratios"]) == calls
        assert ("decision" in result) is decision and ("decision_ratios" in result) is decision
        report = {"serving_latency": result, "device": {"name": "cpu"}, "peak_rss_mib": 1.0}
        rows = {row[0] for row in _table_rows(report)}
        assert ("serving_decision_grpc_batch_64_p50_ms" in rows) is decision
        if decision:
            assert set(result["decision"]) == set(result["decision_ratios"]) == calls
            for key, ratio in result["decision_ratios"].items():
                assert ratio["p50_speedup"] == pytest.approx(
                    result["default"][key]["p50_ms"] / result["decision"][key]["p50_ms"])


# --------------------------------------------------------------------------- gRPC client


def test_grpc_predict_every_signature(defense, server):
    _, images, reference = defense
    sigs = server.backend.signatures
    for signature, keys in SIGNATURES.items():
        out = client.predict_grpc(server.target, "fmd", images, signature, timeout=30)
        assert set(out) == set(keys), signature
        expected = {k: v.numpy() for k, v in sigs[signature](images=tf.constant(images)).items()}
        _assert_outputs_equal(expected, out)
    out = client.predict_grpc(server.target, "fmd", images[:, :, :, 0].astype(np.float64),
                              timeout=30, version=1)  # [N, 28, 28] float64 is accepted
    _assert_outputs_equal(reference, out)
    out = client.predict_grpc(server.target, "fmd", images[:2], "detect",
                              output_filter=["verdict"])
    assert list(out) == ["verdict"]
    np.testing.assert_array_equal(out["verdict"], reference["verdict"][:2])


def test_grpc_metadata_lists_signatures(server, exported):
    meta = client.get_model_metadata(server.target, "fmd")
    assert meta["model"] == "fmd" and meta["version"] == 1
    assert meta["signatures"] == describe_signatures(exported)


@pytest.mark.parametrize("name,array,message", BAD_INPUTS[:4], ids=[b[0] for b in BAD_INPUTS[:4]])
def test_grpc_bad_input_is_invalid_argument_and_server_survives(defense, server, name, array,
                                                                message):
    with pytest.raises(grpc.RpcError) as info:
        _raw_predict(server.target, array, "serving_default")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _raw_predict(server.target, array.astype(np.float64), "classify")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if name != "wrong_shape":  # the client itself checks shapes; values are the server's job
        with pytest.raises(client.ServingError) as err:
            client.predict_grpc(server.target, "fmd", array, "classify")
        assert err.value.code == "INVALID_ARGUMENT" and message in err.value.message
    else:  # refused before sending, naming the model's shape (from its metadata)
        with pytest.raises(client.ImageInputError, match=r"\[N, 28, 28, 1\] or \[N, 28, 28\]"):
            client.predict_grpc(server.target, "fmd", array, "classify")
    _, images, reference = defense
    out = client.predict_grpc(server.target, "fmd", images[:2], "classify")
    np.testing.assert_array_equal(out["label"], reference["classifier_label"][:2])


def test_identical_requests_identical_answers(defense, server):
    _, images, _ = defense
    first = client.predict_grpc(server.target, "fmd", images, timeout=30)
    second = client.predict_grpc(server.target, "fmd", images, timeout=30)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    single = client.predict_grpc(server.target, "fmd", images[5:6], timeout=30)
    for key in first:  # an image's answer does not depend on the rest of the batch
        np.testing.assert_allclose(single[key][0], first[key][5], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- client CLI


@pytest.fixture
def npy(tmp_path, defense):
    path = tmp_path / "x.npy"
    np.save(path, defense[1][:3])
    return path


def test_cli_prints_json_outputs(server, npy, defense, capsys):
    code = client.main(["--target", server.target, "--images", str(npy), "--outputs",
                        "label,verdict", "--warmup", "1", "--repeat", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = json.loads(captured.out)
    assert printed == {"label": defense[2]["label"][:3].tolist(),
                       "verdict": defense[2]["verdict"][:3].tolist()}
    assert "median" in captured.err and "1 warm-up" in captured.err
    assert client.main(["--target", server.target, "--metadata"]) == 0
    assert "purify" in json.loads(capsys.readouterr().out)["signatures"]


@pytest.mark.parametrize("flags,message", [
    (["--model", "nope"], "model 'nope' not found"),
    (["--version", "7"], "version 7 not found"),
    (["--signature", "explain"], "signature 'explain' not served"),
])
def test_cli_wrong_model_version_or_signature_exits_2(server, npy, capsys, flags, message):
    assert client.main(["--target", server.target, "--images", str(npy), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_server_rejects_input_exits_2_with_message(server, tmp_path, capsys):
    path = tmp_path / "bright.npy"
    np.save(path, np.full((2, 28, 28), 2.0, np.float64))
    assert client.main(["--target", server.target, "--images", str(path)]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "found a value > 1" in err
    assert client.main(["--rest", server.rest_url, "--images", str(path)]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "found a value > 1" in err


def test_cli_unreachable_server_exits_2(npy, capsys):
    port = _unused_port()
    assert client.main(["--target", f"127.0.0.1:{port}", "--images", str(npy),
                        "--timeout", "5"]) == 2
    assert "cannot reach TF Serving" in capsys.readouterr().err
    assert client.main(["--rest", f"http://127.0.0.1:{port}", "--images", str(npy),
                        "--timeout", "5"]) == 2
    assert "cannot reach TF Serving" in capsys.readouterr().err


def test_cli_silent_server_times_out_with_exit_2(npy, capsys):
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        for flags in (["--target", f"127.0.0.1:{port}"], ["--rest", f"http://127.0.0.1:{port}"]):
            assert client.main([*flags, "--images", str(npy), "--timeout", "1"]) == 2
            err = capsys.readouterr().err
            assert "within --timeout 1 s" in err, err


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file"),
    ("not_npy", "expected a .npy file"),
    ("garbage", "not a readable .npy"),
    ("uint8", "found dtype uint8"),
    ("channels", "found [3, 32, 32, 2]"),
    ("rank", "found [3, 32]"),
])
def test_cli_bad_images_file_exits_2(tmp_path, capsys, kind, message):
    path = tmp_path / ("x.txt" if kind == "not_npy" else "x.npy")
    if kind in ("not_npy", "garbage"):
        path.write_text("1 2 3")
    elif kind == "uint8":
        np.save(path, np.zeros((2, 28, 28, 1), np.uint8))
    elif kind == "channels":  # no model has 2 channels: refused before any request
        np.save(path, np.zeros((3, 32, 32, 2), np.float32))
    elif kind == "rank":
        np.save(path, np.zeros((3, 32), np.float32))
    port = _unused_port()  # never contacted: the file is checked first
    assert client.main(["--target", f"127.0.0.1:{port}", "--images", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


# --------------------------------------------------------------------------- REST


def test_rest_predict_matches_grpc_and_maps_errors(defense, server):
    _, images, reference = defense
    for signature in ("serving_default", "purify"):
        rest = client.predict_rest(server.rest_url, "fmd", images[:4], signature, timeout=30)
        grpc_out = client.predict_grpc(server.target, "fmd", images[:4], signature, timeout=30)
        _assert_outputs_equal(grpc_out, rest)
    with pytest.raises(client.ServingError) as err:
        client.predict_rest(server.rest_url, "nope", images[:1])
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(client.ServingError) as err:
        client.predict_rest(server.rest_url, "fmd", images[:1], "explain")
    assert err.value.code == "FAILED_PRECONDITION"
    bad = images[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(client.ServingError) as err:
        client.predict_rest(server.rest_url, "fmd", bad)
    assert err.value.code == "INVALID_ARGUMENT" and "NaN" in err.value.message
    # The README's row format: {"signature_name", "instances"} -> {"predictions": [...]}.
    body = json.dumps({"signature_name": "classify", "instances": images[:2].tolist()})
    request = urllib.request.Request(f"{server.rest_url}/v1/models/fmd:predict",
                                     data=body.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        predictions = json.loads(response.read())["predictions"]
    assert [p["label"] for p in predictions] == reference["classifier_label"][:2].tolist()


def test_serving_config_names_the_model_and_compose_mounts_it():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "serving", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    models = {m.name: m.base_path for m in config.model_config_list.config}
    assert models == {"fmd": "/models/fmd", "fmd_robust": "/models/fmd_robust"}
    with open(os.path.join(root, "serving", "docker-compose.yml")) as f:
        compose = f.read()
    for name, model in (("fmd", "fmnist"), ("fmd_robust", "fmnist_robust")):
        assert f"../saved_models/{model}/serving:/models/{name}:ro" in compose
        assert os.path.isfile(os.path.join(root, "saved_models", model, "serving", "1",
                                           "saved_model.pb"))


# --------------------------------------------------------------------------- other image shapes

SMALL_SHAPE = (12, 12, 3)


def test_check_images_follows_the_given_shape():
    rgb = np.zeros((2, *SMALL_SHAPE), np.float64)
    out = client.check_images(rgb, SMALL_SHAPE)
    assert out.dtype == np.float32 and out.shape == (2, *SMALL_SHAPE)
    assert client.check_images(rgb).shape == (2, *SMALL_SHAPE)  # generic: C in {1, 3}
    assert client.check_images(np.zeros((2, 8, 8), np.float32), (8, 8, 1)).shape == (2, 8, 8, 1)
    assert client.check_images(np.zeros((2, 8, 8), np.float32)).shape == (2, 8, 8, 1)
    assert client.check_images(rgb, (None, None, 3)).shape == (2, *SMALL_SHAPE)  # -1 dims
    with pytest.raises(client.ImageInputError, match=r"\[N, 12, 12, 3\] \(the served model"):
        client.check_images(np.zeros((2, 28, 28, 1), np.float32), SMALL_SHAPE)
    with pytest.raises(client.ImageInputError, match=r"\[N, 12, 12, 3\].*found \[2, 12, 12\]"):
        client.check_images(np.zeros((2, 12, 12), np.float32), SMALL_SHAPE)  # C = 3: no [N,H,W]
    with pytest.raises(client.ImageInputError, match=r"\[N, 8, 8, 1\] or \[N, 8, 8\]"):
        client.check_images(np.zeros((2, 28, 28), np.float32), (8, 8, 1))
    with pytest.raises(client.ImageInputError, match="C in {1, 3}"):
        client.check_images(np.zeros((2, 8, 8, 4), np.float32))
    with pytest.raises(client.ImageInputError, match="empty batch"):
        client.check_images(np.zeros((0, *SMALL_SHAPE), np.float32), SMALL_SHAPE)
    assert not hasattr(client, "IMAGE_SHAPE")


@pytest.fixture(scope="module")
def small_defense():
    """(fmd on 12x12x3 images, 3 classes, calibrated; images [8, 12, 12, 3]; fmd.defend)."""
    keras.utils.set_random_seed(1)
    x = np.random.default_rng(1).uniform(size=(20, *SMALL_SHAPE)).astype(np.float32)
    classifier = Classifier(num_classes=3, conv_filters=(4, 4), dense_units=(8,), dropout=0.0,
                            name="classifier")
    combo = build_combo_vae(TINY_COMBO_CONFIG, SMALL_SHAPE, 3, seed=0)
    for model in (combo.decoder, combo.shared_encoder):  # varied morphs (see _tiny_defense)
        for w in model.weights:
            if "kernel" in w.path:
                w.assign(w.numpy() * 10.0)
    fmd = FMDefense(classifier, combo, num_morphs=4, candidates_per_step=2, max_steps=2,
                    chunk_size=64, min_suspicious=2, name="fmd")
    fmd.calibrate(x[:12])
    images = x[12:]
    # Thresholds for a mix of verdicts (the untrained model calibrates to "reject all"): the
    # most resistant image just passes; the others are purified or rejected by distance.
    resistance = fmd.resistance(images)
    fmd.theta_r.assign((resistance[resistance.sum(axis=1).argmax()] - 0.1).astype(np.float32))
    distance = fmd.defend(images)["distance"]
    suspicious = np.unique(distance[distance > 0])
    fmd.theta_d.assign((suspicious[0] + suspicious[1]) / 2 if len(suspicious) > 1 else 0.0)
    reference = fmd.defend(images)
    assert len(set(reference["verdict"].tolist())) >= 2, reference["verdict"]
    return fmd, images, reference


@pytest.fixture(scope="module")
def small_exported(small_defense, tmp_path_factory):
    return Path(export_serving(small_defense[0], tmp_path_factory.mktemp("small"), version=1))


@pytest.fixture(scope="module")
def small_server(small_exported):
    with ServingServer(small_exported, model_name="fmd", version=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def small_server_no_metadata(small_exported):
    """The same model behind a server that does not answer metadata (an older server)."""
    with ServingServer(small_exported, model_name="fmd", version=1, metadata=False) as srv:
        yield srv


def test_small_model_signatures_and_metadata_take_its_shape(small_exported, small_server):
    sigs = describe_signatures(small_exported)
    for name in SIGNATURES:
        assert sigs[name]["inputs"] == {"images": ("float32", (-1, *SMALL_SHAPE))}, name
    assert sigs["serving_default"]["outputs"]["purified"] == ("float32", (-1, *SMALL_SHAPE))
    assert sigs["classify"]["outputs"]["logits"] == ("float32", (-1, 3))
    assert client.get_model_metadata(small_server.target, "fmd", timeout=30)["signatures"] == sigs
    rest = client.get_model_metadata_rest(small_server.rest_url, "fmd", timeout=30, version=1)
    assert rest["signatures"] == sigs and rest["model"] == "fmd" and rest["version"] == 1
    # TF Serving's REST metadata JSON: proto field names, the map nested under signature_def.
    with urllib.request.urlopen(f"{small_server.rest_url}/v1/models/fmd/metadata",
                                timeout=30) as response:
        raw = json.loads(response.read())
    images = raw["metadata"]["signature_def"]["signature_def"]["detect"]["inputs"]["images"]
    assert images["dtype"] == "DT_FLOAT"
    assert [int(d["size"]) for d in images["tensor_shape"]["dim"]] == [-1, *SMALL_SHAPE]


def test_small_model_through_grpc_and_rest_equals_defend(small_defense, small_server):
    fmd, images, reference = small_defense
    before = small_server.backend.metadata_requests
    with client.GrpcClient(small_server.target, timeout=30) as grpc_client, \
            client.RestClient(small_server.rest_url, timeout=30) as rest_client:
        for c in (grpc_client, rest_client):
            assert c.input_shape("fmd") == SMALL_SHAPE
            for _ in range(2):
                out = c.predict("fmd", images)
                np.testing.assert_array_equal(out["verdict"], reference["verdict"])
                np.testing.assert_array_equal(out["label"], reference["label"])
                np.testing.assert_allclose(out["resistance"], reference["resistance"],
                                           rtol=1e-5, atol=1e-6)
            detect = c.predict("fmd", images[:3].astype(np.float64), "detect")
            np.testing.assert_array_equal(detect["verdict"], reference["verdict"][:3])
            assert c.input_shape("fmd", "classify") == SMALL_SHAPE
            assert c.metadata_requests == 1  # read once, for every signature and request
    assert small_server.backend.metadata_requests - before == 2  # one per client object
    out = client.predict_rest(small_server.rest_url, "fmd", images[:2], "classify", timeout=30)
    np.testing.assert_array_equal(out["label"], reference["classifier_label"][:2])


def test_client_refuses_other_shapes_naming_the_models_shape(small_server, small_defense,
                                                             tmp_path, capsys):
    mnist = np.zeros((2, 28, 28, 1), np.float32)
    predicts = small_server.backend.requests
    with pytest.raises(client.ImageInputError, match=r"\[N, 12, 12, 3\].*found \[2, 28, 28, 1\]"):
        client.predict_grpc(small_server.target, "fmd", mnist, timeout=30)
    with pytest.raises(client.ImageInputError, match=r"\[N, 12, 12, 3\]"):
        client.predict_rest(small_server.rest_url, "fmd", mnist, timeout=30)
    with pytest.raises(client.ImageInputError, match=r"\[N, 12, 12, 3\].*found \[2, 12, 12\]"):
        client.predict_grpc(small_server.target, "fmd", small_defense[1][:2, :, :, 0],
                            timeout=30)
    assert small_server.backend.requests == predicts  # nothing was sent
    path = tmp_path / "mnist.npy"
    np.save(path, mnist)
    for flags in (["--target", small_server.target], ["--rest", small_server.rest_url]):
        assert client.main([*flags, "--images", str(path), "--timeout", "30"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and "Traceback" not in err
        assert "[N, 12, 12, 3]" in err and "found [2, 28, 28, 1]" in err
    assert small_server.backend.requests == predicts


def test_cli_on_small_model_reads_metadata_once(small_server, small_defense, tmp_path, capsys):
    _, images, reference = small_defense
    path = tmp_path / "x.npy"
    np.save(path, images[:3])
    for flags in (["--target", small_server.target], ["--rest", small_server.rest_url]):
        before = small_server.backend.metadata_requests
        assert client.main([*flags, "--images", str(path), "--outputs", "verdict", "--warmup",
                            "1", "--repeat", "2", "--timeout", "30"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out) == {"verdict": reference["verdict"][:3].tolist()}
        assert small_server.backend.metadata_requests - before == 1
        assert client.main([*flags, "--metadata", "--timeout", "30"]) == 0
        meta = json.loads(capsys.readouterr().out)
        assert meta["signatures"]["classify"]["inputs"]["images"] == "float32 [None, 12, 12, 3]"


def test_server_without_metadata_falls_back_to_its_own_check(small_server_no_metadata,
                                                             small_defense, tmp_path, capsys):
    server = small_server_no_metadata
    _, images, reference = small_defense
    with client.GrpcClient(server.target, timeout=30) as grpc_client, \
            client.RestClient(server.rest_url, timeout=30) as rest_client:
        for c in (grpc_client, rest_client):
            assert c.input_shape("fmd") is None
            out = c.predict("fmd", images)
            np.testing.assert_array_equal(out["verdict"], reference["verdict"])
            with pytest.raises(client.ServingError) as err:  # the server's in-graph check
                c.predict("fmd", np.zeros((2, 28, 28, 1), np.float32))
            assert err.value.code == "INVALID_ARGUMENT"
            assert "images must be [batch, 12, 12, 3]" in err.value.message
            assert c.metadata_requests == 1  # "no metadata" is remembered too
    path = tmp_path / "mnist.npy"
    np.save(path, np.zeros((2, 28, 28), np.float32))
    for flags in (["--target", server.target], ["--rest", server.rest_url]):
        assert client.main([*flags, "--images", str(path), "--timeout", "30"]) == 2
        err = capsys.readouterr().err
        assert err == ("error: the server rejected the input (INVALID_ARGUMENT): images must be "
                       "[batch, 12, 12, 3]\n")

"""Serving under load (issue 22, point 4): `fmd_tf.serving.load_test` against the local
PredictionService (gRPC) and REST test server, with and without server-side batching.

On the `scripts/train.py --quick` model (`quick_model`) and its exported SavedModel
(quick_model/serving/1): real Fashion-MNIST test images, the expected answers computed by
`FMDefense` in this process. The bounded load (8 clients, 10 % malformed) runs in `make test`;
the full-size one (2,000 requests per protocol and batching setting) is marked slow; the bench
section `serving_load` (`scripts/bench.py --sections serving_load`) records its figures.
"""

from __future__ import annotations

import threading

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import fmd_tf  # noqa: F401  (registers the Keras classes)
from fmd_tf.data import load_dataset
from fmd_tf.serving import client
from fmd_tf.serving.load_test import BAD_KINDS, expected_outputs, make_schedule, run_load
from fmd_tf.serving.local_server import ServingServer

SIGNATURES = ("serving_default", "classify", "detect", "purify")
CLIENTS = 8
# Warm-up requests before the measured run: enough that most of the server's 2 x CLIENTS worker
# threads have served one (each thread's first request grows the heap once: with 12, the
# batching run grew 68 MiB on one machine of this kind, 4 MiB past the limit).
WARMUP = 4 * CLIENTS
# Resident memory may grow by at most this much over one measured run (the server, its
# batching queues and the clients all live in this process, at ~1 GiB RSS).
RSS_LIMIT_MIB = 64.0


@pytest.fixture(scope="module")
def setup(quick_model):
    """(SavedModel path, images float32 [24, 28, 28, 1], {signature: FMDefense outputs})."""
    fmd = keras.models.load_model(quick_model / "fmd.keras")
    (_, _), (x_test, _) = load_dataset("fmnist")
    images = np.ascontiguousarray(x_test[:24], np.float32)
    return quick_model / "serving" / "1", images, expected_outputs(fmd, images, SIGNATURES)


def _check(report, requests):
    """Everything a load report must show."""
    assert report["complete"] and not report["time_limit_hit"], report
    assert report["requests"] == requests
    assert report["failures"] == [] and report["wrong_answers"] == 0
    assert report["unexpected_statuses"] == 0
    assert report["bad"] == round(0.1 * requests) and report["good"] == requests - report["bad"]
    assert report["good_ok"] == report["good"]
    assert report["bad_invalid_argument"] == report["bad"]
    assert set(report["bad_by_kind"]) == set(BAD_KINDS[report["protocol"]])  # every kind
    assert all(v["invalid_argument"] == v["sent"] for v in report["bad_by_kind"].values())
    assert report["statuses"] == {"OK": report["good"], "INVALID_ARGUMENT": report["bad"]}
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert report["throughput_rps"] > 0 and report["wall_s"] > 0
    rss = report["rss_mib"]
    assert rss["before"] > 0 and rss["max"] >= rss["after"] > 0
    assert rss["growth"] <= RSS_LIMIT_MIB, rss
    assert report["passed"]


def test_schedule_is_deterministic_with_every_bad_kind():
    first = make_schedule(10, 200, 0.1, seed=3, signatures=SIGNATURES, batch_sizes=(1, 2))
    again = make_schedule(10, 200, 0.1, seed=3, signatures=SIGNATURES, batch_sizes=(1, 2))
    assert [repr(r) for r in first] == [repr(r) for r in again]
    other = make_schedule(10, 200, 0.1, seed=4, signatures=SIGNATURES, batch_sizes=(1, 2))
    assert [repr(r) for r in first] != [repr(r) for r in other]
    bad = [r for r in first if r.kind != "good"]
    assert len(bad) == 20
    counts = {k: sum(r.kind == k for r in bad) for k in BAD_KINDS["grpc"]}
    assert set(counts.values()) <= {2, 3} and sum(counts.values()) == 20
    rest = make_schedule(10, 200, 0.1, seed=3, signatures=SIGNATURES, batch_sizes=(1, 2),
                         kinds=BAD_KINDS["rest"])
    assert [(r.index, r.signature, r.rows.tolist()) for r in rest] == \
        [(r.index, r.signature, r.rows.tolist()) for r in first]
    good = [r for r in first if r.kind == "good"]
    assert {len(r.rows) for r in good} == {1, 2} and {r.signature for r in good} == \
        set(SIGNATURES)
    assert all(0 <= i < 10 for r in first for i in r.rows)
    with pytest.raises(ValueError, match="bad_share"):
        make_schedule(10, 20, 1.5)


@pytest.mark.parametrize("batching", [False, True], ids=["batching_off", "batching_on"])
def test_bounded_load_grpc_and_rest(setup, batching):
    """8 clients, 90 requests per protocol (9 bad: one of each kind), every answer checked."""
    path, images, expected = setup
    with ServingServer(path, max_workers=2 * CLIENTS, batching=batching) as server:
        reports = [run_load(server, images, expected, clients=CLIENTS, requests=90,
                            bad_share=0.1, protocol=protocol, seed=seed, time_limit_s=60,
                            signatures=SIGNATURES, batch_sizes=(1, 2), warmup=WARMUP,
                            rss_limit_mib=RSS_LIMIT_MIB)
                   for seed, protocol in enumerate(("grpc", "rest"))]
        stats = server.backend.batching_stats()
    for report in reports:
        _check(report, 90)
        assert report["server"]["batching"] is batching
    if batching:
        # Concurrent requests were merged, and the batches holding a bad request were rerun
        # one request at a time (or the bad one ran alone: no fall-back needed).
        assert stats["merged"] >= 1 and stats["max_requests"] >= 2, stats
        assert stats["graph_calls"] >= stats["batches"]
        assert sum(r["server"]["stats"]["requests"] for r in reports) > 0
    else:
        assert stats == dict.fromkeys(stats, 0)  # no queue: one graph call per request


def _grpc_send(target, array, signature="classify", name="images"):
    """A raw Predict call: {output: array} or the grpc.RpcError."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "fmd"
    request.model_spec.signature_name = signature
    request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=60)
        except grpc.RpcError as e:
            return e
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _rest_send(url, array, signature="classify"):
    try:
        return client.predict_rest(url, "fmd", array, signature, timeout=60)
    except client.ServingError as e:
        return e


def _together(calls):
    """Runs the calls at the same moment (one thread each); their results in order."""
    results = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def work(i):
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    return results


def _assert_equal(answer, expected, rows):
    assert isinstance(answer, dict), answer
    assert set(answer) == set(expected)
    for key, value in expected.items():
        if value.dtype.kind in "iu":
            np.testing.assert_array_equal(answer[key], value[rows], err_msg=key)
        else:
            np.testing.assert_allclose(answer[key], value[rows], rtol=1e-5, atol=1e-5,
                                       err_msg=key)


@pytest.mark.parametrize("signature", ["classify", "serving_default"])
def test_bad_request_in_a_batch_fails_alone(setup, signature):
    """A NaN (gRPC) and an out-of-range (REST) request forced into one batch with good gRPC
    and REST requests (4 rows fill a batch; the timeout is 30 s): the merged call fails in
    the graph, the batch is rerun one request at a time, and only the bad ones fail."""
    path, images, expected = setup
    expected = expected[signature]
    nan = images[3:4].copy()
    nan[0, 5, 5, 0] = np.nan
    bright = images[4:5] * 0 + 1.5
    with ServingServer(path, max_workers=8, batching=True, max_batch_size=5,
                       batch_timeout_micros=30_000_000) as server:
        results = _together([
            lambda: _grpc_send(server.target, images[0:1], signature),
            lambda: _grpc_send(server.target, nan, signature),
            lambda: _rest_send(server.rest_url, images[1:3], signature),
            lambda: _rest_send(server.rest_url, bright, signature),
        ])  # 5 rows: one full batch, run at once
        stats = server.backend.batching_stats()
        assert stats == {"batches": 1, "requests": 4, "merged": 1, "fallbacks": 1,
                         "graph_calls": 5, "max_requests": 4, "max_rows": 5}
        _assert_equal(results[0], expected, [0])
        assert isinstance(results[1], grpc.RpcError)
        assert results[1].code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN or Inf" in results[1].details()
        _assert_equal(results[2], expected, [1, 2])
        assert isinstance(results[3], client.ServingError)
        assert results[3].code == "INVALID_ARGUMENT" and "found a value > 1" in \
            results[3].message

        # Good requests alone: one merged graph call, split back by rows. Requests that do
        # not fit the signature (float64, wrong size, wrong input name) never join a batch:
        # they are refused at once as without batching (else they would wait 30 s).
        results = _together([
            lambda: _grpc_send(server.target, images[5:7], signature),
            lambda: _grpc_send(server.target, images[7:8].astype(np.float64), signature),
            lambda: _grpc_send(server.target, images[7:8, 1:, 1:], signature),
            lambda: _grpc_send(server.target, images[7:8], signature, name="image"),
            lambda: _rest_send(server.rest_url, images[8:11], signature),
        ])
        after = server.backend.batching_stats()
        assert {k: after[k] - stats[k] for k in ("batches", "requests", "merged", "fallbacks",
                                                  "graph_calls")} == \
            {"batches": 1, "requests": 2, "merged": 1, "fallbacks": 0, "graph_calls": 1}
        _assert_equal(results[0], expected, [5, 6])
        for result, message in zip(results[1:4], ("to be float32 but float64 is provided",
                                                  "images must be [batch, 28, 28, 1]",
                                                  "input size does not match signature"),
                                   strict=True):
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, result
            assert message in result.details()
        _assert_equal(results[4], expected, [8, 9, 10])


def test_batching_parameters_are_checked(setup):
    with pytest.raises(ValueError, match="max_batch_size"):
        ServingServer(setup[0], batching=True, max_batch_size=0)


@pytest.mark.slow
def test_full_size_load(setup):
    """>= 8 clients, 2,000 requests (10 % bad) per protocol and batching setting."""
    path, images, expected = setup
    for batching in (False, True):
        with ServingServer(path, max_workers=2 * CLIENTS, batching=batching) as server:
            for protocol in ("grpc", "rest"):
                report = run_load(server, images, expected, clients=CLIENTS, requests=2000,
                                  bad_share=0.1, protocol=protocol, time_limit_s=600,
                                  signatures=SIGNATURES, batch_sizes=(1, 2),
                                  rss_limit_mib=RSS_LIMIT_MIB)
                _check(report, 2000)

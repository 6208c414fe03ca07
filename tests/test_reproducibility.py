"""Reproducibility (issue 22, point 5): an image gets the same verdict, label and resistance
whatever else is in its batch (batch size 1, 3, 8, 17, first / middle / last / shuffled), and
after a save -> load -> export -> serve round trip (the eager model, `keras.models.load_model`
of its file, the exported SavedModel called in-process, and the SavedModel served over gRPC and
REST by the in-process stand-in `fmd_tf.serving.local_server.ServingServer`). Across processes:
tests/test_defense.py::test_deterministic_across_processes.

Model: the session's quick Fashion-MNIST model (`quick_model`), loaded once for the module. Its
own operating point passes every image (ρ 0.95 on an undertrained combo-VAE), so the module
moves its thresholds (θr, θd, θe set between observed values, never on one) to get passed,
purified and rejected images, gate included, among the 24 test images: Fashion-MNIST test
images, some with noise, some blended.

Verdicts, labels and resistances must be equal; floats (distance, purified image,
reconstruction error) equal within 1e-5 (batch size changes the float sums of the convolutions
by ~1e-7).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import tiny_images, toy_batch

import fmd_tf  # noqa: F401  (registers the Keras classes)
from fmd_tf.data import DataNotAvailableError, load_dataset
from fmd_tf.defense.fm_defense import OUTPUT_KEYS
from fmd_tf.export import export_serving
from fmd_tf.serving import client
from fmd_tf.serving.local_server import ServingServer

EXACT = ("verdict", "label", "classifier_label", "resistance")
BATCH_SIZES = (1, 3, 8, 17)


def _between(values, upper_share):
    """A threshold halfway between two neighbouring distinct `values`, with about
    `upper_share` of the distinct values above it (one distinct value: 0.5 above it)."""
    distinct = np.unique(values)
    if len(distinct) == 1:
        return float(distinct[0]) + 0.5
    k = min(max(int(round(len(distinct) * (1 - upper_share))), 1), len(distinct) - 1)
    return float((distinct[k - 1] + distinct[k]) / 2)


@pytest.fixture(scope="module")
def pool():
    """float32 [24, 28, 28, 1]: 16 Fashion-MNIST test images, 4 with noise, 4 blends of two
    (toy blocks and noise when Fashion-MNIST is not installed)."""
    try:
        x = load_dataset("fmnist")[1][0][:24]
    except DataNotAvailableError:
        x = np.concatenate([toy_batch()[0][:16], tiny_images(8, seed=1)])
    rng = np.random.default_rng(0)
    noisy = np.clip(x[16:20] + rng.uniform(-0.3, 0.3, x[16:20].shape), 0.0, 1.0)
    blends = 0.5 * x[20:24] + 0.5 * x[:4]
    return np.concatenate([x[:16], noisy, blends]).astype(np.float32)


@pytest.fixture(scope="module")
def defense(quick_model, pool):
    """The quick model with thresholds that give the pool all three verdicts."""
    fmd = keras.models.load_model(quick_model / "fmd.keras")
    out = fmd.defend(pool)
    # Its resistances are multiples of 1/N: no r equals θr = 0.5 + 1/(2N).
    theta_r = 0.5 + 0.5 / fmd.num_morphs
    fmd.theta_r.assign(np.full(fmd.num_codes, theta_r, np.float32))
    distance = np.sum(np.maximum(theta_r - out["resistance"], 0.0), axis=1)
    fmd.theta_d.assign(_between(distance[distance > 0], 0.5))
    fmd.theta_e.assign(_between(out["recon_error"], 0.1))  # the gate rejects a few
    return fmd


@pytest.fixture(scope="module")
def reference(defense, pool):
    """The eager model's outputs on the whole pool in one batch."""
    return defense.defend(pool, batch_size=len(pool))


def assert_same_answers(expected, actual, where):
    for key in OUTPUT_KEYS:
        e, a = np.asarray(expected[key]), np.asarray(actual[key])
        assert a.shape == e.shape, f"{where}: {key} shape {a.shape} != {e.shape}"
        if key in EXACT:
            assert a.dtype == e.dtype, f"{where}: {key} dtype {a.dtype} != {e.dtype}"
            np.testing.assert_array_equal(a, e, err_msg=f"{where}: {key}")
        else:
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, err_msg=f"{where}: {key}")


def _rows(out, rows):
    return {key: np.asarray(out[key])[rows] for key in OUTPUT_KEYS}


def test_pool_gets_every_verdict(defense, reference):
    verdict = reference["verdict"]
    assert set(verdict.tolist()) == {0, 1, 2}, verdict
    gated = reference["recon_error"] > defense.theta_e.numpy()
    assert gated.any() and np.all(verdict[gated] == 2), "the gate rejects no image"


# --------------------------------------------------------------------------- batch / position


def _placed(size, targets, others):
    """A batch of `size` pool indices: `targets` first, in the middle and last (as many as fit),
    the rest from `others`."""
    batch = np.full(size, -1)
    slots = sorted({0, size // 2, size - 1})
    batch[slots] = targets[: len(slots)]
    batch[batch < 0] = others[: int(np.sum(batch < 0))]
    return batch


def test_same_answers_whatever_the_batch_size_and_position(defense, pool, reference):
    n = len(pool)
    rng = np.random.default_rng(0)
    # One image of each verdict; each takes every slot (first, middle, last) in turn.
    targets = np.array([int(np.flatnonzero(reference["verdict"] == v)[0]) for v in (0, 1, 2)])
    rest = np.setdiff1d(np.arange(n), targets)
    batches = [np.array([t]) for t in targets] + [np.repeat(targets[:1], 3)]  # alone; twice
    for size in BATCH_SIZES[1:]:
        for turn in range(3):
            batches.append(_placed(size, np.roll(targets, turn), rng.permutation(rest)))
    for size in BATCH_SIZES[2:]:  # the whole pool shuffled, in batches (and a shorter last)
        order = rng.permutation(n)
        batches += [order[i : i + size] for i in range(0, n, size)]
    for batch in batches:
        out = defense.defend(pool[batch], batch_size=len(batch))
        assert_same_answers(_rows(reference, batch), out, f"batch {batch.tolist()}")
    # defend's own batching, and the Keras call on a tensor, reversed.
    assert_same_answers(reference, defense.defend(pool, batch_size=5), "defend(batch_size=5)")
    called = {k: v.numpy() for k, v in defense(tf.constant(pool[::-1])).items()}
    assert_same_answers(_rows(reference, np.arange(n)[::-1]), called, "call, reversed")


# --------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def round_trip(defense, tmp_path_factory):
    """(the model after save -> keras.models.load_model, its SavedModel export path)."""
    tmp = tmp_path_factory.mktemp("round_trip")
    defense.save(tmp / "fmd.keras")
    loaded = keras.models.load_model(tmp / "fmd.keras")
    return loaded, Path(export_serving(loaded, tmp / "serving", version=1))


def test_same_answers_after_save_and_load(defense, round_trip, pool, reference):
    loaded, _ = round_trip
    for name in defense.STATE_WEIGHTS:
        np.testing.assert_array_equal(getattr(loaded, name).numpy(),
                                      getattr(defense, name).numpy(), err_msg=name)
    assert_same_answers(reference, loaded.defend(pool), "loaded")
    assert_same_answers(_rows(reference, [7]), loaded.defend(pool[7:8]), "loaded, alone")


def test_same_answers_from_the_exported_saved_model(round_trip, pool, reference):
    fn = tf.saved_model.load(str(round_trip[1])).signatures["serving_default"]
    out = {k: v.numpy() for k, v in fn(images=tf.constant(pool)).items()}
    assert_same_answers(reference, out, "SavedModel")
    order = np.random.default_rng(1).permutation(len(pool))[:5]
    out = {k: v.numpy() for k, v in fn(images=tf.constant(pool[order])).items()}
    assert_same_answers(_rows(reference, order), out, "SavedModel, 5 shuffled")


def test_same_answers_served_over_grpc_and_rest(round_trip, pool, reference):
    with ServingServer(round_trip[1], model_name="fmd", version=1) as server:
        grpc_out = client.predict_grpc(server.target, "fmd", pool, timeout=120)
        rest_out = client.predict_rest(server.rest_url, "fmd", pool, timeout=120)
        alone = client.predict_grpc(server.target, "fmd", pool[7:8], timeout=60)
    assert_same_answers(reference, grpc_out, "gRPC")
    assert_same_answers(reference, rest_out, "REST")
    assert_same_answers(_rows(reference, [7]), alone, "gRPC, alone")

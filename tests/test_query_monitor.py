"""Blacklight query monitor (fmd_tf.serving.query_monitor): fingerprints and the store's rule."""

import json

import numpy as np
import pytest
from test_case import run_script

from fmd_tf.data import DataNotAvailableError, load_dataset
from fmd_tf.serving.query_monitor import QueryMonitor, fingerprints, stream_flags


def _images(n, seed=0, side=28):
    return np.random.default_rng(seed).uniform(size=(n, side, side, 1)).astype(np.float32)


def test_fingerprint_is_the_top_k_distinct_window_hashes():
    x = _images(3)
    fps = fingerprints(x, top_k=50)
    assert len(fps) == 3 and all(f.dtype == np.uint64 and len(f) == 50 for f in fps)
    assert all(np.all(np.diff(f.astype(np.float64)) > 0) for f in fps)  # sorted, distinct
    again = fingerprints(x.copy(), top_k=50)
    assert all(np.array_equal(a, b) for a, b in zip(fps, again, strict=True))
    # The k smallest of a larger fingerprint.
    wide = fingerprints(x, top_k=200)
    assert all(np.array_equal(w[:50], f) for w, f in zip(wide, fps, strict=True))
    # Unrelated random images share no hash.
    assert not set(fps[0].tolist()) & set(fps[1].tolist())


def test_fingerprint_ignores_changes_inside_a_quantization_bucket_and_flat_windows():
    step = 50
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 5, size=(1, 28, 28, 1))
    centre = ((levels + 0.5) * step / 255.0).astype(np.float32)
    jitter = rng.uniform(-0.4, 0.4, size=centre.shape).astype(np.float32) * step / 255.0
    a, b = fingerprints(np.concatenate([centre, centre + jitter]), step=step)
    np.testing.assert_array_equal(a, b)
    flat = np.full((1, 28, 28, 1), 0.3, np.float32)
    assert len(fingerprints(flat)[0]) == 0  # a flat image has no informative window
    with pytest.raises(ValueError, match="window"):
        fingerprints(np.zeros((1, 4, 4, 1), np.float32), window=20)


def test_monitor_flags_a_repeat_and_a_small_change_not_a_new_image():
    x = _images(3)
    monitor = QueryMonitor()
    flags, matches = monitor.check(x[:2])
    np.testing.assert_array_equal(flags, [False, False])
    np.testing.assert_array_equal(matches, [0, 0])
    nudged = x[:1].copy()
    nudged[0, :4, :4] = 1.0 - nudged[0, :4, :4]  # 16 of 784 pixels changed
    flags, matches = monitor.check(np.concatenate([x[:1], nudged, x[2:3]]))
    np.testing.assert_array_equal(flags, [True, True, False])
    assert matches[0] == 50 and matches[1] >= monitor.threshold and matches[2] == 0
    assert monitor.queries == 5 and monitor.flagged == 2
    # Rows of one batch are taken in order: the second copy matches the first.
    fresh = QueryMonitor()
    np.testing.assert_array_equal(fresh.check(np.concatenate([x[2:3], x[2:3]]))[0],
                                  [False, True])
    fresh.reset()
    assert fresh.queries == 0 and not fresh.check(x[2:3])[0][0]


def test_monitor_checks_its_options():
    for bad in ({"threshold": 0}, {"top_k": 0}, {"step": 1.5}, {"threshold": 60, "top_k": 50}):
        with pytest.raises(ValueError, match="QueryMonitor|flags nothing"):
            QueryMonitor(**bad)


def test_stream_flags_counts_each_image_against_those_before_it():
    x = _images(4)
    stream = np.concatenate([x, x[:1]])
    out = stream_flags(stream, [1, 25, 50])
    assert out["n"] == 5
    np.testing.assert_array_equal(out["matches"], [0, 0, 0, 0, 50])
    assert out["flagged"] == {1: 0.2, 25: 0.2, 50: 0.2}


def test_clean_fashion_mnist_stream_is_rarely_flagged_at_the_default_threshold():
    """Benign false-positive rate: 2,000 test images sent one after another."""
    try:
        _, (x_test, _) = load_dataset("fmnist")
    except DataNotAvailableError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    out = stream_flags(x_test[:2000], [QueryMonitor.threshold])
    # Measured on all 10,000 test images: 0.04 % at 25 (scripts/query_monitor.py).
    assert out["flagged"][QueryMonitor.threshold] <= 0.005, out["flagged"]
    assert np.median(out["matches"]) < 10


def test_query_monitor_script_reports_benign_rates(tmp_path):
    out = tmp_path / "qm" / "report.json"
    proc = run_script("scripts/query_monitor.py", "--dataset", "digits", "--thresholds",
                      "10,25", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["default_threshold"] == QueryMonitor.threshold
    assert report["options"]["top_k"] == 50 and "threshold" not in report["options"]
    for name in ("val", "cle"):
        stream = report["streams"][name]
        assert stream["n"] > 0 and set(stream["flagged"]) == {"10", "25"}
        assert 0.0 <= stream["flagged"]["25"] <= stream["flagged"]["10"] <= 1.0
        assert f"{name} ({stream['n']} clean images" in proc.stdout
    bad = run_script("scripts/query_monitor.py", "--dataset", "digits", "--thresholds", "60")
    assert bad.returncode == 2 and "top_k" in bad.stderr and "Traceback" not in bad.stderr

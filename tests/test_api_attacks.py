"""Black-box attacks on the defended endpoint through its public outputs (`api_attacks`).

Three targets:

* `FakeEndpoint`: NumPy only, a random linear classifier behind a rule that can reject. It
  counts the images it is sent by itself (each attributed to the nearest original), so the
  query budget is checked against what the endpoint saw, not against the attack's own count.
* a tiny undefended Fashion-MNIST classifier (seeded, as in test_attacks.py; skipped where the
  dataset is not installed): our Square against ART's `SquareAttack` and random noise, our
  HopSkipJump against its own starting points;
* a tiny FMDefense on `toy_batch` (as in test_adaptive_attacks.py) with θr = 0.5 and θd = 0:
  its untrained combo-VAE puts every morph in one class c*, so it passes exactly the inputs the
  classifier labels c* and rejects the others (a rejecting, deterministic defense); the harness
  names run through `adversarial_set` on it.

Rates are compared with margins (32-48 images; oneDNN's float sums differ between CPUs).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import TINY_COMBO_CONFIG, graph_forward
from test_case import toy_batch as make_toy_batch

import fmd_tf  # noqa: F401  (registers the Keras classes)
from fmd_tf.attacks import (
    QueryOracle,
    api_corners,
    api_hop_skip_jump,
    api_rays,
    api_square,
    square,
)
from fmd_tf.attacks.api_attacks import (
    PUBLIC_KEYS,
    as_oracle,
    is_success,
    logit_margin,
    p_schedule,
    rays_blocks,
    true_class_support,
)
from fmd_tf.data import DataNotAvailableError, load_dataset
from fmd_tf.evaluation import harness
from fmd_tf.models import Classifier, build_combo_vae

API_NAMES = ("api_square", "api_square_5k", "api_hopskipjump", "api_hopskipjump_5k",
             "api_rays", "api_rays_5k", "api_square_monitored", "api_rays_monitored",
             "api_hopskipjump_monitored", "api_corners")

# ART warns at import that PyTorch is missing (irrelevant here).
pytestmark = pytest.mark.filterwarnings("ignore:PyTorch not found:UserWarning")


# ----------------------------------------------------------------------------- fakes / fixtures


class FakeEndpoint:
    """A linear classifier z = flat(x) W behind a defense rule, with its own query counter.

    `reject_beyond`: rows farther (L∞) than this from every original are rejected (verdict 2,
    label -1); originals answer `labels` (default: the linear classifier's own). `fooled_logits`:
    `classify` says "class y + 1" for every perturbed row (the undefended view is fooled).
    """

    def __init__(self, x, labels=None, reject_beyond=None, fooled_logits=False, seed=0):
        rng = np.random.default_rng(seed)
        self.x0 = np.asarray(x, np.float32).reshape(len(x), -1)
        self.w = rng.normal(size=(self.x0.shape[1], 10)).astype(np.float32) / 4.0
        self.labels = np.argmax(self.x0 @ self.w, axis=1) if labels is None else labels
        self.reject_beyond, self.fooled_logits = reject_beyond, fooled_logits
        self.rows, self.per_image = 0, np.zeros(len(x), np.int64)

    def _nearest(self, q):
        dist = np.abs(q[:, None, :] - self.x0[None, :, :]).max(axis=2)  # [b, n]
        return np.argmin(dist, axis=1), dist.min(axis=1)

    def logits(self, x):
        q = np.asarray(x, np.float32).reshape(len(x), -1)
        z = q @ self.w
        if self.fooled_logits:
            owner, dist = self._nearest(q)
            wrong = (self.labels[owner] + 1) % 10
            z = np.where((dist > 0)[:, None], np.eye(10, dtype=np.float32)[wrong] * 9.0, z)
        return z

    def defend(self, x):
        q = np.asarray(x, np.float32).reshape(len(x), -1)
        owner, dist = self._nearest(q)
        self.rows += len(q)
        np.add.at(self.per_image, owner, 1)
        label = np.where(dist == 0, self.labels[owner], np.argmax(q @ self.w, axis=1))
        verdict = np.zeros(len(q), np.int32)
        if self.reject_beyond is not None:
            far = dist > self.reject_beyond
            verdict[far], label = 2, np.where(far, -1, label)
        return {"label": label.astype(np.int64), "verdict": verdict,
                "classifier_label": np.argmax(self.logits(x), axis=1)}

    def oracle(self) -> QueryOracle:
        return QueryOracle(self.defend, self.logits)


def _far_apart_images(n, seed=0):
    """n images whose pairwise L∞ distances exceed 0.5 (each a different constant offset)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.0, 0.2, size=(n, 8, 8, 1)).astype(np.float32)
    return base + np.linspace(0.0, 0.8, n, dtype=np.float32)[:, None, None, None] * (n > 1)


@pytest.fixture(scope="module")
def fmnist():
    """(tiny classifier, 48 test images it classifies right (read-only), their labels)."""
    try:
        (x_train, y_train), (x_test, y_test) = load_dataset("fmnist")
    except DataNotAvailableError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    keras.utils.set_random_seed(0)
    model = Classifier(conv_filters=(8, 16), dense_units=(32,), dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:6000], y_train[:6000], epochs=2, batch_size=64, verbose=0)
    x, y = np.array(x_test[:120]), np.array(y_test[:120])
    right = _predict(model, x) == y
    assert right.sum() >= 48, f"fixture classifier too weak ({right.mean():.2f})"
    x, y = x[right][:48], y[right][:48]
    x.flags.writeable = False
    return model, x, y


def _strict_toy_defense(x, y):
    """FMDefense on toy images with θr = 0.5, θd = 0 (the classifier fitted to x, y)."""
    from fmd_tf.defense import FMDefense

    keras.utils.set_random_seed(0)
    clf = Classifier(conv_filters=(4, 4), dense_units=(8,), name="clf")
    clf.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clf.fit(x, y, epochs=40, batch_size=20, verbose=0)
    keras.utils.set_random_seed(0)
    fmd = FMDefense(clf, build_combo_vae(TINY_COMBO_CONFIG, (28, 28, 1), 10), num_morphs=8,
                    candidates_per_step=4, max_steps=4, radius_step=0.2, chunk_size=64,
                    rho=0.9, morph_dtype="float32")
    fmd.build((None, 28, 28, 1))
    fmd.calibrate(x)
    fmd.theta_r.assign(np.full(fmd.num_codes, 0.5, np.float32))
    fmd.theta_d.assign(0.0)
    return fmd


@pytest.fixture(scope="module")
def strict_defense(toy_batch):
    """(FMDefense that passes only what its classifier labels c*, x, y, c*)."""
    x, y = toy_batch
    fmd = _strict_toy_defense(x, y)
    out = fmd.defend(x)
    passed = out["verdict"] == 0
    assert passed.any() and (out["verdict"] == 2).any(), "the toy defense should pass and reject"
    morph_class = int(np.unique(out["classifier_label"][passed])[0])
    assert np.all(out["classifier_label"][passed] == morph_class)
    return fmd, x, y, morph_class


def _predict(model, x):
    return np.argmax(model(tf.constant(x), training=False).numpy(), axis=1)


def _check_images(x_adv, x):
    assert isinstance(x_adv, np.ndarray) and x_adv.dtype == np.float32
    assert x_adv.shape == x.shape and np.all(np.isfinite(x_adv))
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def _linf(a, b):
    return np.abs(a - b).reshape(len(a), -1).max(axis=1)


def _l2(a, b):
    return np.linalg.norm((a - b).reshape(len(a), -1), axis=1)


# ----------------------------------------------------------------------------- query budget


@pytest.mark.parametrize("budget", [1, 2, 7, 60])
def test_square_never_exceeds_the_budget(budget):
    x = _far_apart_images(5)
    for reject in (None, 1e-6):  # a fooled linear model, and one that can never be fooled
        end = FakeEndpoint(x, reject_beyond=reject)
        x_adv, rec = api_square(end.oracle(), x, end.labels, eps=0.05, max_queries=budget)
        # What the endpoint saw, image by image (every row lies in its own image's ball).
        np.testing.assert_array_equal(end.per_image, rec["queries"])
        assert rec["queries"].max() <= budget and end.rows == rec["queries"].sum()
        if reject is not None:  # nothing succeeds: every image spends its whole budget
            assert not rec["success"].any()
            np.testing.assert_array_equal(rec["queries"], budget)
        assert np.all(_linf(x_adv, x) <= 0.05 + 1e-6)


@pytest.mark.parametrize("budget", [1, 3, 40, 150])
def test_hop_skip_jump_never_exceeds_the_budget(budget):
    x = _far_apart_images(4)
    end = FakeEndpoint(x)
    oracle = end.oracle()
    x_adv, rec = api_hop_skip_jump(oracle, x, end.labels, max_queries=budget, init_eval=10,
                                   max_eval=40, init_size=20)
    assert rec["queries"].max() <= budget
    assert end.rows == rec["queries"].sum() == oracle.queries.sum()
    _check_images(x_adv, x)
    # One image alone: every row the endpoint saw was spent on it (noise starts included).
    end = FakeEndpoint(x[:1])
    _, rec = api_hop_skip_jump(end.oracle(), x[:1], end.labels, max_queries=budget,
                               init_eval=10, max_eval=40, init_size=20)
    assert end.rows == rec["queries"][0] <= budget


@pytest.mark.parametrize("budget", [1, 2, 9, 80])
def test_rays_never_exceeds_the_budget_and_reads_decisions_only(budget):
    x = _far_apart_images(5)
    for reject in (None, 1e-6):
        end = FakeEndpoint(x, reject_beyond=reject)
        labels_only = QueryOracle(end.defend)  # no `classify`: RayS needs none
        x_adv, rec = api_rays(labels_only, x, end.labels, eps=0.05, max_queries=budget)
        # Its linear search reaches past the images' spacing: count per image by the oracle,
        # in all by the endpoint, and per image by the endpoint for one image alone.
        np.testing.assert_array_equal(labels_only.queries, rec["queries"])
        assert rec["queries"].max() <= budget and end.rows == rec["queries"].sum()
        one = FakeEndpoint(x[:1], reject_beyond=reject)
        _, rec_one = api_rays(QueryOracle(one.defend), x[:1], one.labels, eps=0.05,
                              max_queries=budget)
        assert one.rows == rec_one["queries"][0] <= budget
        _check_images(x_adv, x)
        assert np.all(_linf(x_adv, x) <= 0.05 + 1e-6)
        if reject is not None:  # every perturbed row is rejected: nothing succeeds
            assert not rec["success"].any() and np.all(np.isinf(rec["radius"]))
            np.testing.assert_array_equal(rec["queries"], budget)
            np.testing.assert_array_equal(x_adv, x)


@pytest.mark.parametrize("budget", [1, 2, 6])
def test_corners_never_exceed_the_budget_and_read_decisions_only(budget):
    x = _far_apart_images(5)
    for reject in (None, 1e-6):
        end = FakeEndpoint(x, reject_beyond=reject)
        labels_only = QueryOracle(end.defend)
        x_adv, rec = api_corners(labels_only, x, end.labels, eps=0.05, max_queries=budget)
        np.testing.assert_array_equal(end.per_image, rec["queries"])
        assert rec["queries"].max() <= budget and end.rows == rec["queries"].sum()
        _check_images(x_adv, x)
        assert np.all(_linf(x_adv, x) <= 0.05 + 1e-6)
        np.testing.assert_allclose(rec["linf"], _linf(x_adv, x), atol=1e-7)
        if reject is not None:
            assert not rec["success"].any() and np.all(rec["corner"] == -1)
            np.testing.assert_array_equal(rec["queries"], budget)
            np.testing.assert_array_equal(x_adv, x)


def test_corners_shift_both_ways_then_draw_signs_per_image():
    """Five 4x4 images near 0.5, each with its own rule (label 1 = fooled, true label 0):
    0 falls to a brighter image, 1 to a darker one, 2 to pixel 0 up and pixel 1 down (a sign
    vector, which neither shift is), 3 to nothing within 0.1, 4 is wrong already."""
    rng = np.random.default_rng(0)
    x = (0.5 + rng.uniform(-0.05, 0.05, size=(5, 4, 4, 1))).astype(np.float32)
    x0 = x.reshape(5, -1)

    def defend(q):
        flat = np.asarray(q, np.float64).reshape(len(q), -1)
        owner = np.argmin(np.abs(flat[:, None] - x0[None]).max(2), axis=1)
        d = flat - x0[owner]
        fooled = np.select(
            [owner == 0, owner == 1, owner == 2, owner == 3],
            [d.mean(1) > 0.05, d.mean(1) < -0.05, (d[:, 0] > 0.05) & (d[:, 1] < -0.05),
             np.zeros(len(q), bool)], default=True)
        return {"label": fooled.astype(np.int64), "verdict": np.zeros(len(q), np.int32)}

    y = np.zeros(5, np.int64)
    x_adv, rec = api_corners(QueryOracle(defend), x, y, eps=0.1, max_queries=40, seed=3)
    np.testing.assert_array_equal(rec["success"], [True, True, True, False, True])
    np.testing.assert_array_equal(rec["queries"][[0, 1, 3, 4]], [2, 3, 40, 1])
    np.testing.assert_array_equal(rec["corner"][[0, 1, 3, 4]], [0, 1, -1, -1])
    assert rec["corner"][2] >= 2 and rec["queries"][2] == rec["corner"][2] + 2
    np.testing.assert_allclose(x_adv[0] - x[0], 0.1, atol=1e-6)
    np.testing.assert_allclose(x_adv[1] - x[1], -0.1, atol=1e-6)
    np.testing.assert_array_equal(x_adv[[3, 4]], x[[3, 4]])
    np.testing.assert_array_equal(defend(x_adv)["label"], [1, 1, 1, 0, 1])
    # One stream per image: image 2 alone meets the same corners.
    alone, rec_alone = api_corners(QueryOracle(defend), x[2:3], y[2:3], eps=0.1,
                                   max_queries=40, seed=3)
    np.testing.assert_array_equal(alone[0], x_adv[2])
    assert rec_alone["queries"][0] == rec["queries"][2]


def test_rays_blocks_cover_the_image_at_every_level():
    for size in (16, 784, 3 * 64 * 64):
        for level in range(0, int(np.log2(size)) + 1):
            cover = np.zeros(size, int)
            for k in range(2**level):
                cover[rays_blocks(level, k, size)] += 1
            np.testing.assert_array_equal(cover, 1)


def test_rays_finds_the_closed_form_radius_of_a_linear_rule():
    """Label 1 iff w·x > c on 4x4 images near 0.5 (no clipping): along a sign direction d the
    adversarial radius is g(d) = (w·x - c) / (-w·d), least at d = -sign(w), where it is
    r* = (w·x - c) / ||w||_1. RayS's finest level flips single pixels, so it reaches -sign(w)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=16)
    x = (0.5 + rng.uniform(-0.05, 0.05, size=(3, 4, 4, 1))).astype(np.float32)
    margin = np.array([0.6, 1.0, 1.4])
    c = x.reshape(3, -1) @ w - margin  # every image in class 1, at its own margin
    r_star = margin / np.abs(w).sum()
    assert np.all(r_star < 0.3)

    def defend(q):
        flat = np.asarray(q, np.float64).reshape(len(q), -1)
        owner = np.argmin(np.abs(flat[:, None] - x.reshape(3, -1)[None]).max(2), axis=1)
        label = (flat @ w > c[owner]).astype(np.int64)
        return {"label": label, "verdict": np.zeros(len(q), np.int32)}

    y = np.ones(3, np.int64)
    _, rec = api_rays(QueryOracle(defend), x, y, eps=1e-4, max_queries=600, tol=1e-4)
    assert not rec["success"].any()
    np.testing.assert_allclose(rec["radius"], r_star, rtol=0, atol=3e-4)
    eps = float(r_star.max()) + 0.01
    x_adv, rec = api_rays(QueryOracle(defend), x, y, eps=eps, max_queries=600)
    assert rec["success"].all()
    assert np.all(_linf(x_adv, x) <= eps + 1e-6)
    np.testing.assert_array_equal(defend(x_adv)["label"], 0)
    assert rec["queries"].max() < 600


def test_oracle_counts_per_owner_and_checks_inputs():
    x = _far_apart_images(3)
    end = FakeEndpoint(x)
    oracle = end.oracle()
    oracle.query(x[[0, 0, 2]], [0, 0, 2])
    out = oracle.query(x[:1], [1], logits=True)
    np.testing.assert_array_equal(oracle.queries, [2, 1, 1])
    np.testing.assert_array_equal(oracle.used([0, 1, 2, 7]), [2, 1, 1, 0])
    assert out["logits"].shape == (1, 10) and oracle.calls == 2
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oracle.query(x[:1] + 2.0, [0])
    with pytest.raises(ValueError, match="one owner per image"):
        oracle.query(x[:2], [0])
    labels_only = QueryOracle(end.defend)
    with pytest.raises(ValueError, match="classify"):
        api_square(labels_only, x, end.labels, max_queries=3)
    with pytest.raises(ValueError, match="norm"):
        api_square(oracle, x, end.labels, norm="l2")
    with pytest.raises(ValueError, match="norm"):
        api_hop_skip_jump(oracle, x, end.labels, norm="linf")
    with pytest.raises(ValueError, match="norm"):
        api_rays(oracle, x, end.labels, norm="l2")
    with pytest.raises(ValueError, match="one label per image"):
        api_square(oracle, x, end.labels[:2])
    with pytest.raises(TypeError, match="from_client"):
        as_oracle("localhost:8500")


def test_monitor_answers_flagged_queries_as_rejected_without_the_model():
    x = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    end = FakeEndpoint(x)
    oracle = QueryOracle(end.defend, end.logits, monitor={"threshold": 25})
    first = oracle.query(x[:2], [0, 1], logits=True)
    assert np.all(first["verdict"] == 0) and np.all(np.isfinite(first["logits"]))
    out = oracle.query(x[[0, 2]], [0, 2], logits=True)  # image 0 again: flagged
    assert end.rows == 3  # the flagged row never reached the model
    np.testing.assert_array_equal(out["verdict"], [2, 0])
    np.testing.assert_array_equal(out["label"], [-1, end.labels[2]])
    np.testing.assert_array_equal(out["classifier_label"][:1], [-1])
    assert np.all(np.isnan(out["logits"][0])) and np.all(np.isfinite(out["logits"][1]))
    assert not is_success(out, np.array([5, end.labels[2]]))[0]  # rejected: never a success
    np.testing.assert_array_equal(oracle.queries, [2, 1, 1])
    np.testing.assert_array_equal(oracle.monitor_flagged, [1, 0, 0])
    start = oracle.counts([0, 1])
    every = oracle.query(x[:2], [0, 1], logits=True)  # all flagged: no model call at all
    assert end.rows == 3 and every["logits"].shape == (2, 10)
    np.testing.assert_array_equal(every["verdict"], [2, 2])
    since = oracle.since(start, [0, 1])
    assert sorted(since) == ["monitor_flagged", "queries"]
    assert all(np.array_equal(v, [1, 1]) for v in since.values())
    with pytest.raises(ValueError, match="QueryOracle itself"):
        as_oracle(oracle, monitor={})
    with pytest.raises(TypeError, match="QueryMonitor"):
        QueryOracle(end.defend, monitor="blacklight")


def test_monitor_stops_rays_on_the_undefended_classifier(fmnist):
    """RayS's queries differ from each other in one block of pixels: the monitor rejects
    almost all of them, and the attack finds far fewer adversarial images."""
    model, x, y = fmnist
    eps, budget = 0.1, 200
    _, plain = api_rays(QueryOracle.from_classifier(model), x, y, eps=eps, max_queries=budget)
    x_adv, rec = api_rays(model, x, y, eps=eps, max_queries=budget, monitor={})
    _check_images(x_adv, x)
    assert np.all(_linf(x_adv, x) <= eps + 1e-6) and rec["queries"].max() <= budget
    flagged_share = rec["monitor_flagged"].sum() / rec["queries"].sum()
    assert flagged_share >= 0.9, flagged_share
    assert rec["success"].mean() <= plain["success"].mean() - 0.2, \
        (rec["success"].mean(), plain["success"].mean())


def test_from_client_asks_both_signatures_for_public_outputs_only():
    x = _far_apart_images(2)
    end = FakeEndpoint(x)

    class GrpcLike:
        def __init__(self):
            self.calls = []

        def predict(self, model, images, signature="serving_default", version=None,
                    output_filter=None):
            self.calls.append((model, signature, version, output_filter))
            if signature == "classify":
                z = end.logits(images)
                return {"logits": z, "label": np.argmax(z, axis=1)}
            return {**end.defend(images), "purified": images}

    class RestLike(GrpcLike):
        def predict(self, model, images, signature="serving_default", version=None):
            return super().predict(model, images, signature, version)

    for client in (GrpcLike(), RestLike()):
        oracle = QueryOracle.from_client(client, model="fmd", version=3)
        _, rec = api_square(oracle, x, end.labels, eps=0.05, max_queries=4)
        assert {c[1] for c in client.calls} == {"serving_default", "classify"}
        assert all(c[0] == "fmd" and c[2] == 3 for c in client.calls)
        filters = {tuple(c[3] or ()) for c in client.calls if c[1] == "serving_default"}
        assert filters == ({tuple(PUBLIC_KEYS)} if type(client) is GrpcLike else {()})
        assert rec["queries"].max() <= 4


# ----------------------------------------------------------------------------- rejection


def test_rejected_answers_never_count_as_success():
    """Every perturbed image is rejected, while `classify` claims a wrong class for it."""
    x = _far_apart_images(4)
    y = np.array([3, 3, 5, 5])
    end = FakeEndpoint(x, labels=y, reject_beyond=1e-6, fooled_logits=True)
    x_sq, rec_sq = api_square(end.oracle(), x, y, eps=0.1, max_queries=30)
    assert not rec_sq["success"].any()
    assert set(rec_sq["verdict"]) <= {0, 2}
    # HopSkipJump: the other-class originals are accepted starting points for images 0-1 and
    # 2-3, but everything between them is rejected: nothing within L2 1.0.
    x_hsj, rec = api_hop_skip_jump(end.oracle(), x, y, max_queries=80, eps=1.0, init_eval=10,
                                   max_eval=20, init_size=10)
    assert not rec["success"].any()
    np.testing.assert_array_equal(x_hsj, x)  # failures come back unchanged
    # One class only: no accepted start, noise is rejected: nothing at any distance.
    same = np.full(4, 3)
    end = FakeEndpoint(x, labels=same, reject_beyond=1e-6)
    _, rec = api_hop_skip_jump(end.oracle(), x, same, max_queries=40, init_size=20)
    assert not rec["success"].any() and np.all(np.isinf(rec["l2"]))
    # The rule itself.
    out = {"verdict": np.array([2, 2, 0, 1, 0]), "label": np.array([-1, 4, 4, 4, 3])}
    np.testing.assert_array_equal(is_success(out, np.array([3, 3, 3, 3, 3])),
                                  [False, False, True, True, False])


def test_loss_pieces():
    logits = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    np.testing.assert_allclose(logit_margin(logits, np.array([0, 0])), [1.0, -5.0])
    out = {"label": np.zeros(2), "classifier_label": np.array([0, 1]),
           "resistance": np.array([[1.0, 0.5], [0.25, 0.25]])}
    # Label kept: the mean resistance; label changed: 1 - it.
    np.testing.assert_allclose(true_class_support(out, np.array([0, 0])), [0.75, 0.75])
    # The paper's schedule at 1,000 iterations: halvings after 1, 5, 20, 50, ... iterations.
    assert [p_schedule(0.8, i, 1000) for i in (0, 1, 2, 5, 6, 21, 999)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.1, 0.8 / 512]


# ----------------------------------------------------------------------------- undefended


def test_square_beats_noise_and_matches_art(fmnist):
    model, x, y = fmnist
    eps, budget = 0.05, 200
    x_adv, rec = api_square(QueryOracle.from_classifier(model), x, y, eps=eps,
                            max_queries=budget, seed=0)
    _check_images(x_adv, x)
    assert np.all(_linf(x_adv, x) <= eps + 1e-6)
    assert rec["queries"].max() <= budget
    fooled = _predict(model, x_adv) != y
    np.testing.assert_array_equal(fooled, rec["success"])  # the record is the truth
    ours = fooled.mean()
    # Random vertices of the ball, the same number of queries per image.
    rng = np.random.default_rng(1)
    noise_fooled = np.zeros(len(x), bool)
    for _ in range(budget):
        noisy = np.clip(x + eps * rng.choice([-1.0, 1.0], size=x.shape), 0, 1)
        noise_fooled |= _predict(model, noisy.astype(np.float32)) != y
    # ART's SquareAttack with as many iterations (it queries twice per iteration).
    keras.utils.set_random_seed(0)
    art = np.mean(_predict(model, square(graph_forward(model), x, eps=eps,
                                         max_queries=budget)) != y)
    assert ours >= noise_fooled.mean() + 0.15, (ours, noise_fooled.mean())
    assert abs(ours - art) <= 0.15, (ours, art)


def test_rays_beats_noise_on_the_undefended_classifier(fmnist, capsys):
    model, x, y = fmnist
    # At L-inf 0.1, 200 queries: RayS fooled 40 % and noise 10 % on a float32-only CPU
    # (AVX2), 21 % and 6 % at 0.05: a margin that the classifier's training noise could close.
    eps, budget = 0.1, 200
    x_adv, rec = api_rays(QueryOracle.from_classifier(model), x, y, eps=eps, max_queries=budget,
                          verbose=1)
    shown = capsys.readouterr().out  # the progress bar: rounds of the budget, share fooled
    assert f"{budget - 1}/{budget - 1}" in shown
    assert f"fooled: {rec['success'].mean():.4f}" in shown
    _check_images(x_adv, x)
    assert np.all(_linf(x_adv, x) <= eps + 1e-6) and rec["queries"].max() <= budget
    fooled = _predict(model, x_adv) != y
    np.testing.assert_array_equal(fooled, rec["success"])
    rng = np.random.default_rng(1)
    noise_fooled = np.zeros(len(x), bool)
    for _ in range(budget):
        noisy = np.clip(x + eps * rng.choice([-1.0, 1.0], size=x.shape), 0, 1)
        noise_fooled |= _predict(model, noisy.astype(np.float32)) != y
    assert fooled.mean() >= noise_fooled.mean() + 0.15, (fooled.mean(), noise_fooled.mean())


def test_hop_skip_jump_on_the_undefended_classifier(fmnist):
    model, x, y = fmnist
    x, y = x[:8], y[:8]
    budget = 300
    x_adv, rec = api_hop_skip_jump(QueryOracle.from_classifier(model), x, y,
                                   max_queries=budget, seed=0)
    _check_images(x_adv, x)
    assert rec["queries"].max() <= budget
    fooled = _predict(model, x_adv) != y
    np.testing.assert_array_equal(fooled, rec["success"])
    assert fooled.mean() >= 0.75
    np.testing.assert_allclose(rec["l2"][fooled], _l2(x_adv, x)[fooled], rtol=1e-5)
    # It walks toward x: nearer than its start, the nearest image of another class.
    start = np.array([_l2(x[_predict(model, x) != y[i]], x[i : i + 1]).min()
                      for i in range(len(x))])
    assert np.median(rec["l2"][fooled] / start[fooled]) < 0.7
    # With a radius, images stop at the first adversarial inside it; the others fail.
    radius = float(np.median(rec["l2"]))
    x_r, rec_r = api_hop_skip_jump(QueryOracle.from_classifier(model), x, y,
                                   max_queries=budget, seed=0, eps=radius)
    assert np.all(_l2(x_r, x)[rec_r["success"]] <= radius + 1e-5)
    np.testing.assert_array_equal(x_r[~rec_r["success"]], x[~rec_r["success"]])
    assert rec_r["success"].mean() >= 0.5
    assert rec_r["queries"][rec_r["success"]].mean() < budget


# ----------------------------------------------------------------------------- the defense


def test_hop_skip_jump_judges_by_the_defense_not_the_classifier(strict_defense):
    fmd, x, y, morph_class = strict_defense
    pick = np.flatnonzero(fmd.defend(x)["verdict"] == 2)[:3]  # defended by rejection
    x, y = x[pick], y[pick]
    x_adv, rec = api_hop_skip_jump(as_oracle(fmd), x, y, max_queries=25, init_eval=5,
                                   max_eval=10)
    out = fmd.defend(x_adv)
    np.testing.assert_array_equal(is_success(out, y), rec["success"])
    # Only label c* passes: HopSkipJump starts from passed images of class c* and every
    # success is an accepted image labelled c*, nearer to x than that start.
    assert rec["success"].all() and rec["queries"].max() <= 25
    assert np.all(out["verdict"] != 2) and np.all(out["label"] == morph_class)
    passed = fmd.defend(strict_defense[1])["verdict"] == 0
    start = np.array([_l2(strict_defense[1][passed], x[i : i + 1]).min() for i in range(3)])
    assert np.all(rec["l2"] <= start + 1e-5)


@pytest.fixture
def gates_only(strict_defense):
    """The strict toy defense with thresholds no resistance reaches (θr < 0, as ρ 0.999 leaves
    them on the robust mode) and reconstruction and margin gates that reject some of its
    images (restored afterwards); (fmd, images)."""
    fmd, x, _, _ = strict_defense
    images = np.concatenate([x, np.clip(x + np.random.default_rng(0).normal(
        0, 0.3, x.shape), 0, 1).astype(np.float32)])
    saved = [v.numpy() for v in (fmd.theta_r, fmd.theta_e, fmd.theta_m)]
    fmd.theta_r.assign(np.full(fmd.num_codes, -0.1, np.float32))
    fmd.theta_e.assign(np.median(fmd.reconstruction_error(images)))
    fmd.theta_m.assign(np.quantile(fmd.logit_margins(images), 0.2))
    yield fmd, images
    for variable, value in zip((fmd.theta_r, fmd.theta_e, fmd.theta_m), saved, strict=True):
        variable.assign(value)


def test_decisions_without_morphs_are_the_defenses_answers(gates_only):
    fmd, x = gates_only
    full, fast = fmd.defend(x), fmd.decisions(x, batch_size=7)
    for key in ("label", "verdict", "classifier_label"):
        np.testing.assert_array_equal(fast[key], full[key])
    assert set(np.unique(full["verdict"])) == {0, 2}  # both gates at work, nothing purified
    fmd.theta_r.assign(np.full(fmd.num_codes, 0.0, np.float32))  # r = 0 is flagged now
    with pytest.raises(ValueError, match="can flag"):
        fmd.decisions(x)


def test_decision_attacks_get_the_defenses_answers_without_its_morphs(gates_only,
                                                                      monkeypatch):
    """RayS, HopSkipJump and the corners read label and verdict only: on a defense whose
    resistance cannot flag they get them from `decisions` (never `defend`) and find exactly
    what they find through the whole defense."""
    fmd, x = gates_only
    y = fmd.defend(x)["classifier_label"][:4]
    x = x[:4]
    runs = ((api_rays, {"eps": 0.3, "max_queries": 30}),
            (api_corners, {"eps": 0.3, "max_queries": 6}),
            (api_hop_skip_jump, {"max_queries": 25, "init_eval": 5, "max_eval": 10}))
    whole = {attack: attack(QueryOracle.from_defense(fmd), x, y, **params)
             for attack, params in runs}

    def no_morphs(*args, **kwargs):
        raise AssertionError("defend ran the morphs")

    monkeypatch.setattr(type(fmd), "defend", no_morphs)
    for attack, params in runs:
        x_adv, record = attack(fmd, x, y, **params)
        np.testing.assert_array_equal(x_adv, whole[attack][0])
        for key, value in whole[attack][1].items():
            np.testing.assert_array_equal(record[key], value)
    with pytest.raises(AssertionError, match="defend ran"):  # Square reads the resistances
        api_square(fmd, x, y, eps=0.3, max_queries=4)


@pytest.mark.slow
def test_square_detector_term_steers_to_what_the_defense_passes():
    """Square on images the toy defense rejects: with λ = 1 the loss also asks the morphs to
    back the new label, which leads to c*, the one class the defense passes."""
    x, y = make_toy_batch(per_class=4)
    fmd = _strict_toy_defense(x, y)
    rejected = np.flatnonzero(fmd.defend(x)["verdict"] == 2)
    x, y = x[rejected], y[rejected]
    rates = {}
    for weight in (0.0, 1.0):
        x_adv, rec = api_square(fmd, x, y, eps=0.3, max_queries=150, detector_weight=weight)
        np.testing.assert_array_equal(is_success(fmd.defend(x_adv), y), rec["success"])
        rates[weight] = rec["success"].mean()
    assert rates[1.0] > 0 and rates[1.0] >= rates[0.0], rates


def test_harness_names_run_through_adversarial_set(strict_defense, tmp_path):
    fmd, x, y, _ = strict_defense
    x, y = x[:3], y[:3]
    budgets = {"api_square": 6, "api_square_5k": 4, "api_rays": 7, "api_rays_5k": 5,
               "api_hopskipjump": 12, "api_hopskipjump_5k": 10, "api_square_monitored": 6,
               "api_rays_monitored": 7, "api_hopskipjump_monitored": 12, "api_corners": 5}
    assert set(budgets) == set(API_NAMES) == \
        set(harness.QUERY_BASED) & set(harness.DEFENSE_AWARE)
    for name in API_NAMES:
        assert name in harness.DEFENSE_AWARE and name in harness.BUDGETED
        spec = harness.ATTACKS[name]
        assert spec.target == "endpoint"
        assert spec.function in ("api_square", "api_rays", "api_hop_skip_jump", "api_corners")
        default = 20 if name == "api_corners" else 5000 if name.endswith("_5k") else 1000
        assert spec.params["max_queries"] == default
    with pytest.raises(ValueError, match="needs the defense"):
        harness.adversarial_set("api_square", fmd.classifier, x, y, None)
    for name, budget in budgets.items():
        params = {"max_queries": budget}
        if "hopskipjump" in name:
            params.update(init_eval=4, max_eval=8, init_size=4)
        x_adv, info = harness.adversarial_set(name, fmd.classifier, x, y, str(tmp_path),
                                              params=params, defense=fmd)
        _check_images(x_adv, x)
        rec = info["record"]
        assert not info["cached"] and rec["queries"].max() <= budget
        monitored = "monitor" in harness.ATTACKS[name].params
        assert ("monitor_flagged" in rec) == monitored
        if monitored:
            assert np.all(rec["monitor_flagged"] <= rec["queries"])
        # The report re-runs the defense on x_adv: it must agree with the attack's record.
        np.testing.assert_array_equal(is_success(fmd.defend(x_adv), y), rec["success"])
        eps = info["params"]["eps"]
        size = _linf(x_adv, x) if harness.ONE_NORM[name] == "linf" else _l2(x_adv, x)
        assert np.all(size <= eps + 1e-5), (name, size)
        again, info = harness.adversarial_set(name, fmd.classifier, x, y, str(tmp_path),
                                              params=params, defense=fmd)
        assert info["cached"]
        np.testing.assert_array_equal(again, x_adv)
        for key, value in rec.items():  # the record is cached with the images
            np.testing.assert_array_equal(info["record"][key], value, err_msg=key)
    # The 5,000-query runs are made in resumable pieces; the records of the pieces are joined.
    assert all(harness.ATTACKS[name].chunk == 20 for name in API_NAMES if name.endswith("_5k"))
    square = harness.ATTACKS["api_square_5k"]
    piece, _ = harness.adversarial_set("api_square_5k", fmd.classifier, x[2:], y[2:],
                                       str(tmp_path), params={"max_queries": 4}, defense=fmd)
    harness.ATTACKS["api_square_5k"] = square._replace(chunk=2)
    try:
        x_adv, info = harness.adversarial_set("api_square_5k", fmd.classifier, x, y,
                                              str(tmp_path), params={"max_queries": 4},
                                              defense=fmd)
    finally:
        harness.ATTACKS["api_square_5k"] = square
    assert not info["cached"] and set(info["record"]) == {"queries", "success", "verdict",
                                                          "label", "linf"}
    np.testing.assert_array_equal(x_adv[2:], piece)  # the last piece came from the cache
    np.testing.assert_array_equal(is_success(fmd.defend(x_adv), y), info["record"]["success"])
    assert len(info["record"]["queries"]) == 3 and info["record"]["queries"].max() <= 4
    # RayS on the undefended classifier's labels: the reference for api_rays.
    assert "rays" in harness.QUERY_BASED and "rays" not in harness.DEFENSE_AWARE
    x_adv, info = harness.adversarial_set("rays", fmd.classifier, x, y, str(tmp_path),
                                          params={"max_queries": 9})
    fooled = np.argmax(fmd.classifier(x_adv).numpy(), axis=1) != y
    np.testing.assert_array_equal(fooled, info["record"]["success"])
    assert info["record"]["queries"].max() <= 9
    # Budget grids: Square only at the L∞ radii, HopSkipJump only at the L2 ones.
    assert harness.expand_budgets(["api_square", "api_hopskipjump"], [0.05], [1.5, 3.0]) == [
        ("adaptive_api_square_linf_0.05", "api_square", {"eps": 0.05, "norm": "linf"}),
        ("adaptive_api_hopskipjump_l2_1.5", "api_hopskipjump", {"eps": 1.5, "norm": "l2"}),
        ("adaptive_api_hopskipjump_l2_3", "api_hopskipjump", {"eps": 3.0, "norm": "l2"})]
    assert harness.expand_budgets(["api_hopskipjump"], [0.1]) == [
        ("adaptive_api_hopskipjump", "api_hopskipjump", {})]

"""Property-based tests of the input checks (issue 22, point 2: errors that read well).

Both doors into the defense are tested with `hypothesis` over shapes, dtypes and values:

* the eager numpy API of `FMDefense` (`defend`, `detect`, `__call__` on numpy input): a good
  batch gets the documented outputs; a bad one raises ValueError / TypeError whose *first line*
  names the problem, before any graph runs (the defense's graph function is swapped for one
  that fails the test if it is reached);
* the exported SavedModel's `serving_default` signature (`tf.saved_model.load`): a bad request
  fails with InvalidArgumentError naming the problem (or the signature's own dtype error), never
  a crash, and a good request right after gets the same answer as before;
* `fmd_tf.fit_defense`: bad train / VAL data is refused with a ValueError naming the problem
  before any training starts (the training stages are replaced by stubs that fail the test).

One tiny calibrated FMDefense (random tiny combo-VAE, untrained classifier, thresholds set for a
mix of verdicts) serves the whole module. Examples are derandomized (the same ones every run, so
that a 2-core CI sees stable runtimes); `FMD_HYPOTHESIS_EXPLORE=1` draws fresh ones.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from test_case import TINY_COMBO_CONFIG, tiny_images, toy_batch

import fmd_tf
from fmd_tf import pipeline
from fmd_tf.defense import FMDefense
from fmd_tf.defense.fm_defense import validate_images
from fmd_tf.export import export_serving
from fmd_tf.models import Classifier, build_combo_vae

IMAGE = (28, 28, 1)
NUM_MORPHS = 4
NUM_CODES = TINY_COMBO_CONFIG.shared_dim  # all codes selected
SIZE_TEXT = "[batch, 28, 28, 1]"
OUTPUTS = {  # key: (shape of one row, dtype), as documented in FMDefense
    "label": ((), np.int64),
    "verdict": ((), np.int32),
    "classifier_label": ((), np.int64),
    "resistance": ((NUM_CODES,), np.float32),
    "distance": ((), np.float32),
    "purified": (IMAGE, np.float32),
    "recon_error": ((), np.float32),
}

PROPERTY = settings(
    max_examples=30, deadline=None, database=None,
    derandomize=not os.environ.get("FMD_HYPOTHESIS_EXPLORE"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def defense():
    """A tiny calibrated FMDefense whose thresholds give passed, purified and rejected rows."""
    keras.utils.set_random_seed(0)
    classifier = Classifier(conv_filters=(4, 4), dense_units=(8,), name="clf")
    combo = build_combo_vae(TINY_COMBO_CONFIG, IMAGE, 10, seed=0)
    for model in (combo.decoder, combo.shared_encoder):  # decoded morphs that vary
        for w in model.weights:
            if "kernel" in w.path:
                w.assign(w.numpy() * 10.0)
    fmd = FMDefense(classifier, combo, num_morphs=NUM_MORPHS, candidates_per_step=2,
                    max_steps=4, chunk_size=16, rho=0.9, morph_dtype="float32", name="fmd")
    fmd.calibrate(tiny_images(16, seed=3))
    # No distance sum of (0.3 - r) over 4 codes, r in multiples of 1/4, equals 1.0 exactly.
    fmd.theta_r.assign(np.full(NUM_CODES, 0.3, np.float32))
    fmd.theta_d.assign(1.0)
    return fmd


@pytest.fixture(scope="module")
def good_images():
    """float32 [12, 28, 28, 1]: noise and toy blocks, which get all three verdicts."""
    return np.concatenate([tiny_images(8, seed=5), toy_batch()[0][:4]])


def test_fixture_gets_every_verdict(defense, good_images):
    assert set(defense.defend(good_images)["verdict"].tolist()) == {0, 1, 2}


@pytest.fixture(scope="module")
def serving_default(defense, tmp_path_factory):
    path = export_serving(defense, tmp_path_factory.mktemp("serving"), version=1)
    return tf.saved_model.load(path).signatures["serving_default"]


class GraphReached(Exception):
    """An input that should have been refused in Python reached the defense's graph."""


class _NoGraph:
    def __call__(self, *args, **kwargs):
        raise GraphReached("the input reached the graph")

    get_concrete_function = __call__


@contextlib.contextmanager
def graph_forbidden(fmd):
    """Within: any run (or trace) of `fmd`'s graph function raises GraphReached."""
    saved = fmd._graph_fn
    fmd._graph_fn = _NoGraph()
    try:
        yield
    finally:
        fmd._graph_fn = saved


ENTRY_POINTS = {
    "defend": lambda fmd, x: fmd.defend(x),
    "detect": lambda fmd, x: fmd.detect(x),
    "__call__": lambda fmd, x: fmd(x),
    "defend_with_stats": lambda fmd, x: fmd.defend_with_stats(x),
}


def first_line_of_refusal(fmd, x, error=(ValueError, TypeError)) -> str:
    """The first line of the error that every eager entry point raises on `x` (the same one),
    checked to come before the graph."""
    lines = set()
    with graph_forbidden(fmd):
        for name, call in ENTRY_POINTS.items():
            with pytest.raises(error) as caught:
                call(fmd, x)
            assert str(caught.value), name
            lines.add((type(caught.value), str(caught.value).splitlines()[0]))
    assert len(lines) == 1, lines  # every entry point says the same
    return lines.pop()[1]


# --------------------------------------------------------------------------- strategies


def _rng(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


@st.composite
def good_batches(draw):
    """float16/32/64 [n, 28, 28, 1], n in 1..5, values in [0, 1]: noise, constant, binary or
    tiny (subnormal) images, with a few values hypothesis picks (0, 1, ...) at random pixels."""
    n = draw(st.integers(1, 5))
    rng = _rng(draw)
    shape = (n, *IMAGE)
    kind = draw(st.sampled_from(["uniform", "zeros", "ones", "binary", "tiny"]))
    x = {"uniform": lambda: rng.uniform(size=shape), "zeros": lambda: np.zeros(shape),
         "ones": lambda: np.ones(shape), "binary": lambda: rng.integers(0, 2, shape) * 1.0,
         "tiny": lambda: rng.uniform(0.0, 1e-40, shape)}[kind]()
    values = draw(st.lists(st.floats(0.0, 1.0), max_size=8))
    x.flat[rng.integers(0, x.size, len(values))] = values
    return x.astype(draw(st.sampled_from([np.float32, np.float64, np.float16])))


@st.composite
def bad_shapes(draw):
    """(float32 array in [0, 1] of a wrong shape, the words its refusal must name)."""
    kind = draw(st.sampled_from(["rank", "size", "empty"]))
    if kind == "rank":
        shape = draw(st.one_of(
            st.sampled_from([(), (784,), (2, 784), (2, 28, 28), (28, 28, 1), (1, 2, 28, 28, 1),
                             (1, 28, 28, 1, 1)]),
            st.integers(0, 6).filter(lambda r: r != 4).flatmap(
                lambda r: st.tuples(*[st.integers(0, 5)] * r)),
        ))
        words = ("rank 4", str(shape))
    elif kind == "size":
        shape = draw(st.tuples(st.integers(0, 3), st.integers(0, 30), st.integers(0, 30),
                               st.integers(0, 4)).filter(lambda s: s[1:] != IMAGE))
        words = (SIZE_TEXT, str(shape))
    else:
        shape, words = (0, *IMAGE), ("empty batch",)
    return np.full(shape, 0.5, np.float32), words


@st.composite
def bad_values(draw, dtypes=(np.float32, np.float64, np.float16)):
    """(array [n, 28, 28, 1] with NaN / Inf / values outside [0, 1] (0-255 images among them),
    the words its refusal must name: "NaN or Inf" first, else "[0, 1]" and the extreme)."""
    n = draw(st.integers(1, 3))
    rng = _rng(draw)
    x = rng.uniform(size=(n, *IMAGE))
    kind = draw(st.sampled_from(["nan", "inf", "negative", "above_one", "0-255", "mixed"]))
    if kind == "0-255":
        x = np.round(x * 255.0)
    else:
        bad = {"nan": st.just(np.nan), "inf": st.sampled_from([np.inf, -np.inf]),
               "negative": st.floats(max_value=-1e-6, allow_infinity=False),
               "above_one": st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
               "mixed": st.sampled_from([np.nan, np.inf, -3.0, 7.0, 255.0])}[kind]
        values = draw(st.lists(bad, min_size=1, max_size=6))
        x.flat[rng.integers(0, x.size, len(values))] = values
    with np.errstate(over="ignore"):  # float16 overflows to Inf: then Inf is the problem
        x = x.astype(draw(st.sampled_from(dtypes)))
    if not np.all(np.isfinite(x)):
        return x, ("NaN or Inf",)
    assume(x.min() < 0 or x.max() > 1)  # a value rounded into [0, 1] by the cast
    extreme = x.max() if x.max() > 1 else x.min()
    return x, ("[0, 1]", f"{extreme:.3g}")


BAD_DTYPES = (np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.bool_,
              np.complex64, np.str_, np.bytes_, np.object_, np.dtype("datetime64[s]"))


@st.composite
def bad_dtypes(draw, dtypes=BAD_DTYPES):
    """[n, 28, 28, 1] pixels 0 / 1 of a dtype that is not floating point."""
    n = draw(st.integers(1, 3))
    pixels = _rng(draw).integers(0, 2, (n, *IMAGE))
    return pixels.astype(draw(st.sampled_from(dtypes)))


def _check_contract(out, n, tensors=False):
    """The documented outputs of `n` rows, and the rules that tie them together."""
    assert set(out) == set(OUTPUTS)
    out = {k: v.numpy() if tensors else v for k, v in out.items()}
    for key, (row, dtype) in OUTPUTS.items():
        assert out[key].shape == (n, *row), key
        assert out[key].dtype == dtype, key
        if dtype == np.float32:
            assert np.all(np.isfinite(out[key])), key
    verdict, label = out["verdict"], out["label"]
    assert set(verdict.tolist()) <= {0, 1, 2}
    np.testing.assert_array_equal(label == -1, verdict == 2)  # -1 exactly when rejected
    np.testing.assert_array_equal(label[verdict == 0], out["classifier_label"][verdict == 0])
    r = out["resistance"]
    assert np.all((r >= 0) & (r <= 1))
    np.testing.assert_array_equal(r * NUM_MORPHS, np.round(r * NUM_MORPHS))  # shares of N
    assert np.all(out["distance"] >= 0) and np.all(out["distance"][verdict == 0] == 0)
    assert np.all(out["recon_error"] >= 0)
    return out


# --------------------------------------------------------------------------- eager: good input


@PROPERTY
@given(x=good_batches())
def test_good_batches_get_the_documented_outputs(defense, x):
    out = _check_contract(defense.defend(x), len(x))
    called = _check_contract(defense(x), len(x), tensors=True)
    float32 = defense.defend(x.astype(np.float32))  # other float dtypes: only cast
    report, is_adversarial = defense.detect(x)
    for key in OUTPUTS:
        np.testing.assert_array_equal(called[key], out[key], err_msg=key)
        np.testing.assert_array_equal(float32[key], out[key], err_msg=key)
        np.testing.assert_array_equal(report[key], out[key], err_msg=key)
    assert is_adversarial.dtype == bool
    np.testing.assert_array_equal(is_adversarial, out["verdict"] != 0)


def test_python_lists_and_scalars_are_checked_like_arrays(defense, good_images):
    x = good_images[:2]
    expected = defense.defend(x)
    for given_as in (x.tolist(), tuple(x.tolist())):
        out = defense(given_as)
        for key in OUTPUTS:
            np.testing.assert_array_equal(out[key].numpy(), expected[key], err_msg=key)
    with graph_forbidden(defense):
        for scalar in (0.5, np.float32(0.5), np.array(0.5)):
            with pytest.raises(ValueError, match=r"^images must have rank 4 \[batch, 28, 28, 1\]"):
                defense(scalar)
        with pytest.raises(ValueError, match="^images must be an array"):
            defense([[[[0.5]] * 28] * 28, [[0.5]]])  # uneven nested lists


# --------------------------------------------------------------------------- eager: bad input


@PROPERTY
@given(case=bad_shapes())
def test_bad_shapes_are_refused_before_the_graph(defense, case):
    x, words = case
    line = first_line_of_refusal(defense, x, ValueError)
    for word in words:
        assert word in line, (word, line)


@PROPERTY
@given(case=bad_values())
# finite float64 beyond float32's range: out of [0, 1] (it read "NaN or Inf" once cast)
@example(case=(np.full((1, *IMAGE), 1e300), ("[0, 1]", "1e+300")))
def test_bad_values_are_refused_before_the_graph(defense, case):
    x, words = case
    line = first_line_of_refusal(defense, x, ValueError)
    for word in words:
        assert word in line, (word, line)


@PROPERTY
@given(x=bad_dtypes())
def test_bad_dtypes_are_refused_before_the_graph(defense, x):
    line = first_line_of_refusal(defense, x, TypeError)
    assert line.startswith("images must be float32 in [0, 1], got dtype "), line
    assert x.dtype.name in line, line
    if np.issubdtype(x.dtype, np.integer):
        assert "divide uint8 images by 255" in line, line


def test_a_bad_first_batch_does_not_build_the_defense(defense):
    """An unbuilt defense takes its image shape from its first batch: a bad one is refused
    before the build (a rank-3 batch failed in Keras' build, about kernel shapes; a uint8 one
    built the model, then was refused)."""
    for x, error, words in [(np.zeros((2, 28, 28), np.float32), ValueError, "rank 4"),
                            (np.zeros((2, *IMAGE), np.uint8), TypeError, "dtype uint8")]:
        fresh = FMDefense(defense.classifier, defense.combo_vae, defense.config)
        with pytest.raises(error) as caught:
            fresh.defend(x)
        assert words in str(caught.value).splitlines()[0]
        assert not fresh.built and fresh._image_shape is None
        assert fresh(np.full((1, *IMAGE), 0.5, np.float32))["verdict"].shape == (1,)
        assert fresh._image_shape == IMAGE


# --------------------------------------------------------------------------- SavedModel


def _saved_model_request(fn, x, reference, probe):
    """`fn` must refuse `x` (InvalidArgumentError, or the signature's TypeError / ValueError),
    and the good request `probe` right after get its `reference` answer; returns (the error,
    its text)."""
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError)) as caught:
        fn(images=tf.constant(x))
    after = fn(images=tf.constant(probe))
    for key in OUTPUTS:
        np.testing.assert_array_equal(after[key].numpy(), reference[key], err_msg=key)
    error = caught.value
    return error, error.message if isinstance(error, tf.errors.OpError) else str(error)


@pytest.fixture(scope="module")
def probe(serving_default, good_images):
    """(good request, the SavedModel's answer to it as numpy)."""
    x = good_images[:3]
    return x, {k: v.numpy() for k, v in serving_default(images=tf.constant(x)).items()}


@PROPERTY
@given(x=good_batches())
def test_saved_model_answers_good_batches_like_the_eager_model(defense, serving_default, x):
    x = x.astype(np.float32)  # the signature takes float32 only
    served = _check_contract(serving_default(images=tf.constant(x)), len(x), tensors=True)
    eager = defense.defend(x)
    for key in ("verdict", "label", "classifier_label", "resistance"):
        np.testing.assert_array_equal(served[key], eager[key], err_msg=key)
    for key in ("distance", "purified", "recon_error"):
        np.testing.assert_allclose(served[key], eager[key], rtol=1e-5, atol=1e-6, err_msg=key)


@PROPERTY
@given(case=st.one_of(bad_shapes(), bad_values(dtypes=(np.float32,))))
# Always tried: the signature's static rank let the rank test be folded away, and these
# failed with "must be a scalar" instead of naming the shape (flaky: drawn at random).
@example(case=(np.full((1, 28, 28, 1, 1), 0.5, np.float32), ("rank 4",)))
@example(case=(np.full((1, 2, 28, 28, 1), 0.5, np.float32), ("rank 4",)))
def test_saved_model_refuses_bad_shapes_and_values(serving_default, probe, case):
    x, words = case
    error, text = _saved_model_request(serving_default, x, probe[1], probe[0])
    assert isinstance(error, tf.errors.InvalidArgumentError), (type(error), text)
    if "rank 4" in words or SIZE_TEXT in words:  # the graph names size and rank alike
        words = (f"images must be {SIZE_TEXT}",)
    elif "[0, 1]" in words:  # the graph names the side ("found a value > 1" / "< 0")
        below, above = bool(x.min() < 0), bool(x.max() > 1)
        words = ("images must be in [0, 1]: found a value " + (
            "" if below and above else "<" if below else ">"),)  # both: either check fires
    for word in words:
        assert word in text, (word, text)


@PROPERTY
@given(x=st.one_of(bad_dtypes(dtypes=BAD_DTYPES[:-2]),  # tf.constant takes no object / date
                   bad_values(dtypes=(np.float64, np.float16)).map(lambda case: case[0])))
def test_saved_model_refuses_other_dtypes(serving_default, probe, x):
    _, text = _saved_model_request(serving_default, x, probe[1], probe[0])
    assert "float" in text, text  # "expected to be a float tensor but is a double tensor"


def _with(x, values):
    """`x` with its first pixels set to `values`."""
    x.flat[: len(values)] = values
    return x


def test_graph_checks_name_the_first_problem_whatever_the_rank():
    """`validate_images` in a graph of unknown rank (what a SavedModel signature runs when fed
    another rank): the size check names the shape (it failed inside its own comparison,
    "Incompatible shapes: [3] vs. [2]"), and the stages report in order."""
    check = tf.function(lambda x: validate_images(x, IMAGE),
                        input_signature=[tf.TensorSpec(None, tf.float32)])
    cases = [
        (np.zeros((2, 28, 28), np.float32), f"images must be {SIZE_TEXT}"),
        (np.float32(0.5), f"images must be {SIZE_TEXT}"),
        (np.zeros((0, 27, 28, 1), np.float32), f"images must be {SIZE_TEXT}"),
        (np.zeros((0, *IMAGE), np.float32), "images: empty batch"),
        (_with(np.full((1, *IMAGE), 0.5, np.float32), [7.0, np.nan, -1.0]), "NaN or Inf"),
        (_with(np.full((1, *IMAGE), 0.5, np.float32), [0.2, 7.0]), "found a value > 1"),
    ]
    for x, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            check(tf.constant(x))
        assert message in caught.value.message, (message, caught.value.message)
    np.testing.assert_array_equal(check(tf.fill([1, *IMAGE], 0.5)).numpy(),
                                  np.full((1, *IMAGE), 0.5, np.float32))


# --------------------------------------------------------------------------- fit_defense


@pytest.fixture(scope="module")
def fit_problem():
    """(classifier of 16x16x1 images with 3 classes, train (x, y), VAL (x, y)), small."""
    keras.utils.set_random_seed(0)
    classifier = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Flatten(),
                                   keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(120, 16, 16, 1)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    return classifier, (x[:64], y[:64]), (x[64:], y[64:])


def _corrupt(kind, x, y, rng):
    """(x, y) made bad in one way, and the words the refusal's first line must hold."""
    x = x.copy()
    rows = rng.integers(0, len(x), 3)
    if kind in ("NaN", "Inf"):
        x[rows, 0, 0, 0] = np.nan if kind == "NaN" else -np.inf
        return (x, y), ("images contain NaN or Inf",)
    if kind == "0-255":
        return (np.round(x * 255.0), y), ("images must be in [0, 1]", "255")
    if kind == "negative":
        x[rows] -= 0.5
        return (x, y), ("images must be in [0, 1]",)
    if kind in ("uint8", "bool", "str", "object"):
        pixels = (x * 255).astype(np.uint8) if kind == "uint8" else x > 0.5
        x = {"uint8": pixels, "bool": pixels, "str": pixels.astype(str),
             "object": x.astype(object)}[kind]
        return (x, y), ("images must be float in [0, 1], got dtype", str(x.dtype))
    if kind == "rank 3":
        return (x[..., 0], y), ("images must be [N, H, W, C], got shape", str(x[..., 0].shape))
    if kind == "no images":
        return (x[:0], y[:0]), ("no images",)
    if kind == "float labels":
        return (x, y.astype(np.float64)), ("labels must be integers", "float64")
    if kind == "label count":
        return (x, y[:-1]), (f"{len(x)} images but {len(y) - 1} labels",)
    if kind == "label range":
        return (x, y + 3), ("labels must be in [0, 3)",)
    raise AssertionError(kind)


KINDS = ("NaN", "Inf", "0-255", "negative", "uint8", "bool", "str", "object", "rank 3",
         "no images", "float labels", "label count", "label range")


def _training_forbidden(*args, **kwargs):
    raise AssertionError("fit_defense started training on bad data")


@PROPERTY
@given(which=st.sampled_from(["train_data", "val_data"]), kind=st.sampled_from(KINDS),
       seed=st.integers(0, 2**16))
def test_fit_defense_refuses_bad_data_before_training(fit_problem, which, kind, seed):
    classifier, train, val = fit_problem
    data = {"train_data": train, "val_data": val}
    data[which], words = _corrupt(kind, *data[which], np.random.default_rng(seed))
    with mock.patch.object(pipeline, "train_combo_vae", _training_forbidden), \
            mock.patch.object(pipeline, "calibrate_defense", _training_forbidden), \
            pytest.raises(ValueError) as caught:
        fmd_tf.fit_defense(classifier, data["train_data"], data["val_data"], preset="fast",
                           verbose=0)
    line = str(caught.value).splitlines()[0]
    assert line.startswith(f"{which}: "), line
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize("change, words", [
    (lambda t, v: ((t[0][:, :6, :6], t[1]), (v[0][:, :6, :6], v[1])), "H, W >= 8"),
    (lambda t, v: ((t[0].repeat(2, -1), t[1]), (v[0].repeat(2, -1), v[1])), "C in {1, 3}"),
    (lambda t, v: (t, (v[0].repeat(3, -1), v[1])), "VAL images (16, 16, 3)"),
    (lambda t, v: (t, (v[0][:10], v[1][:10])), "at least 50 clean VAL images"),
    (lambda t, v: (t, (t[0][:56], t[1][:56])), "val_data overlaps train_data"),
    (lambda t, v: ((t[0],), v), "train_data must be (x, y)"),
])
def test_fit_defense_refuses_unusable_splits_before_training(fit_problem, change, words):
    classifier, train, val = fit_problem
    train, val = change(train, val)
    with mock.patch.object(pipeline, "train_combo_vae", _training_forbidden), \
            mock.patch.object(pipeline, "calibrate_defense", _training_forbidden), \
            pytest.raises((ValueError, TypeError)) as caught:
        fmd_tf.fit_defense(classifier, train, val, preset="fast", verbose=0)
    assert words in str(caught.value).splitlines()[0], str(caught.value)

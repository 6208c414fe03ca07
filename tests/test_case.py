"""Shared test helpers for fmd_tf (in the style of keras-hub's ``src/tests/test_case.py``).

Usage::

    from test_case import FmdTestCase, tiny_images

    class MyModelTest(FmdTestCase):
        def test_saving(self):
            model = MyModel(...)
            self.run_serialization_test(model)
            self.run_keras_saving_test(model, tiny_images())

API (kept deliberately small):

* :class:`FmdTestCase` -- a ``tf.test.TestCase`` with

  - :meth:`FmdTestCase.run_serialization_test` -- ``get_config`` / ``from_config`` and
    ``keras.saving.serialize_keras_object`` / ``deserialize_keras_object`` round trips;
  - :meth:`FmdTestCase.run_keras_saving_test` -- ``.keras`` save / ``keras.models.load_model``
    round trip with equal outputs (a tensor, or a tuple / list / dict of them, nested);
  - :meth:`FmdTestCase.assertNestedAllClose` -- the output comparison used by the above.

* Deterministic data: :func:`tiny_images` (uniform noise) and :func:`toy_batch` (a labeled,
  learnable batch: one bright block per class). ``conftest.py`` exposes them as the
  session-scoped fixtures ``tiny_images`` and ``toy_batch``.
* :data:`TINY_COMBO_CONFIG` -- a very small ``ComboVAEConfig`` for fast combo-VAE tests.
* :func:`run_python` -- ``python <args>`` in a new process from the repository root (scripts).
* :func:`script_module` -- a script's module (imported once), for tests of its functions.
* :func:`run_script` -- a script's command line in this process, with the same result object
  (no new Python and TensorFlow import, 5-10 s each): for tests of what a script does, not of
  how it starts (import time, exit before TensorFlow, environment, signals).

This module is a helper, not a test module: it defines no tests (``conftest.py`` keeps pytest
from collecting it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback

import keras
import numpy as np
import tensorflow as tf

from fmd_tf.config import ComboVAEConfig

__all__ = ["FmdTestCase", "ROOT", "TINY_COMBO_CONFIG", "run_python", "run_script",
           "script_module", "tiny_images", "toy_batch"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# Small enough that build + a few train steps take well under a second on one CPU core.
TINY_COMBO_CONFIG = ComboVAEConfig(
    shared_dim=4,
    unique_dim=3,
    encoder_filters=(8, 8),
    encoder_dense=16,
    decoder_dense=16,
    decoder_filters=(8, 4),
    discriminator_units=(16, 16),
    batch_size=8,
    consistency_weight=0.0,
    code_use_weight=0.0,
)


def graph_forward(model):
    """`model`'s forward pass as one `tf.function` (same outputs): for ART's estimators, which
    otherwise call a Keras model eagerly once per class gradient (ART's DeepFool on 32 images:
    20 s eager, 11 s traced, the same images)."""
    import tensorflow as tf

    return tf.function(lambda images, training=False: model(images, training=training),
                       reduce_retracing=True)


def run_python(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`python *args` in a new process from the repository root (TensorFlow's C++ log quiet),
    output captured as text."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=env or dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )


_SCRIPTS = {}


def script_module(path: str):
    """The module of a script (`path` relative to the repository, e.g. "scripts/bench.py"),
    imported once per process, for tests that call its functions."""
    if path not in _SCRIPTS:
        name = "fmd_script_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[path] = module
    return _SCRIPTS[path]


def run_script(path: str, *args) -> subprocess.CompletedProcess:
    """`python path *args` run in this process: the script's `run_cli(run, parse_args, argv)`
    from the repository root, its stdout / stderr captured, an uncaught exception's traceback
    on stderr with exit status 1 (as a new process would print it), argparse's exit status
    kept. Returns what `run_python` returns."""
    module = script_module(path)
    out, err = io.StringIO(), io.StringIO()
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [path, *map(str, args)]
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.run_cli(module.run, module.parse_args, sys.argv[1:])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - reported like an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return subprocess.CompletedProcess([sys.executable, path, *map(str, args)], code,
                                       out.getvalue(), err.getvalue())


def tiny_images(n: int = 4, shape=(28, 28, 1), seed: int = 0) -> np.ndarray:
    """Read-only float32 [n, *shape] uniform noise in [0, 1), the same for the same arguments."""
    x = np.random.default_rng(seed).uniform(size=(n, *shape)).astype(np.float32)
    x.flags.writeable = False
    return x


def toy_batch(per_class: int = 2, num_classes: int = 10, seed: int = 0):
    """A learnable labeled batch: (x float32 [per_class*C, 28, 28, 1] in [0, 1], y int64).

    Class c is a 7x7 bright block at grid cell c (4x4 grid of 7x7 cells) on a dark background,
    plus a little uniform noise; classes are interleaved (y = 0, 1, ..., C-1, 0, 1, ...).
    Arrays are read-only.
    """
    if num_classes > 16:
        raise ValueError("toy_batch supports at most 16 classes")
    rng = np.random.default_rng(seed)
    n = per_class * num_classes
    y = np.arange(n, dtype=np.int64) % num_classes
    x = rng.uniform(0.0, 0.1, size=(n, 28, 28, 1)).astype(np.float32)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 4)
        x[i, 7 * r : 7 * r + 7, 7 * col : 7 * col + 7, 0] = rng.uniform(0.8, 1.0)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def toy_classifier(epochs: int, per_class: int = 4):
    """(classifier, x, y): a small `Classifier` (conv 4-4, dense 16, no dropout) fitted for
    `epochs` on `toy_batch(per_class)` after seeding Keras with 0; the tiny defenses of the
    export and feature-map tests protect it."""
    import keras

    from fmd_tf.models import Classifier

    keras.utils.set_random_seed(0)
    x, y = (np.asarray(a) for a in toy_batch(per_class=per_class))
    classifier = Classifier(num_classes=10, conv_filters=(4, 4), dense_units=(16,), dropout=0.0,
                            name="classifier")
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.fit(x, y, epochs=epochs, batch_size=40, verbose=0)
    return classifier, x, y


def check_measure_then_decide(detector, x, x_val) -> None:
    """A baseline detector's `measure` does not depend on its calibration: after calibrating it
    again on `x_val` at FPR 0.5, `decide` on the outputs measured before gives what `defend`
    gives now, its `measurement_fingerprint` is unchanged, and it flags at least as many of
    `x` as before. The detector's calibration is put back afterwards."""
    state = detector._calibration_state()
    measured, fingerprint = detector.measure(x), detector.measurement_fingerprint()
    before = detector.decide(measured)
    try:
        detector.calibrate(x_val, fpr=0.5)
        assert detector.measurement_fingerprint() == fingerprint
        after, now = detector.decide(measured), detector.defend(x)
        assert set(after) == set(now)
        for key in now:
            np.testing.assert_array_equal(after[key], now[key], err_msg=key)
        assert (after["verdict"] == 2).sum() >= (before["verdict"] == 2).sum()
    finally:
        detector._restore_calibration(state)


def _to_numpy(value):
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return value.numpy()
    return np.asarray(keras.ops.convert_to_numpy(value))


class FmdTestCase(tf.test.TestCase):
    """``tf.test.TestCase`` with Keras serialization and ``.keras`` saving checks.

    ``tearDown`` clears the Keras session so that many small models do not pile up.
    """

    # tf.test.TestCase.test_session is a TF1 session helper, not a test; hide it from the
    # unittest loader that pytest uses (it only collects callable ``test*`` attributes).
    test_session = None

    def tearDown(self):
        keras.backend.clear_session()
        super().tearDown()

    # ------------------------------------------------------------------ comparisons

    def assertNestedAllClose(self, expected, actual, atol=1e-6, rtol=1e-6, path="output"):
        """assertAllClose on a tensor or a nested tuple / list / dict of tensors.

        Dicts must have the same keys; tuples and lists the same length (a tuple and a list of
        the same length compare equal, since loaded models may return either).
        """
        if isinstance(expected, dict):
            self.assertIsInstance(actual, dict, msg=f"{path}: expected a dict")
            self.assertEqual(sorted(expected), sorted(actual), msg=f"{path}: dict keys differ")
            for key in expected:
                self.assertNestedAllClose(
                    expected[key], actual[key], atol=atol, rtol=rtol, path=f"{path}[{key!r}]"
                )
        elif isinstance(expected, (tuple, list)):
            self.assertIsInstance(actual, (tuple, list), msg=f"{path}: expected a sequence")
            self.assertLen(actual, len(expected), msg=f"{path}: lengths differ")
            for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
                self.assertNestedAllClose(e, a, atol=atol, rtol=rtol, path=f"{path}[{i}]")
        else:
            e, a = _to_numpy(expected), _to_numpy(actual)
            self.assertEqual(e.shape, a.shape, msg=f"{path}: shapes differ")
            self.assertEqual(e.dtype, a.dtype, msg=f"{path}: dtypes differ")
            self.assertAllClose(e, a, atol=atol, rtol=rtol, msg=f"{path} differs")

    # ------------------------------------------------------------------ round trips

    def run_serialization_test(self, instance):
        """Config and Keras-serialization round trips of a layer / model.

        Checks that (1) the config is JSON-serializable, (2) ``cls.from_config(get_config())``
        gives an instance of the same class with an identical config, and (3)
        ``deserialize_keras_object(json round trip of serialize_keras_object(instance))`` does
        too. Returns the instance revived in (3).
        """
        cls = type(instance)
        config = instance.get_config()
        config_json = json.dumps(config, sort_keys=True)

        revived = cls.from_config(config)
        self.assertIs(type(revived), cls)
        self.assertEqual(config_json, json.dumps(revived.get_config(), sort_keys=True))

        serialized = keras.saving.serialize_keras_object(instance)
        serialized = json.loads(json.dumps(serialized))
        revived = keras.saving.deserialize_keras_object(serialized)
        self.assertIs(type(revived), cls)
        self.assertEqual(config_json, json.dumps(revived.get_config(), sort_keys=True))
        return revived

    def run_keras_saving_test(
        self, model, input_data, expected_output=None, atol=1e-6, rtol=1e-6, call_kwargs=None
    ):
        """Save `model` to a temporary ``.keras`` file, load it back and compare outputs.

        Args:
            model: a (built or buildable) Keras model registered as serializable.
            input_data: input of ``model(input_data, **call_kwargs)``.
            expected_output: output the *loaded* model must give; defaults to the output of
                `model` itself on `input_data`.
            atol, rtol: tolerances of :meth:`assertNestedAllClose`.
            call_kwargs: extra keyword arguments of both calls (e.g. ``{"training": False}``).

        Also checks that the loaded model has the same class and the same weights (in order,
        with the same names, shapes and values; variable *paths* may differ, since nested
        models are built outside their parent's name scope when loaded). Returns the loaded
        model.
        """
        call_kwargs = call_kwargs or {}
        output = model(input_data, **call_kwargs)
        if expected_output is None:
            expected_output = output
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            loaded = keras.models.load_model(path)
        self.assertIs(type(loaded), type(model))
        self.assertEqual(
            [(w.name, tuple(w.shape)) for w in model.weights],
            [(w.name, tuple(w.shape)) for w in loaded.weights],
        )
        for w, lw in zip(model.weights, loaded.weights, strict=True):
            self.assertAllEqual(w.numpy(), lw.numpy(), msg=f"weight {w.path} differs")
        self.assertNestedAllClose(
            expected_output, loaded(input_data, **call_kwargs), atol=atol, rtol=rtol
        )
        return loaded

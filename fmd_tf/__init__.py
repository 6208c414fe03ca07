"""fmd_tf: FM-Defense (semantic feature manipulation) for Keras 3 image classifiers.

    import fmd_tf
    defense = fmd_tf.fit_defense(classifier, (x_train, y_train), (x_val, y_val))
    defense.save("fmd.keras"); fmd_tf.export_saved_model(defense, "serving/1")

`import fmd_tf` is cheap: TensorFlow is imported when something needs it (the public names below,
the Keras models), so the command-line scripts answer a usage error at once. The package's
Keras classes (package "fmd_tf") are registered as soon as Keras is imported, before or after
fmd_tf, so that `keras.models.load_model("saved_models/fmnist/fmd.keras")` works after
`import fmd_tf`.
"""

import importlib as _importlib
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
__all__ = ["ExperimentConfig", "FMDefense", "FMDefenseEnsemble", "export_saved_model",
           "fit_defense", "load_defense"]

# public name -> the module that defines it (imported on first use)
_PUBLIC = {"ExperimentConfig": "fmd_tf.config", "FMDefense": "fmd_tf.defense",
           "FMDefenseEnsemble": "fmd_tf.defense", "export_saved_model": "fmd_tf.export",
           "fit_defense": "fmd_tf.pipeline", "load_defense": "fmd_tf.loading"}
_SUBMODULES = ("attacks", "baselines", "calibration", "cli", "config", "data", "defense",
               "evaluation", "export", "files", "loading", "losses", "models", "operating_point",
               "options", "pipeline", "plots", "serving", "training")


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(_importlib.import_module(_PUBLIC[name]), name)
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fmd_tf' has no attribute {name!r}")


def _register_keras_classes():
    """Import the modules whose classes are `keras.saving.register_keras_serializable`."""
    _importlib.import_module("fmd_tf.models")
    _importlib.import_module("fmd_tf.defense")


class _RegisterAfterKeras(_abc.MetaPathFinder):
    """Finds nothing itself: watches the imports of `keras` and `tensorflow` and registers
    fmd_tf's Keras classes once Keras is loaded and neither import is still running (TensorFlow
    imports Keras from inside its own import, when fmd_tf's modules cannot import TensorFlow
    yet), then removes itself."""

    _WATCHED = ("keras", "tensorflow")

    def __init__(self):
        self._busy = False  # inside our own find_spec call
        self._running = set()  # watched modules whose import has not finished

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self._WATCHED or self._busy:
            return None
        self._busy = True
        try:
            spec = _util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                self._running.add(fullname)
                try:
                    exec_module(module)
                finally:
                    self._running.discard(fullname)
                self._register_when_ready()

            spec.loader.exec_module = exec_then_register
        return spec

    def _register_when_ready(self):
        if "keras" in _sys.modules and not self._running and self in _sys.meta_path:
            _sys.meta_path.remove(self)
            _register_keras_classes()


if "keras" in _sys.modules:
    _register_keras_classes()
elif not any(isinstance(f, _RegisterAfterKeras) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _RegisterAfterKeras())

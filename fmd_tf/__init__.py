"""fmd_tf: FM-Defense (semantic feature manipulation) for Keras 3 image classifiers.

Importing the package registers every serializable class (package "fmd_tf") so that
`keras.models.load_model("saved_models/fmnist/fmd.keras")` works.
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fmd_tf import (
    defense,  # noqa: E402,F401
    models,  # noqa: E402,F401  (registers the Keras classes)
)

__version__ = "0.1.0"

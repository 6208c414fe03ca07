"""Clients for the FM-Defense SavedModel served by TensorFlow Serving (see `client`).

The server side is TF Serving itself (`serving/docker-compose.yml`) with the SavedModel written
by `scripts/export.py` / `fmd_tf.export_saved_model` / `fmd_tf.export.export_serving`. The
clients take the input shape from the served model's metadata (any H x W x C the package
defends), not from a constant. Command line: `python -m fmd_tf.serving.client --help`.

The names below are loaded lazily so that `python -m fmd_tf.serving.client` does not import the
module twice (runpy warns when a package pre-imports the module it runs).
"""

_CLIENT_NAMES = (
    "GrpcClient",
    "ImageInputError",
    "RestClient",
    "ServingError",
    "check_images",
    "get_model_metadata",
    "get_model_metadata_rest",
    "load_images",
    "predict_grpc",
    "predict_rest",
)

__all__ = list(_CLIENT_NAMES)


def __getattr__(name):
    if name in _CLIENT_NAMES:
        from fmd_tf.serving import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Clients for the FM-Defense SavedModel served by TensorFlow Serving (see `client`).

The server side is TF Serving itself (`serving/docker-compose.yml`) with the SavedModel written
by `scripts/export.py` / `fmd_tf.export_saved_model` / `fmd_tf.export.export_serving`. The
clients take the input shape from the served model's metadata (any H x W x C the package
defends), not from a constant. Command line: `python -m fmd_tf.serving.client --help`.

`QueryMonitor` (`query_monitor`) runs in the gateway in front of the server: it rejects queries
that look like a query-based attack's (Blacklight).

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

# The gateway side: stateful detection of query-based attacks (`query_monitor`).
_MONITOR_NAMES = ("QueryMonitor",)

__all__ = [*_CLIENT_NAMES, *_MONITOR_NAMES]


def __getattr__(name):
    import importlib

    for module, names in (("client", _CLIENT_NAMES), ("query_monitor", _MONITOR_NAMES)):
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Command-line and Python client for FM-Defense served by TensorFlow Serving.

Expected server: TensorFlow Serving (the official `tensorflow/serving` image, see
`serving/docker-compose.yml`) serving the SavedModel written by `scripts/export.py` /
`fmd_tf.export_saved_model` under the model name `fmd`: gRPC on port 8500, REST on port 8501.
Host and port are flags; nothing is hard-wired. Signatures: `serving_default` (full defense),
`classify`, `detect`, `purify`; each takes `images` float32 [N, H, W, C] in [0, 1], where
(H, W, C) is the served model's own image shape (e.g. 28x28x1, 8x8x1, 32x32x3; see
`fmd_tf.export`).

    python -m fmd_tf.serving.client --target localhost:8500 --model fmd --images x.npy \\
        [--signature serving_default] [--version N] [--timeout 10] [--outputs label,verdict]
    python -m fmd_tf.serving.client --rest http://localhost:8501 --images x.npy ...
    python -m fmd_tf.serving.client --target localhost:8500 --metadata   # or --rest URL
    python -m fmd_tf.serving.client --images x.npy --warmup 3 --repeat 20   # latency

The input shape is not a constant of the client: it is read from the served model (gRPC
`GetModelMetadata`, REST `GET /v1/models/<name>[/versions/<v>]/metadata`: the `images` input of
the signature used), once per client object (`GrpcClient`, `RestClient`; the one-shot functions
`predict_grpc` / `predict_rest` ask once per call). `--images` is a .npy file, float32 or
float64, [N, H, W, C] with the model's H, W, C, or [N, H, W] for a one-channel model (a channel
axis is added; float64 is cast to float32); other shapes are refused before sending, naming the
shape the model expects. A server that does not answer metadata (an older or minimal server)
only gets the generic check (rank 4, C in {1, 3}, or rank 3) and its own in-graph check refuses
a wrong shape with INVALID_ARGUMENT, reported like any server error. Value checks (NaN, range)
are the server's: it answers INVALID_ARGUMENT naming the problem. Prints the outputs as JSON
(lists) on stdout; timings go to stderr. Errors (server unreachable, unknown model or signature,
rejected input, bad input file) are one line on stderr and exit status 2.

Python API: `GrpcClient`, `RestClient` (`predict`, `metadata`, `input_shape`), `predict_grpc`,
`predict_rest` (dict of numpy arrays), `get_model_metadata`, `get_model_metadata_rest`,
`check_images`, `load_images`; failures raise `ServingError` (with a gRPC-style `code`) or
`ImageInputError`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

DEFAULT_TARGET = "localhost:8500"
DEFAULT_MODEL = "fmd"
DEFAULT_SIGNATURE = "serving_default"
INPUT_NAME = "images"  # the signatures' one input (`fmd_tf.export.INPUT_NAME`)
CHANNELS = (1, 3)  # channel counts the package defends (generic check without metadata)
# Messages of a few MB (big batches, `purified` outputs) exceed gRPC's 4 MB default.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]
# REST answers are JSON: restore the signatures' dtypes by output name.
_REST_DTYPES = {"label": np.int64, "classifier_label": np.int64, "verdict": np.int32}
# Metadata failures that mean "no usable answer now, ask again next time" (the request itself
# will say what is wrong); connection failures are raised; anything else (UNIMPLEMENTED: an
# older server, a malformed answer) is remembered as "no metadata" for the client's lifetime.
_METADATA_RETRY = frozenset({"NOT_FOUND", "FAILED_PRECONDITION", "CANCELLED", "ABORTED",
                             "RESOURCE_EXHAUSTED"})
_CONNECTION_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


class ServingError(RuntimeError):
    """The server (or the connection to it) failed a request.

    `code` is the gRPC status name (UNAVAILABLE, NOT_FOUND, FAILED_PRECONDITION,
    INVALID_ARGUMENT, DEADLINE_EXCEEDED, UNIMPLEMENTED, ...; REST errors are mapped to the same
    names) and `message` the server's text.
    """

    def __init__(self, code: str, message: str, target: str = ""):
        self.code, self.message, self.target = code, message, target
        super().__init__(f"{code}: {message}")


class ImageInputError(ValueError):
    """The images file or array cannot be sent (missing, not .npy, wrong dtype or shape)."""


# ----------------------------------------------------------------------------------- input


def _dims(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _expected_text(image_shape) -> str:
    text = f"[N, {_dims(image_shape)[1:]}"
    if len(image_shape) == 3 and image_shape[-1] == 1:
        text += f" or [N, {_dims(image_shape[:-1])[1:]}"
    return text


def _check_dtype(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype not in (np.float32, np.float64):
        hint = " (divide uint8 images by 255 first)" if images.dtype.kind in "ui" else ""
        raise ImageInputError(
            f"images must be float32 or float64 in [0, 1], found dtype {images.dtype}{hint}"
        )
    return images


def check_images(images, image_shape=None) -> np.ndarray:
    """float32 [N, *image_shape] from float32/float64 images; else ImageInputError.

    `image_shape`: the model's (H, W, C) (None entries: any size), e.g. from
    `GrpcClient.input_shape`; [N, H, W] is accepted when C == 1 (a channel axis is added).
    None: the generic check, rank 4 with C in {1, 3} (or rank 3, one channel), as when the
    server does not tell its shape; the server's in-graph check then has the last word.
    """
    images = _check_dtype(images)
    found = list(images.shape)
    if image_shape is None:
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in CHANNELS:
            raise ImageInputError(
                "images must have shape [N, H, W, C] with C in {1, 3} or [N, H, W], found "
                f"{found}"
            )
    else:
        image_shape = tuple(None if d is None or int(d) < 0 else int(d) for d in image_shape)
        if len(image_shape) == 3 and image_shape[-1] == 1 and images.ndim == 3:
            images = images[..., None]
        if images.ndim != 1 + len(image_shape) or any(
            want is not None and got != want
            for got, want in zip(images.shape[1:], image_shape, strict=True)
        ):
            raise ImageInputError(
                f"images must have shape {_expected_text(image_shape)} (the served model's "
                f"input), found {found}"
            )
    if images.shape[0] == 0:
        raise ImageInputError("images: empty batch (N = 0)")
    return np.ascontiguousarray(images, dtype=np.float32)


def load_images(path, image_shape=None) -> np.ndarray:
    """Read and check a .npy file of images (see `check_images`)."""
    path = os.fspath(path)
    images = _read_npy(path)
    try:
        return check_images(images, image_shape)
    except ImageInputError as e:
        raise ImageInputError(f"{path}: {e}") from None


def _read_npy(path: str) -> np.ndarray:
    if not path.endswith(".npy"):
        raise ImageInputError(f"{path}: expected a .npy file (numpy.save), got another extension")
    if not os.path.isfile(path):
        raise ImageInputError(f"{path}: no such file")
    try:
        images = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ImageInputError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(images, np.ndarray):
        raise ImageInputError(f"{path}: holds a {type(images).__name__}, not one array")
    return images


def signature_summary(signature_defs) -> dict:
    """{name: {"inputs"|"outputs": {key: (dtype, shape)}}} of SignatureDef protos (-1 = any)."""
    import tensorflow as tf

    def info(tensors):
        return {
            key: (tf.dtypes.as_dtype(t.dtype).name,
                  None if t.tensor_shape.unknown_rank
                  else tuple(d.size for d in t.tensor_shape.dim))
            for key, t in sorted(tensors.items())
        }

    return {
        name: {"inputs": info(sig.inputs), "outputs": info(sig.outputs)}
        for name, sig in sorted(signature_defs.items())
        if not name.startswith("__")  # __saved_model_init_op
    }


def image_shape_from_metadata(meta, signature=DEFAULT_SIGNATURE):
    """(H, W, C) (None = any size) of the `images` input of `signature` in `meta` (as returned
    by `metadata()`); None when the metadata does not say (unknown signature or rank)."""
    sig = meta.get("signatures", {}).get(signature or DEFAULT_SIGNATURE)
    if not sig or INPUT_NAME not in sig["inputs"]:
        return None
    shape = sig["inputs"][INPUT_NAME][1]
    if shape is None or len(shape) < 2:
        return None
    return tuple(None if d < 0 else int(d) for d in shape[1:])


class _MetadataCache:
    """Per-client cache of the served models' metadata, keyed by (model, version)."""

    def _init_cache(self):
        self._metadata_cache = {}
        self._cache_lock = threading.Lock()
        self.metadata_requests = 0  # answered or not: how often the server was asked

    def metadata(self, model, version=None) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def _cached_metadata(self, model, version):
        key = (model, None if version is None else int(version))
        with self._cache_lock:
            if key in self._metadata_cache:
                return self._metadata_cache[key]
            self.metadata_requests += 1
        try:
            meta = self.metadata(model, version)
        except ServingError as e:
            if e.code in _CONNECTION_CODES:
                raise
            if e.code in _METADATA_RETRY:
                return None
            meta = None  # the server does not answer metadata: generic check, in-graph check
        with self._cache_lock:
            self._metadata_cache[key] = meta
        return meta

    def input_shape(self, model, signature=DEFAULT_SIGNATURE, version=None):
        """The served model's image shape (H, W, C) for `signature`, from its metadata (read
        once per (model, version) by this client); None when the server does not tell it.
        Raises ServingError only when the server cannot be reached."""
        meta = self._cached_metadata(model, version)
        return None if meta is None else image_shape_from_metadata(meta, signature)

    def forget_metadata(self):
        """Drop the cached metadata (e.g. after the server loaded a new model version)."""
        with self._cache_lock:
            self._metadata_cache.clear()

    def _checked(self, model, images, signature, version) -> np.ndarray:
        images = _check_dtype(images)  # no request for a wrong dtype
        return check_images(images, self.input_shape(model, signature, version))


# ------------------------------------------------------------------------------------ gRPC


def _grpc_error(e, target: str) -> ServingError:
    code = e.code().name if e.code() is not None else "UNKNOWN"
    return ServingError(code, e.details() or str(e), target)


def _model_spec(spec, model, signature=None, version=None):
    spec.name = model
    if signature is not None:
        spec.signature_name = signature
    if version is not None:
        spec.version.value = int(version)


class GrpcClient(_MetadataCache):
    """A PredictionService connection to reuse across requests (`with GrpcClient(...) as c`).

    `predict` checks the images against the served model's input shape, read once per
    (model, version) with `GetModelMetadata` and cached by this object (`input_shape`).
    """

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float = 10.0):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.target, self.timeout, self._grpc = target, float(timeout), grpc
        self.channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self._init_cache()

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def predict(self, model, images, signature=DEFAULT_SIGNATURE, version=None,
                output_filter=None) -> dict:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        images = self._checked(model, images, signature, version)
        request = predict_pb2.PredictRequest()
        _model_spec(request.model_spec, model, signature, version)
        request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(images))
        request.output_filter.extend(output_filter or [])
        try:
            response = self.stub.Predict(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise _grpc_error(e, self.target) from None
        return {key: tf.make_ndarray(proto) for key, proto in sorted(response.outputs.items())}

    def metadata(self, model, version=None) -> dict:
        """{"model", "version", "signatures"} via GetModelMetadata (not cached)."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        _model_spec(request.model_spec, model, version=version)
        request.metadata_field.append("signature_def")
        try:
            response = self.stub.GetModelMetadata(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise _grpc_error(e, self.target) from None
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        if "signature_def" not in response.metadata or \
                not response.metadata["signature_def"].Unpack(signature_map):
            raise ServingError("INTERNAL", "metadata is not a SignatureDefMap", self.target)
        return {
            "model": response.model_spec.name,
            "version": response.model_spec.version.value,
            "signatures": signature_summary(signature_map.signature_def),
        }


def predict_grpc(target, model, images, signature=DEFAULT_SIGNATURE, timeout=10.0,
                 version=None, output_filter=None) -> dict:
    """One gRPC Predict call (after one GetModelMetadata call for the input shape);
    {output name: numpy array}. Raises ServingError/ImageInputError. Use a `GrpcClient` for
    many requests."""
    with GrpcClient(target, timeout) as client:
        return client.predict(model, images, signature, version, output_filter)


def get_model_metadata(target, model=DEFAULT_MODEL, timeout=10.0, version=None) -> dict:
    """{"model", "version", "signatures": {name: {"inputs", "outputs"}}} via GetModelMetadata."""
    with GrpcClient(target, timeout) as client:
        return client.metadata(model, version)


# ------------------------------------------------------------------------------------ REST


def _rest_code(status: int, message: str) -> str:
    if status == 404:
        return "NOT_FOUND"
    if status == 400:
        return "FAILED_PRECONDITION" if _is_signature_error(message) else "INVALID_ARGUMENT"
    if status in (503, 502):
        return "UNAVAILABLE"
    if status in (501, 405):
        return "UNIMPLEMENTED"
    return f"HTTP_{status}"


def _is_signature_error(message: str) -> bool:
    # TF Serving: 'Serving signature name: "x" not found in signature def'
    return "not found in signature def" in message


class RestClient(_MetadataCache):
    """TF Serving's REST API at `url` (e.g. http://localhost:8501); same interface as
    `GrpcClient`: `predict` checks the images against the model's input shape, read once per
    (model, version) from `GET /v1/models/<model>[/versions/<v>]/metadata` and cached."""

    def __init__(self, url, timeout: float = 10.0):
        base = str(url).rstrip("/")
        if "://" not in base:
            base = "http://" + base
        self.base, self.timeout = base, float(timeout)
        self._init_cache()

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _model_path(model, version):
        return f"/v1/models/{model}" + (f"/versions/{int(version)}" if version is not None
                                        else "")

    def _request(self, path, body=None) -> dict:
        if body is None:
            request = urllib.request.Request(self.base + path, method="GET")
        else:
            request = urllib.request.Request(
                self.base + path, data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json"},
            )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                message = text or e.reason
            raise ServingError(_rest_code(e.code, str(message)), str(message),
                               self.base) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            code = "DEADLINE_EXCEEDED" if isinstance(reason, (socket.timeout, TimeoutError)) \
                else "UNAVAILABLE"
            raise ServingError(code, f"{self.base}: {reason}", self.base) from None
        try:
            payload = json.loads(raw)
        except ValueError:
            raise ServingError("INTERNAL", f"{self.base}{path}: answer is not JSON",
                               self.base) from None
        if not isinstance(payload, dict):
            raise ServingError("INTERNAL", f"{self.base}{path}: answer is not a JSON object",
                               self.base)
        return payload

    def predict(self, model, images, signature=DEFAULT_SIGNATURE, version=None) -> dict:
        """POSTs {"signature_name", "inputs": {"images": ...}} (columnar format) to
        `url/v1/models/<model>[/versions/N]:predict`; returns {output name: numpy array}."""
        images = self._checked(model, images, signature, version)
        payload = self._request(
            self._model_path(model, version) + ":predict",
            {"signature_name": signature, "inputs": {INPUT_NAME: images.tolist()}},
        )
        outputs = payload.get("outputs")
        if outputs is None:
            raise ServingError("INTERNAL", f"unexpected REST answer: keys {sorted(payload)}",
                               self.base)
        if not isinstance(outputs, dict):  # TF Serving drops the name of a single output
            outputs = {"output": outputs}
        return {key: _rest_array(key, value) for key, value in sorted(outputs.items())}

    def metadata(self, model, version=None) -> dict:
        """{"model", "version", "signatures"} from `GET .../metadata` (not cached)."""
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        payload = self._request(self._model_path(model, version) + "/metadata")
        try:
            # TF Serving: {"model_spec": {...}, "metadata": {"signature_def": SignatureDefMap
            # as JSON, i.e. {"signature_def": {name: SignatureDef}}}}.
            signature_map = json_format.ParseDict(
                payload["metadata"]["signature_def"], get_model_metadata_pb2.SignatureDefMap(),
                ignore_unknown_fields=True,
            )
            spec = payload.get("model_spec") or {}
            version_value = int(spec.get("version") or 0)
        except (KeyError, TypeError, ValueError, json_format.ParseError) as e:
            raise ServingError("INTERNAL", f"unexpected REST metadata answer ({e})",
                               self.base) from None
        return {
            "model": spec.get("name", model),
            "version": version_value,
            "signatures": signature_summary(signature_map.signature_def),
        }


def predict_rest(url, model, images, signature=DEFAULT_SIGNATURE, timeout=10.0,
                 version=None) -> dict:
    """One REST predict call (columnar "inputs" format) to TF Serving at `url`, after one
    metadata request for the input shape; see `RestClient.predict`. Use a `RestClient` for many
    requests."""
    with RestClient(url, timeout) as client:
        return client.predict(model, images, signature, version)


def get_model_metadata_rest(url, model=DEFAULT_MODEL, timeout=10.0, version=None) -> dict:
    """`get_model_metadata` over REST (`GET url/v1/models/<model>[/versions/N]/metadata`)."""
    with RestClient(url, timeout) as client:
        return client.metadata(model, version)


def _rest_array(key, value) -> np.ndarray:
    array = np.asarray(value)
    if key in _REST_DTYPES:
        return array.astype(_REST_DTYPES[key])
    return array.astype(np.float32) if array.dtype.kind == "f" else array


# ------------------------------------------------------------------------------------- CLI


class UsageError(Exception):
    """Printed as one line on stderr; exit status 2."""


def _one_line(message: str) -> str:
    """A server message on one line: an in-graph assertion's own text ("images must be [batch,
    8, 8, 1]"), else the message without TensorFlow's "[[{{node ...}}]]" trace lines."""
    match = re.search(r"assertion failed: \[(.+?)\](?: \[Condition|\s*$)", message, re.M)
    if match:
        return match.group(1)
    lines = [ln.strip() for ln in message.splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith("[[")) or message.strip()


def _explain(e: ServingError, args) -> str:
    where = args.rest or args.target
    e = ServingError(e.code, _one_line(e.message), e.target)
    if e.code == "DEADLINE_EXCEEDED":
        return (f"no answer from {where} within --timeout {args.timeout:g} s ({e.message}); the "
                "server is unreachable or slow (the full defense runs m*N morphs per image): "
                "raise --timeout or send fewer images")
    if e.code == "UNAVAILABLE":
        return (f"cannot reach TF Serving at {where} ({e.code}: {e.message}); is the server "
                "running (docker compose -f serving/docker-compose.yml up) and the "
                f"{'--rest URL' if args.rest else '--target host:port'} right?")
    if e.code == "NOT_FOUND":
        version = f" version {args.version}" if args.version is not None else ""
        return (f"model {args.model!r}{version} not found on {where} ({e.message}); check "
                "--model / --version against serving/models.config")
    if e.code == "FAILED_PRECONDITION" or _is_signature_error(e.message):
        return (f"signature {args.signature!r} not served by model {args.model!r} "
                f"({e.message}); expected one of serving_default, classify, detect, purify")
    if e.code == "INVALID_ARGUMENT":
        return f"the server rejected the input (INVALID_ARGUMENT): {e.message}"
    return f"request to {where} failed ({e.code}): {e.message}"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fmd_tf.serving.client", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help="gRPC host:port of TF Serving")
    p.add_argument("--rest", default=None, metavar="URL",
                   help="use REST at URL (e.g. http://localhost:8501) instead of gRPC")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--version", type=int, default=None, help="model version (default latest)")
    p.add_argument("--signature", default=DEFAULT_SIGNATURE)
    p.add_argument("--images", default=None,
                   help=".npy file, float in [0, 1], [N, H, W, C] with the served model's "
                        "image shape (read from its metadata), or [N, H, W] when C = 1")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--outputs", default=None,
                   help="comma-separated outputs to print (default all)")
    p.add_argument("--metadata", action="store_true",
                   help="print the served signatures (gRPC GetModelMetadata, or the REST "
                        "metadata with --rest) and exit")
    p.add_argument("--warmup", type=int, default=0, help="untimed requests before timing")
    p.add_argument("--repeat", type=int, default=1, help="timed requests (latency on stderr)")
    args = p.parse_args(argv)
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    if args.warmup < 0 or args.repeat < 1:
        raise UsageError("--warmup must be >= 0 and --repeat >= 1")
    if not args.metadata and args.images is None:
        raise UsageError("--images FILE.npy is required (or pass --metadata)")
    return args


def _expected_keys(signature):
    from fmd_tf.export import SIGNATURES

    return set(SIGNATURES.get(signature, ()))


def run(args, out=None, err=None) -> dict:
    out, err = out or sys.stdout, err or sys.stderr
    if args.metadata:
        if args.rest:
            meta = get_model_metadata_rest(args.rest, args.model, args.timeout, args.version)
        else:
            meta = get_model_metadata(args.target, args.model, args.timeout, args.version)
        print(json.dumps(_readable(meta), indent=2), file=out)
        return meta
    try:
        raw = _read_npy(os.fspath(args.images))  # errors name the file
    except ImageInputError as e:
        raise UsageError(str(e)) from None
    try:
        images = check_images(raw)  # the generic check, before any request
    except ImageInputError as e:
        raise UsageError(f"{args.images}: {e}") from None
    client = RestClient(args.rest, args.timeout) if args.rest else \
        GrpcClient(args.target, args.timeout)

    def request():
        return client.predict(args.model, images, args.signature, args.version)

    try:
        # The model's own shape (one metadata request, cached by `client` for the requests).
        shape = client.input_shape(args.model, args.signature, args.version)
        if shape is not None:
            try:
                images = check_images(raw, shape)
            except ImageInputError as e:
                raise UsageError(f"{args.images}: {e}") from None
        expected = _expected_keys(args.signature)
        for _ in range(args.warmup):
            _check_keys(request(), expected, args.signature)
        seconds = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            outputs = request()
            seconds.append(time.perf_counter() - start)
            _check_keys(outputs, expected, args.signature)
    finally:
        client.close()
    if args.warmup or args.repeat > 1:
        ms = np.array(seconds) * 1e3
        print(f"{len(images)} images x {args.repeat} requests ({args.warmup} warm-up) via "
              f"{'REST' if args.rest else 'gRPC'}: median {np.median(ms):.1f} ms, p90 "
              f"{np.percentile(ms, 90):.1f} ms, min {ms.min():.1f} ms, "
              f"{len(images) / np.median(seconds):.1f} images/s", file=err)
    if args.outputs:
        wanted = [k.strip() for k in args.outputs.split(",") if k.strip()]
        missing = [k for k in wanted if k not in outputs]
        if missing:
            raise UsageError(f"--outputs: {missing} not in the answer ({sorted(outputs)})")
        outputs = {k: outputs[k] for k in wanted}
    print(json.dumps({k: v.tolist() for k, v in outputs.items()}), file=out)
    return outputs


def _readable(meta):
    """Metadata with "dtype [d0, d1, ...]" strings instead of (dtype, shape) pairs."""
    def text(dtype, shape):
        dims = "?" if shape is None else "[" + ", ".join(
            "None" if d < 0 else str(d) for d in shape) + "]"
        return f"{dtype} {dims}"

    signatures = {
        name: {kind: {k: text(*v) for k, v in sig[kind].items()} for kind in sig}
        for name, sig in meta["signatures"].items()
    }
    return {**meta, "signatures": signatures}


def _check_keys(outputs, expected, signature):
    missing = sorted(expected - set(outputs))
    if missing:
        raise ServingError(
            "INTERNAL", f"answer of signature {signature!r} lacks outputs {missing} (got "
            f"{sorted(outputs)}): is the served model an fmd_tf export?"
        )


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServingError as e:
        print(f"error: {_explain(e, args)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A minimal local stand-in for TensorFlow Serving over one exported SavedModel.

For tests and benchmarks where the TF Serving binary is not available (it ships only as a
Docker image): `ServingServer(path)` loads `tf.saved_model.load(path).signatures` and
serves them

* over gRPC (`tensorflow_serving.apis.prediction_service_pb2_grpc`): `Predict` and
  `GetModelMetadata` (metadata_field "signature_def": a `SignatureDefMap` of the SavedModel's
  "serve" SignatureDefs - inputs/outputs as TensorInfo with dtype and shape, e.g. `images`
  float32 [-1, H, W, C] - packed in an `Any`, like TF Serving); the other RPCs answer
  UNIMPLEMENTED;
* over REST (`http.server` in a thread): `POST /v1/models/<name>[/versions/N]:predict` with TF
  Serving's JSON ("instances" row format or "inputs" columnar format; answers "predictions" or
  "outputs"; errors as {"error": ...} with 400 / 404), `GET /v1/models/<name>[/versions/N]`
  (status) and `GET /v1/models/<name>[/versions/N]/metadata`, answered as TF Serving does:
  {"model_spec": {...}, "metadata": {"signature_def": {"signature_def": {name: SignatureDef}}}}
  in proto JSON with the proto field names (`tensor_shape`, `unknown_rank`, sizes as strings).

`ServingServer(path, metadata=False)` plays an older / minimal server without metadata:
GetModelMetadata answers UNIMPLEMENTED and the REST metadata path 400 "Malformed request" (what
a TF Serving without that endpoint says). `server.backend.metadata_requests` counts the
metadata requests (both fronts, answered or not) and `requests` the predict requests.

Status codes follow TF Serving: unknown model or version -> NOT_FOUND ("Servable not found for
request: ..."), unknown signature -> FAILED_PRECONDITION, bad input (wrong input names, dtype,
in-graph InvalidArgumentError) -> INVALID_ARGUMENT with the graph's message. A request can never
take the server down. Both listen on 127.0.0.1 on free ports.

    with ServingServer("/tmp/serving/1", model_name="fmd", version=1) as server:
        predict_grpc(server.target, "fmd", images)
        predict_rest(server.rest_url, "fmd", images)
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

__all__ = ["ServingServer", "ServingBackend", "Status"]

_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404,
                "UNIMPLEMENTED": 501}


class Status(Exception):
    """A failed request: gRPC status name + message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _graph_message(e: tf.errors.OpError) -> str:
    """The useful part of a graph error (drops 'Graph execution error' / stack-trace noise)."""
    text = e.message
    marker = "<stack traces unavailable>"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [ln for ln in text.strip().splitlines()
             if ln.strip() and not ln.startswith(("Graph execution error", "Detected at node"))]
    text = re.sub(r"\s*\[Op:__inference_\w+\]", "", "\n".join(lines)).strip()
    return text or e.message


class ServingBackend:
    """The model: signatures of one SavedModel version, shared by the gRPC and REST fronts."""

    def __init__(self, path, model_name="fmd", version=1, metadata=True):
        self.path, self.model_name, self.version = os.fspath(path), model_name, int(version)
        self.metadata = bool(metadata)
        self.loaded = tf.saved_model.load(self.path)
        self.signatures = dict(self.loaded.signatures)
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(self.path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        meta = next(m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags)
        self.signature_defs = meta.signature_def  # like TF Serving: every SignatureDef
        self._lock = threading.Lock()
        self.requests = 0
        self.metadata_requests = 0

    def check_model(self, name, version=None):
        if name != self.model_name:
            raise Status("NOT_FOUND", f"Servable not found for request: Latest({name})")
        if version is not None and int(version) != self.version:
            raise Status("NOT_FOUND", f"Servable not found for request: Specific({name}, "
                                      f"{version})")

    def predict(self, name, version, signature, inputs, output_filter=()):
        """inputs {key: np.ndarray} -> {output: np.ndarray}; raises Status."""
        with self._lock:
            self.requests += 1
        self.check_model(name, version)
        signature = signature or "serving_default"
        if signature not in self.signatures:
            raise Status("FAILED_PRECONDITION",
                         f'Serving signature name: "{signature}" not found in signature def')
        fn = self.signatures[signature]
        specs = fn.structured_input_signature[1]
        if set(inputs) != set(specs):
            raise Status(
                "INVALID_ARGUMENT",
                f"input size does not match signature: {len(inputs)}!={len(specs)} "
                f"len({{{','.join(sorted(inputs))}}}) != len({{{','.join(sorted(specs))}}}). "
                f"Sent extra: {sorted(set(inputs) - set(specs))}. "
                f"Missing but required: {sorted(set(specs) - set(inputs))}.",
            )
        feed = {}
        for key, value in inputs.items():
            want = specs[key].dtype
            if tf.as_dtype(value.dtype) != want:
                raise Status("INVALID_ARGUMENT", f"Expects arg[0] ({key}) to be {want.name} but "
                                                 f"{tf.as_dtype(value.dtype).name} is provided")
            feed[key] = tf.constant(value)
        outputs_spec = fn.structured_outputs
        unknown = [k for k in output_filter if k not in outputs_spec]
        if unknown:
            raise Status("INVALID_ARGUMENT",
                         f"output tensor alias not found in signature: {unknown[0]}")
        try:
            result = fn(**feed)
        except tf.errors.InvalidArgumentError as e:
            raise Status("INVALID_ARGUMENT", _graph_message(e)) from None
        except (ValueError, TypeError) as e:  # rejected before the graph runs
            raise Status("INVALID_ARGUMENT", str(e)) from None
        except tf.errors.OpError as e:
            code = next((c.name for c in grpc.StatusCode if c.value[0] == e.error_code),
                        "INTERNAL")
            raise Status(code, _graph_message(e)) from None
        keys = list(output_filter) or sorted(result)
        return {k: result[k].numpy() for k in keys}

    def signature_def_map(self):
        """The SignatureDefMap TF Serving answers: every SignatureDef of the "serve" graph."""
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in self.signature_defs.items():
            sig_map.signature_def[name].CopyFrom(sig)
        return sig_map

    def get_metadata(self, name, version=None, fields=("signature_def",)):
        """GetModelMetadataResponse for the model; raises Status (like TF Serving)."""
        with self._lock:
            self.metadata_requests += 1
        if not self.metadata:
            raise Status("UNIMPLEMENTED", "Method GetModelMetadata is unimplemented")
        self.check_model(name, version)
        fields = list(fields)
        if fields != ["signature_def"]:
            raise Status("INVALID_ARGUMENT",
                         f"Metadata field(s) {fields} not supported: only signature_def")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        response.metadata["signature_def"].Pack(self.signature_def_map())
        return response


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, backend: ServingBackend):
        self.backend = backend

    @staticmethod
    def _fail(context, status: Status):
        context.set_code(getattr(grpc.StatusCode, status.code, grpc.StatusCode.UNKNOWN))
        context.set_details(status.message)

    @staticmethod
    def _version(spec):
        return spec.version.value if spec.HasField("version") else None

    def Predict(self, request, context):  # noqa: N802  (gRPC method name)
        response = predict_pb2.PredictResponse()
        try:
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            outputs = self.backend.predict(
                request.model_spec.name, self._version(request.model_spec),
                request.model_spec.signature_name, inputs, list(request.output_filter),
            )
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        except Status as status:
            self._fail(context, status)
            return predict_pb2.PredictResponse()
        except Exception as e:  # noqa: BLE001  (never let a request kill the server)
            self._fail(context, Status("INTERNAL", f"{type(e).__name__}: {e}"))
            return predict_pb2.PredictResponse()
        spec = response.model_spec
        spec.name = self.backend.model_name
        spec.version.value = self.backend.version
        spec.signature_name = request.model_spec.signature_name or "serving_default"
        return response

    def GetModelMetadata(self, request, context):  # noqa: N802
        try:
            return self.backend.get_metadata(request.model_spec.name,
                                             self._version(request.model_spec),
                                             request.metadata_field)
        except Status as status:
            self._fail(context, status)
        except Exception as e:  # noqa: BLE001
            self._fail(context, Status("INTERNAL", f"{type(e).__name__}: {e}"))
        return get_model_metadata_pb2.GetModelMetadataResponse()


_PREDICT_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
_MODEL_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?$")


def _rest_inputs(body, specs):
    """TF Serving's two request formats -> {input key: array of the signature's dtype}."""
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise Status("INVALID_ARGUMENT",
                     'JSON Value: missing or ambiguous "instances" / "inputs" in the request')
    names = sorted(specs)

    def array(key, value):
        if key not in specs:
            raise Status("INVALID_ARGUMENT", f"JSON object: unknown input {key!r}")
        try:
            return np.asarray(value, dtype=specs[key].dtype.as_numpy_dtype)
        except (ValueError, TypeError) as e:
            raise Status("INVALID_ARGUMENT", f"JSON Value for {key!r}: {e}") from None

    if "inputs" in body:
        data = body["inputs"]
        if isinstance(data, dict):
            return {k: array(k, v) for k, v in data.items()}
        if len(names) != 1:
            raise Status("INVALID_ARGUMENT", "unnamed inputs need a single-input signature")
        return {names[0]: array(names[0], data)}
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise Status("INVALID_ARGUMENT", '"instances" must be a non-empty list')
    if all(isinstance(r, dict) for r in rows):
        return {k: array(k, [r.get(k) for r in rows]) for k in rows[0]}
    if len(names) != 1:
        raise Status("INVALID_ARGUMENT", "unnamed instances need a single-input signature")
    return {names[0]: array(names[0], rows)}


def _proto_json(message) -> dict:
    # TF Serving prints metadata with the proto field names and every primitive field.
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _metadata_json(response) -> dict:
    """TF Serving's REST metadata answer for a GetModelMetadataResponse."""
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    return {"model_spec": _proto_json(response.model_spec),
            "metadata": {"signature_def": _proto_json(sig_map)}}


def _make_handler(backend: ServingBackend):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: Status):
            self._send(_HTTP_STATUS.get(status.code, 500), {"error": status.message})

        def _answer(self, respond):
            """Sends `respond()`'s JSON payload with 200, or the error it raises: a Status
            with its HTTP code, anything else as INTERNAL (a request never stops the server)."""
            try:
                payload = respond()
            except Status as status:
                self._error(status)
            except Exception as e:  # noqa: BLE001
                self._error(Status("INTERNAL", f"{type(e).__name__}: {e}"))
            else:
                self._send(200, payload)

        def do_POST(self):  # noqa: N802
            self._answer(self._predict)

        def do_GET(self):  # noqa: N802
            self._answer(self._status_or_metadata)

        def _predict(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            match = _PREDICT_PATH.match(self.path)
            if not match:
                raise Status("NOT_FOUND", f"Malformed request: POST {self.path}")
            name, version = match.group(1), match.group(2)
            try:
                body = json.loads(raw or b"null")
            except ValueError as e:
                raise Status("INVALID_ARGUMENT", f"JSON Parse error: {e}") from None
            backend.check_model(name, version)
            signature = (body.get("signature_name") if isinstance(body, dict) else None) \
                or "serving_default"
            if signature not in backend.signatures:
                raise Status("FAILED_PRECONDITION", f'Serving signature name: "{signature}" '
                                                    "not found in signature def")
            specs = backend.signatures[signature].structured_input_signature[1]
            inputs = _rest_inputs(body, specs)
            outputs = backend.predict(name, version, signature, inputs)
            if "instances" in body:
                n = len(next(iter(outputs.values())))
                rows = [{k: v[i].tolist() for k, v in outputs.items()} for i in range(n)]
                if len(outputs) == 1:
                    rows = [next(iter(r.values())) for r in rows]
                return {"predictions": rows}
            cols = {k: v.tolist() for k, v in outputs.items()}
            return {"outputs": next(iter(cols.values())) if len(cols) == 1 else cols}

        def _status_or_metadata(self) -> dict:
            match = _MODEL_PATH.match(self.path)
            if not match:
                raise Status("NOT_FOUND", f"Malformed request: GET {self.path}")
            if match.group(3):
                if not backend.metadata:  # a TF Serving without the metadata endpoint
                    with backend._lock:
                        backend.metadata_requests += 1
                    raise Status("INVALID_ARGUMENT", f"Malformed request: GET {self.path}")
                return _metadata_json(backend.get_metadata(match.group(1), match.group(2)))
            backend.check_model(match.group(1), match.group(2))
            return {"model_version_status": [{
                "version": str(backend.version), "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""}}]}

    return Handler


class ServingServer:
    """gRPC + REST stand-in for TF Serving on 127.0.0.1 (free ports); a context manager.

    Attributes after `start()`: `target` ("127.0.0.1:PORT", gRPC), `rest_url`
    ("http://127.0.0.1:PORT"), `backend` (the loaded model and a request counter).
    """

    def __init__(self, path, model_name="fmd", version=1, max_workers=4, metadata=True):
        self.backend = ServingBackend(path, model_name, version, metadata=metadata)
        self.max_workers = max_workers
        self._grpc = None
        self._http = None
        self.target = self.rest_url = None

    def start(self):
        options = [("grpc.max_send_message_length", -1),
                   ("grpc.max_receive_message_length", -1)]
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers),
                                 options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(self.backend), self._grpc)
        port = self._grpc.add_insecure_port("127.0.0.1:0")
        if not port:
            raise RuntimeError("could not bind a gRPC port on 127.0.0.1")
        self._grpc.start()
        self.target = f"127.0.0.1:{port}"
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self.backend))
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self.rest_url = f"http://127.0.0.1:{self._http.server_address[1]}"
        return self

    def stop(self):
        if self._grpc is not None:
            self._grpc.stop(grace=None)
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

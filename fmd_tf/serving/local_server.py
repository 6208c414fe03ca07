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

Server-side batching (TF Serving's `--enable_batching` with its batching parameters):
`ServingServer(path, batching=True, max_batch_size=64, batch_timeout_micros=2000,
num_batch_threads=1)` merges concurrent predict requests (gRPC and REST alike) for the same
signature into one graph call and splits the outputs back by rows. A batch closes when it holds
`max_batch_size` rows (images) or `batch_timeout_micros` after its first request arrived; one
queue per signature, served by `num_batch_threads` threads. A bad request never fails the good
ones batched with it: each request is checked on its own first (input names, dtype, output
filter: INVALID_ARGUMENT as without batching), and only requests that fit the signature (its
rank and fixed sizes, 1 to `max_batch_size` rows) join a batch; the others run alone, exactly
as without batching. When a merged call still fails (e.g. a NaN image, caught by the in-graph
check), every request of that batch is run again alone, so only the bad one gets its
INVALID_ARGUMENT. Answers with batching equal those without, up to float round-off of the
larger batch. `server.backend.batching_stats()` counts graph calls, merged batches and such
fall-backs. With `batching=False` (the default) each request is one graph call, as before.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
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


_STOP = object()  # tells a batching thread to finish


class _Task:
    """One request waiting in a batching queue: inputs {key: array [rows, ...]} -> future."""

    __slots__ = ("inputs", "rows", "future", "arrived")

    def __init__(self, inputs, rows):
        self.inputs, self.rows = inputs, rows
        self.future = futures.Future()
        self.arrived = time.monotonic()


class _Batcher:
    """The batching queue of one signature (TF Serving's `--enable_batching`).

    `run(inputs) -> {output: array}` is the backend's graph call (raises Status). Tasks are
    merged in arrival order until `max_batch_size` rows or `timeout_s` after the first task of
    the batch arrived; a task that would overflow the batch starts the next one.
    """

    def __init__(self, name, run, max_batch_size, timeout_s, threads, stats, lock):
        self.run, self.max_batch_size, self.timeout_s = run, max_batch_size, timeout_s
        self._stats, self._stats_lock = stats, lock
        self._queue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True,
                                          name=f"batching-{name}-{i}") for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs, rows) -> dict:
        """Blocks until the task's batch ran; its own outputs {key: array [rows, ...]}."""
        task = _Task(inputs, rows)
        with self._lock:
            if self._closed:
                raise Status("UNAVAILABLE", "the server is shutting down")
            self._queue.put(task)
        return task.future.result()

    def close(self, timeout=30.0):
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
        while True:  # nothing can be left, but never leave a caller waiting
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not _STOP:
                task.future.set_exception(Status("UNAVAILABLE", "the server is shutting down"))

    def _loop(self):
        carry = None
        while True:
            first, carry = (carry if carry is not None else self._queue.get()), None
            if first is _STOP:
                return
            batch, rows, stop = [first], first.rows, False
            deadline = first.arrived + self.timeout_s
            while rows < self.max_batch_size:
                wait = deadline - time.monotonic()
                try:
                    task = self._queue.get(timeout=wait) if wait > 0 else \
                        self._queue.get_nowait()
                except queue.Empty:
                    break
                if task is _STOP:
                    stop = True
                    break
                if rows + task.rows > self.max_batch_size:
                    carry = task  # the first task of the next batch
                    break
                batch.append(task)
                rows += task.rows
            self._execute(batch)
            if stop:
                return

    def _count(self, **increments):
        with self._stats_lock:
            for key, value in increments.items():
                if key.startswith("max_"):
                    self._stats[key] = max(self._stats[key], value)
                else:
                    self._stats[key] += value

    def _answer_alone(self, task):
        self._count(graph_calls=1)
        try:
            task.future.set_result(self.run(task.inputs))
        except Status as status:
            task.future.set_exception(status)
        except Exception as e:  # noqa: BLE001  (a batching thread never dies)
            task.future.set_exception(Status("INTERNAL", f"{type(e).__name__}: {e}"))

    def _execute(self, batch):
        rows = sum(task.rows for task in batch)
        self._count(batches=1, requests=len(batch), merged=int(len(batch) > 1),
                    max_requests=len(batch), max_rows=rows)
        if len(batch) == 1:
            self._answer_alone(batch[0])
            return
        try:
            merged = {key: np.concatenate([task.inputs[key] for task in batch])
                      for key in batch[0].inputs}
            self._count(graph_calls=1)
            outputs = self.run(merged)
            if any(np.ndim(v) == 0 or len(v) != rows for v in outputs.values()):
                raise Status("INTERNAL", "an output without the batch dimension")
        except Exception:  # noqa: BLE001  (a bad request in the batch: each runs alone)
            self._count(fallbacks=1)
            for task in batch:
                self._answer_alone(task)
            return
        ends = np.cumsum([task.rows for task in batch])
        for task, end in zip(batch, ends, strict=True):
            start = end - task.rows
            task.future.set_result({key: value[start:end] for key, value in outputs.items()})


class ServingBackend:
    """The model: signatures of one SavedModel version, shared by the gRPC and REST fronts.

    `batching=True`: concurrent predict requests for one signature are merged into one graph
    call (see the module docstring; `max_batch_size` rows, `batch_timeout_micros`,
    `num_batch_threads` per signature queue).
    """

    def __init__(self, path, model_name="fmd", version=1, metadata=True, batching=False,
                 max_batch_size=64, batch_timeout_micros=2000, num_batch_threads=1):
        self.path, self.model_name, self.version = os.fspath(path), model_name, int(version)
        self.metadata = bool(metadata)
        if batching and (int(max_batch_size) < 1 or int(batch_timeout_micros) < 0
                         or int(num_batch_threads) < 1):
            raise ValueError("batching needs max_batch_size >= 1, batch_timeout_micros >= 0 "
                             "and num_batch_threads >= 1")
        self.batching = bool(batching)
        self.max_batch_size, self.batch_timeout_micros = int(max_batch_size), \
            int(batch_timeout_micros)
        self.num_batch_threads = int(num_batch_threads)
        self._batchers = {}
        self._batch_stats = dict.fromkeys(("batches", "requests", "merged", "fallbacks",
                                           "graph_calls", "max_requests", "max_rows"), 0)
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
        for key, value in inputs.items():
            want = specs[key].dtype
            if tf.as_dtype(value.dtype) != want:
                raise Status("INVALID_ARGUMENT", f"Expects arg[0] ({key}) to be {want.name} but "
                                                 f"{tf.as_dtype(value.dtype).name} is provided")
        outputs_spec = fn.structured_outputs
        unknown = [k for k in output_filter if k not in outputs_spec]
        if unknown:
            raise Status("INVALID_ARGUMENT",
                         f"output tensor alias not found in signature: {unknown[0]}")
        rows = self._batch_rows(inputs, specs) if self.batching else None
        if rows is None:
            result = self._call(signature, inputs)
        else:
            result = self._batcher(signature).submit(inputs, rows)
        keys = list(output_filter) or sorted(result)
        return {k: result[k] for k in keys}

    def _call(self, signature, inputs) -> dict:
        """One graph call of `signature` on inputs {key: np.ndarray}: {output: np.ndarray};
        raises Status (graph errors mapped as TF Serving does)."""
        fn = self.signatures[signature]
        try:
            result = fn(**{key: tf.constant(value) for key, value in inputs.items()})
        except tf.errors.InvalidArgumentError as e:
            raise Status("INVALID_ARGUMENT", _graph_message(e)) from None
        except (ValueError, TypeError) as e:  # rejected before the graph runs
            raise Status("INVALID_ARGUMENT", str(e)) from None
        except tf.errors.OpError as e:
            code = next((c.name for c in grpc.StatusCode if c.value[0] == e.error_code),
                        "INTERNAL")
            raise Status(code, _graph_message(e)) from None
        return {k: v.numpy() for k, v in result.items()}

    def _batch_rows(self, inputs, specs):
        """Rows of a request that may join a batch (every input of the signature's rank and
        fixed sizes, a variable batch dimension, the same 1..max_batch_size rows); else None:
        the request runs alone and answers exactly as without batching."""
        rows = set()
        for key, value in inputs.items():
            shape = specs[key].shape
            if shape.rank is None or value.ndim != shape.rank or value.ndim == 0 \
                    or shape[0] is not None:
                return None
            if any(want is not None and got != want
                   for got, want in zip(value.shape[1:], shape[1:], strict=True)):
                return None
            rows.add(value.shape[0])
        if len(rows) != 1:
            return None
        (count,) = rows
        return count if 1 <= count <= self.max_batch_size else None

    def _batcher(self, signature) -> _Batcher:
        with self._lock:
            if signature not in self._batchers:
                self._batchers[signature] = _Batcher(
                    signature, lambda inputs: self._call(signature, inputs),
                    self.max_batch_size, self.batch_timeout_micros / 1e6,
                    self.num_batch_threads, self._batch_stats, self._lock)
            return self._batchers[signature]

    def batching_stats(self) -> dict:
        """Counters of the batching queues (all signatures): `batches` (formed, of any size),
        `requests` (that went through a queue), `merged` (batches of >= 2 requests),
        `fallbacks` (merged batches that failed and were rerun one request at a time),
        `graph_calls` (made by the queues), `max_requests` / `max_rows` (largest batch)."""
        with self._lock:
            return dict(self._batch_stats)

    def close(self):
        """Stops the batching threads (a request arriving later starts new ones)."""
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()

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
        want = specs[key].dtype
        try:
            found = np.asarray(value)
            # JSON types as TF Serving takes them: numbers for a numeric input (numpy alone
            # would also read "0.5" or true as a float).
            kinds = "iuf" if want.is_floating else "iu" if want.is_integer else \
                "b" if want == tf.bool else None
            if kinds and found.size and found.dtype.kind not in kinds:
                raise TypeError(f"{found.dtype.name.rstrip('0123456789') or found.dtype.kind} "
                                f"values where {want.name} numbers are expected")
            return found.astype(want.as_numpy_dtype)
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
    `max_workers`: gRPC handler threads (requests served at once; with batching, at most that
    many gRPC requests can share a batch). `batching`, `max_batch_size`, `batch_timeout_micros`,
    `num_batch_threads`: server-side batching (module docstring); off by default.
    """

    def __init__(self, path, model_name="fmd", version=1, max_workers=4, metadata=True,
                 batching=False, max_batch_size=64, batch_timeout_micros=2000,
                 num_batch_threads=1):
        self.backend = ServingBackend(path, model_name, version, metadata=metadata,
                                      batching=batching, max_batch_size=max_batch_size,
                                      batch_timeout_micros=batch_timeout_micros,
                                      num_batch_threads=num_batch_threads)
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
        self.backend.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

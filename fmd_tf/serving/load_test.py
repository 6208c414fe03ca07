"""A bounded load test of the local TF Serving stand-in (`fmd_tf.serving.local_server`).

    from fmd_tf.serving.load_test import expected_outputs, output_tolerances, run_load
    from fmd_tf.serving.local_server import ServingServer

    expected = expected_outputs(fmd, images)   # FMDefense in this process, {signature: {...}}
    with ServingServer("saved_models/fmnist/serving/1", max_workers=16, batching=True) as srv:
        report = run_load(srv, images, expected, clients=8, requests=2000, bad_share=0.1,
                          protocol="grpc", seed=0, time_limit_s=900,
                          output_atol=output_tolerances(fmd))
    assert report["passed"] and report["complete"]

`run_load` sends a deterministic schedule of `requests` predict requests (`make_schedule`:
the same `seed`, images and settings give the same requests in the same order) from `clients`
threads at once, each with its own connection (`GrpcClient` / `RestClient` of
`fmd_tf.serving.client`); client c sends requests c, c + clients, c + 2 clients, ... one after
the other. A share `bad_share` of them is malformed, the kinds of `BAD_KINDS[protocol]` in turn:

===================  =========================================  ==============================
kind (gRPC / REST)   gRPC: `PredictRequest` sent as is          REST: raw JSON body
===================  =========================================  ==============================
nan                  one pixel NaN                              same (JSON `NaN`)
above_one            one pixel 1.5                              same
below_zero           one pixel -0.25                            same
wrong_rank           [H, W, C] (no batch axis)                  same
wrong_size           [1, H - 1, W - 1, C]                       same
empty                [0, H, W, C]                               `[]`
float64 / strings    a float64 tensor                           numbers written as strings
int32 / not_json     an int32 tensor                            a body cut off in the middle
wrong_name           input "image" instead of "images"          same
===================  =========================================  ==============================

(REST has no dtypes: its two dtype kinds are a wrong JSON type and no JSON at all.)

Every bad request must be answered INVALID_ARGUMENT (gRPC `StatusCode.INVALID_ARGUMENT`; REST
HTTP 400 with {"error": ...}); every good request (1 or more real images, `batch_sizes`) must
be answered with the outputs in `expected` for its images: integer outputs (label, verdict,
...) equal, float outputs within `rtol` / `atol` (per output: `output_atol`, e.g.
`output_tolerances(fmd)`). Anything else is counted as a wrong answer or an unexpected status
(first few kept in `failures`); `exact_answers` counts the answers equal to the last bit.

Why a tolerance: the served graph is the one `FMDefense` runs, but CPU kernels (oneDNN) take
other code paths for other batch sizes, so an image's float outputs may differ in the last bits
between a batch of 1 (a request), a merged batch and the batch `expected` was computed in.
With the "pixel_share" reconstruction metric (`recon_error` = share of pixels off by more than
a tolerance), one pixel at that tolerance moves `recon_error` by 1 / (H x W x C): that is the
tolerance `output_tolerances` gives it. Integer outputs have none.

A warm-up of `warmup` requests (another schedule with every bad kind, not counted) runs first,
through the same clients. The resident memory of this process (the server runs in it, in
threads; the clients too) is read from /proc/self/status (VmRSS) before and after the measured
run and sampled every 0.2 s during it. Clients stop sending when `time_limit_s` has passed
(`complete` False). Latencies are wall times of one request as a client sees it
(serialization, the server, the answer's decoding).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np

__all__ = ["BAD_KINDS", "Request", "expected_outputs", "make_schedule", "output_tolerances",
           "rss_mib", "run_load"]

_COMMON = ("nan", "above_one", "below_zero", "wrong_rank", "wrong_size", "empty")
# protocol -> malformed-request kinds (the same count: the same schedule for both)
BAD_KINDS = {"grpc": (*_COMMON, "float64", "int32", "wrong_name"),
             "rest": (*_COMMON, "strings", "not_json", "wrong_name")}
PROTOCOLS = ("grpc", "rest")
INPUT_NAME = "images"
_KEEP_FAILURES = 10


class Request:
    """One scheduled request: `index` in the schedule, `kind` ("good" or a `BAD_KINDS` name),
    `signature`, `rows` (int array: indices of the images sent; one base image for a bad
    request)."""

    __slots__ = ("index", "kind", "signature", "rows")

    def __init__(self, index, kind, signature, rows):
        self.index, self.kind, self.signature, self.rows = index, kind, signature, rows

    def __repr__(self):
        return (f"Request({self.index}, {self.kind!r}, {self.signature!r}, "
                f"rows={self.rows.tolist()})")


def make_schedule(n_images: int, requests: int, bad_share: float = 0.1, seed: int = 0,
                  signatures=("serving_default",), batch_sizes=(1,),
                  kinds=BAD_KINDS["grpc"]) -> list[Request]:
    """`requests` Requests: round(requests x bad_share) bad ones at random positions, their
    `kinds` in turn (shuffled); the good ones of a random signature and batch size,
    consecutive images (cyclic) from a random start among `n_images`. Deterministic in `seed`
    (the kinds' names aside, the same for any `kinds` of the same length).
    """
    if requests < 1 or n_images < 1:
        raise ValueError("requests and n_images must be >= 1")
    if not 0.0 <= bad_share <= 1.0:
        raise ValueError(f"bad_share must be in [0, 1], got {bad_share}")
    if not signatures or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("signatures and batch_sizes (>= 1) must not be empty")
    rng = np.random.default_rng(seed)
    n_bad = int(round(requests * bad_share))
    bad_at = set(rng.choice(requests, n_bad, replace=False).tolist())
    order = iter(rng.permutation([i % len(kinds) for i in range(n_bad)]).tolist())
    schedule = []
    for index in range(requests):
        signature = str(signatures[rng.integers(len(signatures))])
        start = int(rng.integers(n_images))
        if index in bad_at:
            schedule.append(Request(index, kinds[next(order)], signature, np.array([start])))
        else:
            size = int(batch_sizes[rng.integers(len(batch_sizes))])
            schedule.append(Request(index, "good", signature,
                                    (start + np.arange(size)) % n_images))
    return schedule


def expected_outputs(fmd, images, signatures=("serving_default",), batch_size: int = 64) -> dict:
    """{signature: {output: np.ndarray [N, ...]}}: what each exported signature must answer
    for `images` (float32 [N, H, W, C] in [0, 1]), computed by `fmd` (an `FMDefense`) in this
    process: `serving_default` / `detect` from `fmd.defend`, `classify` from its classifier
    (logits float32 [N, classes], label int64 [N]), `purify` from its purifier (the function
    the export serves)."""
    import tensorflow as tf

    from fmd_tf.export import SIGNATURES

    images = np.asarray(images, np.float32)
    out, defended = {}, None
    for signature in signatures:
        keys = SIGNATURES[signature]
        if signature in ("serving_default", "detect"):
            if defended is None:
                defended = fmd.defend(images, batch_size=batch_size)
            out[signature] = {k: np.asarray(defended[k]) for k in keys}
            continue
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = tf.constant(images[start:start + batch_size])
            if signature == "classify":
                logits = tf.cast(fmd.classifier(chunk), tf.float32)
                parts.append({"logits": logits.numpy(),
                              "label": tf.argmax(logits, axis=-1).numpy()})
            elif signature == "purify":
                parts.append({k: v.numpy() for k, v in fmd._purify_valid(chunk).items()})
            else:
                raise ValueError(f"unknown signature {signature!r}")
        out[signature] = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    return out


def output_tolerances(fmd) -> dict:
    """{output: atol} beyond `run_load`'s default for `fmd`'s outputs: `recon_error` may move
    by one pixel's share (1 / (H x W x C)) under the "pixel_share" metric (module docstring)."""
    if getattr(fmd, "recon_metric", None) != "pixel_share":
        return {}
    return {"recon_error": 1.0 / float(np.prod(fmd._image_shape)) + 1e-6}


def rss_mib() -> float:
    """Resident memory of this process now (VmRSS of /proc/self/status), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise OSError("no VmRSS in /proc/self/status")


# ------------------------------------------------------------------------------ payloads


def _bad_array(kind, image):
    """The malformed array of `kind` from one image [H, W, C]: float32 [1, H, W, C] with a
    bad pixel, another shape, or unchanged (kinds that break something else)."""
    x = np.array(image[None], np.float32)
    h, w = x.shape[1] // 2, x.shape[2] // 2
    if kind == "nan":
        x[0, h, w, 0] = np.nan
    elif kind == "above_one":
        x[0, h, w, 0] = 1.5
    elif kind == "below_zero":
        x[0, h, w, 0] = -0.25
    elif kind == "wrong_rank":
        x = x[0]
    elif kind == "wrong_size":
        x = x[:, :-1, :-1, :]
    elif kind == "empty":
        x = x[:0]
    return x


def _grpc_bad_request(kind, image, model, signature):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    x = _bad_array(kind, image)
    name = INPUT_NAME
    if kind == "float64":
        x = x.astype(np.float64)
    elif kind == "int32":
        x = (x * 255).astype(np.int32)
    elif kind == "wrong_name":
        name = "image"
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs[name].CopyFrom(tf.make_tensor_proto(x))
    return request


def _rest_bad_body(kind, image, signature) -> bytes:
    x = _bad_array(kind, image)
    name, value = INPUT_NAME, x.tolist()
    if kind == "strings":
        value = x.astype(str).tolist()
    elif kind == "wrong_name":
        name = "image"
    body = json.dumps({"signature_name": signature, "inputs": {name: value}}).encode()
    if kind == "not_json":  # the body cut off
        body = body[: len(body) // 2]
    return body


# ------------------------------------------------------------------------------ checks


def _compare(expected, answer, rtol, atol, output_atol):
    """(None when `answer` {output: array} equals `expected` within the tolerances, else what
    differs; whether it is equal to the last bit)."""
    if set(answer) != set(expected):
        return f"outputs {sorted(answer)} != {sorted(expected)}", False
    exact = True
    for key, want in expected.items():
        got = np.asarray(answer[key])
        if got.shape != want.shape:
            return f"{key}: shape {got.shape} != {want.shape}", False
        if np.array_equal(got, want):
            continue
        exact = False
        if want.dtype.kind in "iub":
            return f"{key}: {got.ravel()[:8].tolist()} != {want.ravel()[:8].tolist()}", False
        if not np.allclose(got, want, rtol=rtol, atol=output_atol.get(key, atol)):
            diff = float(np.max(np.abs(got.astype(np.float64) - want)))
            return f"{key}: max abs difference {diff:.3g}", False
    return None, exact


class _Client:
    """One load client: its own connection, sends good and bad requests, returns records."""

    def __init__(self, protocol, server, images, expected, timeout, tolerance):
        from fmd_tf.serving.client import GrpcClient, RestClient

        self.protocol, self.images, self.expected = protocol, images, expected
        self.model = server.backend.model_name
        self.timeout, self.tolerance = timeout, tolerance
        if protocol == "grpc":
            self.client = GrpcClient(server.target, timeout=timeout)
        else:
            self.client = RestClient(server.rest_url, timeout=timeout)
            self.url = f"{server.rest_url}/v1/models/{self.model}:predict"
        self.client.input_shape(self.model)  # the metadata, read once, before timing

    def close(self):
        self.client.close()

    def send(self, request: Request) -> dict:
        """{"index", "kind", "signature", "ms", "status", "ok", "exact", "detail"} of one
        request."""
        start = time.perf_counter()
        exact = False
        try:
            if request.kind == "good":
                status, detail, exact = self._good(request)
            else:
                status, detail = self._bad(request)
        except Exception as e:  # noqa: BLE001  (counted, never stops the load)
            status, detail = "CLIENT_ERROR", f"{type(e).__name__}: {e}"
        ms = 1000.0 * (time.perf_counter() - start)
        if request.kind == "good":
            ok = status == "OK" and detail is None
        else:
            ok = status == "INVALID_ARGUMENT"
        return {"index": request.index, "kind": request.kind, "signature": request.signature,
                "ms": ms, "status": status, "ok": ok, "exact": exact, "detail": detail}

    def _good(self, request):
        from fmd_tf.serving.client import ServingError

        images = self.images[request.rows]
        try:
            answer = self.client.predict(self.model, images, request.signature)
        except ServingError as e:
            return e.code, e.message[:300], False
        expected = {k: v[request.rows] for k, v in self.expected[request.signature].items()}
        answer = {k: np.asarray(v) for k, v in answer.items()}
        if self.protocol == "rest" and set(answer) == {"output"} and len(expected) == 1:
            answer = {next(iter(expected)): answer["output"]}  # a single output's name
        return ("OK", *_compare(expected, answer, *self.tolerance))

    def _bad(self, request):
        image = self.images[request.rows[0]]
        if self.protocol == "grpc":
            import grpc

            proto = _grpc_bad_request(request.kind, image, self.model, request.signature)
            try:
                self.client.stub.Predict(proto, timeout=self.timeout)
            except grpc.RpcError as e:
                code = e.code().name if e.code() is not None else "UNKNOWN"
                return code, (e.details() or "")[:300]
            return "OK", "a malformed request was answered"
        body = _rest_bad_body(request.kind, image, request.signature)
        http = urllib.request.Request(self.url, data=body, method="POST",
                                      headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(http, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                return f"HTTP_{e.code}", f"no JSON {{'error': ...}} body: {text[:200]}"
            return ("INVALID_ARGUMENT" if e.code == 400 else f"HTTP_{e.code}"), str(message)[:300]
        return "OK", "a malformed request was answered"


def _drive(clients, schedule, deadline):
    """Sends `schedule` from the clients at once (client c: every len(clients)-th request from
    c); returns (records, wall seconds, whether the deadline stopped a client)."""
    records, hit = [[] for _ in clients], [False]
    barrier = threading.Barrier(len(clients) + 1)

    def work(c):
        barrier.wait()
        for request in schedule[c::len(clients)]:
            if deadline is not None and time.monotonic() > deadline:
                hit[0] = True
                return
            records[c].append(clients[c].send(request))

    threads = [threading.Thread(target=work, args=(c,), daemon=True)
               for c in range(len(clients))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return sorted((r for part in records for r in part), key=lambda r: r["index"]), wall, hit[0]


def _percentiles(ms) -> dict:
    if not ms:
        return {"p50": None, "p99": None, "mean": None, "max": None}
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(np.mean(ms)), "max": float(np.max(ms))}


def run_load(server, images, expected, *, clients: int = 8, requests: int = 2000,
             bad_share: float = 0.1, protocol: str = "grpc", seed: int = 0,
             time_limit_s: float | None = 600.0, signatures=("serving_default",),
             batch_sizes=(1,), warmup: int = 32, timeout_s: float = 120.0,
             rss_limit_mib: float | None = None, rtol: float = 1e-5, atol: float = 1e-5,
             output_atol: dict | None = None) -> dict:
    """A bounded load test against a started `ServingServer` (see the module docstring).

    Args:
        server: a started `fmd_tf.serving.local_server.ServingServer` in this process.
        images: float32 [N, H, W, C] in [0, 1], the served model's image shape.
        expected: {signature: {output: array [N, ...]}} for `images` (`expected_outputs`);
            {output: array} alone stands for {"serving_default": it}.
        clients: concurrent client threads, each with its own connection.
        requests: requests of the measured run (`make_schedule`), `bad_share` of them bad.
        protocol: "grpc" (PredictionService) or "rest" (TF Serving's REST API).
        time_limit_s: clients stop sending after this long (None: no limit); the warm-up
            has its own limit of the same length.
        signatures, batch_sizes: what good requests ask and how many images they send.
        warmup: requests sent before measuring (not counted); 0 for none.
        timeout_s: per-request client timeout.
        rss_limit_mib: when given, `passed` needs the RSS growth below it.
        rtol, atol: tolerance of float outputs; `output_atol` {output: atol} overrides
            `atol` for some (`output_tolerances`).

    Returns a dict: `requests` (answered), `requests_planned`, `good`, `bad`, `good_ok`,
    `bad_invalid_argument`, `wrong_answers`, `exact_answers` (good answers equal to the last
    bit), `unexpected_statuses`, `failures` (first few),
    `bad_by_kind`, `statuses`, `latency_ms` (good requests: p50, p99, mean, max),
    `bad_latency_ms`, `throughput_rps` (answered requests / wall), `images_per_s` (images of
    good requests / wall), `wall_s`, `rss_mib` (before, after, max sampled, growth),
    `time_limit_hit`, `complete`, `passed`, `server` (batching settings and the batching
    counters of the run) and the settings.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    images = np.ascontiguousarray(images, np.float32)
    if expected and not set(expected) & {"serving_default", "classify", "detect", "purify"}:
        expected = {"serving_default": expected}
    missing = [s for s in signatures if s not in expected]
    if missing:
        raise ValueError(f"no expected outputs for signature(s) {missing}")
    expected = {s: {k: np.asarray(v) for k, v in out.items()} for s, out in expected.items()}
    for s in signatures:
        if any(len(v) != len(images) for v in expected[s].values()):
            raise ValueError(f"expected[{s!r}] must have one row per image ({len(images)})")
    kinds = BAD_KINDS[protocol]
    schedule = make_schedule(len(images), requests, bad_share, seed, signatures, batch_sizes,
                             kinds)
    tolerance = (rtol, atol, dict(output_atol or {}))
    conns = [_Client(protocol, server, images, expected, timeout_s, tolerance)
             for _ in range(clients)]
    try:
        if warmup:
            count = max(warmup, len(kinds))  # every bad kind at least once
            warm = make_schedule(len(images), count, max(bad_share, len(kinds) / count),
                                 seed + 1, signatures, batch_sizes, kinds)
            _drive(conns, warm, None if time_limit_s is None
                   else time.monotonic() + time_limit_s)
        stats_before = server.backend.batching_stats()
        rss_before = rss_mib()
        samples, done = [rss_before], threading.Event()

        def sample():
            while not done.wait(0.2):
                samples.append(rss_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        try:
            records, wall, hit = _drive(conns, schedule, deadline)
        finally:
            done.set()
            sampler.join()
        rss_after = rss_mib()
        stats_after = server.backend.batching_stats()
    finally:
        for conn in conns:
            conn.close()
    return _summary(records, wall, hit, schedule, images, server, stats_before, stats_after,
                    (rss_before, rss_after, max([*samples, rss_after])), rss_limit_mib,
                    dict(protocol=protocol, clients=clients, bad_share=bad_share, seed=seed,
                         time_limit_s=time_limit_s, signatures=list(signatures),
                         batch_sizes=list(batch_sizes), warmup=warmup, rtol=rtol, atol=atol,
                         output_atol=dict(output_atol or {})))


def _summary(records, wall, hit, schedule, images, server, before, after, rss, rss_limit,
             settings) -> dict:
    by_index = {r.index: r for r in schedule}
    good = [r for r in records if r["kind"] == "good"]
    bad = [r for r in records if r["kind"] != "good"]
    wrong = [r for r in good if r["status"] == "OK" and not r["ok"]]
    wrong_ids = {id(r) for r in wrong}
    unexpected = [r for r in records if not r["ok"] and id(r) not in wrong_ids]
    statuses, bad_by_kind = {}, {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    for r in bad:
        entry = bad_by_kind.setdefault(r["kind"], {"sent": 0, "invalid_argument": 0})
        entry["sent"] += 1
        entry["invalid_argument"] += int(r["status"] == "INVALID_ARGUMENT")
    good_images = sum(len(by_index[r["index"]].rows) for r in good)
    rss_before, rss_after, rss_max = rss
    growth = rss_after - rss_before
    backend = server.backend
    batching = {"batching": backend.batching}
    if backend.batching:
        batching.update(max_batch_size=backend.max_batch_size,
                        batch_timeout_micros=backend.batch_timeout_micros,
                        num_batch_threads=backend.num_batch_threads)
        batching["stats"] = {k: after[k] - before[k] if not k.startswith("max_") else after[k]
                             for k in after}
    batching["max_workers"] = server.max_workers
    failures = [{**{k: r[k] for k in ("index", "kind", "signature", "status", "detail")},
                 "images": by_index[r["index"]].rows.tolist()}
                for r in (wrong + unexpected)[:_KEEP_FAILURES]]
    within = rss_limit is None or growth <= rss_limit
    return {
        **settings,
        "requests_planned": len(schedule), "requests": len(records),
        "good": len(good), "bad": len(bad), "good_images": good_images,
        "good_ok": sum(r["ok"] for r in good),
        "bad_invalid_argument": sum(r["ok"] for r in bad),
        "wrong_answers": len(wrong), "exact_answers": sum(r["exact"] for r in good),
        "unexpected_statuses": len(unexpected),
        "failures": failures, "statuses": statuses, "bad_by_kind": bad_by_kind,
        "latency_ms": _percentiles([r["ms"] for r in good]),
        "bad_latency_ms": _percentiles([r["ms"] for r in bad]),
        "throughput_rps": len(records) / wall if wall > 0 else None,
        "images_per_s": good_images / wall if wall > 0 else None,
        "wall_s": wall,
        "rss_mib": {"before": rss_before, "after": rss_after, "max": rss_max,
                    "growth": growth, "limit": rss_limit},
        "time_limit_hit": bool(hit), "complete": len(records) == len(schedule),
        "passed": not wrong and not unexpected and within,
        "images": int(len(images)), "server": batching,
    }

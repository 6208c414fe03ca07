"""Performance measurements of FM-Defense (`scripts/bench.py`; its docstring defines each figure).

    from fmd_tf.evaluation.bench import BenchConfig, format_table, run_bench
    report = run_bench(BenchConfig(model="saved_models/fmnist", out="results/bench.json"))
    print(format_table(report))

Sections (`SECTIONS`, each a function of a context dict that `prepare` builds, writing one
report key): the speedup over a naive eager loop (`naive_defend`), the share of the machine's
matmul FLOP/s (`graph_flops`, `matmul_flops_per_s`), own attacks vs ART's, serving latency of
the exported SavedModel and the served model under load (`serving_load`: concurrent clients,
malformed requests, with and without server-side batching), the adaptive morph budget and
bfloat16 morphs. `measure` runs the chosen sections, keeps the others of an existing report of
the same model file and sizes (`earlier_sections`), and writes the report after each section.
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from fmd_tf.config import POSITIVE, POSITIVE_INT, UNIT_LEFT_OPEN
from fmd_tf.files import sha256 as file_sha256  # which fmd.keras a bench measured
from fmd_tf.files import write_json
from fmd_tf.options import OptionError, normalize, option, validate

__all__ = [
    "SECTIONS", "SECTION_KEYS", "BenchConfig", "device_info", "earlier_sections",
    "file_sha256", "format_table", "graph_flops", "matmul_flops_per_s", "matmul_peak_flops",
    "measure", "naive_defend", "prepare", "quick_sizes", "run_bench", "variant",
]

SECTIONS = ("speed", "roofline", "attacks", "serving", "serving_load", "default", "bf16", "xla",
            "demo", "tests", "training", "feature_map")
# section -> its key in the report
SECTION_KEYS = {"speed": "speedup_vs_naive", "roofline": "roofline_share",
                "attacks": "attack_speedup_vs_art", "serving": "serving_latency",
                "serving_load": "serving_load", "default": "default_inference",
                "bf16": "bfloat16_vs_float32", "xla": "xla_on_off",
                "demo": "demo_wall", "tests": "test_suite", "training": "training",
                "feature_map": "feature_map_celeba_size"}
# Settings an earlier report must share for its sections to be carried over.
CARRY_OVER_KEYS = ("model", "n", "attack_n", "quick", "fmd_sha256")
# Report keys of the sections that do not run the model's fmd.keras (the test suite, a training
# card, untrained CelebA-size models): carried over when only fmd.keras changed.
MODEL_FREE_KEYS = ("test_suite", "training", "feature_map_celeba_size")
# Times are also given at this float32 matmul peak (the reference machine of the targets):
# time x (this machine's peak / REFERENCE_PEAK).
REFERENCE_PEAK_FLOPS = 220e9
# serving_load: the share of malformed requests and the bound on resident-memory growth per run.
LOAD_BAD_SHARE = 0.1
LOAD_RSS_LIMIT_MIB = 64.0


@dataclass(frozen=True)
class BenchConfig:
    """What `run_bench` measures, and where the report goes (`scripts/bench.py`'s flags are
    generated from these fields)."""

    model: str = option("saved_models/fmnist", "directory holding fmd.keras")
    dataset: str = option("fmnist", "data set of the CLE images")
    out: str = option("results/bench.json", "the JSON report")
    n: int = option(256, "CLE images for the throughput figures", check=POSITIVE_INT)
    naive_n: int = option(4, "images timed by the naive loop", check=POSITIVE_INT)
    attack_n: int = option(100, "images attacked by own and ART's DeepFool / C&W",
                           check=POSITIVE_INT)
    default_n: int = option(1000, "CLE images (and as many FGSM ones) of the default-path "
                            "section", check=POSITIVE_INT)
    demo_n: int = option(200, "the demo's --n in the demo section", check=POSITIVE_INT)
    batch_size: int = option(64, "defend batch size", check=POSITIVE_INT)
    eps: float = option(0.3, "FGSM L∞ budget (default, bf16 sections)", check=UNIT_LEFT_OPEN)
    matmul_size: int = option(2048, "side of the matmul that measures the peak",
                              check=POSITIVE_INT)
    latency_reps: tuple[int, int] = option(
        (50, 10), "timed serving calls at batch 1 and batch 64 (the full budget's batch 64: "
        "half as many)", check=(lambda v: min(v) >= 1, "must be >= 1"))
    load_requests: int = option(2000, "serving_load: requests per protocol (gRPC, REST) and "
                                "batching setting (off, on), 10 % of them malformed",
                                check=POSITIVE_INT)
    load_clients: int = option(8, "serving_load: concurrent clients", check=POSITIVE_INT)
    load_time_limit: float = option(1800.0, "serving_load: seconds one run may take (its "
                                    "clients stop sending after it)", check=POSITIVE)
    cw_iterations: int = option(100, "C&W iterations", check=POSITIVE_INT)
    cw_search_steps: int = option(5, "C&W binary search steps", check=POSITIVE_INT)
    df_iterations: int = option(50, "DeepFool iterations", check=POSITIVE_INT)
    art_attacks: tuple[str, ...] = option(
        ("deepfool", "cw"), "attacks section: which of deepfool,cw to time against ART (one "
        "left out is carried over from an existing --out file)",
        check=(lambda v: bool(v) and set(v) <= {"deepfool", "cw"},
               "must be a non-empty subset of deepfool,cw"))
    training_steps: int = option(40, "training section: timed steps per stage variant",
                                 check=POSITIVE_INT)
    feature_map_n: int = option(8, "feature_map section: images the CelebA-size feature-map "
                                "defense is timed on (and calibrated on)", check=POSITIVE_INT)
    training_card: str = option(
        "results/training/model_card.json", "training section: the model card of a from-scratch "
        "`scripts/train.py --dataset fmnist` run (its wall time and accuracies are reported)")
    sections: tuple[str, ...] = option(
        SECTIONS, "sections to measure; the others are kept from an existing --out of the same "
        "model file", check=(lambda v: bool(v) and set(v) <= set(SECTIONS),
                             f"must be a non-empty subset of {','.join(SECTIONS)}"))
    seed: int = option(0, "seed of the data split")
    quick: bool = option(False, "smoke-test sizes (`quick_sizes`), recorded in the report",
                         cli=False)  # scripts/bench.py: the switch --quick

    def __post_init__(self):
        normalize(self)
        validate(self)

    def _cross_checks(self):
        if self.naive_n > self.n:
            raise OptionError("naive_n", f"must be <= n ({self.n})", self.naive_n,
                              fields=("naive_n", "n"))


def quick_sizes(settings: dict) -> dict:
    """The smoke-test sizes of `--quick` for the `BenchConfig` field values in `settings`."""
    return {"n": min(settings["n"], 16), "naive_n": 1,
            "attack_n": min(settings["attack_n"], 4), "default_n": min(settings["default_n"], 16),
            "demo_n": min(settings["demo_n"], 8), "matmul_size": 1024,
            "latency_reps": (5, 2), "load_requests": min(settings["load_requests"], 40),
            "cw_iterations": 10, "cw_search_steps": 2,
            "df_iterations": 20, "training_steps": 3, "feature_map_n": 2}


def _timed(fn, *a, **kw):
    start = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - start


def device_info() -> dict:
    import tensorflow as tf

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = []
    for dev in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(dev)
        gpus.append(details.get("device_name", dev.name))
    return {
        "name": gpus[0] if gpus else cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "tensorflow": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def variant(fmd, **changes):
    """A copy of `fmd` with other options, sharing its classifier and combo-VAE (and state)."""
    return fmd.copy_with(**changes)


def graph_flops(fn, spec) -> int:
    """2 x multiply-adds of MatMul / Conv2D / transposed-conv ops in fn's graph for `spec`."""
    import tensorflow as tf

    graph = tf.function(fn, autograph=False).get_concrete_function(spec).graph
    total = 0
    for op in graph.get_operations():
        if op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
            a, b = (t.shape.as_list() for t in op.inputs[:2])
            ta = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
            tb = op.get_attr("transpose_b") if op.type == "MatMul" else op.get_attr("adj_y")
            k = a[-2] if ta else a[-1]
            n = b[-2] if tb else b[-1]
            rows = int(np.prod(op.outputs[0].shape.as_list()[:-1]))
            total += 2 * rows * k * n
        elif op.type == "Conv2D":
            kh, kw, cin, _ = op.inputs[1].shape.as_list()
            total += 2 * int(np.prod(op.outputs[0].shape.as_list())) * kh * kw * cin
        elif op.type == "Conv2DBackpropInput":  # transposed convolution
            kh, kw, cout, _ = op.inputs[1].shape.as_list()
            total += 2 * int(np.prod(op.inputs[2].shape.as_list())) * kh * kw * cout
    return int(total)


def matmul_flops_per_s(size: int, dtype: str, reps: int) -> dict:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = tf.cast(tf.constant(rng.standard_normal((size, size), np.float32)), dtype)
    b = tf.cast(tf.constant(rng.standard_normal((size, size), np.float32)), dtype)
    mm = tf.function(lambda a, b: tf.reduce_sum(tf.linalg.matmul(a, b)[:1, :1]))
    mm(a, b).numpy()  # warm-up
    times = []
    for _ in range(reps):
        _, t = _timed(lambda: mm(a, b).numpy())
        times.append(t)
    flops = 2.0 * size**3
    return {"size": size, "dtype": dtype, "reps": reps, "best_s": min(times),
            "median_s": float(np.median(times)), "flops_per_s": flops / min(times),
            "flops_per_s_median": flops / float(np.median(times))}


# ----------------------------------------------------------------------------- naive reference


def naive_defend(fmd, x, per_code: bool = False) -> dict:
    """FM-Defense written the obvious way: eager Keras calls in Python loops (the reference).

    per_code=False: one decoder and one classifier call per morph; per_code=True: one call of
    each per (image, code) on its N morphs. Same maths as `FMDefense._defend`.
    """
    import tensorflow as tf

    from fmd_tf.defense.fm_defense import VERDICT_PASSED, VERDICT_PURIFIED, VERDICT_REJECTED

    clf, vae = fmd.classifier, fmd.combo_vae
    if vae.num_codes != vae.shared_dim:
        raise ValueError("naive_defend writes out a vector latent (one dimension per code); "
                         "this combo-VAE has a feature-map latent: use fmd.defend")
    low, high = fmd.code_low.numpy(), fmd.code_high.numpy()
    table = fmd.search_table.numpy()
    theta_r, theta_d = fmd.theta_r.numpy(), float(fmd.theta_d.numpy())
    n_morphs = fmd.num_morphs
    out = {"resistance": [], "verdict": [], "label": []}
    for image in x:
        batch = tf.constant(image[None])
        y0 = int(np.argmax(clf(batch).numpy()[0]))
        mean, _, zu = vae.encode(batch)
        mean, zu = mean.numpy()[0], zu.numpy()[0]
        r = np.zeros(fmd.num_codes, np.float32)
        for i, code in enumerate(fmd.selected_codes):
            width = np.float32(high[code] - low[code])
            inside, outside = [], []
            for offset in table[i]:  # §III-C: walk the search candidates in order
                value = np.float32(mean[code] + np.float32(offset * width))
                (inside if low[code] <= value <= high[code] else outside).append(value)
            values = np.clip(np.array((inside + outside)[:n_morphs], np.float32),
                             low[code], high[code])
            latents = np.repeat(np.concatenate([mean, zu])[None], n_morphs, axis=0)
            latents[:, code] = mean[code] + (values - mean[code])  # as morphs.morph_latents
            if per_code:
                labels = np.argmax(clf(vae.decoder(tf.constant(latents))).numpy(), axis=-1)
                kept = int(np.sum(labels == y0))
            else:
                kept = 0
                for latent in latents:
                    logits = clf(vae.decoder(tf.constant(latent[None]))).numpy()[0]
                    kept += int(np.argmax(logits) == y0)
            r[i] = kept / n_morphs
        zu_p = vae.dgmm.class_mean(zu[None]).numpy()[0] if fmd.purify_zu == "class_mean" else zu
        purified = vae.decode(tf.constant(mean[None]), tf.constant(zu_p[None]))
        y_p = int(np.argmax(clf(purified).numpy()[0]))
        if fmd.purify_label == "corroborated" and int(
                np.argmax(vae.dgmm.class_logits(zu[None]).numpy()[0])) == y0:
            y_p = y0  # the DGMM's class corroborates the input's label
        distance = float(np.sum(np.maximum(theta_r - r, 0.0)))
        if np.all(r > theta_r):
            verdict, label = VERDICT_PASSED, y0
        elif distance <= theta_d:
            verdict, label = VERDICT_PURIFIED, y_p
        else:
            verdict, label = VERDICT_REJECTED, -1
        out["resistance"].append(r)
        out["verdict"].append(verdict)
        out["label"].append(label)
    return {k: np.array(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- sections


def section_speed(ctx) -> dict:
    fmd, x, cfg = ctx["fmd"], ctx["x"], ctx["cfg"]
    fmd.defend(x[: cfg.batch_size], batch_size=cfg.batch_size)  # warm-up / trace
    out, t_fmd = _timed(fmd.defend, x, batch_size=cfg.batch_size)
    ctx["t_fmd"], ctx["out_clean"] = t_fmd, out
    sub = x[: cfg.naive_n]
    naive_per_code(fmd, sub[:1])  # warm-up of the eager Keras calls
    ref, t_naive = _timed(naive_defend, fmd, sub)
    ref_code, t_code = _timed(naive_defend, fmd, sub, per_code=True)
    diff = np.abs(ref["resistance"] - out["resistance"][: len(sub)])
    per_img_fmd = t_fmd / len(x)
    per_img_naive = t_naive / len(sub)
    per_img_code = t_code / len(sub)
    return {
        "value": per_img_naive / per_img_fmd,
        "fmd_images_per_s": len(x) / t_fmd,
        "fmd_seconds": t_fmd,
        "fmd_images": len(x),
        "naive_images_per_s": 1.0 / per_img_naive,
        "naive_images_timed": len(sub),
        "naive_extrapolated_per_image": True,
        "naive_mode": "eager, one decoder + one classifier call per morph",
        "speedup_vs_naive_per_code": per_img_code / per_img_fmd,
        "naive_per_code_images_per_s": 1.0 / per_img_code,
        "naive_resistance_matches": bool(np.all(diff == 0)),
        "naive_max_abs_resistance_diff": float(diff.max()),
        "naive_verdict_agreement": float(np.mean(ref["verdict"] == out["verdict"][: len(sub)])),
        "morphs_per_image": fmd.num_codes * fmd.num_morphs,
        "batch_size": cfg.batch_size,
    }


def naive_per_code(fmd, x):
    return naive_defend(fmd, x, per_code=True)


def section_roofline(ctx) -> dict:
    import tensorflow as tf

    fmd, x, cfg = ctx["fmd"], ctx["x"], ctx["cfg"]
    clf, vae = fmd.classifier, fmd.combo_vae
    latent_dim = vae.shared_dim + vae.unique_dim
    f_morph = graph_flops(lambda z: clf(vae.decoder(z)),
                          tf.TensorSpec([1, latent_dim], tf.float32))

    def image_part(images):
        mean, _, zu = vae.encode(images)
        return clf(images), clf(vae.decode(mean, zu))

    f_image = graph_flops(image_part, tf.TensorSpec([1, *fmd._image_shape], tf.float32))
    per_image = fmd.num_codes * fmd.num_morphs * f_morph + f_image
    if "t_fmd" not in ctx:
        fmd.defend(x[: cfg.batch_size], batch_size=cfg.batch_size)
        _, ctx["t_fmd"] = _timed(fmd.defend, x, batch_size=cfg.batch_size)
    reps = 3 if cfg.quick else 7
    peak = matmul_flops_per_s(cfg.matmul_size, "float32", reps)
    peak_bf16 = matmul_flops_per_s(cfg.matmul_size, "bfloat16", reps)
    ctx["peak"], ctx["peak_bf16"] = peak, peak_bf16
    achieved = len(x) * per_image / ctx["t_fmd"]
    return {
        "value": achieved / peak["flops_per_s"],
        "achieved_flops_per_s": achieved,
        "peak_matmul_float32": peak,
        "peak_matmul_bfloat16": peak_bf16,
        "flops_per_morph": f_morph,
        "flops_per_image_other": f_image,
        "flops_per_image": per_image,
        "morph_share_of_flops": fmd.num_codes * fmd.num_morphs * f_morph / per_image,
        "flop_count": "2 x multiply-adds of MatMul, Conv2D, Conv2DBackpropInput ops of the traced "
                      "batch-1 graphs; bias, activations, pooling, chunk padding not counted",
    }


def _own_attack(name, module):
    import importlib

    import fmd_tf.attacks as attacks

    fn = getattr(attacks, name, None)
    if callable(fn):
        return fn
    return getattr(importlib.import_module(f"fmd_tf.attacks.{module}"), name)


def section_attacks(ctx) -> dict:
    fmd, cfg = ctx["fmd"], ctx["cfg"]
    try:
        deepfool = _own_attack("deepfool", "deepfool")
        cw = _own_attack("carlini_wagner_l2", "carlini_wagner")
    except (ImportError, AttributeError) as e:
        return {"skipped": f"own DeepFool / C&W not importable from fmd_tf.attacks: {e}"}
    try:
        from art.attacks.evasion import CarliniL2Method, DeepFool

        from fmd_tf.attacks import art_classifier
    except ImportError as e:
        return {"skipped": f"ART not importable (pip install -e '.[dev]'): {e}"}
    clf = fmd.classifier
    x = ctx["x_all"][: cfg.attack_n]
    batch = 128
    art_clf = art_classifier(clf, x)
    pred = np.argmax(clf.predict(x, verbose=0), axis=1)

    def summary(adv, seconds):
        adv_pred = np.argmax(clf.predict(adv, verbose=0), axis=1)
        success = adv_pred != pred
        l2 = np.linalg.norm((adv - x).reshape(len(x), -1), axis=1)
        return {"seconds": seconds, "success_rate": float(success.mean()),
                "mean_l2_successful": float(l2[success].mean()) if success.any() else None}

    result = {"images": len(x), "batch_size": batch,
              "success": "the classifier's label of the adversarial image differs from the clean"}
    earlier = earlier_sections(cfg.out, ctx["report"]["settings"],
                               ["attack_speedup_vs_art"]).get("attack_speedup_vs_art", {})
    for name, key in (("deepfool", "deepfool"), ("cw", "carlini_wagner_l2")):
        if name not in cfg.art_attacks and key in earlier:
            result[key] = {**earlier[key],
                           "carried_over_from": earlier.get("measured_at", "an earlier run")}
    num_classes = int(clf(x[:1]).shape[-1])
    if "deepfool" in cfg.art_attacks:
        result["deepfool"] = _time_deepfool(deepfool, clf, art_clf, DeepFool, x, num_classes,
                                            batch, cfg, summary)
    if "cw" in cfg.art_attacks:
        result["carlini_wagner_l2"] = _time_cw(cw, clf, art_clf, CarliniL2Method, x, batch,
                                               cfg, summary)
    return result


def _time_deepfool(deepfool, clf, art_clf, DeepFool, x, num_classes, batch, cfg, summary):  # noqa: N803
    df_kw = dict(overshoot=0.02, max_iterations=cfg.df_iterations)
    _, cold = _timed(deepfool, clf, x, num_classes=num_classes, batch_size=batch, **df_kw)
    adv, warm = _timed(deepfool, clf, x, num_classes=num_classes, batch_size=batch, **df_kw)
    own = summary(adv, warm) | {"seconds_first_call": cold}
    art_adv, t_art = _timed(DeepFool(art_clf, max_iter=cfg.df_iterations, epsilon=0.02,
                                     nb_grads=num_classes, batch_size=batch,
                                     verbose=False).generate, x)
    art = summary(art_adv.astype(np.float32), t_art)
    return {"speedup": t_art / warm, "speedup_first_call": t_art / cold, "own": own, "art": art,
            "params": {"overshoot": 0.02, "max_iterations": cfg.df_iterations,
                       "classes": num_classes, "norm": "l2"}}


def _time_cw(cw, clf, art_clf, CarliniL2Method, x, batch, cfg, summary):  # noqa: N803
    cw_kw = dict(learning_rate=0.01, max_iterations=cfg.cw_iterations,
                 binary_search_steps=cfg.cw_search_steps, initial_const=1.0, confidence=0.0)
    _, cold = _timed(cw, clf, x, batch_size=batch, **cw_kw)
    adv, warm = _timed(cw, clf, x, batch_size=batch, **cw_kw)
    own = summary(adv, warm) | {"seconds_first_call": cold}
    art_adv, t_art = _timed(CarliniL2Method(
        art_clf, confidence=0.0, learning_rate=0.01, binary_search_steps=cfg.cw_search_steps,
        max_iter=cfg.cw_iterations, initial_const=1.0, batch_size=batch, verbose=False,
    ).generate, x)
    art = summary(art_adv.astype(np.float32), t_art)
    return {
        "speedup": t_art / warm, "speedup_first_call": t_art / cold, "own": own, "art": art,
        "params": cw_kw,
        "note": "ART's C&W uses its own step-size line search (halving / doubling), so equal "
                "nominal parameters are not identical iterations: compare success and L2 too",
    }


def _latency(call, images, reps: int) -> dict:
    """p50 / p99 / mean milliseconds and images/s of `call(images)` over `reps` timed calls
    after one warm-up call."""
    call(images)
    times = [1000.0 * _timed(call, images)[1] for _ in range(reps)]
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "mean_ms": float(np.mean(times)), "reps": reps,
            "images_per_s": 1000.0 * len(images) / float(np.median(times))}


def _latency_ratios(before: dict, after: dict) -> dict:
    """Per timed call (e.g. "grpc_batch_64"): how many times `after`'s p50 is below `before`'s
    and its images/s above."""
    return {key: {"p50_speedup": before[key]["p50_ms"] / after[key]["p50_ms"],
                  "throughput_ratio": after[key]["images_per_s"] / before[key]["images_per_s"]}
            for key in after}


def section_serving(ctx) -> dict:
    """The exported SavedModel's `serving_default`, batch 1 and 64, of the full budget
    (`FMDefense.FULL_BUDGET`, "before") and of the model's default path ("after"), in this process
    (`tf.saved_model.load`) and through the local PredictionService server over gRPC. A model
    that `decides_without_morphs` (the robust mode) is also timed as its decision export
    ("decision": `export_serving(..., exposure="decision")`, the gates only), with its ratios to
    the default path (`decision_ratios`)."""
    import tensorflow as tf

    from fmd_tf.export import export_serving
    from fmd_tf.operating_point import decides_without_morphs
    from fmd_tf.serving.client import GrpcClient
    from fmd_tf.serving.local_server import ServingServer

    cfg, x = ctx["cfg"], ctx["x"]
    reps1, reps64 = cfg.latency_reps
    result = {}
    exports = [("full_budget", ctx["fmd"], "full"), ("default", ctx["default"], "full")]
    if decides_without_morphs(ctx["default"]):
        exports.append(("decision", ctx["default"], "decision"))
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, exposure in exports:
            path = export_serving(model, os.path.join(tmp, name), version=1, exposure=exposure)
            fn = tf.saved_model.load(path).signatures["serving_default"]
            figures = {}
            with ServingServer(path, model_name="fmd", version=1) as server, \
                    GrpcClient(server.target, timeout=600.0) as client:
                calls = {"in_process": lambda b, fn=fn: fn(images=tf.constant(b))["label"].numpy(),
                         "grpc": lambda b, client=client: client.predict("fmd", b)["label"]}
                for batch in (1, 64):
                    reps = reps1 if batch == 1 else max(1, reps64 // (2 if name ==
                                                                    "full_budget" else 1))
                    images = np.resize(x, (batch, *x.shape[1:])).astype(np.float32)
                    for where, call in calls.items():
                        figures[f"{where}_batch_{batch}"] = _latency(call, images, reps)
            result[name] = figures
    result["ratios"] = _latency_ratios(result["full_budget"], result["default"])
    if "decision" in result:
        result["decision_ratios"] = _latency_ratios(result["default"], result["decision"])
    result["default_options"] = ctx["report"]["settings"]["default_budget"]
    result["note"] = ("full_budget: the same fmd.keras with all morphs in float32 "
                      "(FMDefense.FULL_BUDGET); default: as shipped; decision (a model "
                      "whose resistance cannot flag): its gates-only decision export. gRPC: "
                      "fmd_tf.serving.local_server (PredictionService from the "
                      "tensorflow-serving-api stubs, in this process) on 127.0.0.1")
    return result


def section_serving_load(ctx) -> dict:
    """The bounded load test (`fmd_tf.serving.load_test.run_load`) on the model as shipped
    (fmd.keras exported to a temporary SavedModel, as `scripts/export.py` writes it) behind
    the local PredictionService / REST server: `load_clients` clients, `load_requests`
    requests (10 % malformed, batch 1, `serving_default`) over gRPC and over REST, with
    server-side batching off and on; every answer checked against `FMDefense` in this
    process on the same CLE images."""
    from fmd_tf.export import export_serving
    from fmd_tf.serving.load_test import expected_outputs, output_tolerances, run_load
    from fmd_tf.serving.local_server import ServingServer

    cfg, model, images = ctx["cfg"], ctx["default"], ctx["x"]
    tolerances = output_tolerances(model)
    expected, seconds = _timed(expected_outputs, model, images, batch_size=cfg.batch_size)
    batching = {"max_batch_size": 64, "batch_timeout_micros": 2000, "num_batch_threads": 1}
    result = {"images": len(images), "clients": cfg.load_clients,
              "requests": cfg.load_requests, "bad_share": LOAD_BAD_SHARE,
              "rss_limit_mib": LOAD_RSS_LIMIT_MIB, "expected_seconds": seconds,
              "batching_parameters": batching}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_serving(model, tmp, version=1)
        for name, on in (("batching_off", False), ("batching_on", True)):
            with ServingServer(path, model_name="fmd", version=1,
                               max_workers=2 * cfg.load_clients, batching=on,
                               **batching) as server:
                result[name] = {}
                for protocol in ("grpc", "rest"):
                    before = _peak(cfg)  # the machine's speed around each run (shared hosts)
                    run = run_load(server, images, expected, clients=cfg.load_clients,
                                   requests=cfg.load_requests, bad_share=LOAD_BAD_SHARE,
                                   protocol=protocol, seed=cfg.seed,
                                   time_limit_s=cfg.load_time_limit,
                                   rss_limit_mib=LOAD_RSS_LIMIT_MIB, output_atol=tolerances)
                    run["matmul_peak_flops"] = {"before": before, "after": _peak(cfg)}
                    result[name][protocol] = run
    runs = [run for name in ("batching_off", "batching_on") for run in result[name].values()]
    result["passed"] = all(run["passed"] and run["complete"] for run in runs)
    result["note"] = ("fmd_tf.serving.local_server in this process (threads) on 127.0.0.1; "
                      "latency: a good request as its client sees it; rss_mib: VmRSS of this "
                      "process (server and clients) before / after the measured run; compare "
                      "runs only at similar matmul_peak_flops (measured around each run)")
    return result


def _adversarial(ctx, x, y):
    from fmd_tf.attacks import fgsm

    return fgsm(ctx["fmd"].classifier, x, eps=ctx["cfg"].eps, y=y)


def profile_top_ops(fn, top: int = 8) -> list[dict]:
    """The op types of the most self-time while `fn()` runs under `tf.profiler`: [{"type",
    "self_time_ms", "share", "occurrences"}], share of all ops' self time (host and device
    ops, TensorFlow's framework_op_stats tool; idle time left out)."""
    import glob
    import json

    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            fn()
        finally:
            tf.profiler.experimental.stop()
        paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        data, ok = plugin.xspace_to_tools_data(paths, "framework_op_stats", {})
    if not ok:
        return []
    table = json.loads(data)[0]
    columns = [c["id"] for c in table["cols"]]
    per_type: dict[str, list] = {}
    for row in table["rows"]:
        values = dict(zip(columns, (c.get("v") for c in row["c"]), strict=True))
        entry = per_type.setdefault(values["type"], [0.0, 0])
        entry[0] += float(values["total_self_time"] or 0.0)
        entry[1] += int(values["occurrences"] or 0)
    per_type.pop("IDLE", None)  # host time with no op running
    total = sum(v[0] for v in per_type.values()) or 1.0
    ranked = sorted(per_type.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"type": name, "self_time_ms": t / 1000.0, "share": t / total, "occurrences": n}
            for name, (t, n) in ranked]


def section_default(ctx) -> dict:
    """The model's default inference path (as shipped) against the full budget (all m·N
    morphs in float32, `FMDefense.FULL_BUDGET`) on `default_n` CLE images and their FGSM
    versions: throughput ratio, verdict agreement, ROC AUC of the resistance score, morphs per
    image, and the profile's top ops."""
    from fmd_tf.evaluation.harness import fm_scores
    from fmd_tf.evaluation.metrics import roc_auc

    cfg, full, default = ctx["cfg"], ctx["fmd"], ctx["default"]
    x, y = ctx["x_default"], ctx["y_default"]
    x_adv = _adversarial(ctx, x, y)
    bs = cfg.batch_size
    runs = {}
    for name, model in (("full_budget", full), ("default", default)):
        model.defend_with_stats(x[:bs], batch_size=bs)  # warm-up / trace
        clean, t_clean = _timed(model.defend_with_stats, x, batch_size=bs)
        adv, t_adv = _timed(model.defend_with_stats, x_adv, batch_size=bs)
        runs[name] = {"clean": clean, "adv": adv, "seconds": t_clean + t_adv}
    theta = full.theta_r.numpy()

    def auc(run):
        return roc_auc(fm_scores(run["clean"], theta), fm_scores(run["adv"], theta))

    def morphs(run):
        return float(np.mean(np.concatenate([run[s]["morphs_used"].sum(1)
                                             for s in ("clean", "adv")])))

    agree = np.concatenate([runs["default"][s]["verdict"] == runs["full_budget"][s]["verdict"]
                            for s in ("clean", "adv")])
    batch = x[:bs]
    profile = {name: profile_top_ops(lambda m=model: m.defend(batch, batch_size=bs))
               for name, model in (("full_budget", full), ("default", default))}
    images = 2 * len(x)
    return {
        "throughput_ratio": runs["full_budget"]["seconds"] / runs["default"]["seconds"],
        "verdict_agreement": float(agree.mean()),
        "auc": {name: auc(run) for name, run in runs.items()},
        "auc_change": auc(runs["default"]) - auc(runs["full_budget"]),
        "images_per_s": {name: images / run["seconds"] for name, run in runs.items()},
        "mean_morphs_per_image": {name: morphs(run) for name, run in runs.items()},
        "detection_rate_adv": {name: float(np.mean(run["adv"]["verdict"] != 0))
                               for name, run in runs.items()},
        "false_positive_rate_clean": {name: float(np.mean(run["clean"]["verdict"] != 0))
                                      for name, run in runs.items()},
        "images": {"clean": len(x), "fgsm": len(x_adv)},
        "default_options": ctx["report"]["settings"]["default_budget"],
        "score": "max_i(theta_r_i - r_i)",
        "attack": f"FGSM eps={cfg.eps} against the classifier on the same CLE images",
        "profile_top_ops": profile,
        "profile_note": f"tf.profiler framework_op_stats of one defend() of {len(batch)} images",
    }


def section_xla(ctx) -> dict:
    """XLA off and on (`jit_compile`) for the full budget's graph (all m·N morphs in float32,
    the graph XLA can compile) on the device TensorFlow places it on: a GPU where one is
    visible (the GPU row), else the CPU. Per setting: images/s over the `n` CLE images in
    batches of `batch_size` (after a tracing / compiling call), batch-1 latency, and the share
    of verdicts XLA's run gives like the plain graph. The model as shipped is timed beside
    them: its adaptive budget and checked bfloat16 morphs have data-dependent shapes, so it
    runs without XLA on any device (`FMDefense._xla_compatible`)."""
    cfg, x, device = ctx["cfg"], ctx["x"], ctx["report"]["device"]
    runs = {}
    for name, model in (("xla_off", variant(ctx["fmd"], jit_compile=False)),
                        ("xla_on", variant(ctx["fmd"], jit_compile=True)),
                        ("default", ctx["default"])):
        _, compile_seconds = _timed(model.defend, x[: cfg.batch_size], batch_size=cfg.batch_size)
        out, seconds = _timed(model.defend, x, batch_size=cfg.batch_size)
        runs[name] = {"jit_compile": model.jit_compile, "images_per_s": len(x) / seconds,
                      "first_call_seconds": compile_seconds,
                      "batch_1": _latency(lambda b, m=model: m.defend(b, batch_size=1), x[:1],
                                          cfg.latency_reps[0]),
                      "verdict": out["verdict"]}
    agree = float(np.mean(runs["xla_on"].pop("verdict") == runs["xla_off"].pop("verdict")))
    runs["default"].pop("verdict")
    return {
        **runs, "device": device["name"], "gpu": bool(device["gpus"]),
        "xla_throughput_ratio": runs["xla_on"]["images_per_s"] / runs["xla_off"]["images_per_s"],
        "xla_batch_1_p50_ratio": (runs["xla_off"]["batch_1"]["p50_ms"]
                                  / runs["xla_on"]["batch_1"]["p50_ms"]),
        "xla_verdict_agreement": agree, "images": len(x), "batch_size": cfg.batch_size,
        "note": "xla_off / xla_on: the full budget (float32, all morphs) with jit_compile "
                "False / True; default: the model as shipped (no XLA: data-dependent shapes). "
                "Ratios > 1 mean XLA is faster.",
    }


def _script_wall(args: list[str], timeout: float = 3600.0) -> float:
    """Wall seconds of `python <args>` run from the repository root (exit status checked)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return seconds


def section_demo(ctx) -> dict:
    """Wall time of `scripts/demo.py` (a new process: imports, model load, data, FGSM, the
    defense on clean and FGSM images, the figure) with the model's default path and with
    `--budget full`, back to back."""
    cfg = ctx["cfg"]
    result = {"n": cfg.demo_n}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("full_budget", ["--budget", "full"]), ("default", [])):
            seconds = _script_wall(["scripts/demo.py", "--model", cfg.model, "--n",
                                    str(cfg.demo_n), "--figure", os.path.join(tmp, "demo.png"),
                                    *extra])
            result[name] = _seconds(seconds)
    result["speedup"] = result["full_budget"]["seconds"] / result["default"]["seconds"]
    return result


def section_tests(ctx) -> dict:
    """Wall time of the test suite (`python -m pytest -q`, what `make test` runs) in a new
    process; with --quick only tests/test_losses.py (a smoke test of the section)."""
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if ctx["cfg"].quick:
        args.append("tests/test_losses.py")
    return {"command": "python " + " ".join(args), **_seconds(_script_wall(args))}


def _seconds(seconds: float) -> dict:
    """{"seconds", "seconds_at_reference_peak"}: a wall time here, and scaled to the reference
    machine's matmul peak (`REFERENCE_PEAK_FLOPS`) by `measure` once the section is done (with
    the mean of the peaks measured right before and right after it)."""
    return {"seconds": seconds, "seconds_at_reference_peak": None}


def _scale_times(value, peak: float):
    """Fills every `_seconds` entry of a section's result with its time at the reference peak."""
    if isinstance(value, dict):
        if "seconds_at_reference_peak" in value and value["seconds_at_reference_peak"] is None:
            value["seconds_at_reference_peak"] = value["seconds"] * peak / REFERENCE_PEAK_FLOPS
        for item in value.values():
            _scale_times(item, peak)


def section_bf16(ctx) -> dict:
    """The morph pass (all m·N morphs) in bfloat16 against float32 on the same clean and FGSM
    images, unchecked (`morph_check_margin` 0) and checked (the default margin: close calls
    classified again in float32, `fmd_tf.defense.precision`): throughput ratios (timed back to
    back), morph outcomes that differ from float32's, verdict / resistance / label agreement."""
    from fmd_tf.config import DefenseConfig

    fmd, x, cfg = ctx["fmd"], ctx["x"], ctx["cfg"]
    x_adv = _adversarial(ctx, x, ctx["y"])
    margin = DefenseConfig.morph_check_margin
    models = {"float32": variant(fmd, morph_dtype="float32"),
              "bfloat16": variant(fmd, morph_dtype="bfloat16", morph_check_margin=0.0),
              "checked": variant(fmd, morph_dtype="bfloat16", morph_check_margin=margin)}
    bs = cfg.batch_size
    runs = {}
    for name, model in models.items():
        model.defend_with_stats(x[:bs], batch_size=bs, outcomes=True)  # warm-up / trace
        clean, seconds = _timed(model.defend_with_stats, x, batch_size=bs, outcomes=True)
        runs[name] = {"clean": clean, "seconds": seconds,
                      "adv": model.defend_with_stats(x_adv, batch_size=bs, outcomes=True)}

    def compare(name):
        out, ref = runs[name], runs["float32"]
        both = ("clean", "adv")
        r_diff = np.abs(np.concatenate([out[s]["resistance"] - ref[s]["resistance"]
                                        for s in both]))
        outcomes = [out[s]["morph_outcomes"] != ref[s]["morph_outcomes"] for s in both]
        return {
            "throughput_ratio": ref["seconds"] / out["seconds"],
            "images_per_s": len(x) / out["seconds"],
            "morph_outcomes_differing": int(sum(d.sum() for d in outcomes)),
            "morph_outcomes": int(sum(d.size for d in outcomes)),
            "verdict_agreement": float(np.mean(np.concatenate(
                [out[s]["verdict"] == ref[s]["verdict"] for s in both]))),
            "resistance_max_abs_diff": float(r_diff.max()),
            "label_agreement": float(np.mean(np.concatenate(
                [out[s]["label"] == ref[s]["label"] for s in both]))),
        }

    unchecked = compare("bfloat16")
    result = {
        **unchecked,
        "images_per_s": {"float32": len(x) / runs["float32"]["seconds"],
                         "bfloat16": unchecked["images_per_s"]},
        "checked": {"morph_check_margin": margin, **compare("checked")},
        "images": {"clean": len(x), "fgsm": len(x_adv)},
    }
    if "peak_bf16" in ctx and "roofline_share" in ctx["report"]:
        per_image = ctx["report"]["roofline_share"]["flops_per_image"]
        result["roofline_share_vs_bf16_matmul"] = (
            len(x) * per_image / runs["bfloat16"]["seconds"] / ctx["peak_bf16"]["flops_per_s"])
    return result


def section_feature_map(ctx) -> dict:
    """The paper's CelebA model at CelebA's size, timed on untrained weights (the FLOPs, not the
    figures, matter here): 64x64x3 images, `data.CELEBA_IDENTITIES` classes, the feature-map
    combo-VAE and classifier that `experiment_config(..., latent="feature_map")` builds for them.
    Milliseconds per classifier step and per combo-VAE stage-2 step (precomputed DGMM codes and
    classifier logits, as `training.train_vae` trains it) at their batch sizes, float32 and the
    training precision chosen here; then the full-budget defense (all m·N morphs, float32
    morphs) in images/s on `cfg.feature_map_n` random images after calibrating its ranges on as
    many others."""
    import dataclasses

    import keras

    from fmd_tf import training
    from fmd_tf.data import CELEBA_IDENTITIES, CELEBA_IMAGE_SIZE
    from fmd_tf.defense import FMDefense
    from fmd_tf.pipeline import experiment_config

    cfg = ctx["cfg"]
    shape = (CELEBA_IMAGE_SIZE, CELEBA_IMAGE_SIZE, 3)
    exp = experiment_config(shape, CELEBA_IDENTITIES, latent="feature_map")
    steps, batch, n = cfg.training_steps, exp.combo.batch_size, cfg.feature_map_n
    rng = np.random.default_rng(0)
    x = rng.random(((steps + 2) * batch, *shape), dtype=np.float32)
    y = rng.integers(0, CELEBA_IDENTITIES, len(x))
    result = {"image_shape": list(shape), "classes": CELEBA_IDENTITIES,
              "latent": exp.combo.latent, "channels": exp.combo.shared_dim,
              "map_size": exp.combo.feature_map_size, "steps": steps, "batch_size": batch}
    with training.dtype_policy(training.training_precision(exp.classifier.precision)):
        clf = training.new_classifier(exp, steps=steps + 2)
    result["classifier_step_ms"] = _step_ms(lambda k, cb: clf.fit(
        x[: k * batch], y[: k * batch], batch_size=batch, verbose=0, callbacks=cb), steps)
    vae_ms = {}
    for policy in ("float32", training.training_precision(exp.combo.vae_precision)):
        c = dataclasses.replace(exp, combo=dataclasses.replace(exp.combo, vae_precision=policy))
        combo = training.new_combo_vae(c, training.get_strategy("default"), 0)
        combo.set_consistency_classifier(clf)
        combo.compile(optimizer=keras.optimizers.Adam(1e-3))
        targets = {"zu": combo.dgmm.predict(x, batch_size=256, verbose=0),
                   "logits": clf.predict(x, batch_size=256, verbose=0)}
        vae_ms[policy] = _step_ms(lambda k, cb, m=combo, t=targets: m.fit(
            x[: k * batch], {name: v[: k * batch] for name, v in t.items()},
            batch_size=batch, verbose=0, callbacks=cb), steps)
    result["vae_step_ms"] = vae_ms
    combo = training.inference_copy(combo)
    clf = training.inference_copy(clf)
    fmd = FMDefense.from_config_dataclass(
        clf, combo, dataclasses.replace(exp.defense, **FMDefense.FULL_BUDGET), name="fmd")
    fmd.build((None, *shape))
    fmd.calibrate(x[n : 2 * n])
    fmd.defend(x[:1])  # trace
    _, seconds = _timed(fmd.defend, x[:n], batch_size=n)
    result["defense"] = {"images": n, "morphs_per_image": fmd.num_codes * fmd.num_morphs,
                         "images_per_s": n / seconds, **_seconds(seconds)}
    return result


# ----------------------------------------------------------------------------- report
# ----------------------------------------------------------------------------- report


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _table_rows(report: dict) -> list[tuple]:
    """(metric, value, detail) of each headline figure of a report."""
    rows = []
    speed = report.get("speedup_vs_naive", {})
    if "value" in speed:
        rows += [("speedup_vs_naive", speed["value"],
                  f"{speed['fmd_images_per_s']:.3g} vs {speed['naive_images_per_s']:.3g} img/s "
                  f"(naive on {speed['naive_images_timed']} images, extrapolated)"),
                 ("speedup_vs_naive_per_code", speed["speedup_vs_naive_per_code"],
                  "naive with one call per (image, code)")]
    roof = report.get("roofline_share", {})
    if "value" in roof:
        rows.append(("roofline_share", roof["value"],
                     f"{roof['achieved_flops_per_s'] / 1e9:.3g} / "
                     f"{roof['peak_matmul_float32']['flops_per_s'] / 1e9:.3g} GFLOP/s"))
    attacks = report.get("attack_speedup_vs_art", {})
    if "skipped" in attacks:
        rows.append(("attack_speedup_vs_art", "skipped", attacks["skipped"][:60]))
    for name in ("deepfool", "carlini_wagner_l2"):
        if name in attacks:
            a = attacks[name]
            rows.append((f"{name}_speedup_vs_art", a["speedup"],
                         f"success own {a['own']['success_rate']:.2f} / "
                         f"ART {a['art']['success_rate']:.2f}"))
    serving = report.get("serving_latency", {})
    peaks = serving.get("matmul_peak_flops", {"before": REFERENCE_PEAK_FLOPS,
                                              "after": REFERENCE_PEAK_FLOPS})
    scale = (peaks["before"] + peaks["after"]) / 2 / REFERENCE_PEAK_FLOPS
    for prefix, ratios, names in (("serving", "ratios", ("default", "full_budget")),
                                  ("serving_decision", "decision_ratios", ("decision", "default"))):
        for key, ratio in serving.get(ratios, {}).items():
            after, before = serving[names[0]][key], serving[names[1]][key]
            rows.append((f"{prefix}_{key}_p50_ms", after["p50_ms"],
                         f"{after['p50_ms'] * scale:.3g} ms at 220 GFLOP/s; "
                         f"{names[1].replace('_', ' ')} {before['p50_ms']:.4g} ms: "
                         f"{ratio['p50_speedup']:.3g}x"))
    load = report.get("serving_load", {})
    for name in ("batching_off", "batching_on"):
        for protocol, run in load.get(name, {}).items():
            rows.append((f"serving_load_{protocol}_{name}_p50_ms", run["latency_ms"]["p50"],
                         f"p99 {run['latency_ms']['p99']:.4g} ms, {run['throughput_rps']:.3g} "
                         f"req/s, {run['requests']} requests: {run['wrong_answers']} wrong, "
                         f"{run['unexpected_statuses']} unexpected, RSS "
                         f"{run['rss_mib']['growth']:+.3g} MiB"))
    default = report.get("default_inference", {})
    if default:
        rows += [("default_throughput_ratio", default["throughput_ratio"],
                  f"{default['images_per_s']['default']:.3g} vs "
                  f"{default['images_per_s']['full_budget']:.3g} img/s, "
                  f"{default['mean_morphs_per_image']['default']:.0f} morphs/image"),
                 ("default_verdict_agreement", default["verdict_agreement"],
                  f"{default['images']['clean']} clean + {default['images']['fgsm']} FGSM"),
                 ("default_auc_change", default["auc_change"],
                  f"AUC {default['auc']['default']:.4f} vs full "
                  f"{default['auc']['full_budget']:.4f}")]
    peak = report["device"].get("matmul_peak_flops")
    for key, name in (("demo_wall", "demo"), ("test_suite", "test_suite")):
        part = report.get(key, {})
        if "default" in part:
            rows.append((f"{name}_seconds", part["default"]["seconds"],
                         f"{part['default']['seconds_at_reference_peak']:.3g} s at 220 GFLOP/s; "
                         f"full budget {part['full_budget']['seconds']:.3g} s "
                         f"({part['speedup']:.3g}x)"))
        elif "seconds" in part:
            rows.append((f"{name}_seconds", part["seconds"],
                         f"{part['seconds_at_reference_peak']:.3g} s at 220 GFLOP/s"))
    train = report.get("training", {})
    if train:
        clf, vae, trial = (train[k] for k in ("classifier_step_ms", "vae_step_ms",
                                              "budget_trial"))
        rows += [("classifier_bf16_step_speedup", clf["speedup"],
                  f"{clf['mixed_bfloat16']:.3g} vs {clf['float32']:.3g} ms/step"),
                 ("vae_precomputed_step_speedup", vae["speedup"],
                  f"{vae['precomputed']:.3g} vs {vae['in_loss']:.3g} ms/step"),
                 ("budget_trial_replay_speedup", trial["speedup"],
                  f"identical to the model: {trial['replay_identical_to_model']}")]
        if "mixed_bfloat16_speedup" in vae:
            rows.append(("vae_bf16_step_speedup", vae["mixed_bfloat16_speedup"],
                         f"{vae['precomputed_mixed_bfloat16']:.3g} vs {vae['precomputed']:.3g} "
                         "ms/step"))
        if "code_use_cost" in vae:
            rows.append(("vae_code_use_step_cost", vae["code_use_cost"],
                         f"{vae['precomputed_mixed_bfloat16']:.3g} vs "
                         f"{vae['precomputed_mixed_bfloat16_without_code_use']:.3g} ms/step "
                         f"(code_use_weight {vae['code_use_weight']:g} vs 0)"))
        pipeline = train.get("input_pipeline")
        if pipeline:
            rows.append(("epoch_iterator_speedup", pipeline["speedup"],
                         f"{pipeline.get('runs', 1)} x {pipeline['epochs']} epochs: "
                         f"{pipeline['seconds']['epoch_batches']:.3g} vs "
                         f"{pipeline['seconds']['numpy_fit']:.3g} s (fit on numpy)"))
        full = train.get("full_training")
        if full:
            at_ref = full["seconds_at_reference_peak"]
            rows.append(("full_training_seconds", full["seconds"],
                         ("" if at_ref is None else f"{at_ref:.4g} s at 220 GFLOP/s; ")
                         + f"classifier {full['classifier_test_accuracy']:.4f}, DGMM "
                         f"{full['dgmm_test_accuracy']:.4f}, recon agreement "
                         f"{full['recon_label_agreement']:.4f}"))
    if peak:
        rows.append(("matmul_peak_gflops", peak / 1e9, "float32, at the start of this run"))
    bf = report.get("bfloat16_vs_float32", {})
    if bf:
        rows.append(("bfloat16_throughput_ratio", bf["throughput_ratio"],
                     f"verdict agreement {bf['verdict_agreement']:.3f}"))
        checked = bf.get("checked")
        if checked:
            rows.append(("bfloat16_checked_throughput_ratio", checked["throughput_ratio"],
                         f"{checked['morph_outcomes_differing']} of "
                         f"{checked['morph_outcomes']} morph outcomes differ from float32"))
    xla = report.get("xla_on_off", {})
    if xla:
        rows.append(("xla_throughput_ratio", xla["xla_throughput_ratio"],
                     f"{'GPU' if xla['gpu'] else 'CPU'} {xla['device'][:24]}: "
                     f"{xla['xla_on']['images_per_s']:.3g} vs "
                     f"{xla['xla_off']['images_per_s']:.3g} img/s (full budget); batch-1 p50 "
                     f"{xla['xla_on']['batch_1']['p50_ms']:.4g} vs "
                     f"{xla['xla_off']['batch_1']['p50_ms']:.4g} ms"))
    fm = report.get("feature_map_celeba_size", {})
    if fm:
        side = "x".join(map(str, fm["image_shape"]))
        rows.append(("feature_map_defense_images_per_s", fm["defense"]["images_per_s"],
                     f"{side}, {fm['classes']} classes, {fm['channels']} channels of "
                     f"{fm['map_size']}x{fm['map_size']}, all "
                     f"{fm['defense']['morphs_per_image']} morphs"))
        vae = ", ".join(f"{k} {v:.0f} ms" for k, v in fm["vae_step_ms"].items())
        rows.append(("feature_map_classifier_step_ms", fm["classifier_step_ms"],
                     f"batch {fm['batch_size']}; combo-VAE step {vae}"))
    rows.append(("peak_rss_mib", report["peak_rss_mib"], report["device"]["name"]))
    return rows


def format_table(report: dict) -> str:
    """The printed summary of a bench report: a Markdown-like table of the headline figures
    (led by an empty line) and a line of the settings."""
    rows = _table_rows(report)
    width = max(len(r[0]) for r in rows)
    lines = [f"\n| {'metric':{width}s} | {'value':>9s} | detail",
             f"|{'-' * (width + 2)}|{'-' * 11}|{'-' * 40}"]
    lines += [f"| {name:{width}s} | {_fmt(value):>9s} | {detail}" for name, value, detail in rows]
    s = report["settings"]
    lines.append(f"(m={s['num_codes']}, N={s['num_morphs']}, {s['n']} images, "
                 f"{'QUICK smoke-test sizes' if s['quick'] else 'full-size settings'})")
    return "\n".join(lines)


def earlier_sections(path: str, settings: dict, keys) -> dict:
    """The report keys `keys` of an existing bench report at `path`, kept as they were, so that
    a partial rerun never drops results ({} without `keys` or file). ValueError when the file
    is not JSON or was measured with other `CARRY_OVER_KEYS` `settings` (sizes, or another
    model file while a key outside `MODEL_FREE_KEYS` would be carried over)."""
    import json

    if not keys or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} exists but is not readable JSON ({e}); move it away or "
                         "choose another --out") from None
    old = earlier.get("settings", {})
    if not all(old.get(k) == settings.get(k) for k in CARRY_OVER_KEYS if k != "fmd_sha256"):
        raise ValueError(f"{path} holds a bench of other settings ({old.get('model')}, "
                         f"n={old.get('n')}); rerun all sections or choose another --out")
    if old.get("fmd_sha256") != settings.get("fmd_sha256"):
        stale = [k for k in keys if k in earlier and k not in MODEL_FREE_KEYS]
        if stale:
            sections = [s for s, key in SECTION_KEYS.items() if key in stale]
            raise ValueError(f"{path} was measured on another {settings.get('model')}/fmd.keras "
                             "(its fmd_sha256 differs: retrained or replaced); rerun the "
                             f"sections that run it ({','.join(sections)}) or choose another "
                             "--out")
    return {k: earlier[k] for k in keys if k in earlier}


# ----------------------------------------------------------------------------- run


def _step_ms(fit, steps: int) -> float:
    """Milliseconds per step of a Keras fit: `fit(k, callbacks)` fits k steps. After a warm-up
    fit of 2 steps that traces the train function, `steps` + 1 steps are fitted and the time
    from the end of the first to the end of the last is taken: the first step would include
    the input iterator's start, which on 2 CPU cores sometimes idles for seconds
    (`training.epoch_batches`)."""
    import keras

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                self.start = time.perf_counter()

        def on_train_end(self, logs=None):
            self.end = time.perf_counter()

    fit(2, [])
    clock = Clock()
    fit(steps + 1, [clock])
    return (clock.end - clock.start) / steps * 1e3


def training_card_figures(card: dict) -> dict:
    """Wall time (scaled by the peak its run recorded) and quality figures of a model card."""
    run = card["runs"][0]
    peaks = run.get("matmul_peak_flops")
    seconds = sum(run["stage_seconds"].values())
    scaled = None if not peaks else \
        seconds * (peaks["before"] + peaks["after"]) / 2 / REFERENCE_PEAK_FLOPS
    calibration = card.get("calibration", {})
    return {"command": run["command"], "stage_seconds": run["stage_seconds"],
            "seconds": seconds, "seconds_at_reference_peak": scaled,
            "matmul_peak_flops": peaks, "classifier_precision": card.get("classifier_precision"),
            **{k: card.get(k) for k in ("classifier_test_accuracy", "dgmm_test_accuracy",
                                        "recon_label_agreement", "recon_mse")},
            "val_false_positive_rate": calibration.get("val_false_positive_rate"),
            "budget": card.get("operating_point", {}).get("budget", {}).get("options")}


def _input_pipeline(exp, training, epochs: int = 4, images: int = 10_000) -> dict:
    """Seconds of `epochs` epochs of classifier training on `images` Fashion-MNIST images with
    Keras `fit` on numpy arrays (a new input iterator per epoch) and with
    `training.epoch_batches` (one endless iterator), the same model and steps, two runs of each
    alternated; `seconds` are the totals."""
    from fmd_tf.data import load_dataset

    (x, y), _ = load_dataset(exp.dataset)
    x, y = x[:images], y[:images]
    steps = epochs * -(-images // 128)
    def fit(name):
        model = training.new_classifier(exp, steps)
        if name == "numpy_fit":
            return model.fit(x, y, batch_size=128, epochs=epochs, verbose=0)
        return training._fit(model, x, y, 128, epochs, 0, [])

    runs = {"numpy_fit": [], "epoch_batches": []}
    for name in ("numpy_fit", "epoch_batches") * 2:  # alternated
        runs[name].append(_timed(fit, name)[1])
    # The waits come at about every other epoch, not in every run: the total of the runs,
    # not the best one, is what a training of many epochs pays.
    seconds = {name: float(sum(times)) for name, times in runs.items()}
    return {"epochs": epochs, "images": images, "runs": len(runs["numpy_fit"]),
            "run_seconds": runs, "seconds": seconds,
            "speedup": seconds["numpy_fit"] / seconds["epoch_batches"]}


def section_training(ctx) -> dict:
    """Full training from scratch (the card `cfg.training_card`; its own run's peak scales it)
    and, side by side here, the three changes it rests on: classifier steps in float32 vs
    mixed_bfloat16; combo-VAE steps with the frozen DGMM's and classifier's outputs computed
    in the loss vs precomputed once; the morph-budget trial run on the model vs replayed on the
    full budget's morph outcomes (`operating_point.budget_row`). Also what the code-use hinge
    (`ComboVAEConfig.code_use_weight`, one more decoder pass) costs a combo-VAE step."""
    import dataclasses
    import json

    import keras

    from fmd_tf import training
    from fmd_tf.config import get_config
    from fmd_tf.data import load_dataset
    from fmd_tf.operating_point import OperatingPointConfig, budget_row

    cfg, fmd, default = ctx["cfg"], ctx["fmd"], ctx["default"]
    steps, batch = cfg.training_steps, 128
    exp = get_config(cfg.dataset)
    (x_train, y_train), _ = load_dataset(cfg.dataset)
    count = (steps + 2) * batch
    x_train, y_train = x_train[:count], y_train[:count]
    result = {"steps": steps, "batch_size": batch}

    classifier_ms = {}
    for policy in ("float32", "mixed_bfloat16"):
        with training.dtype_policy(policy):
            clf = training.new_classifier(exp, steps=steps + 2)
        classifier_ms[policy] = _step_ms(lambda k, cb, m=clf: m.fit(
            x_train[: k * batch], y_train[: k * batch], batch_size=batch, verbose=0,
            callbacks=cb), steps)
    result["classifier_step_ms"] = {**classifier_ms, "speedup": classifier_ms["float32"]
                                    / classifier_ms["mixed_bfloat16"],
                                    "chosen_here": training.training_precision("auto")}
    result["input_pipeline"] = _input_pipeline(exp, training)

    def combo_vae(policy, **changes):
        c = dataclasses.replace(exp, combo=dataclasses.replace(exp.combo, vae_precision=policy,
                                                               **changes))
        combo = training.new_combo_vae(c, training.get_strategy("default"), 0)
        combo.set_consistency_classifier(fmd.classifier)
        combo.compile(optimizer=keras.optimizers.Adam(1e-3))
        return combo

    combo = combo_vae("float32")
    targets = {"zu": combo.dgmm.predict(x_train, batch_size=512, verbose=0),
               "logits": fmd.classifier.predict(x_train, batch_size=512, verbose=0)}

    def with_targets(model):
        return lambda k, cb: model.fit(x_train[: k * batch],
                                       {n: v[: k * batch] for n, v in targets.items()},
                                       batch_size=batch, verbose=0, callbacks=cb)

    vae_ms = {
        "in_loss": _step_ms(lambda k, cb: combo.fit(x_train[: k * batch], batch_size=batch,
                                                    verbose=0, callbacks=cb), steps),
        "precomputed": _step_ms(with_targets(combo), steps),
        "precomputed_mixed_bfloat16": _step_ms(with_targets(combo_vae("mixed_bfloat16")),
                                               steps),
        "precomputed_mixed_bfloat16_without_code_use": _step_ms(with_targets(combo_vae(
            "mixed_bfloat16", code_use_weight=0.0)), steps)}
    result["vae_step_ms"] = {
        **vae_ms, "speedup": vae_ms["in_loss"] / vae_ms["precomputed"],
        "mixed_bfloat16_speedup": vae_ms["precomputed"] / vae_ms["precomputed_mixed_bfloat16"],
        # what the code-use hinge (one more decoder pass) costs a step, at the config's weight
        "code_use_weight": exp.combo.code_use_weight,
        "code_use_cost": vae_ms["precomputed_mixed_bfloat16"]
        / vae_ms["precomputed_mixed_bfloat16_without_code_use"],
        "chosen_here": training.training_precision(exp.combo.vae_precision)}

    # One budget candidate (the model's own) on clean and FGSM CLE images.
    n = min(len(ctx["x"]), 64)
    x, x_adv = ctx["x"][:n], _adversarial(ctx, ctx["x"][:n], ctx["y"][:n])
    options = {k: getattr(default, k) for k in ("adaptive_budget", "adaptive_round",
                                                 "adaptive_refine_codes")}
    variant_model = fmd.copy_with(**options)
    start = time.perf_counter()
    ran = {name: variant_model.defend_with_stats(images) for name, images in
           (("clean", x), ("fgsm", x_adv))}
    model_seconds = time.perf_counter() - start
    sets = {name: (fmd.defend_with_stats(images, outcomes=True)["morph_outcomes"],
                   fmd.reconstruction_error(images))
            for name, images in (("clean", x), ("fgsm", x_adv))}
    start = time.perf_counter()
    row = budget_row(fmd, options, sets)
    replay_seconds = time.perf_counter() - start
    replayed = [variant_model.adaptive_resistance_on_outcomes(sets[k][0]) for k in ran]
    identical = all(np.array_equal(r, ran[k]["resistance"]) and
                    np.array_equal(u, ran[k]["morphs_used"])
                    for (r, u), k in zip(replayed, ran, strict=True))
    trials = len(OperatingPointConfig().budgets)
    result["budget_trial"] = {
        "images": {"clean": n, "fgsm": n}, "options": options,
        "model_seconds": model_seconds, "replay_seconds": replay_seconds,
        "speedup": model_seconds / max(replay_seconds, 1e-9),
        "replay_identical_to_model": bool(identical),
        "verdict_agreement": row["verdict_agreement"],
        "note": f"training tries up to {trials} candidates on "
                f"{OperatingPointConfig().n_attack} clean + "
                f"{OperatingPointConfig().n_attack} per attack VAL images"}

    if os.path.isfile(cfg.training_card):
        with open(cfg.training_card) as f:
            result["full_training"] = training_card_figures(json.load(f))
        result["full_training"]["card"] = cfg.training_card
    else:
        result["full_training"] = None
        result["full_training_note"] = f"{cfg.training_card} not found"
    return result


STEPS = {"speed": section_speed, "roofline": section_roofline, "attacks": section_attacks,
         "serving": section_serving, "serving_load": section_serving_load,
         "default": section_default, "bf16": section_bf16, "xla": section_xla,
         "demo": section_demo, "tests": section_tests, "training": section_training,
         "feature_map": section_feature_map}


def prepare(cfg: BenchConfig) -> dict:
    """The context of `measure`: the loaded defense and images, the report's device and
    settings, and the sections carried over from `cfg.out`. Raises FileNotFoundError (no
    fmd.keras) and ValueError (not calibrated, too few CLE images, an `cfg.out` of other
    settings: `earlier_sections`) before anything is measured."""
    import keras
    import tensorflow as tf

    import fmd_tf  # noqa: F401  (registers the Keras classes)
    from fmd_tf.data import paper_splits

    fmd_path = os.path.join(cfg.model, "fmd.keras")
    if not os.path.isfile(fmd_path):
        raise FileNotFoundError(f"{fmd_path} not found")
    sha256 = file_sha256(fmd_path)
    default = keras.models.load_model(fmd_path)
    if not default.is_calibrated:
        raise ValueError(f"{cfg.model}/fmd.keras is not calibrated")
    # The inner-loop sections (speed, roofline, bf16) measure all m·N morphs in float32, the
    # reference that the default path is compared with.
    fmd = default.copy_with(**default.FULL_BUDGET)
    splits = paper_splits(cfg.dataset, cfg.seed)
    count = max(cfg.n, cfg.attack_n, cfg.default_n)
    if count > len(splits.x_cle):
        raise ValueError(f"--n / --attack-n / --default-n must be <= {len(splits.x_cle)} CLE "
                         "images")
    x_all = np.ascontiguousarray(splits.x_cle[:count])
    report = {"device": {**device_info(), "matmul_peak_flops": _peak(cfg),
                         "reference_peak_flops": REFERENCE_PEAK_FLOPS}}
    report["settings"] = {
        "quick": cfg.quick, "model": cfg.model, "n": cfg.n, "naive_n": cfg.naive_n,
        "attack_n": cfg.attack_n, "default_n": cfg.default_n, "batch_size": cfg.batch_size,
        "num_codes": fmd.num_codes, "num_morphs": fmd.num_morphs, "chunk_size": fmd.chunk_size,
        "jit_compile": fmd.jit_compile if fmd.jit_compile is not None
        else bool(tf.config.list_physical_devices("GPU")),
        "sections": list(cfg.sections), "keras": keras.__version__,
        "default_budget": {k: getattr(default, k) for k in (
            "adaptive_budget", "adaptive_round", "adaptive_alpha", "adaptive_refine_codes",
            "adaptive_order", "morph_dtype")},
        "fgsm_eps": cfg.eps, "fmd_sha256": sha256,
    }
    carried = earlier_sections(cfg.out, report["settings"],
                               [key for s, key in SECTION_KEYS.items() if s not in cfg.sections])
    report.update(carried)
    if carried:
        report["carried_over"] = sorted(carried)
    return {"fmd": fmd, "default": default, "cfg": cfg, "x": x_all[: cfg.n],
            "y": splits.y_cle[: cfg.n], "x_all": x_all, "x_default": x_all[: cfg.default_n],
            "y_default": splits.y_cle[: cfg.default_n], "report": report}


def matmul_peak_flops(size: int = 2048, reps: int = 5) -> float:
    """This machine's float32 matmul FLOP/s now (best of `reps` size² matmuls): the speed that
    wall times are scaled by (`REFERENCE_PEAK_FLOPS`)."""
    return matmul_flops_per_s(size, "float32", reps)["flops_per_s"]


def _peak(cfg: BenchConfig) -> float:
    return matmul_peak_flops(cfg.matmul_size, 3 if cfg.quick else 7)


def measure(ctx: dict, verbose: int = 1) -> dict:
    """Runs the sections of `ctx["cfg"]` (`prepare`), writing the report to `cfg.out` after each
    (marked "incomplete") and at the end; returns it."""
    cfg, report = ctx["cfg"], ctx["report"]
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    for section, key in SECTION_KEYS.items():
        if section in cfg.sections:
            if verbose:
                print(f"[bench] {section} ...", flush=True)
            before = _peak(cfg)
            report[key], seconds = _timed(STEPS[section], ctx)
            after = _peak(cfg)
            # Shared machines change speed: each section keeps the peak measured around it.
            report[key]["matmul_peak_flops"] = {"before": before, "after": after}
            _scale_times(report[key], (before + after) / 2)
            report[key]["section_seconds"] = seconds
            report[key]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            write_json(cfg.out, {**report, "incomplete": True})  # keep finished sections
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    write_json(cfg.out, report)
    return report


def run_bench(cfg: BenchConfig, verbose: int = 1) -> dict:
    """`measure(prepare(cfg))`: the bench report, also written to `cfg.out`."""
    return measure(prepare(cfg), verbose)

"""Performance measurements of FM-Defense (`scripts/bench.py`; its docstring defines each figure).

    from fmd_tf.evaluation.bench import BenchConfig, format_table, run_bench
    report = run_bench(BenchConfig(model="saved_models/fmnist", out="results/bench.json"))
    print(format_table(report))

Sections (`SECTIONS`, each a function of a context dict that `prepare` builds, writing one
report key): the speedup over a naive eager loop (`naive_defend`), the share of the machine's
matmul FLOP/s (`graph_flops`, `matmul_flops_per_s`), own attacks vs ART's, serving latency of
the exported SavedModel, the adaptive morph budget and bfloat16 morphs. `measure` runs the
chosen sections, keeps the others of an existing report of the same model file and sizes
(`earlier_sections`), and writes the report after each section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from fmd_tf.files import write_json

__all__ = [
    "SECTIONS", "SECTION_KEYS", "BenchConfig", "device_info", "earlier_sections",
    "file_sha256", "format_table", "graph_flops", "matmul_flops_per_s", "measure",
    "naive_defend", "prepare", "quick_sizes", "run_bench", "variant",
]

SECTIONS = ("speed", "roofline", "attacks", "serving", "adaptive", "bf16")
# section -> its key in the report
SECTION_KEYS = {"speed": "speedup_vs_naive", "roofline": "roofline_share",
                "attacks": "attack_speedup_vs_art", "serving": "serving_latency",
                "adaptive": "adaptive_budget", "bf16": "bfloat16_vs_float32"}
# Settings an earlier report must share for its sections to be carried over.
CARRY_OVER_KEYS = ("model", "n", "attack_n", "quick", "fmd_sha256")


@dataclass(frozen=True)
class BenchConfig:
    """What `run_bench` measures, and where the report goes (`scripts/bench.py`'s options)."""

    model: str = "saved_models/fmnist"  # directory holding fmd.keras
    dataset: str = "fmnist"
    out: str = "results/bench.json"
    n: int = 256  # CLE images for the throughput figures
    naive_n: int = 4  # images timed by the naive loop
    attack_n: int = 100
    batch_size: int = 64
    eps: float = 0.3  # FGSM L∞ budget (adaptive, bf16)
    adaptive_round: int = 10
    adaptive_alpha: float = 0.01
    adaptive_refine: int = 1  # adaptive_refine_codes of the `refined` variant
    matmul_size: int = 2048
    latency_reps: tuple[int, int] = (50, 10)  # timed serving calls at batch 1 and batch 64
    cw_iterations: int = 100
    cw_search_steps: int = 5
    df_iterations: int = 50
    art_attacks: tuple[str, ...] = ("deepfool", "cw")  # the others are carried over
    sections: tuple[str, ...] = SECTIONS
    seed: int = 0
    quick: bool = False  # smoke-test sizes (`quick_sizes`), recorded in the report

    def __post_init__(self):
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
        if not self.art_attacks or set(self.art_attacks) - {"deepfool", "cw"}:
            raise ValueError(f"art_attacks: choose from deepfool, cw, got {self.art_attacks}")
        for name in ("n", "naive_n", "attack_n", "batch_size", "adaptive_round", "matmul_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.naive_n > self.n:
            raise ValueError(f"naive_n ({self.naive_n}) must be <= n ({self.n})")


def quick_sizes(settings: dict) -> dict:
    """The smoke-test sizes of `--quick` for the `BenchConfig` field values in `settings`."""
    return {"n": min(settings["n"], 16), "naive_n": 1,
            "attack_n": min(settings["attack_n"], 4), "matmul_size": 1024,
            "latency_reps": (5, 2), "cw_iterations": 10, "cw_search_steps": 2,
            "df_iterations": 20}




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
        import keras
        from art.attacks.evasion import CarliniL2Method, DeepFool
        from art.estimators.classification import TensorFlowV2Classifier
    except ImportError as e:
        return {"skipped": f"ART not importable (pip install -e '.[dev]'): {e}"}
    clf = fmd.classifier
    x = ctx["x_all"][: cfg.attack_n]
    batch = 128
    art_clf = TensorFlowV2Classifier(
        model=clf, nb_classes=int(clf(x[:1]).shape[-1]), input_shape=tuple(x.shape[1:]),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0),
    )
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


def section_serving(ctx) -> dict:
    import tensorflow as tf

    from fmd_tf.export import export_serving

    fmd, cfg = ctx["fmd"], ctx["cfg"]
    x = ctx["x"]
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_serving(fmd, tmp, version=1)
        fn = tf.saved_model.load(path).signatures["serving_default"]
        for batch, reps in ((1, cfg.latency_reps[0]), (64, cfg.latency_reps[1])):
            images = tf.constant(np.resize(x, (batch, *x.shape[1:])))
            for _ in range(2):  # warm-up
                fn(images=images)["label"].numpy()
            times = []
            for _ in range(reps):
                _, t = _timed(lambda images=images: fn(images=images)["label"].numpy())
                times.append(1000.0 * t)
            result[f"batch_{batch}"] = {
                "p50_ms": float(np.percentile(times, 50)),
                "p99_ms": float(np.percentile(times, 99)),
                "mean_ms": float(np.mean(times)), "reps": reps,
                "images_per_s": 1000.0 * batch / float(np.median(times)),
            }
    result["note"] = "tf.saved_model.load in this process (no TF Serving server / network)"
    return result


def _adversarial(ctx):
    if "x_adv" not in ctx:
        from fmd_tf.attacks import fgsm

        ctx["x_adv"] = fgsm(ctx["fmd"].classifier, ctx["x"], eps=ctx["cfg"].eps, y=ctx["y"])
    return ctx["x_adv"]


def section_adaptive(ctx) -> dict:
    from fmd_tf.evaluation.harness import fm_scores
    from fmd_tf.evaluation.metrics import roc_auc

    fmd, x, cfg = ctx["fmd"], ctx["x"], ctx["cfg"]
    x_adv = _adversarial(ctx)
    options = dict(adaptive_budget=True, adaptive_round=cfg.adaptive_round,
                   adaptive_alpha=cfg.adaptive_alpha)
    models = {"full": fmd, "adaptive": variant(fmd, **options),
              "adaptive_refined": variant(fmd, adaptive_refine_codes=cfg.adaptive_refine,
                                          **options),
              "refined_search_order": variant(fmd, adaptive_refine_codes=cfg.adaptive_refine,
                                              adaptive_order="search", **options)}
    theta = fmd.theta_r.numpy()
    bs = cfg.batch_size
    for model in models.values():  # warm-up / trace
        model.defend_with_stats(x[:bs], batch_size=bs)
    runs = {}
    for name, model in models.items():
        clean, t_clean = _timed(model.defend_with_stats, x, batch_size=bs)
        adv, t_adv = _timed(model.defend_with_stats, x_adv, batch_size=bs)
        runs[name] = {"clean": clean, "adv": adv, "seconds": t_clean + t_adv}
    ctx["adaptive_runs"] = runs
    full = runs["full"]

    def morphs(run):
        return float(np.mean(np.concatenate([run["clean"]["morphs_used"].sum(1),
                                             run["adv"]["morphs_used"].sum(1)])))

    def auc(run):
        return roc_auc(fm_scores(run["clean"], theta), fm_scores(run["adv"], theta))

    def agree(run, key):
        return float(np.mean(np.concatenate([run[s][key] == full[s][key]
                                             for s in ("clean", "adv")])))

    def summary(name):
        run = runs[name]
        return {
            "mean_morphs_per_image": morphs(run),
            "mean_morphs_per_image_clean": float(run["clean"]["morphs_used"].sum(1).mean()),
            "mean_morphs_per_image_adv": float(run["adv"]["morphs_used"].sum(1).mean()),
            "morph_reduction": morphs(full) / morphs(run),
            "auc": auc(run),
            "auc_minus_full": auc(run) - auc(full),
            "verdict_agreement": agree(run, "verdict"),
            "detection_rate_adv": float(np.mean(run["adv"]["verdict"] != 0)),
            "false_positive_rate_clean": float(np.mean(run["clean"]["verdict"] != 0)),
            "throughput_ratio": full["seconds"] / run["seconds"],
            "images_per_s": 2 * len(x) / run["seconds"],
        }

    ada, refined = summary("adaptive"), summary("adaptive_refined")
    search = summary("refined_search_order")
    return {
        **{k: ada[k] for k in ("mean_morphs_per_image", "mean_morphs_per_image_clean",
                               "mean_morphs_per_image_adv", "morph_reduction",
                               "verdict_agreement", "throughput_ratio")},
        "auc_adaptive": ada["auc"], "auc_full": auc(full),
        "full_morphs_per_image": morphs(full),
        "detection_rate_adv": {"full": float(np.mean(full["adv"]["verdict"] != 0)),
                               "adaptive": ada["detection_rate_adv"]},
        "false_positive_rate_clean": {"full": float(np.mean(full["clean"]["verdict"] != 0)),
                                      "adaptive": ada["false_positive_rate_clean"]},
        "images_per_s": {"full": 2 * len(x) / full["seconds"], "adaptive": ada["images_per_s"]},
        "refined": refined,
        "refined_search_order": search,
        "order": models["adaptive"].adaptive_order,
        "round_size": cfg.adaptive_round, "alpha": cfg.adaptive_alpha,
        "attack": f"FGSM eps={cfg.eps} on the same {len(x)} images (all, successful or not)",
        "score": "max_i(theta_r_i - r_i)",
        "refine_codes": cfg.adaptive_refine,
        "refined_note": f"adaptive_refine_codes={cfg.adaptive_refine}: each image's codes with "
                        "the lowest r - theta_r estimates then draw all N morphs",
    }


def section_bf16(ctx) -> dict:
    fmd, x, cfg = ctx["fmd"], ctx["x"], ctx["cfg"]
    x_adv = _adversarial(ctx)
    bf16 = variant(fmd, morph_dtype="bfloat16")
    bs = cfg.batch_size
    for model in (fmd, bf16):
        model.defend(x[:bs], batch_size=bs)
    ref, t_f32 = _timed(fmd.defend, x, batch_size=bs)
    out, t_bf16 = _timed(bf16.defend, x, batch_size=bs)
    if "adaptive_runs" in ctx:  # the same float32 model on the same images: reuse
        ref_adv = ctx["adaptive_runs"]["full"]["adv"]
    else:
        ref_adv = fmd.defend(x_adv, batch_size=bs)
    out_adv = bf16.defend(x_adv, batch_size=bs)
    r_diff = np.abs(np.concatenate([out["resistance"] - ref["resistance"],
                                    out_adv["resistance"] - ref_adv["resistance"]]))
    result = {
        "throughput_ratio": t_f32 / t_bf16,
        "images_per_s": {"float32": len(x) / t_f32, "bfloat16": len(x) / t_bf16},
        "verdict_agreement_clean": float(np.mean(out["verdict"] == ref["verdict"])),
        "verdict_agreement_adv": float(np.mean(out_adv["verdict"] == ref_adv["verdict"])),
        "verdict_agreement": float(np.mean(np.concatenate(
            [out["verdict"] == ref["verdict"], out_adv["verdict"] == ref_adv["verdict"]]))),
        "resistance_mean_abs_diff": float(r_diff.mean()),
        "resistance_max_abs_diff": float(r_diff.max()),
        "label_agreement": float(np.mean(np.concatenate([out["label"] == ref["label"],
                                                         out_adv["label"] == ref_adv["label"]]))),
    }
    if "peak_bf16" in ctx and "roofline_share" in ctx["report"]:
        per_image = ctx["report"]["roofline_share"]["flops_per_image"]
        result["roofline_share_vs_bf16_matmul"] = (
            len(x) * per_image / t_bf16 / ctx["peak_bf16"]["flops_per_s"])
    return result


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
    for key in ("batch_1", "batch_64"):
        if key in serving:
            rows.append((f"serving_{key}_p50_ms", serving[key]["p50_ms"],
                         f"p99 {serving[key]['p99_ms']:.3g} ms over {serving[key]['reps']} calls"))
    ada = report.get("adaptive_budget", {})
    if ada:
        rows += [("adaptive_mean_morphs_per_image", ada["mean_morphs_per_image"],
                  f"full budget {ada['full_morphs_per_image']:.0f}"),
                 ("adaptive_auc", ada["auc_adaptive"], f"full budget {ada['auc_full']:.3f}"),
                 ("adaptive_throughput_ratio", ada["throughput_ratio"],
                  f"verdict agreement {ada['verdict_agreement']:.3f}")]
        ref = ada.get("refined")
        if ref:
            rows += [("refined_mean_morphs_per_image", ref["mean_morphs_per_image"],
                      f"reduction {ref['morph_reduction']:.2f}x"),
                     ("refined_auc", ref["auc"], f"minus full {ref['auc_minus_full']:+.4f}, "
                      f"verdict agreement {ref['verdict_agreement']:.3f}")]
        old = ada.get("refined_search_order")
        if old:
            rows.append(("refined_search_order_auc", old["auc"],
                         f"minus full {old['auc_minus_full']:+.4f}, "
                         f"{old['mean_morphs_per_image']:.0f} morphs/image"))
    bf = report.get("bfloat16_vs_float32", {})
    if bf:
        rows.append(("bfloat16_throughput_ratio", bf["throughput_ratio"],
                     f"verdict agreement {bf['verdict_agreement']:.3f}"))
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


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes: which fmd.keras a bench measured."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def earlier_sections(path: str, settings: dict, keys) -> dict:
    """The report keys `keys` of an existing bench report at `path`, kept as they were, so that
    a partial rerun never drops results ({} without `keys` or file). ValueError when the file
    is not JSON or was measured with other `CARRY_OVER_KEYS` `settings` (another model file,
    sizes)."""
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
        raise ValueError(f"{path} was measured on another {settings.get('model')}/fmd.keras "
                         "(its fmd_sha256 differs: retrained or replaced); rerun all sections "
                         "or choose another --out")
    return {k: earlier[k] for k in keys if k in earlier}


# ----------------------------------------------------------------------------- run


STEPS = {"speed": section_speed, "roofline": section_roofline, "attacks": section_attacks,
         "serving": section_serving, "adaptive": section_adaptive, "bf16": section_bf16}


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
    fmd = keras.models.load_model(fmd_path)
    if not fmd.is_calibrated:
        raise ValueError(f"{cfg.model}/fmd.keras is not calibrated")
    splits = paper_splits(cfg.dataset, cfg.seed)
    count = max(cfg.n, cfg.attack_n)
    if count > len(splits.x_cle):
        raise ValueError(f"--n / --attack-n must be <= {len(splits.x_cle)} CLE images")
    x_all = np.ascontiguousarray(splits.x_cle[:count])
    if cfg.quick and cfg.adaptive_round >= fmd.num_morphs:  # e.g. N = 8 on the quick model
        cfg = dataclasses.replace(cfg, adaptive_round=max(1, fmd.num_morphs // 4))
    report = {"device": device_info()}
    report["settings"] = {
        "quick": cfg.quick, "model": cfg.model, "n": cfg.n, "naive_n": cfg.naive_n,
        "attack_n": cfg.attack_n, "batch_size": cfg.batch_size, "num_codes": fmd.num_codes,
        "num_morphs": fmd.num_morphs, "chunk_size": fmd.chunk_size,
        "jit_compile": fmd.jit_compile if fmd.jit_compile is not None
        else bool(tf.config.list_physical_devices("GPU")),
        "sections": list(cfg.sections), "keras": keras.__version__,
        "adaptive_round": cfg.adaptive_round, "adaptive_alpha": cfg.adaptive_alpha,
        "fgsm_eps": cfg.eps, "fmd_sha256": sha256,
    }
    carried = earlier_sections(cfg.out, report["settings"],
                               [key for s, key in SECTION_KEYS.items() if s not in cfg.sections])
    report.update(carried)
    if carried:
        report["carried_over"] = sorted(carried)
    return {"fmd": fmd, "cfg": cfg, "x": x_all[: cfg.n], "y": splits.y_cle[: cfg.n],
            "x_all": x_all, "report": report}


def measure(ctx: dict, verbose: int = 1) -> dict:
    """Runs the sections of `ctx["cfg"]` (`prepare`), writing the report to `cfg.out` after each
    (marked "incomplete") and at the end; returns it."""
    cfg, report = ctx["cfg"], ctx["report"]
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    for section, key in SECTION_KEYS.items():
        if section in cfg.sections:
            if verbose:
                print(f"[bench] {section} ...", flush=True)
            report[key], seconds = _timed(STEPS[section], ctx)
            report[key]["section_seconds"] = seconds
            report[key]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            write_json(cfg.out, {**report, "incomplete": True})  # keep finished sections
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    write_json(cfg.out, report)
    return report


def run_bench(cfg: BenchConfig, verbose: int = 1) -> dict:
    """`measure(prepare(cfg))`: the bench report, also written to `cfg.out`."""
    return measure(prepare(cfg), verbose)
